"""One body streamer for IMAP literals and POP3 RETR/TOP: `send_body()`.

A message body goes from the store to the socket without being held: server memory is a few
chunks per session whatever the message size.

- Plain TCP, a body with a file descriptor, nothing to rewrite (IMAP literals): os.sendfile
  straight from the page cache while the socket takes it. When the socket is full, a small
  piece goes through the transport (which waits for the socket to be writable), and sendfile
  goes on once the transport's buffer is empty again (bytes never overtake each other).
- Otherwise (TLS, a body without a descriptor, or POP3's dot-stuffing): CHUNK-sized reads,
  one chunk read ahead of the one being written. With a descriptor the read is an os.pread in
  the streamer's own small thread pool (file reads never queue behind argon2); without one,
  `body.read()` (the store's async read). Dot-stuffing runs on the loop as each chunk
  arrives (in a thread it would hold the GIL all the same).
- Writes go through the connection's FlowControl: `wait_writable()` after each chunk (the
  transport's high-water mark bounds what is queued; a peer that reads nothing for `timeout`
  seconds gets TimeoutError).

Dot-stuffing (RFC 1939 3) is what made POP3 slow on messages with lines starting with ".":
`bytes.replace(b"\\n.", b"\\n..")` searches a two-byte pattern byte by byte (~200-360 MB/s
here), the compiled regex finds each LF with memchr and is 2-4x faster; chunks without any
"." (base64 bodies) are passed on untouched. docs/decisions.md has the figures.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from relay.protocol import pop3 as pop3proto
from relay.server.flow import FlowControl

CHUNK = 1024 * 1024               # read size when sendfile cannot be used (FACTS: big chunks)
TOP_CHUNK = 64 * 1024             # TOP reads only as far as the header and n lines reach
SENDFILE_MAX = 16 * 1024 * 1024   # one os.sendfile call at most (the loop stays responsive)
WAKE_CHUNK = 64 * 1024            # sent through the transport when sendfile finds the socket full
READ_THREADS = 4                  # the streamer's pool: one read in flight per streaming session,
                                  # more sessions queue (disk reads are not made faster by more)


class BodySource(Protocol):
    """What the streamer reads: the shape of relay.store.api.Body (size, an optional file
    descriptor for sendfile/pread, an async ranged read)."""

    @property
    def size(self) -> int: ...

    def fileno(self) -> int | None: ...

    async def read(self, offset: int, n: int) -> bytes: ...


class FileBody:
    """A BodySource over an open file descriptor (not owned: the caller closes it)."""

    def __init__(self, fd: int, size: int | None = None) -> None:
        self._fd = fd
        self._size = os.fstat(fd).st_size if size is None else size

    @property
    def size(self) -> int:
        return self._size

    def fileno(self) -> int | None:
        return self._fd

    async def read(self, offset: int, n: int) -> bytes:
        n = max(0, min(n, self._size - offset))
        if n == 0:
            return b""
        return await asyncio.get_running_loop().run_in_executor(_executor(), os.pread,
                                                                self._fd, n, offset)


@dataclass(frozen=True)
class Sent:
    body_bytes: int        # message bytes sent (before stuffing; TOP: what it kept)
    wire_bytes: int        # bytes written to the connection (with stuffing and terminator)
    sendfile_bytes: int    # of which by os.sendfile


async def send_body(body: BodySource, flow: FlowControl, offset: int = 0,
                    count: int | None = None, *, dot_stuff: bool = False,
                    top_lines: int | None = None, timeout: float | None = None,
                    progress: Callable[[int], None] | None = None, chunk: int = 0) -> Sent:
    """Send `count` bytes of `body` from `offset` (default: all of it) on `flow`'s transport.

    dot_stuff: the body is a POP3 multi-line reply (RFC 1939 3): lines starting with "." get
    another ".", and the reply ends with ".\\r\\n" (after a CRLF added if the body did not
    end with one). top_lines: POP3 TOP (RFC 1939 7), only the header, the blank line and that
    many body lines (implies dot_stuff). Without either the bytes are sent as they are (IMAP
    literals: the caller has written the "{n}\\r\\n" before).

    Waits with flow.wait_writable(timeout) while the peer is behind; TimeoutError when it
    reads nothing for `timeout` seconds, ConnectionResetError when the connection is gone,
    OSError when the body is shorter than `count` (the reply is cut then: end the session).
    progress(n) is called as message bytes go out (counters that move during a long fetch).
    chunk: the read size when copying (default CHUNK, TOP_CHUNK for TOP; tests use tiny ones
    to put chunk boundaries everywhere).
    The caller keeps the body open until this returns (no read is left in flight)."""
    if count is None:
        count = max(0, body.size - offset)
    if top_lines is not None:
        dot_stuff = True
    fd = body.fileno()
    if not dot_stuff and fd is not None:
        sock = _plain_socket(flow)
        if sock >= 0:
            n = await _sendfile(fd, sock, flow, offset, count, timeout, progress or _ignore)
            return Sent(count, count, n)
    if chunk <= 0:
        chunk = TOP_CHUNK if top_lines is not None else CHUNK
    return await _copy(body, flow, offset, count, dot_stuff, top_lines, timeout,
                       progress or _ignore, chunk)


def _ignore(n: int) -> None:
    pass


def _plain_socket(flow: FlowControl) -> int:
    """The socket's descriptor when the transport is plain TCP (sendfile can write to it)."""
    t = flow.transport
    if t.get_extra_info("sslcontext") is not None or t.get_extra_info("ssl_object") is not None:
        return -1
    sock = t.get_extra_info("socket")
    try:
        return int(sock.fileno()) if sock is not None else -1
    except (OSError, ValueError):
        return -1


async def _sendfile(fd: int, sockfd: int, flow: FlowControl, offset: int, count: int,
                    timeout: float | None, progress: Callable[[int], None]) -> int:
    """os.sendfile while the transport's buffer is empty and the socket takes data; when it is
    full, WAKE_CHUNK through the transport, wait until it is flushed, sendfile again. Returns
    the bytes sent by sendfile."""
    direct = 0
    while count > 0:
        if sockfd >= 0 and flow.transport.get_write_buffer_size() == 0:
            try:
                n = os.sendfile(sockfd, fd, offset, min(count, SENDFILE_MAX))
            except (BlockingIOError, InterruptedError):
                n = 0
            except (BrokenPipeError, ConnectionResetError):
                raise                               # the client went away
            except OSError:
                sockfd = -1                         # not a socket sendfile can use: pread on
                n = 0
            if n > 0:
                offset += n
                count -= n
                direct += n
                progress(n)
                continue
        data = os.pread(fd, min(CHUNK if sockfd < 0 else WAKE_CHUNK, count), offset)
        if not data:
            raise OSError(f"message shorter than expected at {offset}")
        flow.write(data)
        offset += len(data)
        count -= len(data)
        progress(len(data))
        if sockfd >= 0:
            await flow.wait_flushed(timeout)
        else:
            await flow.wait_writable(timeout)
    return direct


def _transform(dot_stuff: bool, top_lines: int | None
               ) -> tuple[Callable[[bytes], bytes] | None, pop3proto.DotStuffer | None,
                          pop3proto.TopFilter | None]:
    stuffer = pop3proto.DotStuffer() if dot_stuff else None
    top = pop3proto.TopFilter(top_lines) if top_lines is not None else None
    if stuffer is None:
        return None, None, None
    feed = stuffer.feed
    if top is None:
        return feed, stuffer, None
    topfeed = top.feed
    return (lambda data: feed(topfeed(data))), stuffer, top


async def _copy(body: BodySource, flow: FlowControl, offset: int, count: int, dot_stuff: bool,
                top_lines: int | None, timeout: float | None, progress: Callable[[int], None],
                chunk: int) -> Sent:
    loop = asyncio.get_running_loop()
    pool = _executor()
    fd = body.fileno()
    transform, stuffer, top = _transform(dot_stuff, top_lines)
    end = offset + count

    async def produce(at: int) -> tuple[int, bytes]:
        n = min(chunk, end - at)
        if n <= 0:
            return 0, b""
        if fd is not None:
            data = await loop.run_in_executor(pool, os.pread, fd, n, at)
        else:
            data = await body.read(at, n)
        # stuffed here, on the loop: in the pool it would hold the GIL just the same, and the
        # hand-offs cost more CPU than they save (docs/decisions.md)
        return len(data), (transform(data) if transform is not None and data else data)

    pending: asyncio.Future[tuple[int, bytes]] | None = asyncio.ensure_future(produce(offset))
    wire = fed = 0
    try:
        while pending is not None:
            got, data = await pending
            pending = None
            if got == 0:
                if offset < end:
                    raise OSError(f"message shorter than expected at {offset}")
                break
            offset += got
            if not (top is not None and top.done) and offset < end:
                pending = asyncio.ensure_future(produce(offset))   # the next read overlaps
            if data:
                flow.write(data)
                wire += len(data)
            now = stuffer.fed if stuffer is not None else wire
            progress(now - fed)
            fed = now
            await flow.wait_writable(timeout)
        if stuffer is not None:
            tail = stuffer.finish()
            flow.write(tail)
            wire += len(tail)
    finally:
        if pending is not None:                 # never leave a read running on the body:
            await asyncio.wait([pending])       # the caller closes it when we return
            if not pending.cancelled():
                pending.exception()             # (retrieved: an error here is not news)
    return Sent(fed, wire, 0)


_pool: concurrent.futures.ThreadPoolExecutor | None = None


def _executor() -> concurrent.futures.ThreadPoolExecutor:
    """The streamer's own small pool: file reads must not queue behind argon2 hashing."""
    global _pool
    if _pool is None:
        _pool = concurrent.futures.ThreadPoolExecutor(READ_THREADS, thread_name_prefix="body-read")
    return _pool
