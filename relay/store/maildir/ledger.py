"""The Maildir backend's ledger: stored bytes and messages per mailbox in sqlite (changed in
the same transaction as the index), bytes in flight in this process's memory.

This is the only place where the quota arithmetic is done (`Usage.refusal`): the SMTP
session adds recipients to a delivery, the delivery reserves here, the policy reads
`snapshot()`/`statistics()`. Reservations live as long as the process: a crash leaves no
residue (the next process starts with none), `relay quota recalc` rebuilds the stored figures.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from relay.store.address import normalize_address
from relay.store.api import ChangeKind, LedgerEntry, LedgerStats, Usage
from relay.store.errors import NoSuchAccount, QuotaExceeded

if TYPE_CHECKING:
    from relay.store.maildir.core import Store


class Held:
    """A reservation (relay.store.api.Reservation): bytes and one message for one recipient."""

    __slots__ = ("_ledger", "address", "nbytes", "open", "streamed")

    def __init__(self, ledger: MaildirLedger, address: str, nbytes: int) -> None:
        self._ledger = ledger
        self.address = address
        self.nbytes = nbytes
        self.streamed = 0
        self.open = True

    def release(self) -> None:
        self._ledger.release(self)


class _InFlight:
    __slots__ = ("bytes", "messages", "streamed")

    def __init__(self) -> None:
        self.bytes = self.messages = self.streamed = 0


class MaildirLedger:
    """Synchronous: every figure is local (sqlite, memory). The api's async methods call
    these without suspending (relay/store/maildir/backend.py)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._inflight: dict[str, _InFlight] = {}
        # address -> (db version the figures were read at, stored bytes, messages, quotas)
        self._stored: dict[str, tuple[tuple[int, int], int, int, int, int]] = {}
        self._refusals = {"bytes": 0, "messages": 0}
        self._reservations = 0

    # --- reservations ------------------------------------------------------------------------
    def reserve(self, address: str, nbytes: int) -> Held:
        """Hold nbytes and one message; QuotaExceeded (holding nothing), NoSuchAccount."""
        addr = normalize_address(address)
        self._check(self.usage(addr), addr, max(0, nbytes), 1)
        slot = self._inflight.setdefault(addr, _InFlight())
        slot.bytes += max(0, nbytes)
        slot.messages += 1
        self._reservations += 1
        return Held(self, addr, max(0, nbytes))

    def extend(self, r: Held, nbytes: int) -> None:
        """Hold nbytes more; QuotaExceeded (holding nothing more). No-op once closed."""
        if not r.open or nbytes <= 0:
            return
        self._check(self.usage(r.address), r.address, nbytes, 0)
        self._inflight.setdefault(r.address, _InFlight()).bytes += nbytes
        r.nbytes += nbytes

    def note_streamed(self, r: Held, nbytes: int) -> None:
        if r.open:
            r.streamed += nbytes
            self._inflight.setdefault(r.address, _InFlight()).streamed += nbytes

    def release(self, r: Held) -> None:
        """Idempotent: the bytes are free again (abort), or stored (settle)."""
        if not r.open:
            return
        r.open = False
        self._reservations -= 1
        slot = self._inflight.get(r.address)
        if slot is None:
            return
        slot.bytes -= r.nbytes
        slot.messages -= 1
        slot.streamed -= r.streamed
        if slot.messages <= 0:
            del self._inflight[r.address]

    def settle(self, r: Held) -> None:
        """The commit's transaction added the message to the stored figures: in flight ends."""
        self.release(r)

    def _check(self, u: Usage, address: str, nbytes: int, nmessages: int) -> None:
        refusal = u.refusal(nbytes, nmessages)
        if refusal is not None:
            self._refusals[refusal.value] += 1
            raise QuotaExceeded(address, refusal.value)

    # --- reading -------------------------------------------------------------------------------
    def reserved(self, address: str) -> tuple[int, int]:
        """(bytes, messages) held in this process for the address."""
        slot = self._inflight.get(address)
        return (slot.bytes, slot.messages) if slot else (0, 0)

    def usage(self, address: str) -> Usage:
        addr = normalize_address(address)
        st = self._read(addr)
        if st is None:
            raise NoSuchAccount(f"{addr}: no such account")
        _, sb, sm, qb, qm = st
        rb, rm = self.reserved(addr)
        return Usage(sb, sm, qb, qm, rb, rm)

    def _read(self, addr: str) -> tuple[tuple[int, int], int, int, int, int] | None:
        """The stored figures and effective quotas, re-read when any commit (of this process
        or another: the admin CLI) happened since they were last read."""
        db = self.store.db
        version = (db.generation, db.data_version())
        hit = self._stored.get(addr)
        if hit is not None and hit[0] == version:
            return hit
        row = db.one("SELECT usage_bytes, usage_messages, quota_bytes, quota_messages"
                     " FROM accounts WHERE address=?", (addr,))
        if row is None:
            self._stored.pop(addr, None)
            return None
        q = self.store.config.quota
        st = (version, int(row[0]), int(row[1]),
              q.default_bytes if row[2] is None else int(row[2]),
              q.default_messages if row[3] is None else int(row[3]))
        self._stored[addr] = st
        return st

    def snapshot(self, address: str) -> LedgerEntry | None:
        st = self._read(address)
        if st is None:
            return None
        slot = self._inflight.get(address)
        rb, rm, streamed = (slot.bytes, slot.messages, slot.streamed) if slot else (0, 0, 0)
        return LedgerEntry(st[1], st[2], rb, rm, streamed, st[3], st[4])

    def on_change(self, address: str, kind: ChangeKind) -> None:
        """The store changed a mailbox: its cached figures are stale (re-read on next use)."""
        self._stored.pop(address, None)

    def forget(self, address: str) -> None:
        self._stored.pop(address, None)

    def statistics(self) -> LedgerStats:
        q = self.store.config.quota
        entries = {}
        for r in self.store.db.query("SELECT address, usage_bytes, usage_messages, quota_bytes,"
                                     " quota_messages FROM accounts", raw=True):
            slot = self._inflight.get(r[0]) or _InFlight()
            entries[r[0]] = LedgerEntry(r[1], r[2], slot.bytes, slot.messages, slot.streamed,
                                        q.default_bytes if r[3] is None else r[3],
                                        q.default_messages if r[4] is None else r[4])
        return LedgerStats(entries, sum(s.bytes for s in self._inflight.values()), self._reservations,
                           dict(self._refusals))
