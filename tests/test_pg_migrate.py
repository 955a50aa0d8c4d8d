"""`relay store migrate --to postgresql`: a Maildir store copied into a real PostgreSQL, byte
for byte, with UIDVALIDITY, UIDs, flags, POP3 ids and password hashes kept; run twice, the
second run copies nothing."""

from __future__ import annotations

import asyncio
import os
import subprocess
from pathlib import Path

import pytest
from conftest import make_config
from pgutil import pg_dsn, pg_server  # noqa: F401  (fixtures)

from relay.store.api import Envelope, Flag
from relay.store.backends import open_store
from relay.store.postgresql.store import PgStore

pytestmark = pytest.mark.timeout(300)


def relay(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["relay", *args], capture_output=True, text=True, timeout=120)


def test_migrate_a_maildir_store(pg_dsn: str, tmp_path: Path) -> None:
    data = tmp_path / "data"
    conf = tmp_path / "relay.toml"
    conf.write_text(f'data_dir = "{data}"\n')
    cfg = make_config(data)
    big = os.urandom(3 << 20)

    async def fill() -> dict[str, list[tuple[object, bytes]]]:
        src = open_store(cfg, "maildir")
        await src.open()
        await src.accounts.add("a@example.org", "secret-a", quota_bytes=1 << 30)
        await src.accounts.add("b@example.org")
        for rcpts, body in ((["a@example.org", "b@example.org"], big), (["a@example.org"], b"small\r\n"),
                            (["b@example.org"], b"")):
            d = src.begin_delivery(Envelope("s@example.org"))
            for r in rcpts:
                assert await d.add_recipient(r, len(body)) is None
            await d.start()
            d.write(body)
            await d.commit()
        await src.mailbox("a@example.org").set_flags(2, Flag.SEEN | Flag.ANSWERED)
        await src.mailbox("b@example.org").expunge([2])
        out = {}
        for a in ("a@example.org", "b@example.org"):
            mb = src.mailbox(a)
            out[a] = [((await mb.uidvalidity(), await mb.uidnext()), b"")]
            for m in await mb.messages():
                with await mb.body(m.uid) as b:
                    out[a].append((m, await b.read(0, m.size)))
        await src.close()
        return out
    before = asyncio.run(fill())

    r = relay("store", "migrate", "--to", "postgresql", "--dsn", pg_dsn, "--config", str(conf))
    assert r.returncode == 0, r.stderr
    assert "2 accounts created (0 there already), 3 messages copied (0 there already), 2 bodies" in r.stdout

    async def check() -> None:
        dst = PgStore(cfg, pg_dsn)
        await dst.open()
        for a, items in before.items():
            mb = dst.mailbox(a)
            assert (await mb.uidvalidity(), await mb.uidnext()) == items[0][0]
            assert await mb.messages() == [m for m, _ in items[1:]]     # uid, id, size, date, flags
            for m, data in items[1:]:
                with await mb.body(m.uid) as b:
                    assert await b.read(0, m.size + 1) == data
            u = await dst.ledger.usage(a)
            assert (u.bytes, u.messages) == (sum(len(d) for _, d in items[1:]), len(items) - 1)
        assert await dst.accounts.verify("a@example.org", "secret-a")
        assert not await dst.accounts.verify("a@example.org", "wrong")
        assert (await dst.accounts.get("a@example.org")).quota_bytes == 1 << 30
        d = dst.begin_delivery(Envelope("s@example.org"))                # delivery goes on from uidnext
        assert await d.add_recipient("a@example.org", 5) is None
        await d.start()
        d.write(b"next\r\n")
        await d.commit()
        assert [m.uid for m in await dst.mailbox("a@example.org").messages()] == [1, 2, 3]
        await dst.close()
    asyncio.run(check())

    r = relay("store", "migrate", "--to", "postgresql", "--dsn", pg_dsn, "--config", str(conf))
    assert r.returncode == 0, r.stderr
    assert "0 accounts created (2 there already), 0 messages copied (3 there already)" in r.stdout


def test_migrate_without_a_store_or_dsn_says_what_to_do(tmp_path: Path) -> None:
    conf = tmp_path / "relay.toml"
    conf.write_text(f'data_dir = "{tmp_path / "nothing"}"\n')
    r = relay("store", "migrate", "--to", "postgresql", "--config", str(conf))
    assert r.returncode == 1 and "needs --dsn" in r.stderr and "Traceback" not in r.stderr
    r = relay("store", "migrate", "--to", "postgresql", "--dsn", "postgresql://x@127.0.0.1:1/x", "--config", str(conf))
    assert r.returncode == 1 and "no Maildir store here" in r.stderr and "Traceback" not in r.stderr
