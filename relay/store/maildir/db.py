"""The store's sqlite database: accounts, mailbox index and quota ledger in one file.

One connection per Store, used from the event loop (and, guarded by a lock, from any thread
that calls the synchronous API). WAL lets the admin CLI write while the server reads; a busy
timeout makes the rare writer collision wait instead of fail. Durable changes (a delivery, an
expunge, an account) commit with synchronous=FULL; bookkeeping (last poll) with NORMAL.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from relay.store.errors import StoreError

BUSY_TIMEOUT = 10.0   # seconds a writer waits for another process's transaction

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS accounts (
    address        TEXT PRIMARY KEY,
    domain         TEXT NOT NULL,
    password       TEXT,                 -- argon2id PHC string; NULL = cannot log in
    quota_bytes    INTEGER,              -- NULL = the config default
    quota_messages INTEGER,              -- NULL = the config default; 0 = unlimited
    created        REAL NOT NULL,
    uidvalidity    INTEGER NOT NULL,
    uidnext        INTEGER NOT NULL DEFAULT 1,
    usage_bytes    INTEGER NOT NULL DEFAULT 0,   -- the ledger: undrained mail
    usage_messages INTEGER NOT NULL DEFAULT 0,
    new_mtime      INTEGER NOT NULL DEFAULT 0,   -- new/ and cur/ mtime (ns) the index matches
    cur_mtime      INTEGER NOT NULL DEFAULT 0,
    last_poll      REAL
);
CREATE INDEX IF NOT EXISTS accounts_domain ON accounts(domain);
CREATE TABLE IF NOT EXISTS messages (
    address     TEXT NOT NULL,
    uid         INTEGER NOT NULL,
    name        TEXT NOT NULL,               -- Maildir base name, "<unique>,S=<size>"
    size        INTEGER NOT NULL,
    internaldate REAL NOT NULL,
    flags       TEXT NOT NULL DEFAULT '',    -- Maildir letters, ASCII order
    first_fetch REAL,
    location    TEXT NOT NULL DEFAULT 'new', -- 'new' | 'cur'
    PRIMARY KEY (address, uid)
);
CREATE UNIQUE INDEX IF NOT EXISTS messages_name ON messages(address, name);
"""


class Database:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock = threading.RLock()
        self.generation = 0       # bumped by every commit of this connection (caches key on it)
        try:
            self.conn = sqlite3.connect(str(path), timeout=BUSY_TIMEOUT, isolation_level=None,
                                        check_same_thread=False)
            self.conn.row_factory = sqlite3.Row
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=FULL")
            self.conn.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT * 1000)}")
            self.conn.executescript(SCHEMA)
        except sqlite3.Error as e:
            raise StoreError(f"{path}: cannot open the database: {e}") from e

    @contextmanager
    def transaction(self, durable: bool = True, bookkeeping: bool = False) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on any exception). sqlite errors -> StoreError.
        bookkeeping=True: the change touches nothing a cached message list holds (last poll,
        first fetch time), so `generation` stays."""
        with self.lock:
            c = self.conn
            try:
                if not durable:
                    c.execute("PRAGMA synchronous=NORMAL")
                c.execute("BEGIN IMMEDIATE")
                try:
                    yield c
                except BaseException:
                    c.execute("ROLLBACK")
                    raise
                c.execute("COMMIT")
                if not bookkeeping:
                    self.generation += 1
            except sqlite3.Error as e:
                if c.in_transaction:
                    c.execute("ROLLBACK")
                raise StoreError(f"database: {e}") from e
            finally:
                if not durable:
                    c.execute("PRAGMA synchronous=FULL")

    def query(self, sql: str, params: Any = (), raw: bool = False) -> list[Any]:
        """Rows as sqlite3.Row, or with raw=True as plain tuples (faster for many rows)."""
        with self.lock:
            try:
                cur = self.conn.cursor()
                if raw:
                    cur.row_factory = None
                return cur.execute(sql, params).fetchall()
            except sqlite3.Error as e:
                raise StoreError(f"database: {e}") from e

    def one(self, sql: str, params: Any = ()) -> sqlite3.Row | None:
        rows = self.query(sql, params)
        return rows[0] if rows else None

    def data_version(self) -> int:
        """Changes when another connection (the admin CLI) commits (sqlite PRAGMA data_version)."""
        with self.lock:
            try:
                return int(self.conn.execute("PRAGMA data_version").fetchone()[0])
            except sqlite3.Error as e:
                raise StoreError(f"database: {e}") from e

    def close(self) -> None:
        with self.lock:
            self.conn.close()
