"""relay.server.smtp with a fake transport: flow control (pause while committing, resume
after), pipelined input kept in the buffer, pacing, session limits. The store is real."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from relay.policy.penalty import LoginPenalty
from relay.server.listener import SessionRegistry
from relay.server.pressure import ReadBuffers
from relay.server.smtp import SmtpCounters, SmtpSession
from relay.store.maildir.backend import MaildirStore
from tests.conftest import make_config

ALICE = "alice@example.test"


class FakeTransport:
    def __init__(self) -> None:
        self.out = bytearray()
        self.paused = False
        self.pauses = 0
        self.closed = False
        self.log: list[str] = []

    def write(self, data: bytes) -> None:
        self.out += data
        self.log.append(data.decode())

    def pause_reading(self) -> None:
        self.paused = True
        self.pauses += 1

    def resume_reading(self) -> None:
        self.paused = False
        self.log.append("resume")

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else None

    def replies(self) -> list[str]:
        return [ln[:9] for ln in self.out.decode().split("\r\n") if len(ln) > 3 and ln[3] == " "]


class FakeRelay:
    def __init__(self, tmp: Path, **sections: Any) -> None:
        self.config = make_config(tmp, **sections)
        self.store = MaildirStore(self.config)           # relay.store.api, as the server sees it
        self.store.engine.accounts.add(ALICE, "secret")
        self.sessions = SessionRegistry()
        self.policy: Any = None
        self.read_buffers = ReadBuffers()
        self.logins = LoginPenalty(self.config, self.store.accounts.verify)


def feed(s: SmtpSession, data: bytes) -> None:
    """As the event loop does: get_buffer, bytes into it, buffer_updated (the buffer is lent
    for that one read; what the session keeps must be copied out of it)."""
    while data:
        view = s.get_buffer(-1)
        n = min(len(view), len(data))
        view[:n] = data[:n]
        s.buffer_updated(n)
        data = data[n:]


async def settle(t: FakeTransport, n: int) -> None:
    for _ in range(500):
        if len(t.replies()) >= n:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(t.out)


def test_reading_paused_during_commit_and_pipelined_rest_answered(tmp_path: Path) -> None:
    async def run() -> None:
        relay = FakeRelay(tmp_path)
        s = SmtpSession(relay, None, False, SmtpCounters())  # type: ignore[arg-type]
        t = FakeTransport()
        s.connection_made(t)
        feed(s, b"EHLO c\r\nMAIL FROM:<x@r.test>\r\nRCPT TO:<alice@example.test>\r\n")
        await settle(t, 4)                                # RCPT asks the store (a task)
        assert not t.paused
        feed(s, b"BDAT 3 LAST\r\nabcNOOP\r\n")
        assert t.paused                                   # committing: no more reads
        assert t.replies() == ["220 relay", "250 HELP", "250 2.1.0", "250 2.1.5"]
        await settle(t, 6)
        assert t.replies()[4:] == ["250 2.0.0", "250 2.0.0"]   # the 250, then the NOOP
        assert not t.paused
        s.connection_lost(None)
        assert relay.sessions.live() == []
        await relay.store.close()
    asyncio.run(run())


def test_pipelined_messages_committed_one_after_another_while_paused(tmp_path: Path) -> None:
    async def run() -> None:
        relay = FakeRelay(tmp_path)
        s = SmtpSession(relay, None, False, SmtpCounters())  # type: ignore[arg-type]
        t = FakeTransport()
        s.connection_made(t)
        txn = b"MAIL FROM:<x@r.test>\r\nRCPT TO:<alice@example.test>\r\nBDAT 3 LAST\r\nabc"
        feed(s, b"EHLO c\r\n" + txn + txn + b"QUIT\r\n")
        await settle(t, 9)
        assert t.replies()[2:] == ["250 2.1.0", "250 2.1.5", "250 2.0.0"] * 2 + ["221 2.0.0"]
        assert "resume" not in t.log                      # closed by QUIT, never resumed early
        assert t.closed
        s.connection_lost(None)
        assert len(list((tmp_path / "mail").rglob("new/*"))) == 2
        await relay.store.close()
    asyncio.run(run())


def test_pacer_delay_pauses_reading(tmp_path: Path) -> None:
    class Pacer:
        def __init__(self) -> None:
            self.closed = False

        def on_data(self, n: int) -> float:
            return 0.05

        def close(self) -> None:
            self.closed = True

    class Policy:
        pacer_obj = Pacer()

        def check_rcpt(self, a: str, size: int | None, claim: Any = None) -> None:
            return None

        def claim_disk(self, declared: int) -> Any:
            import types
            return types.SimpleNamespace(wrote=lambda n: None, release=lambda: None, remaining=0)

        def pacer(self, rcpts: list[str]) -> Pacer:
            return self.pacer_obj

        def check_end_of_data(self, rcpts: list[str], size: int) -> None:
            return None

    async def run() -> None:
        relay = FakeRelay(tmp_path)
        relay.policy = Policy()
        s = SmtpSession(relay, None, False, SmtpCounters())  # type: ignore[arg-type]
        t = FakeTransport()
        s.connection_made(t)
        feed(s, b"EHLO c\r\nMAIL FROM:<x@r.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n")
        await settle(t, 5)                                # 354: RCPT and DATA asked the store
        feed(s, b"some data\r\n")
        assert t.paused
        await asyncio.sleep(0.15)
        assert not t.paused                               # resumed after the delay
        feed(s, b".\r\n")
        await settle(t, 6)
        assert t.replies()[-1] == "250 2.0.0"
        assert relay.policy.pacer_obj.closed
        s.connection_lost(None)
        await relay.store.close()
    asyncio.run(run())


def test_connection_lost_mid_data_aborts(tmp_path: Path) -> None:
    async def run() -> None:
        relay = FakeRelay(tmp_path)
        s = SmtpSession(relay, None, False, SmtpCounters())  # type: ignore[arg-type]
        t = FakeTransport()
        s.connection_made(t)
        feed(s, b"EHLO c\r\nMAIL FROM:<x@r.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n")
        await settle(t, 5)                                # 354: RCPT and DATA asked the store
        feed(s, b"x" * 5000)
        tmp = list((tmp_path / "mail").rglob("tmp/*"))
        assert len(tmp) == 1
        s.connection_lost(ConnectionResetError())
        assert not tmp[0].exists()
        assert list((tmp_path / "mail").rglob("new/*")) == []
        await relay.store.close()
    asyncio.run(run())


@pytest.mark.parametrize("key", ["max_sessions_per_client", "max_sessions"])
@pytest.mark.parametrize("limit", [1, 2])
def test_session_limits(tmp_path: Path, limit: int, key: str) -> None:
    async def run() -> None:
        relay = FakeRelay(tmp_path, smtp={key: limit})
        ts = []
        for _ in range(limit + 1):
            s = SmtpSession(relay, None, False, SmtpCounters())  # type: ignore[arg-type]
            t = FakeTransport()
            s.connection_made(t)
            ts.append(t)
        assert [t.replies()[0] for t in ts] == ["220 relay"] * limit + ["421 4.7.0"]
        assert ts[-1].closed
        await relay.store.close()
    asyncio.run(run())
