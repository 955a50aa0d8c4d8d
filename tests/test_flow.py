"""relay/server/flow.py: read pauses by reason and write waits, on a fake transport (the calls
it receives are what matters), then on real loopback streams (a client that stops reading)."""

from __future__ import annotations

import asyncio
import functools
import socket
from collections.abc import Callable, Coroutine
from typing import Any
import pytest

from relay.server.flow import BUFFERS, PACE, TASK, WRITE, FlowControl


class FakeTransport:
    """Records pause/resume calls; a write buffer with the asyncio water-mark rules: above
    `high` after a write the protocol's pause_writing() runs, at or below `low` after
    `send(n)` its resume_writing()."""

    def __init__(self, flow: FlowControl | None = None, high: int = 100, low: int = 25) -> None:
        self.calls: list[str] = []
        self.closing = False
        self.buffer = 0
        self.high, self.low = high, low
        self.flow = flow
        self.paused = False

    def pause_reading(self) -> None:
        self.calls.append("pause")

    def resume_reading(self) -> None:
        self.calls.append("resume")

    def is_closing(self) -> bool:
        return self.closing

    def get_write_buffer_size(self) -> int:
        return self.buffer

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self.low, self.high

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.calls.append(f"limits {high} {low}")
        self.high = 64 * 1024 if high is None else high
        self.low = self.high // 4 if low is None else low
        self._check()

    def write(self, data: bytes) -> None:
        self.buffer += len(data)
        self._check()

    def send(self, n: int) -> None:
        """The socket took n bytes."""
        self.buffer -= n
        self._check()

    def _check(self) -> None:
        assert self.flow is not None
        if not self.paused and self.buffer > self.high:
            self.paused = True
            self.flow.pause_writing()
        elif self.paused and self.buffer <= self.low:
            self.paused = False
            self.flow.resume_writing()


def run(test: Callable[[], Coroutine[Any, Any, None]]) -> Callable[[], None]:
    """A coroutine test, run in a loop of its own (no pytest-asyncio here)."""
    @functools.wraps(test)
    def wrapper() -> None:
        asyncio.run(test())
    return wrapper


def make() -> tuple[FlowControl, FakeTransport]:
    flow = FlowControl(None)
    t = FakeTransport(flow)
    flow.set_transport(t)
    return flow, t


def test_reading_resumes_only_when_no_reason_is_left() -> None:
    flow, t = make()
    flow.pause_reading(TASK)
    flow.pause_reading(PACE)
    flow.pause_reading(TASK)                       # idempotent: one pause, one count
    assert t.calls == ["pause"]
    assert flow.paused_reasons == {TASK, PACE} and flow.reading_paused
    assert flow.resume_reading(TASK) is False      # PACE still holds
    assert t.calls == ["pause"]
    assert flow.resume_reading(TASK) is False      # not pausing any more: nothing happens
    assert flow.resume_reading(BUFFERS) is False   # never paused for it
    assert flow.resume_reading(PACE) is True
    assert t.calls == ["pause", "resume"]
    assert not flow.reading_paused
    flow.pause_reading(WRITE)
    assert flow.resume_reading(WRITE) is True
    s = flow.statistics()
    assert s.read_pauses == 2 and s.pauses_by_reason == {TASK: 1, PACE: 1, WRITE: 1}
    assert s.paused_reasons == frozenset()
    with pytest.raises(AttributeError):
        setattr(s, "read_pauses", 0)               # frozen  # noqa: B010


def test_a_closing_transport_is_not_resumed_and_a_new_one_inherits_the_pauses() -> None:
    flow, t = make()
    flow.pause_reading(TASK)
    t2 = FakeTransport(flow)
    flow.set_transport(t2)                         # start_tls: the new transport reads at once
    assert t2.calls == ["pause"]
    t2.closing = True
    assert flow.resume_reading(TASK) is False
    assert t2.calls == ["pause"]
    flow.pause_reading(PACE)                       # nothing is paused on a closing transport
    assert t2.calls == ["pause"]
    flow3, t3 = make()
    flow3.set_transport(FakeTransport(flow3))      # no reason: nothing paused
    assert t3.calls == []


@run
async def test_wait_writable_waits_between_the_water_marks() -> None:
    flow, t = make()
    t.write(b"x" * 100)                            # at the high mark, not above: no wait
    await asyncio.wait_for(flow.wait_writable(), 1)
    t.write(b"x")
    assert flow.write_paused
    waiter = asyncio.ensure_future(flow.wait_writable(5))
    await asyncio.sleep(0.01)
    assert not waiter.done()
    t.send(70)                                     # 31 left: above the low mark of 25
    await asyncio.sleep(0.01)
    assert not waiter.done()
    t.send(6)                                      # 25: resume_writing
    await asyncio.wait_for(waiter, 1)
    s = flow.statistics()
    assert s.write_pauses == 1 and s.write_waits == 1 and s.write_buffer == 25


@run
async def test_wait_writable_times_out_and_a_lost_connection_wakes_it() -> None:
    flow, t = make()
    t.write(b"x" * 200)
    with pytest.raises(TimeoutError):
        await flow.wait_writable(0.05)
    waiter = asyncio.ensure_future(flow.wait_writable(5))
    await asyncio.sleep(0.01)
    t.closing = True
    flow.connection_lost()
    with pytest.raises(ConnectionResetError):
        await asyncio.wait_for(waiter, 1)
    with pytest.raises(ConnectionResetError):
        flow.write(b"more")


@run
async def test_wait_flushed_waits_for_an_empty_buffer_and_restores_the_marks() -> None:
    flow, t = make()
    await asyncio.wait_for(flow.wait_flushed(), 1)     # empty: no wait, limits untouched
    assert t.calls == []
    t.write(b"x" * 10)                                 # far below the high mark
    waiter = asyncio.ensure_future(flow.wait_flushed(5))
    await asyncio.sleep(0.01)
    assert t.calls == ["limits 0 0"] and not waiter.done()
    t.send(9)
    await asyncio.sleep(0.01)
    assert not waiter.done()
    t.send(1)
    await asyncio.wait_for(waiter, 1)
    assert t.calls == ["limits 0 0", "limits 100 25"]


@run
async def test_streams_wait_writable_on_a_client_that_stops_reading() -> None:
    """Real loopback: drain=writer.drain; the high mark is the transport's own."""
    got: asyncio.Future[tuple[FlowControl, asyncio.StreamWriter]] = asyncio.Future()

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.transport.set_write_buffer_limits(high=256 * 1024)
        got.set_result((FlowControl(w.transport, drain=w.drain), w))

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    client.connect(("127.0.0.1", port))
    client.setblocking(False)
    try:
        flow, w = await asyncio.wait_for(got, 5)
        chunk = b"y" * 65536
        written = 0
        while flow.transport.get_write_buffer_size() <= 256 * 1024:
            flow.write(chunk)
            written += len(chunk)
            assert written < 64 * 1024 * 1024, "the socket never filled"
            await asyncio.sleep(0)
        with pytest.raises(TimeoutError):
            await flow.wait_writable(0.2)          # the client reads nothing
        waiter = asyncio.ensure_future(flow.wait_writable(10))
        loop = asyncio.get_running_loop()
        received = 0
        while not waiter.done():
            try:
                received += len(await loop.sock_recv(client, 1 << 20))
            except BlockingIOError:
                await asyncio.sleep(0.001)
        await waiter
        assert flow.transport.get_write_buffer_size() <= 64 * 1024     # the low mark
        assert flow.statistics().write_waits == 2
        w.close()
    finally:
        client.close()
        server.close()
        await server.wait_closed()
