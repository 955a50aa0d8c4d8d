"""Message bodies behind a small interface of their own, so that an S3-compatible object store
can hold them later (the mailbox index stays in PostgreSQL).

PgBodyStore keeps a body as rows of BODY_CHUNK bytes in body_chunks (bytea, STORAGE EXTERNAL:
no pglz on base64 of compressed images). Chunks are written before the delivery commits, each
in a short transaction with synchronous_commit off: the commit's own WAL flush (and, with a
synchronous standby, its replication) covers every WAL record before it, so the chunks are
durable exactly when the message is. seal() runs inside the commit's transaction.
"""

from __future__ import annotations

from typing import Any, Protocol

import psycopg

# Rows of 1 MiB: `python3 bench/bench_pg.py` (1 GiB through a node, quiet machine) ingested at
# 282 MB/s with 1 MiB rows, 258 with 512 KiB, 194 with 256 KiB (fetch ~300-314 MB/s for all),
# node peak RSS 78.9 / 73.3 / 70.0 MiB. Per delivery a node holds at most WRITE_BUFFER, per
# reader 1 + READ_AHEAD chunks, and each pooled connection keeps about one chunk in libpq.
BODY_CHUNK = 1 << 20

Conn = psycopg.AsyncConnection[Any]


class BodyStore(Protocol):
    """Where message bodies live. A body is written by one node (new, put... in order), made
    visible by seal() in the index transaction that references it, read by range, and deleted
    once no message references it (after a grace period, so that open readers finish)."""

    chunk_size: int

    async def new(self, conn: Conn, node: str) -> int:
        """A new, empty, incomplete body owned by `node`; its id."""
        ...

    async def put(self, conn: Conn, body: int, seq: int, data: bytes | bytearray) -> None:
        """Chunk number seq (every chunk but the last is chunk_size bytes)."""
        ...

    async def seal(self, conn: Conn, body: int, size: int) -> bool:
        """In the caller's transaction: mark the body complete if it holds exactly `size`
        bytes and still exists (a sweeper may have removed it); False otherwise."""
        ...

    async def read(self, conn: Conn, body: int, first: int, last: int) -> list[tuple[int, bytes]]:
        """Chunks first..last as (seq, data), in order; fewer if the body is shorter or gone."""
        ...

    async def delete(self, conn: Conn, bodies: list[int]) -> None:
        """Remove these bodies now (aborted deliveries)."""
        ...


class PgBodyStore:
    """Bodies as rows in PostgreSQL (tables bodies, body_chunks)."""

    def __init__(self, chunk_size: int = BODY_CHUNK) -> None:
        self.chunk_size = chunk_size

    async def new(self, conn: Conn, node: str) -> int:
        async with conn.transaction():        # an unsealed body need not survive a crash
            await conn.execute("SET LOCAL synchronous_commit TO off")
            cur = await conn.execute("INSERT INTO bodies (node, chunk_size) VALUES (%s, %s) RETURNING id",
                                     (node, self.chunk_size))
            row = await cur.fetchone()
        assert row is not None
        return int(row[0])

    async def put(self, conn: Conn, body: int, seq: int, data: bytes | bytearray) -> None:
        # pipeline: BEGIN, SET LOCAL, INSERT and COMMIT in one round trip
        async with conn.pipeline(), conn.transaction():
            await conn.execute("SET LOCAL synchronous_commit TO off")
            await conn.execute("INSERT INTO body_chunks (body, seq, data) VALUES (%s, %s, %b)",
                               (body, seq, data), prepare=True)

    async def seal(self, conn: Conn, body: int, size: int) -> bool:
        # octet_length of an EXTERNAL (uncompressed) value reads the TOAST pointer only.
        cur = await conn.execute(
            "UPDATE bodies SET complete = true, node = NULL, size = %s"
            " WHERE id = %s AND NOT complete"
            " AND (SELECT COALESCE(SUM(octet_length(data)), 0) FROM body_chunks WHERE body = %s) = %s"
            " RETURNING id", (size, body, body, size))
        return await cur.fetchone() is not None

    async def read(self, conn: Conn, body: int, first: int, last: int) -> list[tuple[int, bytes]]:
        async with conn.cursor(binary=True) as cur:
            await cur.execute("SELECT seq, data FROM body_chunks WHERE body = %s AND seq BETWEEN %s AND %s"
                              " ORDER BY seq", (body, first, last), prepare=True)
            return [(int(r[0]), bytes(r[1])) for r in await cur.fetchall()]

    async def delete(self, conn: Conn, bodies: list[int]) -> None:
        if bodies:
            await conn.execute("DELETE FROM bodies WHERE id = ANY(%s)", (bodies,))
