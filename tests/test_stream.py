"""relay/server/stream.py send_body(): byte-exact bodies, dot-stuffed or not, whatever the chunk
boundaries (every position, and hypothesis), over a collecting transport, real loopback TCP
(sendfile), TLS (copies), and end to end: RETR/TOP by poplib and IMAP literals by imaplib of
dotted messages."""

from __future__ import annotations

import asyncio
import imaplib
import os
import poplib
import socket
import ssl
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
import uvloop
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.server.flow import FlowControl
from relay.server.stream import FileBody, Sent, send_body
from tests.conftest import RunningRelay
from tests.tlsutil import client_context, make_cert

ALICE = "alice@example.test"


def stuffed(body: bytes, top_lines: int | None = None) -> bytes:
    """The reference: RFC 1939 3 line by line (a line ends at LF), TOP per RFC 1939 7."""
    parts = body.split(b"\n")
    lines = [ln + b"\n" for ln in parts[:-1]] + ([parts[-1]] if parts[-1] else [])
    if top_lines is not None:
        kept, in_header, n = [], True, 0
        for line in lines:
            if not in_header:
                if n == top_lines:
                    break
                n += 1
            kept.append(line)
            if in_header and line in (b"\r\n", b"\n"):
                in_header = False
        lines = kept
    out = b"".join(b"." + ln if ln.startswith(b".") else ln for ln in lines)
    return out + (b".\r\n" if out.endswith(b"\r\n") or not out else b"\r\n.\r\n")


class Sink:
    """A transport that takes everything at once (never over its high-water mark), no socket."""

    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, data: bytes) -> None:
        self.data += data

    def is_closing(self) -> bool:
        return False

    def get_extra_info(self, name: str) -> Any:
        return None

    def get_write_buffer_size(self) -> int:
        return 0

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return 0, 1 << 20


class MemBody:
    """A body without a file descriptor (a database or object-store backend): read() only."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.reads = 0

    @property
    def size(self) -> int:
        return len(self.data)

    def fileno(self) -> int | None:
        return None

    async def read(self, offset: int, n: int) -> bytes:
        self.reads += 1
        await asyncio.sleep(0)
        return self.data[offset:offset + n]


def through_sink(body_bytes: bytes, *, file: bool, **kw: Any) -> tuple[bytes, Sent]:
    async def go() -> tuple[bytes, Sent]:
        sink = Sink()
        if file:
            with tempfile.TemporaryFile() as f:
                f.write(body_bytes)
                f.flush()
                sent = await send_body(FileBody(f.fileno()), FlowControl(sink), **kw)
        else:
            sent = await send_body(MemBody(body_bytes), FlowControl(sink), **kw)
        return bytes(sink.data), sent
    return asyncio.run(go())


TRICKY = (b"Subject: dots\r\n\r\n.\r\n..\r\n.x\r\nx.y\r\n\r\n.\n..bare LF\n"
          b"\r\n.\r\n" + b"z" * 10 + b"\r\n...\r\n.last line without CRLF")


def test_dot_stuffing_with_a_chunk_boundary_at_every_position() -> None:
    want = stuffed(TRICKY)
    assert want.endswith(b"\r\n..last line without CRLF\r\n.\r\n")
    for chunk in range(1, len(TRICKY) + 2):
        for file in (True, False):
            out, sent = through_sink(TRICKY, file=file, dot_stuff=True, chunk=chunk)
            assert out == want, (chunk, file)
            assert sent.body_bytes == len(TRICKY) and sent.wire_bytes == len(want)
            assert sent.sendfile_bytes == 0


def test_top_with_a_chunk_boundary_at_every_position() -> None:
    for lines in (0, 1, 3, 100):
        want = stuffed(TRICKY, lines)
        for chunk in range(1, len(TRICKY) + 2, 3):
            out, sent = through_sink(TRICKY, file=True, top_lines=lines, chunk=chunk)
            assert out == want, (lines, chunk)


LINES = st.sampled_from([b".", b"..", b"...", b".x", b"x.", b"", b"abc", b"\r", b". ."])
ENDINGS = st.sampled_from([b"\r\n", b"\n"])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(LINES, ENDINGS), max_size=30), LINES, st.integers(1, 64),
       st.booleans(), st.integers(0, 40), st.integers(0, 40))
def test_stuffed_bytes_and_ranges_match_the_reference(lines: list[tuple[bytes, bytes]], last: bytes,
                                                      chunk: int, file: bool, start: int,
                                                      length: int) -> None:
    body = b"".join(a + b for a, b in lines) + last          # last: maybe without a line end
    out, sent = through_sink(body, file=file, dot_stuff=True, chunk=chunk)
    assert out == stuffed(body)
    assert sent.body_bytes == len(body)
    start = min(start, len(body))                             # an IMAP partial: as it is
    length = min(length, len(body) - start)
    out, sent = through_sink(body, file=file, offset=start, count=length, chunk=chunk)
    assert out == body[start:start + length] and sent.wire_bytes == length


def test_progress_counts_message_bytes_and_a_short_body_is_an_error() -> None:
    seen: list[int] = []
    out, sent = through_sink(TRICKY, file=True, dot_stuff=True, chunk=7, progress=seen.append)
    assert sum(seen) == len(TRICKY) and len(seen) > 1
    with pytest.raises(OSError, match="shorter"):
        through_sink(TRICKY, file=True, count=len(TRICKY) + 1, chunk=16)
    with pytest.raises(OSError, match="shorter"):
        through_sink(TRICKY, file=False, count=len(TRICKY) + 1, dot_stuff=True)


# --- real sockets -----------------------------------------------------------------------------

LOOPS = pytest.mark.parametrize("run", [asyncio.run, uvloop.run], ids=["asyncio", "uvloop"])


def loopback(run: Any, body: bytes, ssl_server: ssl.SSLContext | None,
             ssl_client: ssl.SSLContext | None, **kw: Any) -> tuple[bytes, Sent]:
    """Serve `body` from a file with send_body to one client on 127.0.0.1 (in a loop made by
    `run`: the relay runs uvloop); what the client received."""
    async def go() -> tuple[bytes, Sent]:
        done: asyncio.Future[Sent] = asyncio.Future()

        async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            w.transport.set_write_buffer_limits(high=256 * 1024)
            with tempfile.TemporaryFile() as f:
                f.write(body)
                f.flush()
                try:
                    done.set_result(await send_body(FileBody(f.fileno()),
                                                    FlowControl(w.transport, drain=w.drain),
                                                    timeout=10, **kw))
                except Exception as e:  # noqa: BLE001 - the test reports it
                    done.set_exception(e)
            await w.drain()
            w.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ssl_server)
        port = server.sockets[0].getsockname()[1]
        r, w = await asyncio.open_connection("127.0.0.1", port, ssl=ssl_client,
                                             server_hostname="relay.test" if ssl_client else None)
        got = bytearray()
        while data := await r.read(1 << 16):
            got += data
            await asyncio.sleep(0) if len(got) % 7 else await asyncio.sleep(0.001)   # slow-ish
        w.close()
        server.close()
        await server.wait_closed()
        return bytes(got), await done
    result: tuple[bytes, Sent] = run(go())
    return result


BIG = (b".dot\r\n" + os.urandom(3000).hex().encode() + b"\r\n") * 700     # ~4 MiB


@LOOPS
def test_plain_tcp_uses_sendfile_and_keeps_every_byte(run: Any) -> None:
    got, sent = loopback(run, BIG, None, None)
    assert got == BIG
    assert sent.sendfile_bytes > len(BIG) // 2 and sent.wire_bytes == len(BIG)
    got, sent = loopback(run, BIG, None, None, offset=12345, count=2_000_000)
    assert got == BIG[12345:12345 + 2_000_000]


@LOOPS
def test_plain_tcp_dot_stuffing_copies(run: Any) -> None:
    got, sent = loopback(run, BIG, None, None, dot_stuff=True)
    assert got == stuffed(BIG) and sent.sendfile_bytes == 0


@LOOPS
def test_tls_copies_and_keeps_every_byte(run: Any, tmp_path: Path) -> None:
    cert, key = make_cert(tmp_path)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    got, sent = loopback(run, BIG, server_ctx, client_context(cert))
    assert got == BIG and sent.sendfile_bytes == 0
    got, sent = loopback(run, BIG, server_ctx, client_context(cert), dot_stuff=True)
    assert got == stuffed(BIG)


# --- end to end -------------------------------------------------------------------------------

DOTTED = (b"Subject: dotted\r\nFrom: x@remote.test\r\n\r\n" + b".\r\n..\r\n...x\r\n.a\r\nb.\r\n" * 20000
          + b".final line without CRLF")          # ~440 KiB, stored as sent by BDAT


def bdat(r: RunningRelay, body: bytes) -> None:
    """RFC 3030 BDAT: the exact octets, so the message may end without a CRLF."""
    with socket.create_connection(("127.0.0.1", r.smtp_port), timeout=10) as s:
        f = s.makefile("rb")

        def reply() -> bytes:
            while (line := f.readline())[3:4] == b"-":
                pass
            return line
        assert reply().startswith(b"220")
        for cmd in (b"EHLO client.test", b"MAIL FROM:<x@remote.test>", f"RCPT TO:<{ALICE}>".encode()):
            s.sendall(cmd + b"\r\n")
            assert reply()[:1] == b"2"
        s.sendall(b"BDAT %d LAST\r\n" % len(body) + body)
        assert reply().startswith(b"250")
        s.sendall(b"QUIT\r\n")


@pytest.mark.e2e
def test_retr_top_and_imap_literal_of_a_dotted_message(relay: RunningRelay) -> None:
    bdat(relay, DOTTED)

    def path(r: Any) -> Path:
        mb = r.store.engine.mailbox(ALICE)          # the Maildir file, to compare with
        [m] = mb.messages()
        return Path(mb.path(m.uid))
    msg = relay.call(path).read_bytes()             # with the trace headers the relay adds
    assert msg.endswith(DOTTED[DOTTED.index(b"\r\n\r\n"):])
    p = poplib.POP3("127.0.0.1", relay.pop3_port, timeout=10)
    p.user(ALICE)
    p.pass_("secret")
    resp, lines, octets = p.retr(1)
    assert resp.startswith(b"+OK") and b"\r\n".join(lines) == msg   # poplib unstuffs
    assert resp == b"+OK %d octets" % len(msg)
    assert octets == len(msg) + 2                   # poplib counts the CRLF added to the end
    resp, lines, _ = p.top(1, 4)
    header = msg[:msg.index(b"\r\n\r\n") + 4]
    assert b"\r\n".join(lines) + b"\r\n" == header + b".\r\n..\r\n...x\r\n.a\r\n"
    raw = Raw(relay.pop3_port)                       # the stuffed bytes themselves
    p.quit()
    assert raw.retr() == stuffed(msg)
    m = imaplib.IMAP4("127.0.0.1", relay.imap_port, timeout=10)
    m.login(ALICE, "secret")
    m.select("INBOX", readonly=True)
    typ, data = m.fetch("1", "(BODY.PEEK[])")
    assert typ == "OK" and isinstance(data[0], tuple) and data[0][1] == msg
    typ, data = m.fetch("1", "(BODY.PEEK[]<5.300000>)")
    assert isinstance(data[0], tuple) and data[0][1] == msg[5:300005]
    m.logout()


class Raw:
    """RETR 1 on a raw socket (after the poplib session has quit: the maildrop lock)."""

    def __init__(self, port: int) -> None:
        self.port = port

    def retr(self) -> bytes:
        deadline = time.monotonic() + 5
        while True:
            try:
                return self._retr()
            except InUse:                # the previous session's lock goes after its QUIT
                assert time.monotonic() < deadline, "maildrop lock not released"
                time.sleep(0.02)

    def _retr(self) -> bytes:
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as s:
            f = s.makefile("rb")
            f.readline()
            s.sendall(f"USER {ALICE}\r\nPASS secret\r\n".encode())
            assert f.readline().startswith(b"+OK")
            if (reply := f.readline()).startswith(b"-ERR [IN-USE]"):
                raise InUse
            assert reply.startswith(b"+OK"), reply
            s.sendall(b"RETR 1\r\n")
            assert f.readline().startswith(b"+OK")
            out = bytearray()
            while not out.endswith(b"\r\n.\r\n"):
                out += f.read1(1 << 16)
            s.sendall(b"QUIT\r\n")
            return bytes(out)


class InUse(Exception):
    pass
