"""Relay nodes on one PostgreSQL, the hard cases with the real thing: kill -9 of a node in the
middle of a burst, and a failover of the database (primary killed, synchronous standby
promoted). Nothing acknowledged may be lost; the survivors clean up what the dead left."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import make_config
from pgutil import PgServer, cluster_dsn, numbered_message, pg_dsn, pg_pair, pg_server, seq_of  # noqa: F401

from relay.store.api import Envelope, StoreError
from relay.store.postgresql.store import PgStore

pytestmark = pytest.mark.timeout(300)

ADDRESS = "r@example.org"


async def stored_messages(store: PgStore, address: str) -> dict[int, bytes]:
    """seq -> stored bytes, for every message in the mailbox (duplicates fail the test)."""
    out: dict[int, bytes] = {}
    mb = store.mailbox(address)
    for info in await mb.messages():
        with await mb.body(info.uid) as b:
            data = await b.read(0, info.size)
        i = seq_of(data)
        assert i not in out, f"message {i} stored twice"
        out[i] = data
    return out


async def assert_clean(store: PgStore) -> None:
    """No reservation, no unsealed body; the ledger agrees with the messages."""
    async with store._conn() as conn:
        cur = await conn.execute("SELECT (SELECT count(*) FROM reservations),"
                                 " (SELECT count(*) FROM bodies WHERE NOT complete),"
                                 " (SELECT count(*) FROM accounts a WHERE usage_bytes <> (SELECT COALESCE(SUM(size), 0)"
                                 "   FROM messages m WHERE m.address = a.address)"
                                 "   OR usage_messages <> (SELECT count(*) FROM messages m WHERE m.address = a.address))")
        assert await cur.fetchone() == (0, 0, 0)


def test_kill_9_of_a_node_mid_burst_loses_nothing_acknowledged(pg_dsn: str, tmp_path: Path) -> None:
    size = 3 << 20
    node = subprocess.Popen([sys.executable, str(Path(__file__).parent / "pgutil.py"), pg_dsn, str(tmp_path),
                             ADDRESS, "0", "1000", str(size)], stdout=subprocess.PIPE, text=True)
    acked: list[int] = []

    async def main() -> None:
        survivor = PgStore(make_config(tmp_path), pg_dsn, node_stale_seconds=5.0)
        await survivor.open()
        await survivor.accounts.add(ADDRESS)
        assert node.stdout is not None
        assert node.stdout.readline().startswith("READY")
        deadline = time.monotonic() + 60
        while len(acked) < 5 and time.monotonic() < deadline:
            line = await asyncio.to_thread(node.stdout.readline)
            if line.startswith("ACK"):
                acked.append(int(line.split()[1]))
        await asyncio.sleep(0.15)                  # into the next message's stream
        node.send_signal(signal.SIGKILL)
        rest, _ = await asyncio.to_thread(node.communicate)
        acked.extend(int(x.split()[1]) for x in rest.splitlines() if x.startswith("ACK"))
        assert len(acked) >= 5
        for _ in range(400):                               # the survivor's sweeper
            if survivor.pool_statistics()["swept_nodes"]:
                break
            await asyncio.sleep(0.05)
        assert survivor.pool_statistics()["swept_nodes"] == 1
        await assert_clean(survivor)
        stored = await stored_messages(survivor, ADDRESS)
        assert set(acked) <= set(stored)                   # nothing acknowledged lost
        assert len(stored) - len(acked) <= 1               # at most the commit the kill interrupted
        for i, data in stored.items():
            assert data.endswith(numbered_message(i, size)), f"message {i} corrupted"
        await survivor.close()
    asyncio.run(main())


def test_failover_to_the_synchronous_standby_loses_nothing_acknowledged(
        pg_pair: tuple[PgServer, PgServer], tmp_path: Path) -> None:
    primary, standby = pg_pair
    primary.create_database("relay")
    dsn = cluster_dsn([primary, standby], "relay")
    size = 200_000
    acked: dict[int, str] = {}
    failures: list[str] = []

    async def sender(store: PgStore, first: int, count: int, stop_after: asyncio.Event | None) -> None:
        """An SMTP client's view: retry a message until it is acknowledged."""
        for i in range(first, first + count):
            msg = numbered_message(i, size)
            while True:
                d = store.begin_delivery(Envelope("s@example.org"))
                try:
                    await d.add_recipient(ADDRESS, len(msg))
                    await d.start()
                    d.write(msg)
                    await d.wait_writable()
                    acked[i] = (await d.commit()).id
                    break
                except StoreError as e:
                    d.abort()
                    failures.append(type(e).__name__)
                    await asyncio.sleep(0.1)
            if stop_after is not None and len(acked) == 10:
                stop_after.set()

    async def main() -> None:
        store = PgStore(make_config(tmp_path), dsn)
        await store.open()
        await store.accounts.add(ADDRESS)
        ten = asyncio.Event()
        task = asyncio.create_task(sender(store, 0, 40, ten))
        await ten.wait()
        await asyncio.to_thread(primary.kill)              # the primary's machine dies
        await asyncio.to_thread(standby.promote)           # by hand (Patroni would do this)
        await asyncio.wait_for(task, 120)
        # the node really went through the failover: attempts failed, or the store had to ask
        # whether a commit happened, or at least its change feed reconnected to the new primary
        st = store.pool_statistics()
        assert failures or st["unavailable_errors"] or st["change_feed_reconnects"], "no failover seen"
        stored = await stored_messages(store, ADDRESS)
        assert set(acked) <= set(stored)
        for i in acked:
            assert stored[i].endswith(numbered_message(i, size)), f"message {i} corrupted"
        # the node goes on: more mail, its change feed back on the new primary
        seen = asyncio.Event()
        other = PgStore(make_config(tmp_path), dsn)
        await other.open()
        other.changes.subscribe(ADDRESS, lambda c: seen.set())
        await sender(store, 100, 1, None)
        await asyncio.wait_for(seen.wait(), 30)
        await other.close()
        await store.close()
    asyncio.run(main())
