"""relay.store.api on PostgreSQL: any number of relay nodes share one database.

What lives where (docs/cluster.md):
  * accounts: address, argon2id hash, quotas, UIDVALIDITY/UIDNEXT, the ledger's stored
    figures (usage_bytes/usage_messages), a modseq bumped by every mailbox change;
  * messages: one row per recipient (uid, body, size, internaldate, flags);
  * bodies + body_chunks (bodies.py): written before the commit, sealed in it;
  * reservations: quota held for deliveries in flight, owned by a node (nodes.heartbeat);
    the survivors' sweeper deletes a dead node's row, its reservations and unsealed bodies;
  * the change feed: NOTIFY relay_changes in the commit's transaction; every node LISTENs.

250 only after COMMIT with synchronous_commit on (the server default): with
synchronous_standby_names set, that COMMIT is on two machines. Quotas hold across nodes: the
reservation and the commit lock the account's row, and count every node's reservations.
A lost database answers StoreUnavailable (451 / NO [UNAVAILABLE]); the pool reconnects by
itself (libpq tries every host of the DSN; target_session_attrs=read-write finds the primary).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import secrets
import socket
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
import psycopg_pool

from relay.config import Config
from relay.log import get_logger
from relay.metrics import WAIT_SECONDS, Histogram
from relay.store.api import (
    EXTEND_STEP,
    Account,
    AccountExists,
    Change,
    ChangeCallback,
    ChangeKind,
    DeliveryReceipt,
    Envelope,
    Flag,
    LedgerEntry,
    LedgerStats,
    MailboxStats,
    MessageInfo,
    NoSuchAccount,
    NoSuchMessage,
    QuotaExceeded,
    Refusal,
    StoreError,
    StoreStats,
    StoreUnavailable,
    Usage,
    normalize_address,
    normalize_domain,
)
from relay.store.errors import AddressError
from relay.store.passwords import CredentialCache, check_hash_async, hash_password, run_hashing
from relay.store.postgresql.bodies import BODY_CHUNK, BodyStore, PgBodyStore
from relay.store.postgresql.schema import migrate
from relay.store.trace import trace_headers

log = get_logger("store.postgresql")
# psycopg_pool warns on every failed reconnect (several a second while the database is away);
# the store logs the outage itself (maintenance-failed, change-feed-lost), once per attempt.
logging.getLogger("psycopg.pool").setLevel(logging.ERROR)

Conn = psycopg.AsyncConnection[Any]

CHANNEL = "relay_changes"            # LISTEN/NOTIFY channel of the change feed
POOL_MAX = 20                        # connections per node: one per concurrent statement, not per
                                     # session (a delivery holds one only while writing a chunk)
POOL_TIMEOUT = 5.0                   # seconds to wait for a connection: past it, 4xx (a failover
                                     # takes a few seconds; SMTP clients retry)
WRITERS = 2                          # chunk INSERTs in flight per delivery (bench_pg: 2 beat 1, 3
                                     # did not help on 2 cores)
WRITE_BUFFER = 4 * BODY_CHUNK        # bytes a delivery buffers before write() asks the caller to
                                     # wait: 4 chunks queued keep both writers busy, bound memory
EXTEND_EVERY = EXTEND_STEP // 4      # a message streaming past its reservations extends them by what
                                     # it wrote past, this often (one round trip per MiB, as per chunk)
READ_AHEAD = 2                       # chunks fetched ahead of a reader going forward (2 MiB per
                                     # open body: the database works while the client is sent one)
CHECK_IDLE_SECONDS = 1.0             # a pooled connection idle longer is pinged before use
REFRESH_SECONDS = 1.0                # Ledger.snapshot()/statistics() figures: at most this old
HEARTBEAT_SECONDS = 2.0              # a node's heartbeat period
NODE_STALE_SECONDS = 30.0            # a node silent this long is dead (15 missed heartbeats)
ORPHAN_GRACE_SECONDS = 600.0         # an expunged body stays readable this long (FETCHes in progress)
ORPHAN_SCAN_SECONDS = 300.0          # full scan for bodies no message references (a rare race)
MESSAGES_CACHE = 1024                # mailboxes whose message list is kept between changes
COMMIT_OUTCOME_SECONDS = 60.0        # a commit cut off by a lost connection: how long to keep asking
                                     # whether it happened before replying 4xx (RFC 5321 4.5.3.2: the
                                     # client waits 10 min for the reply to the final dot)
RECONNECT_MAX_SECONDS = 5.0          # the change feed's reconnect backoff ceiling

# Errors that mean "the database is not there (now)": 4xx, the node recovers by itself.
_UNAVAILABLE: tuple[type[BaseException], ...] = (
    psycopg.OperationalError, psycopg.InterfaceError, psycopg_pool.PoolTimeout,
    psycopg.errors.ReadOnlySqlTransaction, psycopg.errors.CannotConnectNow)


@dataclass(frozen=True)
class PgStats:
    pool_connections: int          # open now
    pool_idle: int                 # of those, waiting for a request
    pool_max: int
    pool_waiting: int              # requests waiting for a connection now
    pool_requests: int             # since start
    pool_request_errors: int       # requests that got no connection in time
    connections_made: int          # since start (reconnects included)
    connection_errors: int         # attempts that failed
    connections_lost: int          # found broken in use
    unavailable_errors: int        # operations answered StoreUnavailable (4xx / NO [UNAVAILABLE])
    change_feed_connected: int     # 1 while LISTENing
    change_feed_reconnects: int
    change_feed_received: int      # changes of other nodes
    swept_nodes: int               # dead nodes this node cleaned up after
    swept_bodies: int              # unsealed or expunged bodies it removed


class PgReservation:
    def __init__(self, rid: int, address: str, nbytes: int) -> None:
        self.id, self._address, self._nbytes = rid, address, nbytes
        self._open = True
        self.streamed = 0

    @property
    def address(self) -> str:
        return self._address

    @property
    def nbytes(self) -> int:
        return self._nbytes

    @property
    def open(self) -> bool:
        return self._open


# Reservations, and bodies before their commit, matter only while their node lives: their
# transactions do not wait for the WAL flush (the commit that makes a message durable does).
_NO_FLUSH = "SET LOCAL synchronous_commit TO off"

# An account's ledger: stored figures and every node's reservations, except those this node has
# released and not yet deleted (release() never waits: the DELETE runs in the background).
_USAGE = ("SELECT usage_bytes, usage_messages, quota_bytes, quota_messages, COALESCE(r.nbytes, 0), COALESCE(r.n, 0)"
          " FROM accounts a LEFT JOIN LATERAL (SELECT SUM(nbytes) AS nbytes, COUNT(*) AS n FROM reservations r"
          "  WHERE r.address = a.address AND r.id <> ALL(%s)) r ON true WHERE a.address = %s")


class PgLedger:
    """Stored figures in accounts, in-flight ones in reservations; snapshot() from memory."""

    def __init__(self, store: PgStore) -> None:
        self._store = store
        self._mine: dict[int, PgReservation] = {}
        self._releasing: set[int] = set()
        self._entries: dict[str, LedgerEntry] = {}
        self._refusals: dict[str, int] = {}

    async def _locked_usage(self, conn: Conn, address: str) -> Usage:
        """The account's usage with its row locked (FOR UPDATE: every node's reservations and
        commits for this account take turns)."""
        cur = await conn.execute(
            _USAGE + " FOR UPDATE OF a", (list(self._releasing), address))
        row = await cur.fetchone()
        if row is None:
            raise NoSuchAccount(f"{address}: no such account")
        return self._store._usage(row)

    async def reserve(self, address: str, nbytes: int) -> PgReservation:
        addr = normalize_address(address)
        async with self._store._conn() as conn, conn.transaction():
            await conn.execute(_NO_FLUSH)
            u = await self._locked_usage(conn, addr)
            why = u.refusal(nbytes, 1)
            if why is not None:
                self._refusals[why.value] = self._refusals.get(why.value, 0) + 1
                raise QuotaExceeded(addr, why.value)
            cur = await conn.execute("INSERT INTO reservations (node, address, nbytes) VALUES (%s, %s, %s)"
                                     " RETURNING id", (self._store.node_id, addr, nbytes))
            row = await cur.fetchone()
            assert row is not None
            r = PgReservation(int(row[0]), addr, nbytes)
            self._mine[r.id] = r
        with contextlib.suppress(psycopg.Error):
            await self._store._refresh([addr], conn)
        return r

    async def extend(self, reservation: Any, nbytes: int) -> None:
        r = self._own(reservation)
        if not r.open or nbytes <= 0:
            return
        async with self._store._conn() as conn, conn.transaction():
            await conn.execute(_NO_FLUSH)
            u = await self._locked_usage(conn, r.address)
            if u.refusal(nbytes, 0) is not None:
                self._refusals["bytes"] = self._refusals.get("bytes", 0) + 1
                raise QuotaExceeded(r.address, "bytes")
            await conn.execute("UPDATE reservations SET nbytes = nbytes + %s, streamed = %s WHERE id = %s",
                               (nbytes, r.streamed, r.id))
        r._nbytes += nbytes
        self._adjust(r.address, nbytes, 0, 0)

    def note_streamed(self, reservation: Any, nbytes: int) -> None:
        r = self._own(reservation)
        r.streamed += nbytes
        self._adjust(r.address, 0, 0, nbytes)

    def _adjust(self, address: str, reserved: int, reservations: int, streamed: int) -> None:
        """This node's own change, in the in-memory figures at once (the periodic refresh
        brings the other nodes' changes)."""
        e = self._entries.get(address)
        if e is not None:
            self._entries[address] = dataclasses.replace(
                e, reserved_bytes=max(0, e.reserved_bytes + reserved),
                reserved_messages=max(0, e.reserved_messages + reservations),
                streaming_bytes=max(0, e.streaming_bytes + streamed))

    def release(self, reservation: Any) -> None:
        r = self._own(reservation)
        if r.open:
            r._open = False
            self._mine.pop(r.id, None)
            self._releasing.add(r.id)
            self._adjust(r.address, -r.nbytes, -1, -r.streamed)
            self._store._background(self._delete([r.id]), "release")

    def settle(self, reservation: Any) -> None:
        r = self._own(reservation)
        if r.open:
            r._open = False
            self._mine.pop(r.id, None)
            self._adjust(r.address, -r.nbytes, -1, -r.streamed)

    def _settled(self, reservation: PgReservation) -> None:
        """The commit removed the reservation's row (the refresh after it has the figures)."""
        reservation._open = False
        self._mine.pop(reservation.id, None)

    async def _delete(self, ids: list[int]) -> None:
        async with self._store._conn() as conn:
            await conn.execute("DELETE FROM reservations WHERE id = ANY(%s)", (ids,))
        self._releasing.difference_update(ids)

    @staticmethod
    def _own(reservation: Any) -> PgReservation:
        if not isinstance(reservation, PgReservation):
            raise StoreError("a reservation of another store")
        return reservation

    async def usage(self, address: str) -> Usage:
        addr = normalize_address(address)
        async with self._store._conn() as conn:
            cur = await conn.execute(
                _USAGE, (list(self._releasing), addr))
            row = await cur.fetchone()
        if row is None:
            raise NoSuchAccount(f"{addr}: no such account")
        return self._store._usage(row)

    def snapshot(self, address: str) -> LedgerEntry | None:
        try:
            return self._entries.get(normalize_address(address))
        except AddressError:
            return None

    def statistics(self) -> LedgerStats:
        entries = dict(self._entries)
        return LedgerStats(entries, sum(e.reserved_bytes for e in entries.values()),
                           sum(e.reserved_messages for e in entries.values()), dict(self._refusals))


class PgAccounts:
    def __init__(self, store: PgStore) -> None:
        self._store = store
        self._cache = CredentialCache()

    @staticmethod
    def _account(row: Sequence[Any]) -> Account:
        return Account(row[0], row[1], row[2], float(row[3]), row[4] is not None)

    _COLS = "address, quota_bytes, quota_messages, created, password_hash"

    async def add(self, address: str, password: str | None = None, quota_bytes: int | None = None,
                  quota_messages: int | None = None) -> Account:
        addr = normalize_address(address)
        _check_quota(quota_bytes, "quota_bytes")
        _check_quota(quota_messages, "quota_messages")
        hashed = await run_hashing(hash_password, password) if password is not None else None
        now = time.time()
        try:
            async with self._store._conn() as conn:
                cur = await conn.execute(
                    "INSERT INTO accounts (address, domain, password_hash, quota_bytes, quota_messages, created,"
                    " uidvalidity) VALUES (%s, %s, %s, %s, %s, %s, nextval('uidvalidity_seq'))"
                    f" ON CONFLICT (address) DO NOTHING RETURNING {self._COLS}",
                    (addr, addr.rsplit("@", 1)[1], hashed, quota_bytes, quota_messages, now))
                row = await cur.fetchone()
        except psycopg.errors.UniqueViolation:
            row = None
        if row is None:
            raise AccountExists(f"{addr}: account exists")
        return self._account(row)

    async def get(self, address: str) -> Account | None:
        try:
            addr = normalize_address(address)
        except AddressError:
            return None
        async with self._store._conn() as conn:
            cur = await conn.execute(f"SELECT {self._COLS} FROM accounts WHERE address = %s", (addr,))
            row = await cur.fetchone()
        return None if row is None else self._account(row)

    async def list(self) -> list[Account]:
        async with self._store._conn() as conn:
            cur = await conn.execute(f"SELECT {self._COLS} FROM accounts ORDER BY domain, address")
            return [self._account(r) for r in await cur.fetchall()]

    async def delete(self, address: str) -> None:
        addr = normalize_address(address)
        async with self._store._conn() as conn, conn.transaction():
            cur = await conn.execute("DELETE FROM messages WHERE address = %s RETURNING body", (addr,))
            bodies = sorted({int(r[0]) for r in await cur.fetchall()})
            cur = await conn.execute("DELETE FROM accounts WHERE address = %s RETURNING address", (addr,))
            if await cur.fetchone() is None:
                raise NoSuchAccount(f"{addr}: no such account")
            await _orphan(conn, bodies)
        self._cache.forget(addr)
        self._store._forget(addr)

    async def set_password(self, address: str, password: str | None) -> None:
        addr = normalize_address(address)
        hashed = await run_hashing(hash_password, password) if password is not None else None
        async with self._store._conn() as conn:
            cur = await conn.execute("UPDATE accounts SET password_hash = %s WHERE address = %s RETURNING address",
                                     (hashed, addr))
            if await cur.fetchone() is None:
                raise NoSuchAccount(f"{addr}: no such account")
        self._cache.forget(addr)

    async def set_quota(self, address: str, quota_bytes: int | None = None,
                        quota_messages: int | None = None) -> Account:
        addr = normalize_address(address)
        _check_quota(quota_bytes, "quota_bytes")
        _check_quota(quota_messages, "quota_messages")
        async with self._store._conn() as conn:
            cur = await conn.execute(
                "UPDATE accounts SET quota_bytes = COALESCE(%s, quota_bytes),"
                f" quota_messages = COALESCE(%s, quota_messages) WHERE address = %s RETURNING {self._COLS}",
                (quota_bytes, quota_messages, addr))
            row = await cur.fetchone()
        if row is None:
            raise NoSuchAccount(f"{addr}: no such account")
        return self._account(row)

    async def verify(self, address: str, password: str) -> bool:
        try:
            addr = normalize_address(address)
        except AddressError:
            return False
        async with self._store._conn() as conn:
            cur = await conn.execute("SELECT password_hash FROM accounts WHERE address = %s", (addr,))
            row = await cur.fetchone()
        if row is None or row[0] is None:
            return False
        stored = str(row[0])
        if self._cache.check(addr, stored, password):
            return True
        ok = await check_hash_async(stored, password)
        if ok:
            self._cache.add(addr, stored, password)
        return ok

    async def is_local_domain(self, domain: str) -> bool:
        try:
            d = normalize_domain(domain)
        except AddressError:
            return False
        async with self._store._conn() as conn:
            cur = await conn.execute("SELECT 1 FROM accounts WHERE domain = %s LIMIT 1", (d,))
            return await cur.fetchone() is not None


def _check_quota(v: int | None, what: str) -> None:
    if v is not None and v < 0:
        raise StoreError(f"{what} must be 0 (unlimited) or more, not {v}")


async def _orphan(conn: Conn, bodies: list[int]) -> None:
    """Mark bodies that no message references any more (deleted after ORPHAN_GRACE_SECONDS)."""
    if bodies:
        await conn.execute("UPDATE bodies b SET orphaned = now() WHERE id = ANY(%s) AND orphaned IS NULL"
                           " AND NOT EXISTS (SELECT 1 FROM messages m WHERE m.body = b.id)", (bodies,))


def _retrieve(task: asyncio.Task[Any]) -> None:
    """A read-ahead nobody awaits in the end: its error is not worth a warning."""
    if not task.cancelled():
        task.exception()


class PgBody:
    """A body read by range. Chunks read are kept until the reader moves past them, and a
    reader going forward has the next READ_AHEAD chunks fetched while it sends this one (at
    most READ_AHEAD + 1 chunks held per open body)."""

    def __init__(self, store: PgStore, body: int, size: int, chunk_size: int) -> None:
        self._store, self._body, self._size, self._cs = store, body, size, chunk_size
        self._chunks: dict[int, bytes] = {}
        self._ahead: asyncio.Task[list[tuple[int, bytes]]] | None = None

    @property
    def size(self) -> int:
        return self._size

    @property
    def body_id(self) -> int:
        """The stored body (one for every recipient of a delivery)."""
        return self._body

    def fileno(self) -> int | None:
        return None

    async def _fetch(self, first: int, last: int) -> list[tuple[int, bytes]]:
        async with self._store._conn() as conn:
            got = await self._store.bodies.read(conn, self._body, first, last)
        if len(got) != last - first + 1:
            raise StoreError(f"message body {self._body} is gone or incomplete")
        return got

    async def read(self, offset: int, n: int) -> bytes:
        if n <= 0 or offset >= self._size or offset < 0:
            return b""
        n = min(n, self._size - offset)
        first, last = offset // self._cs, (offset + n - 1) // self._cs
        if self._ahead is not None and (self._ahead.done() or first in self._pending_range):
            task, self._ahead = self._ahead, None
            try:
                self._chunks.update(await task)
            except StoreError:
                pass                                  # fetched again below
        missing = [q for q in range(first, last + 1) if q not in self._chunks]
        if missing:
            self._chunks.update(await self._fetch(missing[0], missing[-1]))
        for q in [q for q in self._chunks if q < first or q > last + READ_AHEAD]:
            del self._chunks[q]
        nchunks = (self._size + self._cs - 1) // self._cs
        ahead = [q for q in range(last + 1, min(last + READ_AHEAD, nchunks - 1) + 1) if q not in self._chunks]
        if ahead and self._ahead is None:
            self._pending_range = range(ahead[0], ahead[-1] + 1)
            self._ahead = asyncio.get_running_loop().create_task(self._fetch(ahead[0], ahead[-1]))
            self._ahead.add_done_callback(_retrieve)
        start = offset - first * self._cs
        if first == last:
            return self._chunks[first][start:start + n]
        return b"".join(self._chunks[q] for q in range(first, last + 1))[start:start + n]

    _pending_range = range(0)

    def close(self) -> None:
        self._chunks.clear()
        if self._ahead is not None:
            self._ahead.cancel()
            self._ahead = None

    def __enter__(self) -> PgBody:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class PgMailbox:
    def __init__(self, store: PgStore, address: str) -> None:
        self._store, self._address = store, address

    @property
    def address(self) -> str:
        return self._address

    async def _account(self, conn: Conn) -> tuple[int, int, int]:
        cur = await conn.execute("SELECT uidvalidity, uidnext, modseq FROM accounts WHERE address = %s",
                                 (self._address,))
        row = await cur.fetchone()
        if row is None:
            raise NoSuchAccount(f"{self._address}: no such account")
        return int(row[0]), int(row[1]), int(row[2])

    async def uidvalidity(self) -> int:
        async with self._store._conn() as conn:
            return (await self._account(conn))[0]

    async def uidnext(self) -> int:
        async with self._store._conn() as conn:
            return (await self._account(conn))[1]

    async def messages(self) -> list[MessageInfo]:
        cache = self._store._messages
        async with self._store._conn() as conn:
            _, _, modseq = await self._account(conn)
            hit = cache.get(self._address)
            if hit is not None and hit[0] == modseq:
                cache.move_to_end(self._address)
                return list(hit[1])
            cur = await conn.execute("SELECT uid, size, internaldate, flags, ext_id FROM messages WHERE address = %s"
                                     " ORDER BY uid", (self._address,))
            rows = await cur.fetchall()
            uv = (await self._account(conn))[0]
        msgs = [MessageInfo(int(r[0]), r[4] or f"{uv}.{r[0]}", int(r[1]), float(r[2]), Flag(int(r[3])))
                for r in rows]
        cache[self._address] = (modseq, msgs)
        cache.move_to_end(self._address)
        while len(cache) > MESSAGES_CACHE:
            cache.popitem(last=False)
        return list(msgs)

    async def _one(self, conn: Conn, sql: str, args: tuple[Any, ...], uid: int) -> MessageInfo:
        cur = await conn.execute(sql, args)
        row = await cur.fetchone()
        if row is None:
            await self._account(conn)       # NoSuchAccount first
            raise NoSuchMessage(f"{self._address}: no message with UID {uid}")
        return MessageInfo(int(row[0]), row[5] or f"{row[4]}.{row[0]}", int(row[1]), float(row[2]),
                           Flag(int(row[3])))

    async def info(self, uid: int) -> MessageInfo:
        async with self._store._conn() as conn:
            return await self._one(conn, "SELECT m.uid, m.size, m.internaldate, m.flags, a.uidvalidity, m.ext_id"
                                   " FROM messages m JOIN accounts a USING (address)"
                                   " WHERE m.address = %s AND m.uid = %s", (self._address, uid), uid)

    async def set_flags(self, uid: int, flags: Flag) -> MessageInfo:
        async with self._store._conn() as conn, conn.transaction():
            info = await self._one(conn, "UPDATE messages m SET flags = %s FROM accounts a"
                                   " WHERE a.address = m.address AND m.address = %s AND m.uid = %s"
                                   " RETURNING m.uid, m.size, m.internaldate, m.flags, a.uidvalidity, m.ext_id",
                                   (flags.value, self._address, uid), uid)
            await conn.execute("UPDATE accounts SET modseq = modseq + 1 WHERE address = %s", (self._address,))
        return info

    async def expunge(self, uids: Iterable[int]) -> list[int]:
        wanted = sorted(set(uids))
        if not wanted:
            return []
        async with self._store._conn() as conn, conn.transaction():
            cur = await conn.execute("DELETE FROM messages WHERE address = %s AND uid = ANY(%s)"
                                     " RETURNING uid, size, internaldate, body", (self._address, wanted))
            rows = await cur.fetchall()
            if rows:
                nbytes = sum(int(r[1]) for r in rows)
                await conn.execute("UPDATE accounts SET usage_bytes = usage_bytes - %s,"
                                   " usage_messages = usage_messages - %s, modseq = modseq + 1"
                                   " WHERE address = %s", (nbytes, len(rows), self._address))
                await _orphan(conn, sorted({int(r[3]) for r in rows}))
                await conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, self._store._payload(
                    self._address, ChangeKind.EXPUNGE, nbytes, len(rows))))
        if rows:
            with contextlib.suppress(StoreError):
                await self._store._refresh([self._address])
            now = time.time()
            self._store._deleted([(int(r[1]), now - float(r[2])) for r in rows])
            self._store.changes._dispatch(Change(self._address, ChangeKind.EXPUNGE,
                                                 sum(int(r[1]) for r in rows), len(rows)))
        return sorted(int(r[0]) for r in rows)

    async def body(self, uid: int) -> PgBody:
        async with self._store._conn() as conn:
            cur = await conn.execute("SELECT b.id, b.size, b.chunk_size FROM messages m JOIN bodies b"
                                     " ON b.id = m.body WHERE m.address = %s AND m.uid = %s",
                                     (self._address, uid))
            row = await cur.fetchone()
            if row is None:
                await self._account(conn)
                raise NoSuchMessage(f"{self._address}: no message with UID {uid}")
        return PgBody(self._store, int(row[0]), int(row[1]), int(row[2]))

    async def note_fetched(self, uid: int) -> None:
        async with self._store._conn() as conn:
            cur = await conn.execute("UPDATE messages SET fetched = true WHERE address = %s AND uid = %s"
                                     " AND NOT fetched RETURNING internaldate", (self._address, uid))
            row = await cur.fetchone()
        if row is not None:
            self._store._fetch_latency.observe(max(0.0, time.time() - float(row[0])))

    async def note_poll(self) -> None:
        async with self._store._conn() as conn:
            await conn.execute("UPDATE accounts SET last_poll = %s WHERE address = %s",
                               (time.time(), self._address))


class PgDelivery:
    """Chunks go to the database from a writer task while the client streams; write() only
    buffers (at most WRITE_BUFFER + one chunk) and says when to wait."""

    def __init__(self, store: PgStore, envelope: Envelope) -> None:
        self._store, self._env = store, envelope
        self._rcpts: list[str] = []
        self._res: dict[str, PgReservation] = {}
        self._buf = bytearray()
        self._queue: asyncio.Queue[tuple[int, bytes | bytearray] | None] = asyncio.Queue()   # bounded by WRITE_BUFFER
        self._queued = 0
        self._size = 0
        self._seq = 0
        self._body: int | None = None
        self._writers: list[asyncio.Task[None]] = []
        self._drained = asyncio.Event()      # the caller: a writer stored a chunk (or failed)
        self._error: BaseException | None = None
        self._state = "open"             # open -> committing -> committed | aborted
        self._header_written = False
        self._need_extend = False

    @property
    def recipients(self) -> Sequence[str]:
        return tuple(self._rcpts)

    @property
    def size(self) -> int:
        return self._size

    async def add_recipient(self, address: str, declared_size: int) -> Refusal | None:
        addr = normalize_address(address)
        if addr in self._res:
            return None
        if self._header_written or self._state != "open":
            raise StoreError("add_recipient() after the message started")
        try:
            r = await self._store.ledger.reserve(addr, max(0, declared_size))
        except NoSuchAccount:
            return Refusal.NO_SUCH_ACCOUNT
        except QuotaExceeded as e:
            return Refusal.OVER_QUOTA_MESSAGES if e.reason == "messages" else Refusal.OVER_QUOTA_BYTES
        if self._state != "open":          # aborted while we waited
            self._store.ledger.release(r)
            raise StoreError("delivery aborted")
        self._rcpts.append(addr)
        self._res[addr] = r
        return None

    async def start(self) -> None:
        """The recipients are complete: the body's row is made (a database that is not there
        answers DATA with 451, not 354) and the trace headers are written."""
        if self._header_written:
            return
        if self._state != "open":
            raise StoreError(f"start() on a delivery that is {self._state}")
        if not self._rcpts:
            raise StoreError("a delivery needs at least one recipient")
        async with self._store._conn() as conn:
            body = await self._store.bodies.new(conn, self._store.node_id)
        if self._state != "open":                      # aborted meanwhile
            self._store._background(self._store._drop_body([], body), "abort")
            raise StoreError("delivery aborted")
        self._body = body
        self._write_header()

    def _write_header(self) -> None:
        self._header_written = True
        e = self._env
        self._append(trace_headers(e.sender, self._rcpts, self._store.config.hostname, e.session_id,
                                   e.helo, e.peer, e.protocol))

    def write(self, chunk: bytes | bytearray | memoryview) -> None:
        if self._error is not None:
            raise self._error
        if self._state != "open":
            raise StoreError(f"write() on a delivery that is {self._state}")
        if not self._rcpts:
            raise StoreError("write() before any recipient")
        if not self._header_written:
            raise StoreError("write() before start()")
        self._append(chunk)

    def _append(self, data: bytes | bytearray | memoryview) -> None:
        """Cut the stream into chunks of chunk_size, copying each byte once (the caller may
        reuse `data` when this returns)."""
        mv = memoryview(data).cast("B")
        n = len(mv)
        if not n:
            return
        self._size += n
        for r in self._res.values():
            self._store.ledger.note_streamed(r, n)
            if self._size - r.nbytes >= EXTEND_EVERY:
                self._need_extend = True
        cs = self._store.bodies.chunk_size
        pos = 0
        if self._buf:
            pos = min(n, cs - len(self._buf))
            self._buf += mv[:pos]
            if len(self._buf) == cs:
                self._push(self._buf)               # the buffer itself goes: no copy
                self._buf = bytearray()
        while n - pos >= cs:
            self._push(bytes(mv[pos:pos + cs]))
            pos += cs
        if pos < n:
            self._buf += mv[pos:]

    def _push(self, chunk: bytes | bytearray) -> None:
        if not self._writers:
            loop = asyncio.get_running_loop()
            self._writers = [loop.create_task(self._write_loop()) for _ in range(WRITERS)]
        self._queue.put_nowait((self._seq, chunk))
        self._seq += 1
        self._queued += len(chunk)

    async def _write_loop(self) -> None:
        """One of WRITERS tasks: chunks are rows of their own, written in any order."""
        while (item := await self._queue.get()) is not None:
            seq, chunk = item
            if self._error is None:
                try:
                    if self._body is None:
                        raise StoreError("write() before start()")
                    async with self._store._conn() as conn:
                        await self._store.bodies.put(conn, self._body, seq, chunk)
                except Exception as e:  # noqa: BLE001  (kept, raised by the next write/wait/commit)
                    self._error = e if isinstance(e, StoreError) else StoreError(f"writing the message: {e}")
            self._queued -= len(chunk)
            self._drained.set()

    @property
    def writable(self) -> bool:
        return self._error is None and not self._need_extend and self._queued < WRITE_BUFFER

    async def wait_writable(self) -> None:
        if self._need_extend:
            await self._extend()
        while self._error is None and self._queued >= WRITE_BUFFER:
            await self._wait_progress()
        if self._error is not None:
            raise self._error

    async def _wait_progress(self) -> None:
        self._drained.clear()
        await self._drained.wait()

    async def _extend(self) -> None:
        for r in self._res.values():
            short = self._size - r.nbytes
            if short > 0:
                await self._store.ledger.extend(r, short)
        self._need_extend = False

    async def commit(self) -> DeliveryReceipt:
        if self._state != "open":
            raise StoreError(f"commit() on a delivery that is {self._state}")
        if not self._rcpts:
            raise StoreError("a delivery needs at least one recipient")
        if not self._header_written:
            await self.start()
        if self._error is not None:
            raise self._error
        self._state = "committing"
        try:
            if self._buf:
                self._push(self._buf)
                self._buf = bytearray()
            if not self._writers:                        # an empty body still gets its row
                self._push(b"")
            for _ in self._writers:
                self._queue.put_nowait(None)
            await asyncio.gather(*self._writers)
            if self._error is not None:
                raise self._error
            await self._extend()
            receipt = await self._store._commit(self._body, self._size, self._rcpts, self._res)
        except BaseException:
            self._state = "open"
            raise
        self._state = "committed"
        for r in self._res.values():
            self._store.ledger.settle(r)
        return receipt

    def abort(self) -> None:
        if self._state != "open":
            return
        self._state = "aborted"
        for r in self._res.values():
            self._store.ledger.release(r)
        writers, body = self._writers, self._body
        self._buf = bytearray()
        for w in writers:
            w.cancel()
        self._store._background(self._store._drop_body(writers, body), "abort")


class PgChangeFeed:
    """Local subscribers; changes of other nodes arrive by LISTEN on a connection of its own."""

    def __init__(self, store: PgStore) -> None:
        self._store = store
        self._subs: dict[str | None, list[ChangeCallback]] = {}     # None: every mailbox
        self.connected = False
        self.reconnects = 0
        self.received = 0

    def subscribe(self, address: str | None, callback: ChangeCallback) -> Callable[[], None]:
        addr = None if address is None else normalize_address(address)
        self._subs.setdefault(addr, []).append(callback)

        def unsubscribe() -> None:
            subs = self._subs.get(addr, [])
            if callback in subs:
                subs.remove(callback)
            if not subs:
                self._subs.pop(addr, None)
        return unsubscribe

    def _dispatch(self, change: Change) -> None:
        for cb in [*self._subs.get(change.address, ()), *self._subs.get(None, ())]:
            try:
                cb(change)
            except Exception as e:  # noqa: BLE001  (a subscriber must not break the feed)
                log.error("subscriber-failed", address=change.address, error=repr(e))

    async def connect(self) -> psycopg.AsyncConnection[Any]:
        """The LISTEN connection; it also marks this node alive (nodes.pid: when the session
        ends, because the node died, the sweepers of the others see it at once)."""
        conn = await psycopg.AsyncConnection.connect(self._store.dsn, autocommit=True)
        try:
            await conn.execute(f"LISTEN {CHANNEL}")
            await conn.execute(
                "INSERT INTO nodes (id, pid, backend_start, server_started)"
                " SELECT %s, pid, backend_start, pg_postmaster_start_time() FROM pg_stat_activity"
                " WHERE pid = pg_backend_pid() ON CONFLICT (id) DO UPDATE SET heartbeat = now(),"
                " pid = EXCLUDED.pid, backend_start = EXCLUDED.backend_start,"
                " server_started = EXCLUDED.server_started", (self._store.node_id,))
        except BaseException:
            await conn.close()
            raise
        self.connected = True
        return conn

    async def run(self, conn: psycopg.AsyncConnection[Any] | None) -> None:
        """LISTEN until cancelled; reconnect with backoff. After a reconnect every subscriber
        gets an empty NEW change: it rechecks its mailbox (notifications may have been missed)."""
        delay = 0.1
        while True:
            try:
                if conn is None:
                    conn = await self.connect()
                    self.reconnects += 1
                    for addr in [a for a in self._subs if a is not None]:
                        self._dispatch(Change(addr, ChangeKind.NEW, 0, 0))
                async with conn:
                    delay = 0.1
                    async for note in conn.notifies():
                        self._receive(note.payload)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001  (the database went away: retry)
                if self.connected:
                    log.warning("change-feed-lost", error=str(e).strip())
            conn = None
            self.connected = False
            await asyncio.sleep(delay)
            delay = min(delay * 2, RECONNECT_MAX_SECONDS)

    def _receive(self, payload: str) -> None:
        try:
            d = json.loads(payload)
            if d["node"] == self._store.node_id:
                return
            change = Change(d["address"], ChangeKind(d["kind"]), int(d["nbytes"]), int(d["nmessages"]))
        except (ValueError, KeyError, TypeError):
            log.warning("change-feed-bad-payload", payload=payload[:200])
            return
        self.received += 1
        self._dispatch(change)


class PgStore:
    """relay.store.api.MessageStore on PostgreSQL. `await open()` before use."""

    def __init__(self, config: Config, dsn: str | None = None, *, node_id: str | None = None,
                 bodies: BodyStore | None = None, pool_max: int = POOL_MAX,
                 node_stale_seconds: float = NODE_STALE_SECONDS,
                 orphan_grace_seconds: float = ORPHAN_GRACE_SECONDS) -> None:
        self.config, self.dsn = config, config.store.dsn if dsn is None else dsn
        if not self.dsn:
            raise StoreError('[store] backend "postgresql" needs a dsn (a libpq connection string)')
        self.node_id = node_id or f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        self.bodies: BodyStore = bodies or PgBodyStore()
        # never below two heartbeats: a live node must not look dead to its peers
        self.node_stale_seconds = max(node_stale_seconds, 2 * HEARTBEAT_SECONDS)
        self.orphan_grace_seconds = orphan_grace_seconds
        self._pool = psycopg_pool.AsyncConnectionPool(
            self.dsn, min_size=1, max_size=pool_max, open=False, timeout=POOL_TIMEOUT,
            kwargs={"autocommit": True}, check=self._check_idle,
            name=f"relay-{self.node_id}")
        self._accounts = PgAccounts(self)
        self._ledger = PgLedger(self)
        self._changes = PgChangeFeed(self)
        self._messages: OrderedDict[str, tuple[int, list[MessageInfo]]] = OrderedDict()
        self._tasks: set[asyncio.Task[None]] = set()
        self._last_used: dict[int, float] = {}      # id(pooled connection) -> when it came back
        self._counts = {"stored": 0, "stored_bytes": 0, "deleted": 0, "deleted_bytes": 0,
                        "unavailable": 0, "swept_nodes": 0, "swept_bodies": 0}
        self._fetch_latency = Histogram(WAIT_SECONDS)
        self._delete_latency = Histogram(WAIT_SECONDS)
        self._mailbox_stats: dict[str, MailboxStats] = {}
        self._accounts_count = 0
        self._last_orphan_scan = 0.0
        self._opened = False

    # --- api properties ------------------------------------------------------------------

    @property
    def accounts(self) -> PgAccounts:
        return self._accounts

    @property
    def ledger(self) -> PgLedger:
        return self._ledger

    @property
    def changes(self) -> PgChangeFeed:
        return self._changes

    def mailbox(self, address: str) -> PgMailbox:
        return PgMailbox(self, normalize_address(address))

    def begin_delivery(self, envelope: Envelope) -> PgDelivery:
        return PgDelivery(self, envelope)

    # --- life ----------------------------------------------------------------------------

    async def open(self) -> None:
        """Migrate the schema, open the pool, register this node, start the background work
        (heartbeat, sweeper, ledger refresh, change feed). StoreUnavailable if the database
        cannot be reached now."""
        try:
            conn = await psycopg.AsyncConnection.connect(self.dsn, autocommit=True, connect_timeout=10)
            async with conn:
                await migrate(conn)
        except _UNAVAILABLE as e:
            raise StoreUnavailable(f"PostgreSQL: {str(e).strip()}") from e
        await self._pool.open(wait=False)
        try:
            listener = await self._changes.connect()
        except _UNAVAILABLE as e:
            raise StoreUnavailable(f"PostgreSQL: {str(e).strip()}") from e
        self._opened = True
        self._spawn(self._changes.run(listener))
        await self.sweep()              # what dead nodes left (a crash just before this start)
        await self._refresh()
        self._spawn(self._maintain())

    async def close(self) -> None:
        if self._opened:
            with contextlib.suppress(StoreError):
                async with self._conn() as conn:
                    await conn.execute("DELETE FROM nodes WHERE id = %s", (self.node_id,))
        for t in list(self._tasks):
            t.cancel()
        for t in list(self._tasks):
            with contextlib.suppress(BaseException):
                await t
        await self._pool.close()
        self._opened = False

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        t = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    def _background(self, coro: Coroutine[Any, Any, None], what: str) -> None:
        """Finish a sync call's database work later; its failure only logs (the sweeper
        removes what a failed cleanup leaves)."""
        async def run() -> None:
            try:
                await coro
            except Exception as e:  # noqa: BLE001
                log.warning("background-failed", what=what, error=str(e).strip())
        self._spawn(run())

    async def _check_idle(self, conn: Conn) -> None:
        """Pool checkout: a connection idle for a while is pinged first (after a failover every
        pooled connection is dead; one in use a moment ago is not worth a round trip)."""
        if time.monotonic() - self._last_used.pop(id(conn), 0.0) > CHECK_IDLE_SECONDS:
            await psycopg_pool.AsyncConnectionPool.check_connection(conn)

    @contextlib.asynccontextmanager
    async def _conn(self) -> AsyncIterator[Conn]:
        """A pooled connection; database errors become StoreUnavailable / StoreError."""
        try:
            async with self._pool.connection() as conn:
                try:
                    yield conn
                finally:
                    if len(self._last_used) > 4 * POOL_MAX:    # ids of connections the pool dropped
                        self._last_used.clear()
                    self._last_used[id(conn)] = time.monotonic()
        except StoreError:
            raise
        except _UNAVAILABLE as e:
            self._counts["unavailable"] += 1
            raise StoreUnavailable(f"PostgreSQL unavailable: {str(e).strip()}") from e
        except psycopg.Error as e:
            raise StoreError(f"PostgreSQL: {str(e).strip()}") from e

    # --- delivery ------------------------------------------------------------------------

    def _payload(self, address: str, kind: ChangeKind, nbytes: int, nmessages: int) -> str:
        return json.dumps({"node": self.node_id, "address": address, "kind": kind.value,
                           "nbytes": nbytes, "nmessages": nmessages})

    async def _commit(self, body: int | None, size: int, rcpts: list[str],
                      res: dict[str, PgReservation]) -> DeliveryReceipt:
        if body is None:
            raise StoreError("the message body was not written")
        now = time.time()
        committing: list[bool] = []                # set once COMMIT is on its way
        try:
            await self._commit_tx(body, size, rcpts, res, now, committing)
        except StoreUnavailable:
            # The connection broke: before, during or after COMMIT (a failover). Replying 4xx
            # when the commit did happen would make the client send the message again, so find
            # out first: the body's rows exist exactly when the transaction committed.
            if not committing or not await self._committed(body):
                raise
            log.warning("commit-outcome-recovered", body=body)
            for r in res.values():
                self._ledger._settled(r)
        self._counts["stored"] += len(rcpts)
        self._counts["stored_bytes"] += size * len(rcpts)
        for addr in rcpts:
            self._changes._dispatch(Change(addr, ChangeKind.NEW, size, 1))
        return DeliveryReceipt(f"B{body:x}", size, tuple(rcpts))

    async def _committed(self, body: int) -> bool:
        """Did the delivery of `body` commit? Asked again until the database answers, for at
        most COMMIT_OUTCOME_SECONDS; False when it never does (the caller then replies 4xx)."""
        deadline = time.monotonic() + COMMIT_OUTCOME_SECONDS
        while True:
            try:
                async with self._conn() as conn:
                    cur = await conn.execute("SELECT 1 FROM messages WHERE body = %s LIMIT 1", (body,))
                    return await cur.fetchone() is not None
            except StoreUnavailable:
                if time.monotonic() >= deadline:
                    return False
                await asyncio.sleep(0.2)

    async def _commit_tx(self, body: int, size: int, rcpts: list[str],
                         res: dict[str, PgReservation], now: float, committing: list[bool]) -> None:
        async with self._conn() as conn:
            async with conn.transaction():
                if not await self.bodies.seal(conn, body, size):
                    raise StoreError("the message body is incomplete (removed by a sweeper?): not stored")
                for addr in sorted(rcpts):        # one lock order: concurrent commits cannot deadlock
                    cur = await conn.execute(
                        "UPDATE accounts SET uidnext = uidnext + 1, usage_bytes = usage_bytes + %s,"
                        " usage_messages = usage_messages + 1, modseq = modseq + 1"
                        " WHERE address = %s RETURNING uidnext - 1", (size, addr))
                    row = await cur.fetchone()
                    if row is None:
                        raise NoSuchAccount(f"{addr}: account deleted during delivery")
                    await conn.execute("INSERT INTO messages (address, uid, body, size, internaldate)"
                                       " VALUES (%s, %s, %s, %s, %s)", (addr, int(row[0]), body, size, now))
                    await conn.execute("SELECT pg_notify(%s, %s)",
                                       (CHANNEL, self._payload(addr, ChangeKind.NEW, size, 1)))
                await conn.execute("DELETE FROM reservations WHERE id = ANY(%s)", ([r.id for r in res.values()],))
                committing.append(True)                # leaving the block sends COMMIT
            for r in res.values():
                self._ledger._settled(r)
            with contextlib.suppress(psycopg.Error):      # stored already: figures can wait
                await self._refresh(rcpts, conn)

    async def _drop_body(self, writers: list[asyncio.Task[None]], body: int | None) -> None:
        for w in writers:
            with contextlib.suppress(BaseException):
                await w
        if body is not None:
            async with self._conn() as conn:
                await self.bodies.delete(conn, [body])

    # --- bookkeeping ---------------------------------------------------------------------

    def _usage(self, row: Sequence[Any]) -> Usage:
        q = self.config.quota
        return Usage(int(row[0]), int(row[1]), q.default_bytes if row[2] is None else int(row[2]),
                     q.default_messages if row[3] is None else int(row[3]), int(row[4]), int(row[5]))

    def _forget(self, address: str) -> None:
        self._messages.pop(address, None)

    def _deleted(self, removed: list[tuple[int, float]]) -> None:
        for size, age in removed:
            self._delete_latency.observe(max(0.0, age))
            self._counts["deleted"] += 1
            self._counts["deleted_bytes"] += size

    async def _heartbeat(self) -> None:
        async with self._conn() as conn:
            await conn.execute("INSERT INTO nodes (id) VALUES (%s)"
                               " ON CONFLICT (id) DO UPDATE SET heartbeat = now()", (self.node_id,))

    async def sweep(self) -> tuple[int, int]:
        """Remove dead nodes (session gone or heartbeat stale: their reservations go with them), bodies left
        unsealed by nodes that are gone, and expunged bodies past their grace period.
        Returns (nodes, bodies) removed."""
        async with self._conn() as conn:
            cur = await conn.execute(
                "DELETE FROM nodes n WHERE id <> %s AND (heartbeat < now() - make_interval(secs => %s)"
                " OR server_started = pg_postmaster_start_time() AND NOT EXISTS (SELECT 1 FROM pg_stat_activity a"
                "   WHERE a.pid = n.pid AND a.backend_start = n.backend_start)) RETURNING id",
                (self.node_id, self.node_stale_seconds))
            dead = [str(r[0]) for r in await cur.fetchall()]
            cur = await conn.execute("DELETE FROM bodies WHERE NOT complete AND (node IS NULL OR"
                                     " node NOT IN (SELECT id FROM nodes)) RETURNING id")
            half = len(await cur.fetchall())
            if time.monotonic() - self._last_orphan_scan > ORPHAN_SCAN_SECONDS:
                self._last_orphan_scan = time.monotonic()
                await conn.execute("UPDATE bodies b SET orphaned = now() WHERE complete AND orphaned IS NULL"
                                   " AND NOT EXISTS (SELECT 1 FROM messages m WHERE m.body = b.id)")
            cur = await conn.execute("DELETE FROM bodies WHERE orphaned < now() - make_interval(secs => %s)"
                                     " RETURNING id", (self.orphan_grace_seconds,))
            gone = len(await cur.fetchall())
        if dead or half:
            log.warning("swept-dead-nodes", nodes=dead, unsealed_bodies=half)
        self._counts["swept_nodes"] += len(dead)
        self._counts["swept_bodies"] += half + gone
        return len(dead), half + gone

    async def _refresh(self, addresses: list[str] | None = None, conn: Conn | None = None) -> None:
        """The in-memory figures behind Ledger.snapshot() and statistics(): every account (the
        periodic refresh), or just these (after this node changed them)."""
        if conn is None:
            async with self._conn() as c:
                await self._refresh(addresses, c)
            return
        where = "" if addresses is None else " WHERE a.address = ANY(%s)"
        args: tuple[Any, ...] = (self.node_id, list(self._ledger._releasing))
        cur = await conn.execute(
            "SELECT a.address, a.usage_bytes, a.usage_messages, a.quota_bytes, a.quota_messages,"
            " a.last_poll,"
            " (SELECT internaldate FROM messages m WHERE m.address = a.address ORDER BY uid LIMIT 1),"
            " COALESCE(r.nbytes, 0), COALESCE(r.n, 0), COALESCE(r.streamed, 0)"
            " FROM accounts a LEFT JOIN (SELECT address, SUM(nbytes) AS nbytes, COUNT(*) AS n,"
            "   SUM(streamed) FILTER (WHERE node <> %s) AS streamed FROM reservations WHERE id <> ALL(%s)"
            "   GROUP BY address) r USING (address)" + where,
            args if addresses is None else (*args, addresses))
        rows = await cur.fetchall()
        mine: dict[str, int] = {}
        for r in self._ledger._mine.values():
            mine[r.address] = mine.get(r.address, 0) + r.streamed
        now = time.time()
        q = self.config.quota
        entries: dict[str, LedgerEntry] = {} if addresses is None else dict(self._ledger._entries)
        stats: dict[str, MailboxStats] = {} if addresses is None else dict(self._mailbox_stats)
        for a in addresses or ():
            entries.pop(a, None)
            stats.pop(a, None)
        for row in rows:
            addr = str(row[0])
            qb = q.default_bytes if row[3] is None else int(row[3])
            qm = q.default_messages if row[4] is None else int(row[4])
            entries[addr] = LedgerEntry(int(row[1]), int(row[2]), int(row[7]), int(row[8]),
                                        int(row[9]) + mine.get(addr, 0), qb, qm)
            stats[addr] = MailboxStats(int(row[1]), int(row[2]),
                                       max(0.0, now - float(row[6])) if row[6] is not None else 0.0,
                                       qb, qm, float(row[5]))
        self._ledger._entries = entries
        self._mailbox_stats = stats
        self._accounts_count = len(stats)

    async def _maintain(self) -> None:
        """Once per REFRESH_SECONDS: the ledger figures; heartbeat and sweep less often."""
        last_beat = last_sweep = time.monotonic()
        while True:
            await asyncio.sleep(REFRESH_SECONDS)
            try:
                t = time.monotonic()
                if t - last_beat >= HEARTBEAT_SECONDS:
                    await self._heartbeat()
                    last_beat = t
                if t - last_sweep >= min(HEARTBEAT_SECONDS * 2, self.node_stale_seconds):
                    await self.sweep()
                    last_sweep = t
                if self._ledger._releasing:        # a background release that failed
                    await self._ledger._delete(list(self._ledger._releasing))
                await self._refresh()
            except StoreError as e:
                log.warning("maintenance-failed", error=str(e))

    # --- admin (relay/store/backends.py; not part of the api) -----------------------------

    async def never_fetched(self, address: str) -> int:
        async with self._conn() as conn:
            cur = await conn.execute("SELECT count(*) FROM messages WHERE address = %s AND NOT fetched",
                                     (normalize_address(address),))
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def recalc(self, address: str | None = None) -> list[tuple[str, tuple[int, int], tuple[int, int]]]:
        """Set each account's ledger (stored bytes, messages) to what its messages add up to:
        (address, before, after) for those that differed. Safe while nodes run: each account
        is recounted under its row lock, which every commit and expunge takes too."""
        if address is None:
            addrs = [a.address for a in await self._accounts.list()]
        else:
            addrs = [normalize_address(address)]
        changed = []
        for addr in addrs:
            async with self._conn() as conn, conn.transaction():
                cur = await conn.execute("SELECT usage_bytes, usage_messages FROM accounts WHERE address = %s"
                                         " FOR UPDATE", (addr,))
                before = await cur.fetchone()
                if before is None:
                    if address is not None:
                        raise NoSuchAccount(f"{addr}: no such account")
                    continue
                cur = await conn.execute("SELECT COALESCE(SUM(size), 0), COUNT(*) FROM messages WHERE address = %s",
                                         (addr,))
                after = await cur.fetchone()
                assert after is not None
                old, new = (int(before[0]), int(before[1])), (int(after[0]), int(after[1]))
                if old != new:
                    await conn.execute("UPDATE accounts SET usage_bytes = %s, usage_messages = %s WHERE address = %s",
                                       (*new, addr))
                    changed.append((addr, old, new))
        return changed

    # --- statistics ----------------------------------------------------------------------

    def statistics(self) -> StoreStats:
        c = self._counts
        mb = dict(self._mailbox_stats)
        return StoreStats(self._accounts_count, c["stored"], c["stored_bytes"], c["deleted"], c["deleted_bytes"],
                          sum(m.backlog_bytes for m in mb.values()), sum(m.backlog_messages for m in mb.values()),
                          mb, self._fetch_latency.snapshot(), self._delete_latency.snapshot())

    def backend_statistics(self) -> PgStats:
        """This node's connection pool and cluster machinery (relay/metrics.py)."""
        p = self._pool.get_stats()
        c = self._counts
        return PgStats(p.get("pool_size", 0), p.get("pool_available", 0), p.get("pool_max", 0),
                       p.get("requests_waiting", 0), p.get("requests_num", 0), p.get("requests_errors", 0),
                       p.get("connections_num", 0), p.get("connections_errors", 0), p.get("connections_lost", 0),
                       c["unavailable"], int(self._changes.connected), self._changes.reconnects,
                       self._changes.received, c["swept_nodes"], c["swept_bodies"])

    def pool_statistics(self) -> dict[str, int]:
        """backend_statistics() as a dict (tests)."""
        return dataclasses.asdict(self.backend_statistics())
