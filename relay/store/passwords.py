"""Passwords: argon2id hashes, checked off the event loop, and a cache of recent successes.

Backend-independent: every store backend keeps the PHC string this module makes and checks
logins with `check_hash` (in a thread) behind a `CredentialCache`.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import argon2

from relay.store.errors import KdfBusy, StoreError

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
_kdf_pool: ThreadPoolExecutor | None = None
_kdf_pending = 0
_T = TypeVar("_T")

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


def weak_kdf() -> bool:
    return os.environ.get(WEAK_KDF_ENV, "") not in ("", "0")


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


def check_hash(stored: str, password: str) -> bool:
    try:
        return _hasher.verify(stored, password)
    except (argon2.exceptions.VerificationError, argon2.exceptions.InvalidHashError):
        return False


def _kdf_executor() -> ThreadPoolExecutor:
    global _kdf_pool
    if _kdf_pool is None:
        _kdf_pool = ThreadPoolExecutor(KDF_THREADS, thread_name_prefix="argon2")
    return _kdf_pool


async def check_hash_async(stored: str, password: str) -> bool:
    """check_hash on the KDF pool; KdfBusy when KDF_QUEUE checks already wait."""
    global _kdf_pending
    if _kdf_pending >= KDF_QUEUE + KDF_THREADS:
        raise KdfBusy("too many password checks in progress")
    _kdf_pending += 1
    try:
        return await asyncio.get_running_loop().run_in_executor(_kdf_executor(), check_hash, stored, password)
    finally:
        _kdf_pending -= 1


async def run_hashing(fn: Callable[..., _T], *args: object) -> _T:
    """fn(*args) on the KDF pool: a call that hashes a new password (and then writes it)
    without holding the loop for the ~0.1 s of argon2 (admin operations: not queue-limited)."""
    return await asyncio.get_running_loop().run_in_executor(_kdf_executor(), fn, *args)
