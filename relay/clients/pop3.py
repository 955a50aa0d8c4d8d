"""A small streaming POP3 client (blocking sockets) for benchmarks, the load generator and the
gateway. Unlike poplib it never holds a message in memory: `retr_to_file` receives in 1 MiB
reads and writes the dot-unstuffed bytes straight into a file.

    with Pop3Client("127.0.0.1", 1110) as c:
        c.login("ct@hospital.test", "secret")          # AUTH PLAIN if offered, else USER/PASS
        for n, uidl in c.uidl().items():
            c.retr_to_file(n, f"/tmp/{uidl}.eml")
            c.dele(n)
        c.quit()                                        # the deletions happen here

Blocking on purpose (plain sockets are the fastest receive path in Python); from asyncio code
run it in a thread (`asyncio.to_thread`). Errors: `Pop3Error` (a -ERR reply, with its
RESP-CODE in `.code`), `OSError`/`socket.timeout` for the connection.
"""

from __future__ import annotations

import builtins
import os
import socket
import ssl
from pathlib import Path
from types import TracebackType
from typing import Self

from relay.protocol.pop3 import DotUnstuffer

CHUNK = 1024 * 1024
MAX_REPLY_LINE = 64 * 1024        # RFC 2449 4 says 512 octets; be lenient, but bounded
MAX_LISTING = 64 * 1024 * 1024    # a LIST/UIDL reply: ~25 bytes per message


class Pop3Error(Exception):
    """The server answered -ERR. `.code` is its RESP-CODE ("IN-USE", "AUTH", ...) or None."""

    def __init__(self, line: str) -> None:
        super().__init__(line)
        self.line = line
        text = line[4:].lstrip() if line.startswith("-ERR") else line
        self.code = text[1:text.index("]")] if text.startswith("[") and "]" in text else None


class Pop3Client:
    def __init__(self, host: str, port: int, *, timeout: float = 60.0,
                 ssl_context: ssl.SSLContext | None = None, implicit_tls: bool = False,
                 starttls: bool = False, server_hostname: str | None = None) -> None:
        """Connect and read the greeting. `implicit_tls` wraps at once (995 style); `starttls`
        sends STLS first. Both use `ssl_context` (default: ssl.create_default_context())."""
        self.host, self.port = host, port
        self._server_hostname = server_hostname or host
        self._ctx = ssl_context
        self.sock: socket.socket = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._buf = b""                   # received, not yet consumed from self._pos on
        self._pos = 0
        if implicit_tls:
            self._wrap()
        self.greeting = self._ok()
        self._capa: dict[str, list[str]] | None = None
        if starttls:
            self.stls()

    # --- plumbing ------------------------------------------------------------------------
    def _wrap(self) -> None:
        ctx = self._ctx or ssl.create_default_context()
        self.sock = ctx.wrap_socket(self.sock, server_hostname=self._server_hostname)

    def _recv(self) -> bytes:
        data = self.sock.recv(CHUNK)
        if not data:
            raise ConnectionError("POP3 server closed the connection")
        return data

    def _line(self) -> str:
        while True:
            i = self._buf.find(b"\n", self._pos)
            if i >= 0:              # advance an index: no copy of the rest per line
                line, self._pos = self._buf[self._pos:i + 1], i + 1
                return line.rstrip(b"\r\n").decode("utf-8", "replace")
            if len(self._buf) - self._pos > MAX_REPLY_LINE:
                raise ConnectionError("POP3 reply line too long")
            self._buf = self._buf[self._pos:] + self._recv()
            self._pos = 0

    def _ok(self) -> str:
        line = self._line()
        if line.startswith("+OK"):
            return line[3:].strip()
        raise Pop3Error(line)

    def _send(self, line: str) -> None:
        self.sock.sendall(line.encode("utf-8") + b"\r\n")

    def command(self, line: str) -> str:
        """Send one command, return the text after +OK (or raise Pop3Error)."""
        self._send(line)
        return self._ok()

    def _multiline(self) -> list[str]:
        """The lines of a multi-line reply (LIST, UIDL, CAPA), unstuffed: the whole block up
        to the terminating "." line is found first, then split at once."""
        scanned = self._pos
        while True:
            if self._buf.startswith(b".\r\n", self._pos):
                end = self._pos
                break
            i = self._buf.find(b"\r\n.\r\n", scanned)
            if i >= 0:
                end = i + 2
                break
            if len(self._buf) - self._pos > MAX_LISTING:
                raise ConnectionError("POP3 multi-line reply too long")
            scanned = max(self._pos, len(self._buf) - 4)
            self._buf = self._buf[self._pos:] + self._recv()
            scanned -= self._pos
            self._pos = 0
        block, self._pos = self._buf[self._pos:end], end + 3
        lines = block.decode("utf-8", "replace").split("\r\n")[:-1]
        return [line.removeprefix(".") for line in lines]

    # --- commands ------------------------------------------------------------------------
    def capa(self) -> dict[str, list[str]]:
        """CAPA -> {"TOP": [], "SASL": ["PLAIN"], ...} (cached until STLS)."""
        if self._capa is None:
            try:
                self.command("CAPA")
                self._capa = {}
                for line in self._multiline():
                    name, *args = line.split()
                    self._capa[name.upper()] = args
            except Pop3Error:
                self._capa = {}
        return self._capa

    def stls(self) -> None:
        self.command("STLS")
        if len(self._buf) > self._pos:
            raise ConnectionError("POP3 server sent data after the STLS reply")
        self._wrap()
        self._capa = None

    def login(self, user: str, password: str, method: str = "auto") -> str:
        """method: "plain" (AUTH PLAIN with initial response), "user" (USER/PASS), or "auto"
        (PLAIN when CAPA lists SASL PLAIN, else USER/PASS)."""
        if method == "auto":
            method = "plain" if "PLAIN" in [m.upper() for m in self.capa().get("SASL", [])] else "user"
        if method == "plain":
            import base64

            token = base64.b64encode(f"\0{user}\0{password}".encode()).decode("ascii")
            if len(token) + len("AUTH PLAIN \r\n") <= 255:     # RFC 5034 4
                return self.command(f"AUTH PLAIN {token}")
            self._send("AUTH PLAIN")
            line = self._line()
            if not line.startswith("+ ") and line != "+":
                raise Pop3Error(line)
            return self.command(token)
        if method != "user":
            raise ValueError(f"unknown login method {method!r}")
        self.command(f"USER {user}")
        return self.command(f"PASS {password}")

    def stat(self) -> tuple[int, int]:
        count, size = self.command("STAT").split()[:2]
        return int(count), int(size)

    def _listing(self, cmd: str, n: int | None) -> dict[int, str]:
        if n is not None:
            num, value = self.command(f"{cmd} {n}").split()[:2]
            return {int(num): value}
        self.command(cmd)
        out = {}
        for line in self._multiline():
            num, value = line.split()[:2]
            out[int(num)] = value
        return out

    def poll(self) -> tuple[int, int, dict[int, str]]:
        """STAT and UIDL pipelined (one round trip): (count, octets, {msgno: unique-id})."""
        self.sock.sendall(b"STAT\r\nUIDL\r\n")
        stat = self._line()
        self._ok()
        uidl = {int(num): value for num, value in (line.split()[:2] for line in self._multiline())}
        if not stat.startswith("+OK"):
            raise Pop3Error(stat)
        count, size = stat[3:].split()[:2]
        return int(count), int(size), uidl

    def list(self, n: int | None = None) -> dict[int, int]:
        """LIST -> {msgno: size}."""
        return {k: int(v) for k, v in self._listing("LIST", n).items()}

    def uidl(self, n: int | None = None) -> dict[int, str]:
        """UIDL -> {msgno: unique-id}."""
        return self._listing("UIDL", n)

    def retr_to_file(self, n: int, path: str | os.PathLike[str], *, fsync: bool = False) -> int:
        """RETR n, streamed and dot-unstuffed into `path` (created or truncated). Returns the
        bytes written. Memory: one 1 MiB read plus one line."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            written = self._stream(f"RETR {n}", fd)
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        return written

    def top(self, n: int, lines: int) -> bytes:
        """TOP n lines -> the header and `lines` body lines (small; held in memory)."""
        chunks: list[bytes] = []
        self._stream(f"TOP {n} {lines}", None, chunks)
        return b"".join(chunks)

    def retr(self, n: int) -> bytes:
        """RETR n into memory: only for small messages (tests); use retr_to_file otherwise."""
        chunks: list[bytes] = []
        self._stream(f"RETR {n}", None, chunks)
        return b"".join(chunks)

    def _stream(self, cmd: str, fd: int | None, chunks: builtins.list[bytes] | None = None) -> int:
        self.command(cmd)
        u = DotUnstuffer()
        written = 0
        data, self._buf, self._pos = self._buf[self._pos:], b"", 0
        while True:
            pieces = u.feed(data) if data else []
            if pieces:
                if fd is not None:
                    written += _writev_all(fd, pieces)
                elif chunks is not None:
                    chunks.extend(bytes(p) for p in pieces)
                    written += sum(len(p) for p in pieces)
            if u.done:
                self._buf = u.rest
                return written
            data = self._recv()

    def dele(self, n: int) -> str:
        return self.command(f"DELE {n}")

    def rset(self) -> str:
        return self.command("RSET")

    def noop(self) -> str:
        return self.command("NOOP")

    def quit(self) -> str:
        """QUIT: the server removes the messages marked by DELE and closes."""
        try:
            return self.command("QUIT")
        finally:
            self.close()

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> Self:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def _writev_all(fd: int, pieces: list[bytes | memoryview]) -> int:
    """os.writev, continued after short writes. Returns the bytes written."""
    total = sum(len(p) for p in pieces)
    done = os.writev(fd, pieces)
    if done < total:                      # rare: finish piece by piece
        rest = memoryview(b"".join(pieces))[done:]
        while rest:
            rest = rest[os.write(fd, rest):]
    return total


def fetch_all(host: str, port: int, user: str, password: str, dest: str | Path, *,
              delete: bool = True, **kw: object) -> list[Path]:
    """Download every message into dest/<uidl>.eml (fsync'd), then DELE them and QUIT.
    A message already present under its UIDL is skipped (a re-run after a broken session)."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    got = []
    with Pop3Client(host, port, **kw) as c:  # type: ignore[arg-type]
        c.login(user, password)
        for n, uid in c.uidl().items():
            path = dest / f"{uid}.eml"
            if not path.exists():
                tmp = dest / f".{uid}.part"
                c.retr_to_file(n, tmp, fsync=True)
                tmp.rename(path)
            got.append(path)
            if delete:
                c.dele(n)
        c.quit()
    return got
