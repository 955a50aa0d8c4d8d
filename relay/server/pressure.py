"""Connection pressure: what keeps many (idle, slow or hostile) connections cheap (issue 12).

The ideas are Postfix's (smtpd, anvil, stress mode) and Dovecot's (login process limits):

- **No receive buffer per idle connection.** `ReadBuffers` lends the one big receive buffer
  to a session only for the duration of one read: asyncio and uvloop call `get_buffer()`,
  `recv_into()` and `buffer_updated()` back to back, synchronously, so a loop never has more
  than one buffer in use. What the protocol has not consumed when `buffer_updated()` returns
  (pipelined commands behind a commit) is copied out by the session before the buffer goes
  back. 1000 idle SMTP sessions cost their Python objects, not 1000 MiB.
- **A deadline per request, not per byte.** `Deadline` (Postfix `smtpd_per_request_deadline`
  with `smtpd_min_data_rate`): a command must be complete within the command timeout however
  its bytes trickle in; during DATA/BDAT every chunk extends the deadline by
  `nbytes / min_data_rate` seconds, never beyond one timeout from now. One byte every 299 s no
  longer holds a slot forever; a sender at the minimum rate or faster is never cut off.
- **Stress mode.** `stressed()` is true while a protocol's live sessions pass a share of its
  limit (`stress_threshold`); then the command timeout before MAIL (SMTP) or before login
  (IMAP, POP3) shrinks to the stress value (Postfix: `smtpd_timeout = ${stress?10}${stress:300}`),
  and when the limit is reached a new connection closes the session that has waited longest
  without a transaction or a login (`SessionRegistry.open`), so a real sender from another
  address gets through at once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

# One receive buffer: big reads are what makes ingest fast (docs/decisions.md, FACTS: 1 MiB
# BufferedProtocol reads reach the raw loopback + os.write rate).
READ_BUFFER_SIZE = 1024 * 1024
# Free buffers kept for reuse. Reads are sequential within a loop, so one is in use at a time;
# the second covers a session that reads again from inside its own callback (TLS start).
# Keeping them (never freeing and re-allocating 1 MiB) also keeps glibc's heap from growing:
# freed 1 MiB chunks raise its mmap threshold and later ones are never returned to the OS.
READ_BUFFERS_KEPT = 2
# While a protocol's pre-transaction / pre-login sessions are checked against a stress
# timeout that started after they began waiting, they look again at least this often.
RECHECK_SECONDS = 5.0
# A session must have waited this long without a transaction or login before a new
# connection may close it when the limit is full (a real client between EHLO and MAIL, or
# between the greeting and LOGIN, waits milliseconds).
MIN_IDLE_TO_EVICT = 1.0


@dataclass(frozen=True)
class ReadBufferStats:
    size: int                    # bytes per buffer
    allocated: int               # buffers that exist (in use + kept)
    lent: int                    # reads served
    peak_in_use: int             # most buffers lent at the same time


class ReadBuffers:
    """A bounded pool of big receive buffers, lent for one read at a time."""

    def __init__(self, size: int = READ_BUFFER_SIZE, kept: int = READ_BUFFERS_KEPT) -> None:
        self.size = size
        self.kept = kept
        self._free: list[tuple[bytearray, memoryview]] = []
        self._in_use = 0
        self._allocated = 0
        self._lent = 0
        self._peak = 0

    def acquire(self) -> tuple[bytearray, memoryview]:
        if self._free:
            pair = self._free.pop()
        else:
            buf = bytearray(self.size)
            pair = (buf, memoryview(buf))
            self._allocated += 1
        self._in_use += 1
        self._lent += 1
        self._peak = max(self._peak, self._in_use)
        return pair

    def release(self, pair: tuple[bytearray, memoryview]) -> None:
        self._in_use -= 1
        if len(self._free) < self.kept:
            self._free.append(pair)
        else:
            self._allocated -= 1

    def statistics(self) -> ReadBufferStats:
        return ReadBufferStats(self.size, self._allocated, self._lent, self._peak)


class Deadline:
    """The time by which the current request (a command line, or a message's data) must be
    complete. `start()` when a request begins; `progress(nbytes)` during message data."""

    __slots__ = ("clock", "timeout", "min_rate", "expires")

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.timeout = 0.0
        self.min_rate = 0.0
        self.expires = 0.0

    def start(self, timeout: float, min_rate: float = 0.0) -> None:
        self.timeout, self.min_rate = timeout, min_rate
        self.expires = self.clock() + timeout

    def progress(self, nbytes: int) -> None:
        """Bytes arrived: with a minimum rate, the deadline moves by the time they earn,
        at most to one timeout from now (Postfix smtpd_min_data_rate)."""
        if self.min_rate > 0:
            self.expires = min(self.clock() + self.timeout, self.expires + nbytes / self.min_rate)

    def shorten(self, started: float, timeout: float) -> None:
        """Stress began: a request that started at `started` gets at most `timeout`."""
        self.expires = min(self.expires, started + timeout)

    def remaining(self) -> float:
        return self.expires - self.clock()


def stress_level(current: int, limit: int, threshold: float) -> bool:
    """Stress: more than `threshold` x `limit` sessions (no limit or threshold 0: never)."""
    return bool(limit) and threshold > 0 and current >= limit * threshold
