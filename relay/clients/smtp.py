"""A streaming SMTP sender (sync, sockets): for the benchmarks, loadgen and the gateway.

    from relay.clients.smtp import SmtpClient, send_message
    result = send_message("127.0.0.1", 2525, "a@x.test", ["b@y.test"], Path("study.eml"))
    result.final            # SmtpReply(250, "2.0.0 ...")
    result.rcpt             # {"b@y.test": SmtpReply(250, ...)}

Messages are never held whole in memory: a file is sent with socket.sendfile (BDAT) or read
in chunks; an iterable of byte chunks is sent as it comes. BDAT (RFC 3030) is used when the
server offers CHUNKING, chunks pipelined; otherwise DATA with C-speed dot-stuffing
(bytes.replace). Lines must already end in CRLF: the bytes are sent as given.
4xx/5xx replies raise SmtpError carrying the reply.
"""

from __future__ import annotations

import base64
import io
import mmap
import os
import select
import socket
import ssl
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import BinaryIO, Self

CHUNK = 8 * 1024 * 1024
Source = bytes | bytearray | memoryview | str | os.PathLike[str] | BinaryIO | Iterable[bytes]


@dataclass(frozen=True)
class SmtpReply:
    code: int
    text: str                       # all lines joined by "\n" (enhanced code included)

    @property
    def enhanced(self) -> str:
        first = self.text.split(" ", 1)[0]
        return first if first.count(".") == 2 and first[0] in "245" else ""

    def __str__(self) -> str:
        return f"{self.code} {self.text}"


class SmtpError(Exception):
    """The server answered 4xx/5xx (or broke the protocol). `reply` is what it said."""

    def __init__(self, command: str, reply: SmtpReply,
                 rcpt: dict[str, SmtpReply] | None = None) -> None:
        super().__init__(f"{command}: {reply}")
        self.command = command
        self.reply = reply
        self.rcpt = rcpt or {}

    @property
    def temporary(self) -> bool:
        return 400 <= self.reply.code < 500


@dataclass
class SendResult:
    rcpt: dict[str, SmtpReply] = field(default_factory=dict)   # every recipient's RCPT reply
    final: SmtpReply | None = None                              # the reply to the message
    size: int = 0                                               # message octets sent
    method: str = ""                                            # "BDAT" | "DATA"

    @property
    def accepted(self) -> list[str]:
        return [a for a, r in self.rcpt.items() if r.code < 400]


class SmtpClient:
    def __init__(self, host: str, port: int, *, timeout: float = 600.0,
                 local_hostname: str = "client.invalid",
                 ssl_context: ssl.SSLContext | None = None, implicit_tls: bool = False) -> None:
        """Connects and reads the greeting. `ssl_context` is used for implicit TLS or
        STARTTLS; timeout applies to every read (RFC 5321 4.5.3.2: up to 10 min for the
        reply to the end of data)."""
        self.host, self.port = host, port
        self.local_hostname = local_hostname
        self.ssl_context = ssl_context
        self.sock: socket.socket = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if implicit_tls:
            self._wrap_tls()
        self._rbuf = bytearray()
        self.extensions: dict[str, str] = {}
        self.greeting = self._expect("greeting")

    # --- plumbing ------------------------------------------------------------------------
    def _wrap_tls(self) -> None:
        ctx = self.ssl_context or ssl.create_default_context()
        self.sock = ctx.wrap_socket(self.sock, server_hostname=self.host)

    def _readline(self) -> bytes:
        while True:
            k = self._rbuf.find(b"\n")
            if k >= 0:
                line = bytes(self._rbuf[:k + 1])
                del self._rbuf[:k + 1]
                return line
            if len(self._rbuf) > 65536:
                raise SmtpError("reply", SmtpReply(0, "reply line too long"))
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("server closed the connection")
            self._rbuf += data

    def read_reply(self) -> SmtpReply:
        lines: list[str] = []
        while True:
            raw = self._readline()
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            if len(line) < 3 or not line[:3].isdigit():
                raise SmtpError("reply", SmtpReply(0, line))
            lines.append(line[4:])
            if line[3:4] != "-":
                return SmtpReply(int(line[:3]), "\n".join(lines))

    def _expect(self, command: str) -> SmtpReply:
        r = self.read_reply()
        if r.code >= 400:
            raise SmtpError(command, r)
        return r

    def command(self, line: str) -> SmtpReply:
        """Send one command line, return its reply (any code)."""
        self.sock.sendall(line.encode("utf-8") + b"\r\n")
        return self.read_reply()

    def _checked(self, line: str) -> SmtpReply:
        r = self.command(line)
        if r.code >= 400:
            raise SmtpError(line.split(" ", 1)[0], r)
        return r

    # --- session -------------------------------------------------------------------------
    def ehlo(self) -> dict[str, str]:
        r = self._checked(f"EHLO {self.local_hostname}")
        self.extensions = {}
        for line in r.text.split("\n")[1:]:
            key, _, value = line.partition(" ")
            self.extensions[key.upper()] = value
        return self.extensions

    def starttls(self) -> None:
        self._checked("STARTTLS")
        self._rbuf.clear()
        self._wrap_tls()
        self.ehlo()

    def login(self, user: str, password: str) -> None:
        """AUTH PLAIN (RFC 4616) with an initial response."""
        token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
        self._checked(f"AUTH PLAIN {token}")

    def quit(self) -> None:
        try:
            self.command("QUIT")
        except (OSError, SmtpError):
            pass
        self.close()

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.quit()

    # --- a message -----------------------------------------------------------------------
    def send(self, sender: str, recipients: list[str], source: Source, *,
             size: int | None = None, chunk_size: int = CHUNK, bdat: bool | None = None,
             mail_params: str = "") -> SendResult:
        """Send one message. `bdat`: None = when offered. `size` (for SIZE=) defaults to the
        length of bytes or the file. Raises SmtpError when MAIL, every RCPT or the message
        is refused; partial recipient refusals are in the result."""
        if not self.extensions:
            self.ehlo()
        use_bdat = "CHUNKING" in self.extensions if bdat is None else bdat
        fobj, chunks, size = _open_source(source, size, chunk_size)
        try:
            result = SendResult(method="BDAT" if use_bdat else "DATA")
            params = f" SIZE={size}" if size is not None and "SIZE" in self.extensions else ""
            params += f" {mail_params}" if mail_params else ""
            lines = [f"MAIL FROM:<{sender}>{params}"] + [f"RCPT TO:<{r}>" for r in recipients]
            if "PIPELINING" in self.extensions:
                self.sock.sendall("".join(f"{x}\r\n" for x in lines).encode("utf-8"))
                replies = [self.read_reply() for _ in lines]
            else:
                replies = []
                for x in lines:
                    replies.append(self.command(x))
                    if replies[0].code >= 400:
                        break
            if replies[0].code >= 400:
                raise SmtpError("MAIL", replies[0])
            result.rcpt = dict(zip(recipients, replies[1:], strict=True))
            if not result.accepted:
                self.command("RSET")
                raise SmtpError("RCPT", replies[-1], result.rcpt)
            if use_bdat:
                result.final, result.size = self._send_bdat(fobj, chunks, chunk_size)
            else:
                result.final, result.size = self._send_data(fobj, chunks, chunk_size)
            return result
        finally:
            if fobj is not None and not isinstance(source, io.IOBase):
                fobj.close()

    def _send_data(self, fobj: BinaryIO | None, chunks: Iterator[bytes],
                   chunk_size: int) -> tuple[SmtpReply, int]:
        """DATA with dot-stuffing (RFC 5321 4.5.2). Pieces without any '.' (memchr speed;
        base64 has none) go out unchanged, from a file by sendfile; others get
        bytes.replace plus the cases where a line start falls on a piece boundary."""
        self._expect_354()
        sent = 0
        prev = b"\r\n"                             # DATA's own CRLF starts the first line
        for n, data, offset, tail in _data_pieces(fobj, chunks, chunk_size):
            if not n:
                continue
            sent += n
            if data is None:
                assert fobj is not None
                self.sock.sendfile(fobj, offset, n)
            else:
                out = data.replace(b"\r\n.", b"\r\n..") if b"." in data else data
                if out[:1] == b"." and prev == b"\r\n":
                    out = b"." + out
                elif out[:2] == b"\n." and prev[-1:] == b"\r":
                    out = b"\n.." + out[2:]
                self.sock.sendall(out)
            prev = tail if n >= 2 else prev[-1:] + tail
        self.sock.sendall(b".\r\n" if prev == b"\r\n" else b"\r\n.\r\n")
        return self._expect("DATA end"), sent

    def _expect_354(self) -> None:
        r = self.command("DATA")
        if r.code != 354:
            raise SmtpError("DATA", r)

    def _send_bdat(self, fobj: BinaryIO | None, chunks: Iterator[bytes],
                   chunk_size: int) -> tuple[SmtpReply, int]:
        """Pipelined BDAT: chunks go out without waiting; replies are collected as they come
        and a refusal stops the sending (RFC 3030 4.2)."""
        outstanding = 0
        sent = 0
        failure: SmtpReply | None = None
        last_reply: SmtpReply | None = None

        def collect(block: bool) -> None:
            nonlocal outstanding, failure, last_reply
            while outstanding and (block or self._readable()):
                r = self.read_reply()
                outstanding -= 1
                last_reply = r
                if r.code >= 400 and failure is None:
                    failure = r

        pieces = _file_pieces(fobj, chunk_size) if fobj is not None else (
            (len(c), c) for c in chunks if c)
        for n, data in pieces:
            self.sock.sendall(f"BDAT {n}\r\n".encode())
            if data is None:
                assert fobj is not None
                self.sock.sendfile(fobj, fobj.tell(), n)  # moves the file position
            else:
                self.sock.sendall(data)
            sent += n
            outstanding += 1
            collect(False)
            if failure is not None:
                break
        if failure is None:
            self.sock.sendall(b"BDAT 0 LAST\r\n")
            outstanding += 1
        collect(True)
        if failure is not None:
            raise SmtpError("BDAT", failure)
        assert last_reply is not None
        return last_reply, sent

    def _readable(self) -> bool:
        if b"\n" in self._rbuf:
            return True
        if isinstance(self.sock, ssl.SSLSocket) and self.sock.pending():
            return True
        r, _, _ = select.select([self.sock], [], [], 0)
        return bool(r)


def _open_source(source: Source, size: int | None,
                 chunk_size: int) -> tuple[BinaryIO | None, Iterator[bytes], int | None]:
    """(file object or None, iterator of chunks, size if known)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        it = (data[i:i + chunk_size] for i in range(0, len(data), chunk_size))
        return None, it, len(data) if size is None else size
    if isinstance(source, (str, os.PathLike)):
        f: BinaryIO = open(source, "rb")  # noqa: SIM115 (closed by send)
        return f, iter(lambda: f.read(chunk_size), b""), (os.fstat(f.fileno()).st_size
                                                          if size is None else size)
    if isinstance(source, io.IOBase):
        fb: BinaryIO = source  # type: ignore[assignment]
        try:
            known = os.fstat(fb.fileno()).st_size - fb.tell()
        except (OSError, io.UnsupportedOperation):
            known = None
        return (fb if known is not None else None), iter(lambda: fb.read(chunk_size), b""), (
            known if size is None else size)
    return None, iter(source), size


def _data_pieces(fobj: BinaryIO | None, chunks: Iterator[bytes],
                 chunk_size: int) -> Iterator[tuple[int, bytes | None, int, bytes]]:
    """(length, bytes or None, file offset, last two bytes) per piece. A regular file is
    searched in place through mmap; a piece without any '.' comes as None (sendfile it)."""
    if fobj is None:
        for c in chunks:
            yield len(c), c, -1, c[-2:]
        return
    start, size = fobj.tell(), os.fstat(fobj.fileno()).st_size
    if size <= start:
        return
    with mmap.mmap(fobj.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        for a in range(start, size, chunk_size):
            b = min(a + chunk_size, size)
            dotted = mm.find(b".", a, b) >= 0
            yield b - a, mm[a:b] if dotted else None, a, mm[max(b - 2, a):b]


def _file_pieces(f: BinaryIO, chunk_size: int) -> Iterator[tuple[int, bytes | None]]:
    """(length, None) pieces of a regular file from its position, for socket.sendfile."""
    left = os.fstat(f.fileno()).st_size - f.tell()
    while left > 0:
        n = min(chunk_size, left)
        yield n, None
        left -= n


def send_message(host: str, port: int, sender: str, recipients: list[str], source: Source, *,
                 starttls: bool = False, ssl_context: ssl.SSLContext | None = None,
                 implicit_tls: bool = False, user: str | None = None,
                 password: str | None = None, timeout: float = 600.0,
                 **kw: object) -> SendResult:
    """Connect, EHLO, optional STARTTLS and AUTH PLAIN, send one message, QUIT."""
    with SmtpClient(host, port, timeout=timeout, ssl_context=ssl_context,
                    implicit_tls=implicit_tls) as c:
        c.ehlo()
        if starttls:
            c.starttls()
        if user is not None:
            c.login(user, password or "")
        return c.send(sender, recipients, source, **kw)  # type: ignore[arg-type]


__all__ = ["SendResult", "SmtpClient", "SmtpError", "SmtpReply", "send_message"]
