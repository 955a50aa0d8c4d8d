"""Store: the account database, the Maildirs, delivery, the quota ledger."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from relay.config import Config
from relay.log import get_logger
from relay.stats import WAIT_SECONDS, Histogram
from relay.store.address import normalize_address, normalize_domain
from relay.store.api import (
    ChangeKind,
    Envelope,
    MailboxStats,
    Refusal,
    StoreStats,
    Usage,
)
from relay.store.errors import AddressError, NoSuchAccount, StoreError
from relay.store.maildir.accounts import Accounts
from relay.store.maildir.db import Database
from relay.store.maildir.delivery import Delivery
from relay.store.maildir.ledger import MaildirLedger
from relay.store.maildir.mailbox import Mailbox, MessageInfo

log = get_logger("store")


Subscriber = Callable[..., None]    # (kind, nbytes, nmessages), or (address, ...) for all


class Store:
    def __init__(self, config: Config, db: Database) -> None:
        self.config = config
        self.data_dir = Path(config.data_dir)
        self.mail_root = self.data_dir / "mail"
        self.db = db
        self.accounts = Accounts(db, self.mail_root, on_delete=self._forget)
        self.ledger = MaildirLedger(self)
        self._subscribers: dict[str | None, list[Subscriber]] = {}
        self._pending: set[str] = set()      # names being committed (not yet in the index)
        # address -> (version, messages): Mailbox.messages() between changes
        self._messages_cache: dict[str, tuple[tuple[int, int, tuple[int, int]], list[MessageInfo]]] = {}
        self._counts = {"stored": 0, "stored_bytes": 0, "deleted": 0, "deleted_bytes": 0}
        self._fetch_latency = Histogram(WAIT_SECONDS)
        self._delete_latency = Histogram(WAIT_SECONDS)

    @classmethod
    def open(cls, config: Config) -> Store:
        data_dir = Path(config.data_dir)
        try:
            (data_dir / "mail").mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"{data_dir}: cannot create the data directory: {e.strerror}") from e
        return cls(config, Database(data_dir / "relay.db"))

    def close(self) -> None:
        self.db.close()

    # --- accounts ------------------------------------------------------------------------

    def is_local_domain(self, domain: str) -> bool:
        """A domain with at least one account (read from the database each time: an account
        added by the admin CLI counts at once)."""
        try:
            d = normalize_domain(domain)
        except AddressError:
            return False
        return self.db.one("SELECT 1 FROM accounts WHERE domain=? LIMIT 1", (d,)) is not None

    def _forget(self, address: str) -> None:
        self._subscribers.pop(address, None)
        self.ledger.forget(address)
        self._messages_cache.pop(address, None)

    # --- delivery ------------------------------------------------------------------------

    def delivery(self, envelope: Envelope) -> Delivery:
        """A delivery (relay.store.api.Delivery): recipients come with add_recipient()."""
        return Delivery(self, envelope)

    def begin_delivery(self, sender: str, recipients: list[str], session_id: str = "",
                       helo: str = "", peer: str | None = None, protocol: str = "ESMTP") -> Delivery:
        """A delivery to existing accounts (NoSuchAccount otherwise), without reservations,
        its tmp file open: the admin tools' and tests' way in."""
        d = Delivery(self, Envelope(sender, session_id, helo, peer, protocol))
        for r in recipients:
            if d.add(r, 0, reserve=False) is Refusal.NO_SUCH_ACCOUNT:
                raise NoSuchAccount(f"{normalize_address(r)}: no such account")
        d.write(b"")
        return d

    def _index_new(self, recipients: list[str], name: str, size: int, when: float,
                   mtimes: list[tuple[int, int]]) -> None:
        """One transaction: a row per recipient (next UID), the ledger, the new/ mtime."""
        with self.db.transaction() as c:
            for addr, (before, after) in zip(recipients, mtimes, strict=True):
                row = c.execute("SELECT uidnext, new_mtime FROM accounts WHERE address=?", (addr,)).fetchone()
                if row is None:
                    raise NoSuchAccount(f"{addr}: account deleted during delivery")
                if c.execute("SELECT 1 FROM messages WHERE address=? AND name=?", (addr, name)).fetchone():
                    continue      # `relay quota recalc` (another process) indexed it already
                uid = row["uidnext"]
                c.execute("INSERT INTO messages(address, uid, name, size, internaldate, location)"
                          " VALUES (?,?,?,?,?,?)", (addr, uid, name, size, when, f"new/{name}"))
                new_mtime = after if row["new_mtime"] == before else row["new_mtime"]
                c.execute("UPDATE accounts SET uidnext=?, usage_bytes=usage_bytes+?,"
                          " usage_messages=usage_messages+1, new_mtime=? WHERE address=?",
                          (uid + 1, size, new_mtime, addr))
        self._counts["stored"] += len(recipients)
        self._counts["stored_bytes"] += size * len(recipients)

    def _record_deleted(self, address: str, removed: list[tuple[int, float]]) -> None:
        """(size, seconds since delivery) of messages gone from a mailbox: counters,
        latency histogram, "expunge" notification (the drain rate)."""
        for size, age in removed:
            self._delete_latency.observe(max(0.0, age))
        nbytes = sum(s for s, _ in removed)
        self._counts["deleted"] += len(removed)
        self._counts["deleted_bytes"] += nbytes
        self._notify(address, ChangeKind.EXPUNGE, nbytes, len(removed))

    # --- mailboxes -----------------------------------------------------------------------

    def mailbox(self, address: str) -> Mailbox:
        """The account's INBOX (NoSuchAccount if there is none)."""
        return Mailbox(self, self.accounts.require(address))

    def note_poll(self, address: str) -> None:
        """IMAP/POP3 call this at each successful login (last poll time, for metrics/alerts)."""
        with self.db.transaction(durable=False, bookkeeping=True) as c:
            c.execute("UPDATE accounts SET last_poll=? WHERE address=?", (time.time(), normalize_address(address)))

    # --- notifications -------------------------------------------------------------------

    def subscribe(self, address: str | None, callback: Subscriber) -> Callable[[], None]:
        """callback(kind, nbytes, nmessages) after each durable "new"/"expunge" change of this
        process to that mailbox; with address None, callback(address, kind, nbytes, nmessages)
        for every mailbox. Returns the function that unsubscribes."""
        addr = None if address is None else normalize_address(address)
        subs = self._subscribers.setdefault(addr, [])
        subs.append(callback)

        def unsubscribe() -> None:
            if callback in subs:
                subs.remove(callback)
        return unsubscribe

    def _notify(self, address: str, kind: ChangeKind, nbytes: int, nmessages: int) -> None:
        self.ledger.on_change(address, kind)
        calls: list[tuple[Subscriber, tuple[object, ...]]] = [
            (cb, (kind.value, nbytes, nmessages)) for cb in self._subscribers.get(address, ())]
        calls += [(cb, (address, kind.value, nbytes, nmessages)) for cb in self._subscribers.get(None, ())]
        for cb, args in calls:
            try:
                cb(*args)
            except Exception as e:  # noqa: BLE001  (a subscriber must not break delivery)
                log.error("subscriber-failed", address=address, kind=kind, error=repr(e))

    # --- quota ---------------------------------------------------------------------------

    def usage(self, address: str) -> Usage:
        return self.ledger.usage(address)

    # --- statistics ----------------------------------------------------------------------

    def statistics(self) -> StoreStats:
        now = time.time()
        rows = self.db.query(
            "SELECT a.address, a.usage_bytes, a.usage_messages, a.quota_bytes, a.quota_messages,"
            " a.last_poll, (SELECT MIN(internaldate) FROM messages m WHERE m.address=a.address)"
            " FROM accounts a")
        q = self.config.quota
        mailboxes = {
            r[0]: MailboxStats(r[1], r[2], max(0.0, now - r[6]) if r[6] is not None else 0.0,
                               q.default_bytes if r[3] is None else r[3],
                               q.default_messages if r[4] is None else r[4], r[5] or 0.0)
            for r in rows}
        c = self._counts
        return StoreStats(len(rows), c["stored"], c["stored_bytes"], c["deleted"], c["deleted_bytes"],
                          sum(m.backlog_bytes for m in mailboxes.values()),
                          sum(m.backlog_messages for m in mailboxes.values()), mailboxes,
                          self._fetch_latency.snapshot(), self._delete_latency.snapshot())
