"""Streaming MIME building blocks: never a whole message in memory.

- read_headers(fp): the header block only (cut at the first empty line, bounded).
- MultipartReader: splits a multipart body read from a file into parts, in blocks.
- Base64Encoder / Base64Decoder: base64 in blocks (57*k input bytes -> 76-char CRLF lines).
- ArmorEncoder / ArmorDecoder: OpenPGP ASCII armor (RFC 4880 6.2) around binary OpenPGP
  data, in blocks, so that gpg itself works on binary (its own armor costs it 2.5x its time).
- ChunkReader: a read()-able stream over an iterator of byte blocks (to feed gpg's stdin).
- copy_crlf: copy a file converting bare LF to CRLF (gpg writes LF).
"""

from __future__ import annotations

import binascii
import email.policy
import email.utils
import os
import re
import uuid
from collections.abc import Iterable, Iterator
from email.message import Message
from email.parser import BytesHeaderParser
from typing import BinaryIO

import anycrc  # type: ignore[import-untyped]
import numpy as np

BLOCK = 1024 * 1024
# RFC 5322 2.1.1 lines are <= 998 octets; a header block of real mail is a few KiB. We bound it
# so a message without an empty line cannot make us read gigabytes as "headers".
MAX_HEADER_BLOCK = 256 * 1024
B64_LINE = 57          # input bytes per 76-character base64 line (RFC 2045 6.8)
B64_BLOCK = B64_LINE * 16384   # ~0.9 MiB of input per encode call
INNER_ENCODINGS = ("base64", "binary")   # Content-Transfer-Encoding of the application/dicom
                                         # parts inside the encrypted entity (RFC 3156 3: data
                                         # only encrypted need not be 7bit); base64 by default
ARMOR_LINE = 48        # input bytes per 64-character armor line (RFC 4880 6.3 allows up to 76;
                       # 64 is what gpg writes)


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


def read_headers_stream(fp: BinaryIO) -> tuple[Message, bytes]:
    """read_headers for a stream that cannot seek (gpg's output): returns (headers, the body
    bytes read past the header block), for MultipartReader(prefix=...)."""
    buf = b""
    while (cut := _split_head(buf)) is None:
        chunk = fp.read(BLOCK)
        if not chunk:
            cut = (len(buf), len(buf))
            break
        buf += chunk
        if len(buf) > MAX_HEADER_BLOCK and _split_head(buf[:MAX_HEADER_BLOCK]) is None:
            raise MimeError("header block too large")
    return BytesHeaderParser(policy=email.policy.compat32).parsebytes(buf[:cut[0]]), buf[cut[1]:]


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

    def __init__(self, fp: BinaryIO, boundary: str, end: int | None = None, prefix: bytes = b"") -> None:
        self.fp = fp
        self.delim = b"\r\n--" + boundary.encode("ascii")
        self.end = end
        self._buf = b"\r\n" + prefix   # CRLF: so a delimiter at the very start of the body is found;
                                       # prefix: body bytes read already (read_headers_stream)
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
    """Feed bytes, get base64 as CRLF lines of 4*line/3 characters (76: RFC 2045 6.8)."""

    def __init__(self, line: int = B64_LINE) -> None:
        self._carry = b""
        self._line = line

    def feed(self, data: bytes) -> bytes:
        if self._carry:
            data = self._carry + data
        n = len(data) - len(data) % self._line
        self._carry = data[n:]
        return _b64_lines(data[:n] if n < len(data) else data, self._line)

    def finish(self) -> bytes:
        out = _b64_lines(self._carry, self._line) if self._carry else b""
        self._carry = b""
        return out


def _b64_lines(data: bytes, line: int = B64_LINE) -> bytes:
    """base64 in CRLF lines of 4*line/3 characters. The CRLFs go in with one numpy reshape
    instead of a Python loop per line: 465 vs 275 MB/s (b"\\r\\n".join of the line slices, the
    best of the standard library; base64.encodebytes 229) measured here."""
    width = line // 3 * 4
    enc = binascii.b2a_base64(data, newline=False)
    n, tail = divmod(len(enc), width)
    out = bytearray(n * (width + 2) + (tail + 2 if tail else 0))
    lines = np.frombuffer(out, dtype=np.uint8, count=n * (width + 2)).reshape(n, width + 2)
    lines[:, :width] = np.frombuffer(enc, dtype=np.uint8, count=n * width).reshape(n, width)
    lines[:, width:] = (13, 10)
    if tail:
        out[-tail - 2:] = enc[n * width:] + b"\r\n"
    return out      # type: ignore[return-value]  # a bytearray: written, never kept


class Base64Decoder:
    """Feed base64 text in any chunking (line breaks and whitespace ignored)."""

    # RFC 2045 6.8: characters outside the alphabet (line breaks above all) are ignored
    _NOT_B64 = bytes(c for c in range(256)
                     if c not in b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=")

    def __init__(self) -> None:
        self._carry = b""       # alphabet characters short of a 4-character group
        self._raw = b""         # the undecoded text after the last line break fed

    def feed(self, data: bytes) -> bytes:
        if self._raw:
            data = self._raw + data
        cut = data.rfind(b"\n") + 1
        if cut and not self._carry:
            # whole lines: the lenient decoder skips the line breaks itself, one pass instead
            # of translate + decode (430 vs 290 MB/s measured here); it raises if the lines do
            # not hold whole 4-character groups, and then the general path takes them
            try:
                out = binascii.a2b_base64(data[:cut] if cut < len(data) else data)
            except binascii.Error:
                pass
            else:
                self._raw = data[cut:]
                return out
        self._raw = b""
        return self._groups(data)

    def _groups(self, data: bytes) -> bytes:
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
        """The data held back (the text after the last line break); raises MimeError if the
        base64 ends in the middle of a group."""
        out = self._groups(self._raw) if self._raw else b""
        self._raw = b""
        if self._carry.strip(b"="):
            raise MimeError("base64 ends in the middle of a group")
        return out


ARMOR_BEGIN = b"-----BEGIN PGP MESSAGE-----"
ARMOR_END = b"-----END PGP MESSAGE-----"
_CRC24 = anycrc.Model("CRC24-OPENPGP")    # RFC 4880 6.1
_EMPTY_LINE = re.compile(rb"\r?\n\r?\n")


class ArmorEncoder:
    """Binary OpenPGP data -> an armored "PGP MESSAGE" (RFC 4880 6.2) with CRLF line ends, in
    blocks, with its CRC24 line. RFC 4880 6.2 makes the CRC optional and RFC 9580 6.1 says not
    to emit it, but GnuPG 2.2 (Debian 12) misreads an armor without it whenever the data is a
    multiple of 3 bytes (no "=" padding: it takes the END line for data, BADMDC). anycrc
    computes it at ~7 GB/s (crcmod: 0.4 GB/s, pure Python: ~0.01 GB/s)."""

    def __init__(self) -> None:
        self._b64 = Base64Encoder(ARMOR_LINE)
        self._started = False
        self._crc = _CRC24.calc(b"")

    def feed(self, data: bytes) -> bytes:
        if data:
            self._crc = _CRC24.calc(data, self._crc)
        out = self._b64.feed(data)
        if not self._started:
            self._started = True
            return ARMOR_BEGIN + b"\r\n\r\n" + out
        return out

    def finish(self) -> bytes:
        crc = b"=" + binascii.b2a_base64(self._crc.to_bytes(3, "big"), newline=False) + b"\r\n"
        return self.feed(b"") + self._b64.finish() + crc + ARMOR_END + b"\r\n"


class ArmorDecoder:
    """An armored OpenPGP message in any chunking -> the binary data. Skips the armor header
    lines (RFC 4880 6.2: Version, Comment, Hash, Charset...), ignores the optional CRC24 line
    (RFC 9580 6.1: not to be relied on; gpg checks the data's integrity itself)."""

    def __init__(self) -> None:
        self._head = b""         # the text before the base64 body, until it is found
        self._in_body = False
        self._done = False
        self._last = b""         # the previous body byte: a CRC line starts with LF "="
        self._b64 = Base64Decoder()

    def feed(self, data: bytes) -> bytes:
        if self._done or not data:
            return b""
        if not self._in_body:
            self._head += data
            begin = self._head.find(ARMOR_BEGIN)
            body = -1
            if begin >= 0:       # the body follows the first empty line after the BEGIN line
                m = _EMPTY_LINE.search(self._head, begin)
                body = m.end() if m else -1
            if body < 0:
                if len(self._head) > MAX_HEADER_BLOCK:
                    raise MimeError("no OpenPGP armor (BEGIN PGP MESSAGE and its header lines) found")
                return b""
            data, self._head, self._in_body = self._head[body:], b"", True
        # base64 never contains "-" (the END line); an "=" is padding at the end of the last
        # line, or starts the CRC line. One-byte finds run at memchr speed (~10 GB/s here;
        # find(LF "=") at 1 GB/s cost a third of the de-armoring)
        cut = data.find(b"-")
        eq = data.find(b"=")
        while eq >= 0 and (cut < 0 or eq < cut):
            if (data[eq - 1:eq] if eq else self._last) == b"\n":
                cut = eq
                break
            eq = data.find(b"=", eq + 1)
        if cut >= 0:
            self._done = True
            return self._b64.feed(data[:cut])
        self._last = data[-1:]
        return self._b64.feed(data)

    def finish(self) -> bytes:
        if not self._done:
            raise MimeError("OpenPGP armor without its END line (truncated)")
        return self._b64.finish()


class ChunkReader:
    """read() over an iterator of byte blocks: a block per call (python-gnupg's stdin feeder
    writes whatever read() returns). An exception from the iterator is kept in `error` and
    reads as the end of the data: python-gnupg would log it with a traceback from its thread;
    the caller raises it after gpg has finished instead."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._it = iter(chunks)
        self.error: BaseException | None = None

    def read(self, n: int = -1) -> bytes:
        if self.error is not None:
            return b""
        try:
            for data in self._it:
                if data:
                    return data
        except Exception as e:              # noqa: BLE001 - handed to the caller via .error
            self.error = e
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

