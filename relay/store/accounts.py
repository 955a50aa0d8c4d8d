"""Accounts: addresses, argon2id password hashes, quotas; a credential cache for polls.

Nothing about an account is cached in memory except successful verifications, keyed by the
stored hash string: a password changed by the admin CLI (another process) changes the hash,
so the next login misses the cache and is checked against the new hash at once.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import hmac
import os
import shutil
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import argon2

from relay.store import maildir
from relay.store.address import normalize_address, split
from relay.store.db import Database
from relay.store.errors import AccountExists, AddressError, NoSuchAccount, StoreError

# argon2-cffi defaults = RFC 9106 "second recommended" (low memory) profile: argon2id,
# t=3, m=64 MiB, p=4; ~0.11 s per hash on this machine (docs/decisions.md).
_hasher = argon2.PasswordHasher()

# TEST SUITES ONLY: RELAY_TEST_WEAK_KDF=1 in the environment makes *new* hashes use
# argon2-cffi's test profile (argon2id, t=1, m=8 KiB, p=1: microseconds instead of ~0.5 s
# under load). tests/conftest.py sets it; nothing else may. Verification always uses the
# parameters recorded in the stored hash, so either kind of hash verifies correctly, and
# `relay serve` logs a warning when the variable is set (docs/store.md).
WEAK_KDF_ENV = "RELAY_TEST_WEAK_KDF"
_weak_hasher = argon2.PasswordHasher(time_cost=1, memory_cost=8, parallelism=1, hash_len=16, salt_len=16)


# Password hashing runs on a small pool of its own, never on the loop's default executor, where
# delivery commits fsync (issue 12: 48 guessing connections slowed a delivery from 4 ms to
# 4.2 s and took RSS to 450 MiB with argon2 on the default pool). Two threads: argon2 already
# computes its 4 lanes in parallel, and each hash holds 64 MiB while it runs.
KDF_THREADS = 2
# Checks waiting for a thread at most (~0.06 s each on two threads: half a second of hashing
# that competes with deliveries for the CPU): beyond, a login is answered "try again later"
# unchecked (KdfBusy) rather than queueing without bound. Receivers that poll hit the
# credential cache and never queue here.
KDF_QUEUE = 8
_kdf_pool: concurrent.futures.ThreadPoolExecutor | None = None
_kdf_pending = 0


class KdfBusy(StoreError):
    """Too many password checks waiting: answer "try again later" without checking."""


def _kdf_executor() -> concurrent.futures.ThreadPoolExecutor:
    global _kdf_pool
    if _kdf_pool is None:
        _kdf_pool = concurrent.futures.ThreadPoolExecutor(KDF_THREADS, thread_name_prefix="argon2")
    return _kdf_pool


async def _check_hash_async(stored: str, password: str) -> bool:
    """_check_hash on the KDF pool; KdfBusy when KDF_QUEUE checks already wait."""
    global _kdf_pending
    if _kdf_pending >= KDF_QUEUE + KDF_THREADS:
        raise KdfBusy("too many password checks in progress")
    _kdf_pending += 1
    try:
        return await asyncio.get_running_loop().run_in_executor(_kdf_executor(), _check_hash, stored, password)
    finally:
        _kdf_pending -= 1


def weak_kdf() -> bool:
    return os.environ.get(WEAK_KDF_ENV, "") not in ("", "0")


@dataclass(frozen=True)
class Account:
    address: str
    quota_bytes: int | None          # None = the config default
    quota_messages: int | None       # None = the config default; 0 = unlimited
    created: float
    has_password: bool = True


class CredentialCache:
    """Successful verifications: (address, stored hash, HMAC(process key, password)) -> expiry.

    The password itself is never kept, only a keyed MAC with a key that never leaves this
    process. Bounded (LRU) and time-limited."""

    def __init__(self, size: int = 4096, ttl: float = 600.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._key = os.urandom(32)
        self._entries: OrderedDict[tuple[str, str, bytes], float] = OrderedDict()
        self._lock = threading.Lock()
        self.size, self.ttl, self.clock = size, ttl, clock
        self.hits = self.misses = 0

    def _k(self, address: str, stored: str, password: str) -> tuple[str, str, bytes]:
        mac = hmac.new(self._key, password.encode("utf-8", "surrogatepass"), hashlib.sha256).digest()
        return (address, stored, mac)

    def check(self, address: str, stored: str, password: str) -> bool:
        k = self._k(address, stored, password)
        with self._lock:
            exp = self._entries.get(k)
            if exp is not None and exp > self.clock():
                self._entries.move_to_end(k)
                self.hits += 1
                return True
            if exp is not None:
                del self._entries[k]
            self.misses += 1
            return False

    def add(self, address: str, stored: str, password: str) -> None:
        k = self._k(address, stored, password)
        with self._lock:
            self._entries[k] = self.clock() + self.ttl
            self._entries.move_to_end(k)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)

    def forget(self, address: str) -> None:
        with self._lock:
            for k in [k for k in self._entries if k[0] == address]:
                del self._entries[k]


def hash_password(password: str) -> str:
    if not isinstance(password, str) or password == "":
        raise StoreError("empty password")
    return (_weak_hasher if weak_kdf() else _hasher).hash(password)


def _check_hash(stored: str, password: str) -> bool:
    try:
        return _hasher.verify(stored, password)
    except (argon2.exceptions.VerificationError, argon2.exceptions.InvalidHashError):
        return False


def _quota_value(v: int | None, what: str) -> int | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise StoreError(f"{what} must be a non-negative integer, got {v!r}")
    return v


class Accounts:
    def __init__(self, db: Database, mail_root: Path, on_delete: Callable[[str], None]) -> None:
        self.db = db
        self.mail_root = mail_root
        self.cache = CredentialCache()
        self._on_delete = on_delete

    def maildir(self, address: str) -> Path:
        local, domain = split(address)
        return self.mail_root / domain / local

    def add(self, address: str, password: str | None = None, quota_bytes: int | None = None,
            quota_messages: int | None = None) -> Account:
        addr = normalize_address(address)
        qb = _quota_value(quota_bytes, "quota_bytes")
        qm = _quota_value(quota_messages, "quota_messages")
        stored = hash_password(password) if password is not None else None
        now = time.time()
        with self.db.transaction() as c:
            if c.execute("SELECT 1 FROM accounts WHERE address=?", (addr,)).fetchone():
                raise AccountExists(f"{addr}: an account with this address exists")
            # UIDVALIDITY (RFC 9051 2.3.1.1) must never repeat for a re-created mailbox.
            row = c.execute("SELECT value FROM meta WHERE key='uidvalidity'").fetchone()
            uidvalidity = max(int(now), int(row[0]) + 1 if row else 0)
            c.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('uidvalidity', ?)", (str(uidvalidity),))
            c.execute("DELETE FROM messages WHERE address=?", (addr,))
            c.execute("INSERT INTO accounts(address, domain, password, quota_bytes, quota_messages,"
                      " created, uidvalidity) VALUES (?,?,?,?,?,?,?)",
                      (addr, split(addr)[1], stored, qb, qm, now, uidvalidity))
            path = self.maildir(addr)
            try:
                maildir.create(path)
            except OSError as e:
                raise StoreError(f"{path}: cannot create the Maildir: {e}") from e
            st_new, st_cur = (path / "new").stat(), (path / "cur").stat()
            c.execute("UPDATE accounts SET new_mtime=?, cur_mtime=? WHERE address=?",
                      (st_new.st_mtime_ns, st_cur.st_mtime_ns, addr))
        return Account(addr, qb, qm, now, stored is not None)

    @staticmethod
    def _account(row: object) -> Account:
        r = row  # sqlite3.Row
        return Account(r["address"], r["quota_bytes"], r["quota_messages"], r["created"],  # type: ignore[index]
                       r["password"] is not None)  # type: ignore[index]

    def get(self, address: str) -> Account | None:
        """The account, or None (also for a malformed address)."""
        try:
            addr = normalize_address(address)
        except AddressError:
            return None
        row = self.db.one("SELECT * FROM accounts WHERE address=?", (addr,))
        return self._account(row) if row else None

    def require(self, address: str) -> str:
        """The normalised address of an existing account; NoSuchAccount otherwise."""
        addr = normalize_address(address)
        if not self.db.one("SELECT 1 FROM accounts WHERE address=?", (addr,)):
            raise NoSuchAccount(f"{addr}: no such account")
        return addr

    def list(self) -> list[Account]:
        return [self._account(r) for r in self.db.query("SELECT * FROM accounts ORDER BY domain, address")]

    def delete(self, address: str) -> None:
        """Remove the account, its index rows and its Maildir (with every message in it)."""
        addr = normalize_address(address)
        with self.db.transaction() as c:
            if c.execute("DELETE FROM accounts WHERE address=?", (addr,)).rowcount == 0:
                raise NoSuchAccount(f"{addr}: no such account")
            c.execute("DELETE FROM messages WHERE address=?", (addr,))
        self.cache.forget(addr)
        shutil.rmtree(self.maildir(addr), ignore_errors=True)
        try:
            self.maildir(addr).parent.rmdir()     # the domain directory, when now empty
        except OSError:
            pass
        self._on_delete(addr)

    def set_password(self, address: str, password: str | None) -> None:
        """Set (or with None, remove: the account then only receives) the password."""
        addr = normalize_address(address)
        stored = hash_password(password) if password is not None else None
        with self.db.transaction() as c:
            if c.execute("UPDATE accounts SET password=? WHERE address=?", (stored, addr)).rowcount == 0:
                raise NoSuchAccount(f"{addr}: no such account")
        self.cache.forget(addr)

    def set_quota(self, address: str, quota_bytes: int | None = None,
                  quota_messages: int | None = None) -> Account:
        """Override the account's quotas; None leaves that one unchanged."""
        addr = normalize_address(address)
        qb = _quota_value(quota_bytes, "quota_bytes")
        qm = _quota_value(quota_messages, "quota_messages")
        with self.db.transaction() as c:
            if not c.execute("SELECT 1 FROM accounts WHERE address=?", (addr,)).fetchone():
                raise NoSuchAccount(f"{addr}: no such account")
            if qb is not None:
                c.execute("UPDATE accounts SET quota_bytes=? WHERE address=?", (qb, addr))
            if qm is not None:
                c.execute("UPDATE accounts SET quota_messages=? WHERE address=?", (qm, addr))
        acct = self.get(addr)
        assert acct is not None
        return acct

    def _stored_hash(self, address: str) -> tuple[str, str] | None:
        try:
            addr = normalize_address(address)
        except AddressError:
            return None
        row = self.db.one("SELECT password FROM accounts WHERE address=?", (addr,))
        if row is None or row["password"] is None:
            return None
        return addr, row["password"]

    def _precheck(self, address: str, password: str) -> bool | tuple[str, str]:
        """A decision without argon2 (no account, no password, or a cache hit), or the
        (address, stored hash) that argon2 must check."""
        found = self._stored_hash(address)
        if found is None or not isinstance(password, str) or password == "":
            return False
        return True if self.cache.check(found[0], found[1], password) else found

    def _remember(self, found: tuple[str, str], password: str, ok: bool) -> bool:
        if ok:
            self.cache.add(found[0], found[1], password)
        return ok

    def verify(self, address: str, password: str) -> bool:
        """True when the account exists, has a password, and it matches. Blocks on a cache miss."""
        found = self._precheck(address, password)
        if isinstance(found, bool):
            return found
        return self._remember(found, password, _check_hash(found[1], password))

    async def verify_async(self, address: str, password: str) -> bool:
        """As verify(); argon2 runs on the KDF pool, and only on a cache miss (KdfBusy when
        that pool's queue is full)."""
        found = self._precheck(address, password)
        if isinstance(found, bool):
            return found
        return self._remember(found, password, await _check_hash_async(found[1], password))
