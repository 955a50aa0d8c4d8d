"""Store: the account database, the Maildirs, delivery, the quota ledger."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from relay.config import Config
from relay.log import get_logger
from relay.metrics import WAIT_SECONDS, Histogram
from relay.store.maildir import names
from relay.store.api import ChangeKind, Envelope, MailboxStats, Refusal, StoreStats, Usage
from relay.store.maildir.accounts import Accounts
from relay.store.address import normalize_address, normalize_domain
from relay.store.maildir.db import Database
from relay.store.maildir.delivery import LIVE_TMP, Delivery
from relay.store.maildir.ledger import MaildirLedger
from relay.store.errors import AddressError, NoSuchAccount, StoreError
from relay.store.maildir.mailbox import Mailbox, MessageInfo

log = get_logger("store")

STALE_TMP_SECONDS = 36 * 3600     # Maildir convention: tmp/ files older than 36 h are garbage

Subscriber = Callable[[str, int, int], None]


class Store:
    def __init__(self, config: Config, db: Database) -> None:
        self.config = config
        self.data_dir = Path(config.data_dir)
        self.mail_root = self.data_dir / "mail"
        self.db = db
        self.accounts = Accounts(db, self.mail_root, on_delete=self._forget)
        self.ledger = MaildirLedger(self)
        self._subscribers: dict[str, list[Subscriber]] = {}
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

    def subscribe(self, address: str, callback: Subscriber) -> Callable[[], None]:
        """callback(kind, nbytes, nmessages) after each durable "new"/"expunge" change of this
        process. Returns the function that unsubscribes."""
        addr = normalize_address(address)
        self._subscribers.setdefault(addr, []).append(callback)

        def unsubscribe() -> None:
            subs = self._subscribers.get(addr, [])
            if callback in subs:
                subs.remove(callback)
        return unsubscribe

    def _notify(self, address: str, kind: ChangeKind, nbytes: int, nmessages: int) -> None:
        self.ledger.on_change(address, kind)
        for cb in list(self._subscribers.get(address, [])):
            try:
                cb(kind.value, nbytes, nmessages)
            except Exception as e:  # noqa: BLE001  (a subscriber must not break delivery)
                log.error("subscriber-failed", address=address, kind=kind, error=repr(e))

    # --- quota ---------------------------------------------------------------------------

    def usage(self, address: str) -> Usage:
        return self.ledger.usage(address)

    @property
    def quota(self) -> MaildirLedger:
        """The ledger under its old name (callers are being switched to `ledger`)."""
        return self.ledger

    def recalc(self, address: str | None = None) -> list[tuple[str, tuple[int, int], tuple[int, int]]]:
        """Rebuild index and ledger from the Maildir (one account, or all). Safe while the
        server runs. Returns (address, (bytes, messages) before, after) for every account
        whose ledger changed."""
        addrs = [self.accounts.require(address)] if address else [a.address for a in self.accounts.list()]
        changed = []
        for addr in addrs:
            before = self.db.one("SELECT usage_bytes, usage_messages FROM accounts WHERE address=?", (addr,))
            if before is None:
                continue
            Mailbox(self, addr).reconcile()
            with self.db.transaction() as c:
                now = c.execute("SELECT usage_bytes, usage_messages FROM accounts WHERE address=?", (addr,)).fetchone()
                total = c.execute("SELECT COALESCE(SUM(size), 0), COUNT(*) FROM messages WHERE address=?",
                                  (addr,)).fetchone()
                if (now[0], now[1]) != (total[0], total[1]):
                    c.execute("UPDATE accounts SET usage_bytes=?, usage_messages=? WHERE address=?",
                              (total[0], total[1], addr))
            old, new = (before[0], before[1]), (total[0], total[1])
            if old != new:
                changed.append((addr, old, new))
        return changed

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

    # --- start-up ------------------------------------------------------------------------

    def recover(self) -> None:
        """Once at server start-up: remove tmp/ files left by a crash (a dead process's, or
        older than 36 h); reconcile every mailbox's index with its Maildir and rebuild a
        ledger that disagrees with the index."""
        removed = 0
        now = time.time()
        me = os.getpid()
        for row in self.db.query("SELECT address FROM accounts"):
            tmp = self.accounts.maildir(row["address"]) / "tmp"
            try:
                entries = list(os.scandir(tmp))
            except FileNotFoundError:
                names.create(tmp.parent)
                continue
            for e in entries:
                if not e.is_file(follow_symlinks=False) or e.path in LIVE_TMP:
                    continue
                pid = names.pid_of(e.name)
                try:
                    stale = now - e.stat(follow_symlinks=False).st_mtime > STALE_TMP_SECONDS
                except FileNotFoundError:
                    continue
                if stale or pid is None or pid == me or not _alive(pid):
                    try:
                        os.unlink(e.path)
                        removed += 1
                    except FileNotFoundError:
                        pass
        if removed:
            log.info("recover-tmp", removed=removed)
        for addr, old, new in self.recalc():
            log.warning("ledger-rebuilt", mailbox=addr, bytes_before=old[0], messages_before=old[1],
                        bytes=new[0], messages=new[1])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
