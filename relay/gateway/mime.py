"""Streaming MIME building blocks: never a whole message in memory.

- read_headers(fp): the header block only (cut at the first empty line, bounded).
- MultipartReader: splits a multipart body read from a file into parts, in blocks.
- Base64Encoder / Base64Decoder: base64 in blocks (57*k input bytes -> 76-char CRLF lines).
- copy_crlf: copy a file converting bare LF to CRLF (gpg writes LF).
"""

from __future__ import annotations

import binascii
import email.policy
import email.utils
import os
import uuid
from collections.abc import Iterator
from email.message import Message
from email.parser import BytesHeaderParser
from typing import BinaryIO

import numpy as np

BLOCK = 1024 * 1024
# RFC 5322 2.1.1 lines are <= 998 octets; a header block of real mail is a few KiB. We bound it
# so a message without an empty line cannot make us read gigabytes as "headers".
MAX_HEADER_BLOCK = 256 * 1024
B64_LINE = 57          # input bytes per 76-character base64 line (RFC 2045 6.8)
B64_BLOCK = B64_LINE * 16384   # ~0.9 MiB of input per encode call


class MimeError(ValueError):
    """Malformed MIME that we refuse to process (the reason is the message)."""


def new_boundary() -> str:
    return "=_relay_" + uuid.uuid4().hex


def new_message_id(domain: str) -> str:
    return f"<{uuid.uuid4().hex}@{domain}>"


def _split_head(buf: bytes) -> tuple[int, int] | None:
    """(end of header block, start of body) in buf, or None if no empty line yet."""
    if buf.startswith(b"\r\n"):
        return 0, 2
    if buf.startswith(b"\n"):
        return 0, 1
    found = [(i, i + len(sep)) for sep in (b"\r\n\r\n", b"\n\n") if (i := buf.find(sep)) >= 0]
    return min(found) if found else None


def read_headers(fp: BinaryIO) -> tuple[Message, int]:
    """Parse the header block at fp's position. Returns (headers, body offset) and leaves fp
    at the start of the body."""
    start = fp.tell()
    buf = b""
    while (cut := _split_head(buf)) is None:
        chunk = fp.read(8192)
        if not chunk:
            cut = (len(buf), len(buf))
            break
        buf += chunk
        if len(buf) > MAX_HEADER_BLOCK and _split_head(buf) is None:
            raise MimeError("header block too large")
    fp.seek(start + cut[1])
    msg = BytesHeaderParser(policy=email.policy.compat32).parsebytes(buf[:cut[0]])
    return msg, start + cut[1]


def header_block(fp: BinaryIO) -> bytes:
    """The raw header block (without the empty line) at fp's position."""
    start = fp.tell()
    _, body = read_headers(fp)
    fp.seek(start)
    raw = fp.read(body - start)
    fp.seek(body)
    return raw.rstrip(b"\r\n")


class MultipartReader:
    """Iterate the parts of a multipart body in a file, in blocks.

        for headers, chunks in MultipartReader(fp, boundary, end=None).parts():
            for chunk in chunks: ...        # the part's body bytes, raw (undecoded)

    Each part's chunk iterator must be consumed before moving to the next part.
    """

    def __init__(self, fp: BinaryIO, boundary: str, end: int | None = None) -> None:
        self.fp = fp
        self.delim = b"\r\n--" + boundary.encode("ascii")
        self.end = end
        self._buf = b"\r\n"     # so a delimiter at the very start of the body is found
        self._eof = False
        self.closed = False     # saw the close delimiter

    def _fill(self) -> bool:
        if self._eof:
            return False
        n = BLOCK
        if self.end is not None:
            n = min(n, self.end - self.fp.tell())
        data = self.fp.read(n) if n > 0 else b""
        if not data:
            self._eof = True
            return False
        self._buf += data
        return True

    def _skip_to_delimiter(self) -> bool:
        """Discard up to and including the next delimiter; False if there is none."""
        while True:
            i = self._buf.find(self.delim)
            if i >= 0:
                self._buf = self._buf[i + len(self.delim):]
                return True
            self._buf = self._buf[-len(self.delim):]
            if not self._fill():
                return False

    def _after_delimiter(self) -> bool:
        """After a delimiter: '--' closes; else skip to the end of the line. True if a part follows."""
        while len(self._buf) < 2 and self._fill():
            pass
        if self._buf.startswith(b"--"):
            self.closed = True
            return False
        while b"\n" not in self._buf:
            if not self._fill():
                return False
            if len(self._buf) > 4096:
                raise MimeError("boundary line too long")
        self._buf = self._buf[self._buf.index(b"\n") + 1:]
        return True

    def _part_headers(self) -> Message:
        while True:
            if self._buf.startswith(b"\r\n") or self._buf.startswith(b"\n"):
                head, self._buf = b"", self._buf[self._buf.index(b"\n") + 1:]
                break
            i = self._buf.find(b"\r\n\r\n")
            j = self._buf.find(b"\n\n")
            if i >= 0 and (j < 0 or i < j):
                head, self._buf = self._buf[:i], self._buf[i + 4:]
                break
            if j >= 0:
                head, self._buf = self._buf[:j], self._buf[j + 2:]
                break
            if len(self._buf) > MAX_HEADER_BLOCK:
                raise MimeError("part header block too large")
            if not self._fill():
                raise MimeError("truncated part headers")
        return BytesHeaderParser(policy=email.policy.compat32).parsebytes(head)

    def _body(self) -> Iterator[bytes]:
        keep = len(self.delim)
        while True:
            i = self._buf.find(self.delim)
            if i >= 0:
                if i:
                    yield self._buf[:i]
                self._buf = self._buf[i + len(self.delim):]
                return
            if len(self._buf) > keep:
                out, self._buf = self._buf[:-keep], self._buf[-keep:]
                yield out
            if not self._fill():
                raise MimeError("multipart body ends without its close delimiter")

    def parts(self) -> Iterator[tuple[Message, Iterator[bytes]]]:
        if not self._skip_to_delimiter():
            raise MimeError("no multipart boundary found")
        while self._after_delimiter():
            headers = self._part_headers()
            body = self._body()
            yield headers, body
            for _ in body:      # drain what the caller left
                pass


class Base64Encoder:
    """Feed bytes, get base64 as 76-character CRLF lines (RFC 2045 6.8)."""

    def __init__(self) -> None:
        self._carry = b""

    def feed(self, data: bytes) -> bytes:
        data = self._carry + data
        n = len(data) - len(data) % B64_LINE
        self._carry = data[n:]
        return _b64_lines(data[:n])

    def finish(self) -> bytes:
        out = _b64_lines(self._carry) if self._carry else b""
        self._carry = b""
        return out


def _b64_lines(data: bytes) -> bytes:
    """base64 in 76-character CRLF lines. The CRLFs go in with one numpy reshape instead of a
    Python loop per line (base64.encodebytes): 106 vs 50 MB/s measured on this machine."""
    enc = binascii.b2a_base64(data, newline=False)
    n = len(enc) // 76
    lines = np.empty((n, 78), dtype=np.uint8)
    lines[:, :76] = np.frombuffer(enc, dtype=np.uint8, count=n * 76).reshape(n, 76)
    lines[:, 76:] = (13, 10)
    out = lines.tobytes()
    return out + enc[n * 76:] + b"\r\n" if len(enc) > n * 76 else out


class Base64Decoder:
    """Feed base64 text in any chunking (line breaks and whitespace ignored)."""

    # RFC 2045 6.8: characters outside the alphabet (line breaks above all) are ignored
    _NOT_B64 = bytes(c for c in range(256)
                     if c not in b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=")

    def __init__(self) -> None:
        self._carry = b""

    def feed(self, data: bytes) -> bytes:
        data = self._carry + data.translate(None, self._NOT_B64)
        n = len(data) - len(data) % 4
        self._carry = data[n:]
        try:
            # strict mode decodes clean input 1.5x faster (404 vs 261 MB/s measured here);
            # anything unusual (stray characters, padding mid-stream) takes the lenient path
            return binascii.a2b_base64(data[:n], strict_mode=True)
        except binascii.Error:
            pass
        try:
            return binascii.a2b_base64(data[:n], strict_mode=False)
        except binascii.Error as e:
            raise MimeError(f"bad base64: {e}") from None

    def finish(self) -> bytes:
        if self._carry.strip(b"="):
            raise MimeError("base64 ends in the middle of a group")
        return b""


def write_all(fd: int, data: bytes | memoryview) -> None:
    mv = memoryview(data)
    while mv:
        n = os.write(fd, mv)
        mv = mv[n:]


def copy_crlf(src: BinaryIO, dst: BinaryIO) -> int:
    """Copy src to dst, turning bare LF into CRLF. Returns bytes written."""
    total = 0
    prev_cr = False
    while True:
        data = src.read(BLOCK)
        if not data:
            return total
        out = data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        if prev_cr and out.startswith(b"\r\n"):
            out = out[1:]       # the CR before this block's LF was already written
        prev_cr = data.endswith(b"\r")
        dst.write(out)
        total += len(out)


def param(msg: Message, name: str, header: str = "content-type") -> str | None:
    v = msg.get_param(name, header=header)
    if v is None:
        return None
    if isinstance(v, tuple):
        return str(email.utils.collapse_rfc2231_value(v))
    return str(v)

