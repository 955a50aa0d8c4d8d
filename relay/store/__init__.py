"""The store: accounts, mailboxes, delivery, the quota ledger.

The interface is relay.store.api (typed Protocols; docs/architecture.md, "relay.store";
docs/store.md explains the design). Backends: relay.store.maildir (Maildir + sqlite, the
default). The names below are the Maildir engine's, kept for the admin tools and tests that
use it directly.
"""

from relay.store.address import normalize_address
from relay.store.api import Account, MailboxStats, StoreStats, Usage
from relay.store.errors import (
    AccountExists,
    AddressError,
    NoSuchAccount,
    NoSuchMessage,
    QuotaExceeded,
    StorageFull,
    StoreError,
    StoreUnavailable,
)
from relay.store.maildir import Delivery, Mailbox, MessageInfo, Store
from relay.store.maildir import Held as Reservation

__all__ = ["Account", "AccountExists", "AddressError", "Delivery", "Mailbox", "MailboxStats", "MessageInfo",
           "NoSuchAccount", "NoSuchMessage", "QuotaExceeded", "Reservation", "StorageFull", "Store", "StoreError",
           "StoreStats", "StoreUnavailable", "Usage", "normalize_address"]
