"""A small synchronous IMAP client for our own tools (benchmarks, loadgen, the gateway).

    with ImapClient("127.0.0.1", 1143) as c:
        c.login("ct@hospital.test", "secret")
        c.select()
        for uid in c.uid_search("UNDELETED"):
            c.fetch_to_file(uid, f"/tmp/{uid}.eml")        # resumable: offset=bytes already there
        c.delete(uids)                                       # UID STORE +FLAGS \\Deleted, UID EXPUNGE
        c.wait_exists(timeout=60)                            # IDLE until a new message arrives

Downloads stream: `UID FETCH uid BODY.PEEK[]<offset.length>` in big ranges, each literal read
with readinto() into one reusable buffer and written to the file, so client memory does not
depend on message size, and a broken download resumes from the bytes already in the file.
"""

from __future__ import annotations

import base64
import os
import re
import select
import socket
import ssl
import stat
import time
from pathlib import Path
from types import TracebackType
from typing import Self

FETCH_RANGE = 256 * 1024 * 1024      # bytes per partial FETCH (one round trip per range)
READ_BUF = 1024 * 1024
MAX_LINE = 1024 * 1024               # a response line (without literals) longer than this is an error

_LITERAL_AT_END = re.compile(rb"\{(\d+)\}\r\n$")


class ImapError(Exception):
    """A NO/BAD answer or a protocol violation; `.status` is "NO", "BAD" or "PROTOCOL"."""

    def __init__(self, status: str, text: str) -> None:
        super().__init__(f"{status} {text}")
        self.status = status
        self.text = text


def _quote(s: str) -> bytes:
    b = s.encode("utf-8")
    if re.search(rb"[\r\n\x00]", b):
        raise ValueError("CR, LF and NUL cannot be sent in a quoted string")
    return b'"' + b.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


def uid_set(uids: list[int]) -> bytes:
    """[1, 2, 3, 7, 9, 10] -> b"1:3,7,9:10": runs collapsed, so that a command naming 100,000
    UIDs stays far below the server's line bound."""
    out: list[str] = []
    nums = sorted(set(uids))
    i = 0
    while i < len(nums):
        j = i
        while j + 1 < len(nums) and nums[j + 1] == nums[j] + 1:
            j += 1
        out.append(str(nums[i]) if i == j else f"{nums[i]}:{nums[j]}")
        i = j + 1
    return ",".join(out).encode()


class _Reader:
    """Buffered reading from a socket, with the buffer visible (IDLE waits with select only
    when nothing is buffered; socket timeouts would spoil a BufferedReader)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()

    def _fill(self) -> None:
        data = self.sock.recv(READ_BUF)
        if not data:
            raise ConnectionError("server closed the connection")
        self.buf += data

    def readline(self, limit: int) -> bytes:
        start = 0
        while (i := self.buf.find(b"\n", start)) < 0:
            if len(self.buf) > limit:
                raise ImapError("PROTOCOL", "response line too long")
            start = len(self.buf)
            self._fill()
        line = bytes(self.buf[:i + 1])
        del self.buf[:i + 1]
        return line

    def read(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        data = bytes(self.buf[:n])
        del self.buf[:n]
        return data

    def readinto(self, view: memoryview) -> int:
        if self.buf:
            k = min(len(view), len(self.buf))
            view[:k] = self.buf[:k]
            del self.buf[:k]
            return k
        k = self.sock.recv_into(view)
        if not k:
            raise ConnectionError("server closed the connection in a literal")
        return k

    def wait_readable(self, timeout: float) -> bool:
        if self.buf:
            return True
        if isinstance(self.sock, ssl.SSLSocket) and self.sock.pending():
            return True
        return bool(select.select([self.sock], [], [], timeout)[0])


class ImapClient:
    def __init__(self, host: str, port: int, timeout: float = 60.0,
                 ssl_context: ssl.SSLContext | None = None, starttls: bool = False) -> None:
        """Connect; with ssl_context and not starttls, TLS from the first byte (993 style)."""
        self.host = host
        self.timeout = timeout
        sock = socket.create_connection((host, port), timeout=timeout)
        if ssl_context is not None and not starttls:
            sock = ssl_context.wrap_socket(sock, server_hostname=host)
        self._set_socket(sock)
        self._tag = 0
        self.capabilities: set[str] = set()
        greeting = self._readline()
        if not greeting.startswith(b"* OK"):
            raise ImapError("PROTOCOL", greeting.decode("utf-8", "replace").strip())
        self._note_capabilities(greeting)
        if ssl_context is not None and starttls:
            self.starttls(ssl_context)
        self.exists = 0
        self.uidvalidity = 0
        self.uidnext = 0

    def _set_socket(self, sock: socket.socket) -> None:
        self.sock = sock
        self.file = _Reader(sock)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    # --- protocol basics -----------------------------------------------------------------

    def _readline(self) -> bytes:
        return self.file.readline(MAX_LINE)

    def _note_capabilities(self, line: bytes) -> None:
        m = re.search(rb"\[CAPABILITY ([^\]]*)\]", line) or re.match(rb"\* CAPABILITY (.*)\r\n", line)
        if m:
            self.capabilities = set(m.group(1).decode("ascii", "replace").upper().split())

    def send(self, *parts: bytes) -> str:
        self._tag += 1
        tag = f"c{self._tag}"
        self.sock.sendall(tag.encode() + b" " + b" ".join(parts) + b"\r\n")
        return tag

    def _read_response(self, tag: str) -> list[bytes]:
        """Untagged responses (literals inlined) until the tagged one; NO/BAD raise."""
        untagged: list[bytes] = []
        prefix = tag.encode() + b" "
        while True:
            line = self._readline()
            while (m := _LITERAL_AT_END.search(line)) is not None:
                n = int(m.group(1))
                if n > 64 * 1024 * 1024:
                    raise ImapError("PROTOCOL", "literal too large for a response; use fetch_to_file")
                line += self._read_exact(n) + self._readline()
            if line.startswith(prefix):
                status, _, text = line[len(prefix):].decode("utf-8", "replace").strip().partition(" ")
                if status != "OK":
                    raise ImapError(status, text)
                self._note_capabilities(line)
                return untagged
            if line.startswith(b"* "):
                self._note_capabilities(line)
                untagged.append(line)
            # "+" continuations are not expected here

    def _read_exact(self, n: int) -> bytes:
        return self.file.read(n)

    def command(self, *parts: bytes) -> list[bytes]:
        return self._read_response(self.send(*parts))

    # --- session -------------------------------------------------------------------------

    def starttls(self, ctx: ssl.SSLContext) -> None:
        self.command(b"STARTTLS")
        if self.file.buf:
            raise ImapError("PROTOCOL", "data after the STARTTLS answer (injection?)")
        self._set_socket(ctx.wrap_socket(self.sock, server_hostname=self.host))
        self.command(b"CAPABILITY")

    def login(self, user: str, password: str) -> None:
        """AUTHENTICATE PLAIN with SASL-IR when offered, else LOGIN."""
        if "AUTH=PLAIN" in self.capabilities and "SASL-IR" in self.capabilities:
            ir = base64.b64encode(b"\0" + user.encode() + b"\0" + password.encode())
            self.command(b"AUTHENTICATE PLAIN", ir)
        else:
            self.command(b"LOGIN", _quote(user), _quote(password))
        if not any(c == "UIDPLUS" for c in self.capabilities):
            self.command(b"CAPABILITY")

    def select(self, mailbox: str = "INBOX") -> int:
        """SELECT; returns the number of messages (also self.exists, uidvalidity, uidnext)."""
        for line in self.command(b"SELECT", _quote(mailbox)):
            self._note_untagged(line)
        return self.exists

    def _note_untagged(self, line: bytes) -> None:
        if m := re.match(rb"\* (\d+) EXISTS", line):
            self.exists = int(m.group(1))
        elif m := re.search(rb"\[UIDVALIDITY (\d+)\]", line):
            self.uidvalidity = int(m.group(1))
        elif m := re.search(rb"\[UIDNEXT (\d+)\]", line):
            self.uidnext = int(m.group(1))
        elif re.match(rb"\* \d+ EXPUNGE", line):
            self.exists -= 1

    def uid_search(self, criteria: str = "ALL") -> list[int]:
        out: list[int] = []
        for line in self.command(b"UID SEARCH", criteria.encode()):
            if line.startswith(b"* SEARCH"):
                out += [int(x) for x in line[8:].split()]
        return out

    def sizes(self, uids: list[int] | None = None) -> dict[int, int]:
        """UID -> RFC822.SIZE for the given UIDs (default all)."""
        out: dict[int, int] = {}
        if uids == []:
            return out
        spec = uid_set(uids) if uids else b"1:*"
        for line in self.command(b"UID FETCH", spec, b"(RFC822.SIZE)"):
            u, s = re.search(rb"UID (\d+)", line), re.search(rb"RFC822\.SIZE (\d+)", line)
            if u and s:
                out[int(u.group(1))] = int(s.group(1))
        return out

    def fetch_to_file(self, uid: int, path: str | Path, offset: int = 0, chunk: int = FETCH_RANGE) -> int:
        """Download message `uid` into `path`, starting at byte `offset` (the bytes before it
        are kept: resume after a broken connection with offset=path's size). Returns the
        message size; raises ImapError when the message is gone."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            if stat.S_ISREG(os.fstat(fd).st_mode):          # not for /dev/null (benchmarks)
                os.ftruncate(fd, offset)
                os.lseek(fd, offset, os.SEEK_SET)
            buf = bytearray(READ_BUF)
            view = memoryview(buf)
            pos = offset
            while True:
                tag = self.send(b"UID FETCH %d (BODY.PEEK[]<%d.%d>)" % (uid, pos, chunk))
                got = None
                while True:
                    line = self._readline()
                    m = re.search(rb"BODY\[\]<\d+> \{(\d+)\}\r\n$", line)
                    if m and got is None:
                        n = int(m.group(1))
                        left = n
                        while left:
                            k = self.file.readinto(view[:min(left, READ_BUF)])
                            os.write(fd, view[:k])
                            left -= k
                        got = n
                        self._readline()                 # the rest: ")\r\n" (or more items)
                        continue
                    if line.startswith(tag.encode() + b" "):
                        status = line.split(b" ", 2)[1].decode()
                        if status != "OK":
                            raise ImapError(status, line.decode("utf-8", "replace").strip())
                        break
                    if m2 := _LITERAL_AT_END.search(line):
                        self._read_exact(int(m2.group(1)))
                        self._readline()
                if got is None:
                    raise ImapError("NO", f"message UID {uid} does not exist")
                pos += got
                if got < chunk:
                    return pos
        finally:
            os.close(fd)

    def wait_exists(self, timeout: float) -> int | None:
        """IDLE until the server announces EXISTS (returns the new count) or `timeout` passes
        (returns None). Leaves IDLE with DONE either way."""
        tag = self.send(b"IDLE")
        line = self._readline()
        if not line.startswith(b"+"):
            raise ImapError("BAD", line.decode("utf-8", "replace").strip())
        deadline = time.monotonic() + timeout
        result = None
        try:
            while result is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                if not self.file.wait_readable(left):
                    break
                line = self._readline()
                self._note_untagged(line)
                if re.match(rb"\* \d+ EXISTS", line):
                    result = self.exists
        finally:
            self.sock.sendall(b"DONE\r\n")
            for line in self._read_response(tag):
                self._note_untagged(line)
        return result

    def delete(self, uids: list[int]) -> None:
        """Mark \\Deleted and remove exactly these messages (UIDPLUS UID EXPUNGE)."""
        if not uids:
            return
        spec = uid_set(uids)
        self.command(b"UID STORE", spec, b"+FLAGS.SILENT (\\Deleted)")
        for line in self.command(b"UID EXPUNGE", spec):
            self._note_untagged(line)

    def noop(self) -> None:
        for line in self.command(b"NOOP"):
            self._note_untagged(line)

    def logout(self) -> None:
        try:
            self.command(b"LOGOUT")
        finally:
            self.close()
