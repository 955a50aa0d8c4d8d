"""Accounts: addresses, argon2id password hashes, quotas; a credential cache for polls.

Nothing about an account is cached in memory except successful verifications, keyed by the
stored hash string: a password changed by the admin CLI (another process) changes the hash,
so the next login misses the cache and is checked against the new hash at once.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path

from relay.store.address import normalize_address, split
from relay.store.api import Account
from relay.store.errors import AccountExists, AddressError, NoSuchAccount, StoreError
from relay.store.maildir import names
from relay.store.maildir.db import Database
from relay.store.passwords import (
    CredentialCache,
    check_hash,
    check_hash_async,
    hash_password,
)


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
                names.create(path)
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

    def exists(self, address: str) -> bool:
        """An account with this (normalised) address."""
        return self.db.one("SELECT 1 FROM accounts WHERE address=?", (address,)) is not None

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
        return self._remember(found, password, check_hash(found[1], password))

    async def verify_async(self, address: str, password: str) -> bool:
        """As verify(); argon2 runs in a thread, and only on a cache miss."""
        found = self._precheck(address, password)
        if isinstance(found, bool):
            return found
        return self._remember(found, password, await check_hash_async(found[1], password))
