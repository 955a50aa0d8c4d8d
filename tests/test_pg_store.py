"""The PostgreSQL store against a real PostgreSQL (tests/pgutil.py): what the conformance suite
does not cover: migrations, two nodes on one database (quota, change feed), a dead node's
residue, bodies by range, losing the database and getting it back."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import make_config
from pgutil import PgServer, pg_dsn, pg_server  # noqa: F401  (fixtures)

from relay.store.api import ChangeKind, Envelope, Flag, Refusal, StoreUnavailable
from relay.store.postgresql.schema import latest_version
from relay.store.postgresql.store import PgStore
from relay.store.postgresql.bodies import BODY_CHUNK

pytestmark = pytest.mark.timeout(300)


def run(coro_fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
    return asyncio.run(coro_fn(*args))


def new_store(tmp: Path, dsn: str, **kw: Any) -> PgStore:
    return PgStore(make_config(tmp, quota={"default_bytes": "100MiB"}), dsn, **kw)


async def deliver(store: PgStore, rcpts: list[str], chunks: list[bytes], declared: int = 0) -> Any:
    d = store.begin_delivery(Envelope("sender@example.org", session_id="t1", helo="client.test", peer="127.0.0.1"))
    for r in rcpts:
        assert await d.add_recipient(r, declared) is None
    await d.start()
    for c in chunks:
        d.write(c)
        if not d.writable:
            await d.wait_writable()
    return await d.commit()


def test_migrations_apply_once_even_when_two_nodes_open_together(pg_dsn: str, tmp_path: Path) -> None:
    async def main() -> None:
        a, b = new_store(tmp_path, pg_dsn), new_store(tmp_path, pg_dsn)
        await asyncio.gather(a.open(), b.open())
        async with a._conn() as conn:
            cur = await conn.execute("SELECT version FROM schema_version ORDER BY version")
            assert [r[0] for r in await cur.fetchall()] == list(range(1, latest_version() + 1))
            cur = await conn.execute("SELECT count(*) FROM nodes")
            assert (await cur.fetchone())[0] == 2
        await a.close()
        await b.close()
    run(main)


def test_deliver_once_for_two_recipients_and_read_back_by_range(pg_dsn: str, tmp_path: Path) -> None:
    body = os.urandom(3 * BODY_CHUNK + 12345)

    async def main() -> None:
        s = new_store(tmp_path, pg_dsn)
        await s.open()
        for a in ("a@example.org", "b@example.org"):
            await s.accounts.add(a, "pw")
        receipt = await deliver(s, ["a@example.org", "b@example.org"],
                                [body[i:i + 70000] for i in range(0, len(body), 70000)])
        assert receipt.recipients == ("a@example.org", "b@example.org")
        for a in ("a@example.org", "b@example.org"):
            mb = s.mailbox(a)
            (info,) = await mb.messages()
            assert info.uid == 1 and info.size == receipt.size and info.flags == Flag(0)
            with await mb.body(info.uid) as b:
                head = await b.read(0, 200)
                assert head.startswith(b"Return-Path: <sender@example.org>\r\nReceived: from client.test")
                hlen = receipt.size - len(body)
                whole = bytearray()
                off = 0
                while chunk := await b.read(off, 300000):
                    whole += chunk
                    off += len(chunk)
                assert bytes(whole[hlen:]) == body
                # ranges across chunk boundaries, past the end
                off = 2 * BODY_CHUNK - 10                  # across the 2nd chunk boundary
                assert await b.read(off, 20) == body[off - hlen:off - hlen + 20]
                assert await b.read(receipt.size, 10) == b""
                assert await b.read(receipt.size - 3, 10) == bytes(whole[-3:])
        async with s._conn() as conn:
            cur = await conn.execute("SELECT count(*) FROM bodies")
            assert (await cur.fetchone())[0] == 1           # stored once
        await s.close()
    run(main)


def test_two_nodes_share_quota_and_see_each_others_deliveries(pg_dsn: str, tmp_path: Path) -> None:
    async def main() -> None:
        a, b = new_store(tmp_path, pg_dsn), new_store(tmp_path, pg_dsn)
        await a.open()
        await b.open()
        await a.accounts.add("r@example.org", quota_bytes=10_000)
        seen: list[Any] = []
        got = asyncio.Event()

        def on_change(c: Any) -> None:
            seen.append(c)
            got.set()
        b.changes.subscribe("r@example.org", on_change)
        # a reservation on node a counts on node b
        da = a.begin_delivery(Envelope("s@example.org"))
        assert await da.add_recipient("r@example.org", 6_000) is None
        await da.start()
        db = b.begin_delivery(Envelope("s@example.org"))
        assert await db.add_recipient("r@example.org", 6_000) == Refusal.OVER_QUOTA_BYTES
        da.write(b"x" * 5000)
        receipt = await da.commit()
        await asyncio.wait_for(got.wait(), 10)
        assert seen[0].kind == ChangeKind.NEW and seen[0].nbytes == receipt.size
        assert [m.size for m in await b.mailbox("r@example.org").messages()] == [receipt.size]
        u = await b.ledger.usage("r@example.org")
        assert (u.bytes, u.messages, u.reserved_bytes) == (receipt.size, 1, 0)
        db2 = b.begin_delivery(Envelope("s@example.org"))
        assert await db2.add_recipient("r@example.org", 10_000 - receipt.size + 1) == Refusal.OVER_QUOTA_BYTES
        assert await db2.add_recipient("r@example.org", 10_000 - receipt.size) is None
        db2.abort()
        await a.close()
        await b.close()
    run(main)


def test_flags_expunge_and_the_ledger(pg_dsn: str, tmp_path: Path) -> None:
    async def main() -> None:
        s = new_store(tmp_path, pg_dsn, orphan_grace_seconds=0)
        await s.open()
        await s.accounts.add("r@example.org")
        for i in range(3):
            await deliver(s, ["r@example.org"], [b"message %d\r\n" % i])
        mb = s.mailbox("r@example.org")
        msgs = await mb.messages()
        assert [m.uid for m in msgs] == [1, 2, 3]
        assert (await mb.set_flags(2, Flag.SEEN | Flag.DELETED)).flags == Flag.SEEN | Flag.DELETED
        assert await mb.expunge([2, 7]) == [2]
        assert [m.uid for m in await mb.messages()] == [1, 3]
        u = await s.ledger.usage("r@example.org")
        assert (u.bytes, u.messages) == (msgs[0].size + msgs[2].size, 2)
        await deliver(s, ["r@example.org"], [b"late\r\n"])
        assert [m.uid for m in await mb.messages()] == [1, 3, 4]      # UIDs never reused
        assert (await s.sweep())[1] == 1                               # the expunged body
        await s.close()
    run(main)


def test_a_dead_nodes_reservations_and_half_written_body_are_swept(pg_dsn: str, tmp_path: Path) -> None:
    async def main() -> None:
        dead = new_store(tmp_path, pg_dsn)
        alive = new_store(tmp_path, pg_dsn, node_stale_seconds=5.0)
        await dead.open()
        await alive.open()
        await dead.accounts.add("r@example.org", quota_bytes=5 * BODY_CHUNK)
        d = dead.begin_delivery(Envelope("s@example.org"))
        assert await d.add_recipient("r@example.org", 4 * BODY_CHUNK) is None
        await d.start()
        d.write(os.urandom(2 * BODY_CHUNK + 5))
        await d.wait_writable()
        while d._queued:
            await asyncio.sleep(0.01)
        for t in list(dead._tasks):      # the node dies: no heartbeat, no cleanup
            t.cancel()
        await dead._pool.close()
        assert (await alive.ledger.usage("r@example.org")).reserved_bytes == 4 * BODY_CHUNK
        for _ in range(400):             # the survivor's own sweeper (every 2 heartbeats)
            if alive.pool_statistics()["swept_nodes"]:
                break
            await asyncio.sleep(0.05)
        assert (alive.pool_statistics()["swept_nodes"], alive.pool_statistics()["swept_bodies"]) == (1, 1)
        u = await alive.ledger.usage("r@example.org")
        assert (u.bytes, u.reserved_bytes) == (0, 0)
        async with alive._conn() as conn:
            cur = await conn.execute("SELECT count(*) FROM body_chunks")
            assert (await cur.fetchone())[0] == 0
        await alive.close()
    run(main)


def test_losing_the_database_is_unavailable_and_the_node_recovers(tmp_path: Path) -> None:
    with PgServer.create() as pg:
        dsn = pg.create_database("relay")

        async def main() -> None:
            s = new_store(tmp_path, dsn)
            await s.open()
            await s.accounts.add("r@example.org")
            await deliver(s, ["r@example.org"], [b"before\r\n"])
            pg.stop("immediate")
            with pytest.raises(StoreUnavailable):
                await s.mailbox("r@example.org").messages()
            d = s.begin_delivery(Envelope("s@example.org"))
            with pytest.raises(StoreUnavailable):
                await d.add_recipient("r@example.org", 10)
            pg.start()
            for _ in range(100):             # the pool reconnects by itself
                try:
                    msgs = await s.mailbox("r@example.org").messages()
                    break
                except StoreUnavailable:
                    await asyncio.sleep(0.1)
            assert len(msgs) == 1
            await deliver(s, ["r@example.org"], [b"after\r\n"])
            assert len(await s.mailbox("r@example.org").messages()) == 2
            await s.close()
        run(main)
