"""Store: the account database, the Maildirs, delivery, the quota ledger."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from relay.config import Config
from relay.log import get_logger
from relay.store import maildir
from relay.store.accounts import Accounts
from relay.store.address import normalize_address, normalize_domain
from relay.store.db import Database
from relay.store.delivery import LIVE_TMP, Delivery, trace_headers
from relay.store.errors import AddressError, NoSuchAccount, QuotaExceeded, StoreError

log = get_logger("store")

STALE_TMP_SECONDS = 36 * 3600     # Maildir convention: tmp/ files older than 36 h are garbage

Subscriber = Callable[[str, int, int], None]


@dataclass(frozen=True)
class Usage:
    bytes: int
    messages: int
    quota_bytes: int
    quota_messages: int            # 0 = unlimited
    reserved_bytes: int = 0


class Reservation:
    """Bytes held for a message in flight; release() on every outcome (idempotent)."""

    def __init__(self, quota: Quota, address: str, nbytes: int) -> None:
        self._quota, self.address, self.nbytes = quota, address, nbytes
        self.released = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self._quota._release(self)


class Quota:
    """In-memory reservations on top of the ledger in the database (this process only)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._reserved: dict[str, list[int]] = {}      # address -> [bytes, messages]

    def reserved(self, address: str) -> tuple[int, int]:
        r = self._reserved.get(address)
        return (r[0], r[1]) if r else (0, 0)

    def reserve(self, address: str, nbytes: int) -> Reservation:
        """Hold `nbytes` (and one message) for `address`; QuotaExceeded if it does not fit."""
        addr = normalize_address(address)
        u = self.store.usage(addr)
        if u.quota_bytes and u.bytes + u.reserved_bytes + nbytes > u.quota_bytes:
            raise QuotaExceeded(addr, "bytes")
        if u.quota_messages and u.messages + self.reserved(addr)[1] + 1 > u.quota_messages:
            raise QuotaExceeded(addr, "messages")
        slot = self._reserved.setdefault(addr, [0, 0])
        slot[0] += nbytes
        slot[1] += 1
        return Reservation(self, addr, nbytes)

    def _release(self, r: Reservation) -> None:
        slot = self._reserved.get(r.address)
        if slot is None:
            return
        slot[0] -= r.nbytes
        slot[1] -= 1
        if slot[1] <= 0:
            del self._reserved[r.address]


class Store:
    def __init__(self, config: Config, db: Database) -> None:
        self.config = config
        self.data_dir = Path(config.data_dir)
        self.mail_root = self.data_dir / "mail"
        self.db = db
        self.accounts = Accounts(db, self.mail_root, on_delete=self._forget)
        self.quota = Quota(self)
        self._subscribers: dict[str, list[Subscriber]] = {}
        self._pending: set[str] = set()      # names being committed (not yet in the index)

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

    # --- delivery ------------------------------------------------------------------------

    def begin_delivery(self, sender: str, recipients: list[str], session_id: str = "",
                       helo: str = "", peer: str | None = None, protocol: str = "ESMTP") -> Delivery:
        """Start a message for existing accounts (NoSuchAccount otherwise)."""
        rcpts = list(dict.fromkeys(self.accounts.require(r) for r in recipients))
        if not rcpts:
            raise StoreError("a delivery needs at least one recipient")
        header = trace_headers(sender, rcpts, self.config.hostname, session_id, helo, peer, protocol)
        return Delivery(self, sender, rcpts, header)

    def _index_new(self, recipients: list[str], name: str, size: int, when: float,
                   mtimes: list[tuple[int, int]]) -> None:
        """One transaction: a row per recipient (next UID), the ledger, the new/ mtime."""
        with self.db.transaction() as c:
            for addr, (before, after) in zip(recipients, mtimes):
                row = c.execute("SELECT uidnext, new_mtime FROM accounts WHERE address=?", (addr,)).fetchone()
                if row is None:
                    raise NoSuchAccount(f"{addr}: account deleted during delivery")
                uid = row["uidnext"]
                c.execute("INSERT INTO messages(address, uid, name, size, internaldate) VALUES (?,?,?,?,?)",
                          (addr, uid, name, size, when))
                new_mtime = after if row["new_mtime"] == before else row["new_mtime"]
                c.execute("UPDATE accounts SET uidnext=?, usage_bytes=usage_bytes+?,"
                          " usage_messages=usage_messages+1, new_mtime=? WHERE address=?",
                          (uid + 1, size, new_mtime, addr))

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

    def _notify(self, address: str, kind: str, nbytes: int, nmessages: int) -> None:
        for cb in list(self._subscribers.get(address, [])):
            try:
                cb(kind, nbytes, nmessages)
            except Exception as e:  # noqa: BLE001  (a subscriber must not break delivery)
                log.error("subscriber-failed", address=address, kind=kind, error=repr(e))

    # --- quota ---------------------------------------------------------------------------

    def usage(self, address: str) -> Usage:
        addr = normalize_address(address)
        row = self.db.one("SELECT usage_bytes, usage_messages, quota_bytes, quota_messages"
                          " FROM accounts WHERE address=?", (addr,))
        if row is None:
            raise NoSuchAccount(f"{addr}: no such account")
        qb = self.config.quota.default_bytes if row["quota_bytes"] is None else row["quota_bytes"]
        qm = self.config.quota.default_messages if row["quota_messages"] is None else row["quota_messages"]
        return Usage(row["usage_bytes"], row["usage_messages"], qb, qm, self.quota.reserved(addr)[0])

    # --- start-up ------------------------------------------------------------------------

    def recover(self) -> None:
        """Once at server start-up: remove tmp/ files left by a crash (a dead process's, or
        older than 36 h)."""
        removed = 0
        now = time.time()
        me = os.getpid()
        for row in self.db.query("SELECT address FROM accounts"):
            tmp = self.accounts.maildir(row["address"]) / "tmp"
            try:
                entries = list(os.scandir(tmp))
            except FileNotFoundError:
                maildir.create(tmp.parent)
                continue
            for e in entries:
                if not e.is_file(follow_symlinks=False) or e.path in LIVE_TMP:
                    continue
                pid = maildir.pid_of(e.name)
                try:
                    old = now - e.stat(follow_symlinks=False).st_mtime > STALE_TMP_SECONDS
                except FileNotFoundError:
                    continue
                if old or pid is None or pid == me or not _alive(pid):
                    try:
                        os.unlink(e.path)
                        removed += 1
                    except FileNotFoundError:
                        pass
        if removed:
            log.info("recover-tmp", removed=removed)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
