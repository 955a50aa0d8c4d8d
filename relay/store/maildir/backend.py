"""MaildirStore: relay.store.api on the synchronous Maildir + sqlite engine.

Every async method here returns without suspending (local sqlite and files, as before the
seam), except where the engine already went off the loop: the commit's fsync (a thread),
argon2 (its own threads) and large body reads (a thread).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterable

from relay.config import Config
from relay.store.address import normalize_address
from relay.store.api import (
    Account,
    Change,
    ChangeCallback,
    ChangeKind,
    Envelope,
    Flag,
    LedgerEntry,
    LedgerStats,
    MessageInfo,
    MessageStore,
    Reservation,
    StoreStats,
    Usage,
)
from relay.store.errors import NoSuchMessage, StoreError
from relay.store.maildir import admin
from relay.store.maildir.core import Store
from relay.store.maildir.delivery import Delivery
from relay.store.maildir.ledger import Held, MaildirLedger
from relay.store.maildir.mailbox import Mailbox as EngineMailbox
from relay.store.maildir.mailbox import MessageInfo as EngineInfo
from relay.store.passwords import run_hashing

# Body.read() of at most this many bytes is a pread on the loop (page cache: microseconds);
# larger reads go to a thread so that a cold disk cannot stall the loop.
INLINE_READ = 64 * 1024

# The five system flags and their Maildir letters (https://cr.yp.to/proto/maildir.html).
# Other letters a Maildir reader set ("P" passed, lower-case keywords) are kept as they are.
_LETTERS = {Flag.DRAFT: "D", Flag.FLAGGED: "F", Flag.ANSWERED: "R", Flag.SEEN: "S", Flag.DELETED: "T"}
_SYSTEM = frozenset(_LETTERS.values())
_flag_cache: dict[str, Flag] = {}


def flags_from_letters(letters: str) -> Flag:
    f = _flag_cache.get(letters)
    if f is None:
        f = Flag(0)
        for flag, letter in _LETTERS.items():
            if letter in letters:
                f |= flag
        if len(_flag_cache) < 4096:        # distinct letter strings: a handful in practice
            _flag_cache[letters] = f
    return f


def letters_from_flags(flags: Flag, keep: str = "") -> str:
    """The Maildir letters for these system flags, plus the non-system letters of `keep`."""
    return "".join(sorted({c for c in keep if c not in _SYSTEM}
                          | {letter for flag, letter in _LETTERS.items() if flag in flags}))


def _info(m: EngineInfo) -> MessageInfo:
    return MessageInfo(m.uid, m.name, m.size, m.internaldate, flags_from_letters(m.flags))


class MaildirBody:
    """A message file, open: the descriptor keeps the bytes readable after an expunge."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        try:
            self._size = os.fstat(fd).st_size
        except OSError as e:
            os.close(fd)
            raise StoreError(f"cannot stat a message: {e.strerror}") from e

    @property
    def size(self) -> int:
        return self._size

    def fileno(self) -> int | None:
        return self._fd if self._fd >= 0 else None

    async def read(self, offset: int, n: int) -> bytes:
        if self._fd < 0:
            raise StoreError("read on a closed body")
        n = max(0, min(n, self._size - offset))
        if n == 0 or offset < 0:
            return b""
        try:
            if n <= INLINE_READ:
                return os.pread(self._fd, n, offset)
            return await asyncio.to_thread(os.pread, self._fd, n, offset)
        except OSError as e:
            raise StoreError(f"cannot read a message: {e.strerror}") from e

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    def __enter__(self) -> MaildirBody:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()


class MaildirMailbox:
    def __init__(self, store: Store, address: str) -> None:
        self._store = store
        self._address = normalize_address(address)
        self._engine: EngineMailbox | None = None
        self._converted: tuple[object, list[MessageInfo]] | None = None

    @property
    def address(self) -> str:
        return self._address

    def _mb(self) -> EngineMailbox:
        if self._engine is None:
            self._engine = self._store.mailbox(self._address)     # NoSuchAccount
        return self._engine

    async def uidvalidity(self) -> int:
        return self._mb().uidvalidity

    async def uidnext(self) -> int:
        return self._mb().uidnext

    async def messages(self) -> list[MessageInfo]:
        msgs = self._mb().messages()
        key = self._store._messages_cache.get(self._address)
        if self._converted is None or self._converted[0] is not key:
            self._converted = (key, [_info(m) for m in msgs])
        return list(self._converted[1])

    async def info(self, uid: int) -> MessageInfo:
        return _info(self._mb().info(uid))

    async def set_flags(self, uid: int, flags: Flag) -> MessageInfo:
        mb = self._mb()
        return _info(mb.set_flags(uid, letters_from_flags(flags, mb.info(uid).flags)))

    async def expunge(self, uids: Iterable[int]) -> list[int]:
        return self._mb().expunge(list(uids))

    async def body(self, uid: int) -> MaildirBody:
        path = self._mb().path(uid)
        try:
            return MaildirBody(os.open(path, os.O_RDONLY | os.O_CLOEXEC))
        except FileNotFoundError as e:
            raise NoSuchMessage(f"{self._address}: message {uid} is gone") from e
        except OSError as e:
            raise StoreError(f"{path}: cannot open: {e.strerror}") from e

    async def note_fetched(self, uid: int) -> None:
        self._mb().note_fetched(uid)

    async def note_poll(self) -> None:
        self._store.note_poll(self._address)


class MaildirAccounts:
    def __init__(self, store: Store) -> None:
        self._store = store
        self._accounts = store.accounts

    async def add(self, address: str, password: str | None = None, quota_bytes: int | None = None,
                  quota_messages: int | None = None) -> Account:
        if password is None:
            return self._accounts.add(address, None, quota_bytes, quota_messages)
        return await run_hashing(self._accounts.add, address, password, quota_bytes, quota_messages)

    async def get(self, address: str) -> Account | None:
        return self._accounts.get(address)

    async def list(self) -> list[Account]:
        return self._accounts.list()

    async def delete(self, address: str) -> None:
        self._accounts.delete(address)

    async def set_password(self, address: str, password: str | None) -> None:
        if password is None:
            self._accounts.set_password(address, None)
        else:
            await run_hashing(self._accounts.set_password, address, password)

    async def set_quota(self, address: str, quota_bytes: int | None = None,
                        quota_messages: int | None = None) -> Account:
        return self._accounts.set_quota(address, quota_bytes, quota_messages)

    async def verify(self, address: str, password: str) -> bool:
        return await self._accounts.verify_async(address, password)

    async def is_local_domain(self, domain: str) -> bool:
        return self._store.is_local_domain(domain)


def _held(r: Reservation) -> Held:
    if not isinstance(r, Held):
        raise StoreError(f"not a reservation of this store: {r!r}")
    return r


class MaildirLedgerApi:
    """relay.store.api.Ledger over MaildirLedger (which is synchronous)."""

    def __init__(self, ledger: MaildirLedger) -> None:
        self._ledger = ledger

    async def reserve(self, address: str, nbytes: int) -> Held:
        return self._ledger.reserve(address, nbytes)

    async def extend(self, reservation: Reservation, nbytes: int) -> None:
        self._ledger.extend(_held(reservation), nbytes)

    def note_streamed(self, reservation: Reservation, nbytes: int) -> None:
        self._ledger.note_streamed(_held(reservation), nbytes)

    def release(self, reservation: Reservation) -> None:
        self._ledger.release(_held(reservation))

    def settle(self, reservation: Reservation) -> None:
        self._ledger.settle(_held(reservation))

    async def usage(self, address: str) -> Usage:
        return self._ledger.usage(address)

    def snapshot(self, address: str) -> LedgerEntry | None:
        return self._ledger.snapshot(address)

    def statistics(self) -> LedgerStats:
        return self._ledger.statistics()


class MaildirChanges:
    def __init__(self, store: Store) -> None:
        self._store = store

    def subscribe(self, address: str | None, callback: ChangeCallback) -> Callable[[], None]:
        if address is None:
            def on_any(addr: str, kind: str, nbytes: int, nmessages: int) -> None:
                callback(Change(addr, ChangeKind(kind), nbytes, nmessages))
            return self._store.subscribe(None, on_any)
        addr = normalize_address(address)

        def on_change(kind: str, nbytes: int, nmessages: int) -> None:
            callback(Change(addr, ChangeKind(kind), nbytes, nmessages))
        return self._store.subscribe(addr, on_change)


class MaildirStore:
    """relay.store.api.MessageStore, the embedded default. The engine opens at construction
    (a local sqlite file and directories); open() runs the crash recovery."""

    def __init__(self, config: Config) -> None:
        self.engine = Store.open(config)
        self._accounts = MaildirAccounts(self.engine)
        self._ledger = MaildirLedgerApi(self.engine.ledger)
        self._changes = MaildirChanges(self.engine)

    @property
    def accounts(self) -> MaildirAccounts:
        return self._accounts

    @property
    def ledger(self) -> MaildirLedgerApi:
        return self._ledger

    @property
    def changes(self) -> MaildirChanges:
        return self._changes

    async def open(self) -> None:
        admin.recover(self.engine)

    async def close(self) -> None:
        self.engine.close()

    def mailbox(self, address: str) -> MaildirMailbox:
        return MaildirMailbox(self.engine, address)

    def begin_delivery(self, envelope: Envelope) -> Delivery:
        return self.engine.delivery(envelope)

    def statistics(self) -> StoreStats:
        return self.engine.statistics()


def _conforms(store: MaildirStore) -> MessageStore:
    """mypy checks here that MaildirStore (and what it hands out) implements the api."""
    return store
