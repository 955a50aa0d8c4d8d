"""The store on PostgreSQL (issue 14): accounts, the mailbox index, the quota ledger with
in-flight reservations, the change feed (LISTEN/NOTIFY) and message bodies, shared by any
number of relay nodes. docs/cluster.md explains the design and its operation."""

from relay.store.postgresql.bodies import BodyStore, PgBodyStore
from relay.store.postgresql.schema import latest_version, migrate
from relay.store.postgresql.store import PgStore

__all__ = ["BodyStore", "PgBodyStore", "PgStore", "latest_version", "migrate"]
