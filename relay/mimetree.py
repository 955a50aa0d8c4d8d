"""MIME structure of a stored message file, without reading bodies into memory.

`tree(path)` returns the root `Part` of a message: for every entity the offsets and sizes of
its header block and body, the body's line count, and its parsed header (stdlib email parser
on the header block only). Multipart boundaries are found with `bytes.find` over 1 MiB preads
(C speed, memory bounded by the chunk size), so a 2 GB DICOM message costs one sequential
scan once; results are cached per message (LRU keyed by the Maildir base name and size, which
survive flag renames). ENVELOPE and BODYSTRUCTURE values (nested lists, rendered by
relay.protocol.imap.render) are built from the tree. Malformed MIME never raises: a missing
boundary makes the part run to the end, an endless header ends at the header bound, nesting
beyond MAX_DEPTH and parts beyond MAX_PARTS are not looked into (the part stays a leaf), a
Content-Type that cannot be parsed is text/plain (RFC 2045 5.2), and an address field that is
too long, too deeply nested or that the parser refuses is NIL in ENVELOPE. Whatever a stored
message holds, BODY[] is a byte range of the file and never depends on this module.
"""

from __future__ import annotations

import email.utils
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.message import Message
from email.parser import BytesHeaderParser
from email.policy import compat32
from pathlib import Path

from relay.protocol.imap import render

CHUNK = 1 << 20
MAX_HEADER = 1 << 20            # a header block beyond this is cut (malformed or hostile)
MAX_DEPTH = 16                  # nesting of multiparts / message/rfc822 (Dovecot: 100; we are
                                # a transport for flat DICOM mails, 16 levels is ample)
MAX_PARTS = 2000                # parts per message
# Header bytes parsed per message, all parts together: the compat32 parser costs ~0.7 s per
# MiB of short fields, so 200 parts of 120 KiB headers (a 24 MB message) held the GIL for 14 s
# in one FETCH BODYSTRUCTURE. Real messages parse a few KiB (2000 parts x 200 B = 400 KiB).
# Parts beyond the budget keep their offsets but an empty header (text/plain, NIL fields).
MAX_HEADERS_TOTAL = 2 << 20
# Structured fields (From, To, Cc, ..., Content-Type, Content-Disposition): the stdlib parsers
# are pure Python, ~1 ms per KiB of hostile input, and the address parser recurses on comments
# "(" and groups ":". An address field longer than 64 KiB (some 1500 addresses) or with
# comments nested deeper than 32 is NIL in ENVELOPE; such a Content-Type is text/plain.
MAX_STRUCTURED_FIELD = 64 * 1024
MAX_COMMENT_DEPTH = 32          # RFC 5322 3.2.2 comments nest without limit; ours: 32
CACHE_SIZE = 256

_MIN_LINE_TEXT = ("text", "message")


@dataclass
class Part:
    header_offset: int
    header_size: int             # including the empty line that ends it
    body_offset: int
    body_size: int
    headers: Message
    maintype: str = "text"
    subtype: str = "plain"
    params: list[tuple[str, str]] = field(default_factory=list)
    children: list[Part] = field(default_factory=list)      # multipart
    message: Part | None = None                              # message/rfc822
    body_lines: int = -1          # -1: not counted yet (see fill_lines; only text/message need it)
    envelope: object = None       # ENVELOPE value, computed once per cached tree (see envelope())
    _fields: dict[str, list[str]] | None = None   # lower-case name -> raw values, built once

    @property
    def is_multipart(self) -> bool:
        return self.maintype == "multipart"

    def header(self, name: str) -> bytes | None:
        """The first field `name` as it is in the file (8-bit bytes kept), unfolded."""
        values = self.raw_all(name)
        if not values:
            return None
        return _raw(_unfold(values[0])).strip()

    def raw_all(self, name: str) -> list[str]:
        """Field values as parsed (str with surrogate escapes for 8-bit bytes). `Message.get`
        would turn an 8-bit value into a Header whose str() has U+FFFD in place of the bytes.
        Indexed once per part: a header of 100,000 fields is not scanned per lookup."""
        if self._fields is None:
            index: dict[str, list[str]] = {}
            for k, v in self.headers.raw_items():
                index.setdefault(k.lower(), []).append(v)
            self._fields = index
        return self._fields.get(name.lower(), [])


def _raw(s: str) -> bytes:
    return s.encode("utf-8", "surrogateescape")


def _unfold(v: str) -> str:
    """RFC 5322 2.2.3 unfolding: CRLF before whitespace goes (as Dovecot's ENVELOPE does), so
    a folded Subject stays a quoted string rather than a literal."""
    return v.replace("\r\n", "").replace("\n", "")


# --- scanning ------------------------------------------------------------------------------

def find_all(fd: int, pat: bytes, start: int, end: int) -> Iterator[int]:
    """Offsets of `pat` within [start, end) of the file, in 1 MiB preads."""
    pos, overlap = start, len(pat) - 1
    while pos < end:
        n = min(CHUNK + overlap, end - pos)
        buf = os.pread(fd, n, pos)
        if not buf:
            return
        i = buf.find(pat)
        while i >= 0:
            yield pos + i
            i = buf.find(pat, i + 1)
        if pos + n >= end:
            return
        pos += n - overlap


def count_lines(fd: int, start: int, size: int) -> int:
    n, pos, end = 0, start, start + size
    while pos < end:
        buf = os.pread(fd, min(CHUNK, end - pos), pos)
        if not buf:
            break
        n += buf.count(b"\n")
        pos += len(buf)
    if size and os.pread(fd, 1, end - 1) != b"\n":
        n += 1                                   # a last line without its line end
    return n


def _header_end(fd: int, start: int, end: int) -> tuple[int, int]:
    """(header_size, body_offset) of the entity at `start`: the header ends at the first empty
    line; an entity starting with an empty line has an empty header."""
    head = os.pread(fd, min(end - start, MAX_HEADER), start)
    if head.startswith(b"\r\n"):
        return 2, start + 2
    if head.startswith(b"\n"):
        return 1, start + 1
    found = [(i, len(pat)) for pat in (b"\n\r\n", b"\n\n") if (i := head.find(pat)) >= 0]
    if found:
        i, n = min(found)
        return i + n, start + i + n
    # no empty line within the bound: all of it is header when small, else cut at the bound
    return len(head), start + len(head)


def _parse_headers(fd: int, offset: int, size: int) -> Message:
    data = os.pread(fd, min(size, MAX_HEADER), offset)
    return BytesHeaderParser(policy=compat32).parsebytes(data)


class _Builder:
    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.parts = 0
        self.header_budget = MAX_HEADERS_TOTAL

    def entity(self, start: int, end: int, depth: int, default: tuple[str, str] = ("text", "plain")) -> Part:
        self.parts += 1
        hsize, body = _header_end(self.fd, start, end)
        parsed = min(hsize, MAX_HEADER, self.header_budget)
        self.header_budget -= parsed
        headers = _parse_headers(self.fd, start, parsed)
        p = Part(start, hsize, body, max(0, end - body), headers)
        ctypes = p.raw_all("Content-Type")
        ctype = ctypes[0] if ctypes else None
        if ctype is None:
            p.maintype, p.subtype = default
            p.params = [("charset", "us-ascii")] if default == ("text", "plain") else []
        else:
            mt, st, params = _content_type(_unfold(ctype))
            if mt == "text" and not any(k == "charset" for k, _ in params):
                params.insert(0, ("charset", "us-ascii"))         # RFC 2045 5.2 default
            p.maintype, p.subtype, p.params = mt, st, params
        if p.is_multipart and depth < MAX_DEPTH:
            boundary = {k.lower(): v for k, v in p.params}.get("boundary")
            child_default = ("message", "rfc822") if p.subtype == "digest" else ("text", "plain")
            if boundary:
                for s, e in self.delimited(body, end, boundary.encode("utf-8", "surrogateescape")):
                    if self.parts >= MAX_PARTS:
                        break
                    p.children.append(self.entity(s, e, depth + 1, child_default))
        elif p.maintype == "message" and p.subtype in ("rfc822", "global"):
            if depth < MAX_DEPTH:
                p.message = self.entity(body, end, depth + 1)
            else:                               # BODYSTRUCTURE of MESSAGE/RFC822 needs the
                p.maintype, p.subtype, p.params = "application", "octet-stream", []  # inner one
        return p

    def delimited(self, start: int, end: int, boundary: bytes) -> list[tuple[int, int]]:
        """[start, end) of each body part between the delimiter lines (RFC 2046 5.1.1)."""
        dash = b"--" + boundary
        marks: list[tuple[int, int, bool]] = []          # (content end before it, next line, close)
        for delim_start, after in self._hits(start, end, dash):       # lazily: bounded memory
            tail = os.pread(self.fd, 200, after)
            close = tail.startswith(b"--")
            rest = tail[2:] if close else tail
            stripped = rest.lstrip(b" \t")
            if stripped.startswith(b"\r\n"):
                nxt = after + (len(tail) - len(rest)) + (len(rest) - len(stripped)) + 2
            elif stripped.startswith(b"\n"):
                nxt = after + (len(tail) - len(rest)) + (len(rest) - len(stripped)) + 1
            elif not stripped and after + len(tail) >= end:
                nxt = end
            else:
                continue                              # "--boundaryX": a longer boundary, not ours
            content_end = delim_start
            if delim_start > start and os.pread(self.fd, 1, delim_start - 1) == b"\n":
                content_end -= 1
                if delim_start - 1 > start and os.pread(self.fd, 1, delim_start - 2) == b"\r":
                    content_end -= 1
            marks.append((content_end, min(nxt, end), close))
            if close or len(marks) > MAX_PARTS:
                break
        out = []
        for (_, s, close), nxt_mark in zip(marks, marks[1:] + [(end, end, True)]):
            if close:
                break
            out.append((s, max(s, nxt_mark[0])))
        return out

    def _hits(self, start: int, end: int, dash: bytes) -> Iterator[tuple[int, int]]:
        if os.pread(self.fd, len(dash), start) == dash:
            yield start, start + len(dash)
        for i in find_all(self.fd, b"\n" + dash, start, end):
            yield i + 1, i + 1 + len(dash)


def _header_params(name: str, value: str) -> tuple[Message, list[tuple[str, str]]]:
    """Parse a structured field's parameters; 8-bit bytes in values come back as they were
    (the field goes through the parser as latin-1, which compat32 leaves a plain str)."""
    m = Message()
    m[name] = value.encode("utf-8", "surrogateescape").decode("latin-1")
    params: list[tuple[str, str]] = []
    for k, v in (m.get_params(header=name) or [])[1:]:
        if isinstance(v, tuple):
            v = email.utils.collapse_rfc2231_value(v)          # RFC 2231: decoded text
        else:
            v = v.encode("latin-1", "replace").decode("utf-8", "surrogateescape")
        params.append((k.lower(), str(v)))
    return m, params


_TOKEN = re.compile(r"[!#$%&'*+\-.0-9A-Z^_`a-z{|}~]+\Z")     # RFC 2045 5.1 token


def _content_type(value: str) -> tuple[str, str, list[tuple[str, str]]]:
    """(maintype, subtype, params); text/plain without parameters (RFC 2045 5.2) when the
    field is too long or the parser refuses it: the part is then a flat leaf."""
    if len(value) > MAX_STRUCTURED_FIELD:
        return "text", "plain", []
    try:
        m, params = _header_params("Content-Type", value)
        ctype = m.get_content_type()            # "text/plain" when malformed
    except Exception:  # noqa: BLE001 - the stdlib parser on hostile bytes: a flat part
        return "text", "plain", []
    maintype, _, subtype = ctype.partition("/")
    if not (_TOKEN.match(maintype) and _TOKEN.match(subtype)):
        return "text", "plain", []              # RFC 2045 5.2: invalid syntax -> text/plain
    return maintype, subtype, params


def parse(path: str | Path, lines: bool = True) -> Part:
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        root = _Builder(fd).entity(0, size, 0)
        if lines:
            fill_lines(root, fd)
        return root
    finally:
        os.close(fd)


_cache: OrderedDict[tuple[str, int], Part] = OrderedDict()
_lock = threading.Lock()


def tree(path: str | Path, size: int | None = None, fd: int | None = None) -> Part:
    """The cached MIME tree of a stored message (key: Maildir base name without flags, size);
    read from `fd` when given (the file may be renamed by a flag change meanwhile)."""
    p = Path(path)
    if size is None:
        size = os.fstat(fd).st_size if fd is not None else p.stat().st_size
    key = (p.name.split(":", 1)[0], size)
    with _lock:
        hit = _cache.get(key)
        if hit is not None:
            _cache.move_to_end(key)
            return hit
    t = _Builder(fd).entity(0, size, 0) if fd is not None else parse(p, lines=False)
    with _lock:
        _cache[key] = t
        while len(_cache) > CACHE_SIZE:
            _cache.popitem(last=False)
    return t


# --- sections ------------------------------------------------------------------------------

def fill_lines(part: Part, fd: int) -> None:
    """Count the body lines of the text and message parts (BODYSTRUCTURE needs them): a scan
    of those bodies, done once per cached tree and only when asked for, so that BODY[HEADER]
    of a 2 GB text message does not read 2 GB."""
    if part.body_lines < 0:
        part.body_lines = (count_lines(fd, part.body_offset, part.body_size)
                           if part.maintype in _MIN_LINE_TEXT and not part.is_multipart else 0)
    for child in part.children:
        fill_lines(child, fd)
    if part.message is not None:
        fill_lines(part.message, fd)


def find_part(root: Part, numbers: tuple[int, ...]) -> Part | None:
    """The part named by a section part number "2.1.3" (RFC 9051 6.4.5)."""
    p = root
    for n in numbers:
        if p.message is not None:
            p = p.message
        if p.is_multipart:
            if n > len(p.children):
                return None
            p = p.children[n - 1]
        elif n != 1:
            return None
    return p


def header_fields(fd: int, part: Part, names: tuple[str, ...], exclude: bool) -> bytes:
    """The header fields of `part` named (or, with exclude, not named) in `names`, followed by
    the empty line, as RFC 9051 BODY[HEADER.FIELDS (...)] wants them."""
    data = os.pread(fd, min(part.header_size, MAX_HEADER), part.header_offset)
    wanted = {n.lower() for n in names}
    out = bytearray()
    keep = False
    for line in data.splitlines(keepends=True):
        if line in (b"\r\n", b"\n"):
            break
        if line[:1] in (b" ", b"\t"):
            if keep:
                out += line
            continue
        name = line.split(b":", 1)[0].strip().decode("ascii", "replace").lower()
        keep = (name in wanted) != exclude
        if keep:
            out += line
    out += b"\r\n"
    return bytes(out)


# --- ENVELOPE and BODYSTRUCTURE (RFC 9051 7.5.2) --------------------------------------------

Value = object


def _comment_depth(v: str) -> int:
    """The deepest nesting of "(" in `v` (a cheap count first: most fields have none)."""
    if v.count("(") <= MAX_COMMENT_DEPTH:
        return v.count("(")
    depth = deepest = 0
    for c in v:
        if c == "(":
            depth += 1
            deepest = max(deepest, depth)
        elif c == ")" and depth:
            depth -= 1
    return deepest


def _addresses(part: Part, name: str) -> Value:
    values = [_unfold(v) for v in part.raw_all(name)]
    if not values:
        return None
    if (sum(len(v) for v in values) > MAX_STRUCTURED_FIELD
            or any(_comment_depth(v) > MAX_COMMENT_DEPTH for v in values)):
        return None
    try:
        pairs = email.utils.getaddresses(values)
    except Exception:  # noqa: BLE001 - the stdlib parser on hostile bytes: NIL, never a crash
        return None
    out = []
    for display, addr in pairs:
        if not addr and not display:
            continue
        local, _, host = addr.rpartition("@") if "@" in addr else (addr, "", None)
        out.append([_raw(display) if display else None, None, _raw(local) if local else None,
                    _raw(host) if host else None])
    return out or None


def envelope(part: Part) -> Value:
    """The ENVELOPE of `part` (RFC 9051 7.5.2), computed once per cached tree: a poison
    message costs its address parsing once, not on every FETCH."""
    if part.envelope is None:
        frm = _addresses(part, "From")
        part.envelope = [part.header("Date"), part.header("Subject"), frm,
                         _addresses(part, "Sender") or frm, _addresses(part, "Reply-To") or frm,
                         _addresses(part, "To"), _addresses(part, "Cc"), _addresses(part, "Bcc"),
                         part.header("In-Reply-To"), part.header("Message-ID")]
    return part.envelope


def _params(params: list[tuple[str, str]]) -> Value:
    flat: list[Value] = []
    for k, v in params:
        flat += [k, v]
    return flat or None


def _disposition(part: Part) -> Value:
    values = part.raw_all("Content-Disposition")
    if not values:
        return None
    v = values[0]
    try:
        m, params = _header_params("Content-Disposition", _unfold(v)[:MAX_STRUCTURED_FIELD])
        items = m.get_params(header="content-disposition") or []
    except Exception:  # noqa: BLE001 - the stdlib parser on hostile bytes: NIL
        return None
    if not items:
        return None
    return [items[0][0], _params(params)]


def bodystructure(part: Part, extended: bool = True) -> bytes:
    """BODYSTRUCTURE (extended) or BODY (not extended) of `part`, as IMAP bytes
    (after fill_lines; uncounted lines show as 0)."""
    if part.is_multipart:
        kids = b"".join(bodystructure(c, extended) for c in part.children)
        if not kids:                             # no parts found: describe an empty text part
            kids = render(["text", "plain", ["charset", "us-ascii"], None, None, "7bit", 0, 0])
        out = kids + b" " + render(part.subtype)
        if extended:
            out += b" " + render([_params(part.params), _disposition(part),
                                  part.header("Content-Language"), part.header("Content-Location")])[1:-1]
        return b"(" + out + b")"
    enc = part.header("Content-Transfer-Encoding")
    fields: list[Value] = [part.maintype, part.subtype, _params(part.params), part.header("Content-ID"),
                           part.header("Content-Description"),
                           enc.decode("ascii", "replace").lower() if enc else "7bit", part.body_size]
    tail: list[Value] = []
    if extended:
        tail = [part.header("Content-MD5"), _disposition(part), part.header("Content-Language"),
                part.header("Content-Location")]
    head = render(fields)[:-1]
    if part.message is not None:
        mid = b" " + render(envelope(part.message)) + b" " + bodystructure(part.message, extended)
        mid += b" " + render(max(0, part.body_lines))
    elif part.maintype == "text":
        mid = b" " + render(max(0, part.body_lines))
    else:
        mid = b""
    return head + mid + (b" " + render(tail)[1:-1] if tail else b"") + b")"
