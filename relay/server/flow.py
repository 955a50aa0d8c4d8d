"""Flow control of one connection, in both directions (the model: uvicorn's
`protocols/http/flow_control.py`; Postfix's in_flow_delay for coupling intake to delivery).

Read side: reading is paused for named reasons ("task": a step such as a commit is running,
"pace": the sender is ahead of its pacing, "write": our replies are piling up, "buffers": the
read-buffer pool is empty, ...). `pause_reading(reason)` and `resume_reading(reason)` are
idempotent; the transport reads again only when no reason is left, so one cause ending never
undoes another's pause.

Write side: `wait_writable()` returns once the transport's write buffer is at or below its
low-water mark (the high/low marks are the transport's own: `set_write_buffer_limits`), and
`wait_flushed()` once it is empty (then os.sendfile may write to the socket directly without
reordering bytes). A protocol-based session forwards its `pause_writing()` /
`resume_writing()` callbacks here; a streams-based one passes `drain=writer.drain` (the
StreamReaderProtocol owns those callbacks). A peer that reads nothing for `timeout` seconds
gets TimeoutError, so memory stays bounded by the high-water mark either way.

`statistics()` -> FlowStats (frozen).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

# The reasons (any string works; these are the ones the servers use and logs show).
TASK = "task"            # an awaited step (commit, AUTH, STARTTLS) owns the session
PACE = "pace"            # the sender is ahead of the rate its recipients drain (policy/)
WRITE = "write"          # replies pass the write buffer's high-water mark (a client that
                         # pipelines commands and reads nothing)
BUFFERS = "buffers"      # a read-buffer pool with nothing to lend (unused today:
                         # server/pressure.py's ReadBuffers allocates rather than refuse)


@dataclass(frozen=True)
class FlowStats:
    paused_reasons: frozenset[str]     # why reading is paused now (empty: reading)
    read_pauses: int                   # times reading went from running to paused
    pauses_by_reason: dict[str, int]   # pause_reading() calls that added the reason
    write_pauses: int                  # times the transport passed its high-water mark
    write_waits: int                   # wait_writable()/wait_flushed() calls that waited
    write_buffer: int                  # bytes in the transport's write buffer now


class FlowControl:
    """Read pauses by reason and write waits for one transport."""

    def __init__(self, transport: Any, *, drain: Callable[[], Awaitable[None]] | None = None
                 ) -> None:
        self.transport = transport
        self._drain = drain
        self._reasons: set[str] = set()
        self._write_paused = False
        self._writable = asyncio.Event()
        self._writable.set()
        self._read_pauses = 0
        self._by_reason: dict[str, int] = {}
        self._write_pauses = 0
        self._write_waits = 0

    # --- read side ---------------------------------------------------------------------
    @property
    def reading_paused(self) -> bool:
        return bool(self._reasons)

    @property
    def paused_reasons(self) -> frozenset[str]:
        return frozenset(self._reasons)

    def pause_reading(self, reason: str) -> None:
        """Stop reading for `reason` (again for the same reason: nothing changes)."""
        if reason in self._reasons:
            return
        if not self._reasons:
            self._read_pauses += 1
            if self.transport is not None and not self.transport.is_closing():
                self.transport.pause_reading()
        self._reasons.add(reason)
        self._by_reason[reason] = self._by_reason.get(reason, 0) + 1

    def resume_reading(self, reason: str) -> bool:
        """`reason` no longer holds; True when that was the last one and the transport reads
        again (False: still paused for another reason, `reason` was not pausing, or the
        transport is closing)."""
        if reason not in self._reasons:
            return False
        self._reasons.discard(reason)
        if self._reasons or self.transport is None or self.transport.is_closing():
            return False
        self.transport.resume_reading()
        return True

    def set_transport(self, transport: Any) -> None:
        """A new transport (after start_tls) inherits the read pauses: it starts reading at
        once, so it is paused here if any reason holds."""
        self.transport = transport
        if self._reasons and transport is not None and not transport.is_closing():
            transport.pause_reading()

    # --- write side --------------------------------------------------------------------
    @property
    def write_paused(self) -> bool:
        return self._write_paused

    def pause_writing(self) -> None:
        """The protocol's pause_writing() callback: the buffer passed its high-water mark."""
        if not self._write_paused:
            self._write_paused = True
            self._write_pauses += 1
            self._writable.clear()

    def resume_writing(self) -> None:
        """The protocol's resume_writing() callback: the buffer fell to its low-water mark."""
        if self._write_paused:
            self._write_paused = False
            self._writable.set()

    def connection_lost(self) -> None:
        """Wake every writer waiting (its next write finds the transport closing)."""
        self._write_paused = False
        self._writable.set()

    def write(self, data: bytes | memoryview) -> None:
        """transport.write, but a transport closed by the peer (RST) or by shutdown is a lost
        connection (uvloop refuses the write with RuntimeError, which reads as a bug)."""
        if self.transport is None or self.transport.is_closing():
            raise ConnectionResetError("connection closed")
        self.transport.write(data)

    def _over_high_water(self) -> bool:
        if self._drain is not None:
            _low, high = self.transport.get_write_buffer_limits()
            return bool(self.transport.get_write_buffer_size() > high)
        return self._write_paused

    async def wait_writable(self, timeout: float | None = None) -> None:
        """Return at once below the transport's high-water mark; otherwise once the buffer is
        down to the low-water mark. TimeoutError after `timeout` seconds without that;
        ConnectionResetError when the connection is gone."""
        if self.transport is None or self.transport.is_closing():
            raise ConnectionResetError("connection closed")
        if not self._over_high_water():
            return
        self._write_waits += 1
        async with asyncio.timeout(timeout):
            if self._drain is not None:
                await self._drain()
            else:
                await self._writable.wait()
        if self.transport.is_closing():
            raise ConnectionResetError("connection closed")

    async def wait_flushed(self, timeout: float | None = None) -> None:
        """Return once the transport's write buffer is empty (nothing queued ahead of bytes
        written to the socket directly, e.g. by os.sendfile)."""
        transport = self.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("connection closed")
        if transport.get_write_buffer_size() == 0:
            return
        low, high = transport.get_write_buffer_limits()
        transport.set_write_buffer_limits(high=0, low=0)     # pause_writing now, resume at 0
        try:
            await self.wait_writable(timeout)
        finally:
            if not transport.is_closing():
                transport.set_write_buffer_limits(high=high, low=low)

    def statistics(self) -> FlowStats:
        size = 0
        if self.transport is not None:
            size = self.transport.get_write_buffer_size()
        return FlowStats(frozenset(self._reasons), self._read_pauses, dict(self._by_reason),
                         self._write_pauses, self._write_waits, size)
