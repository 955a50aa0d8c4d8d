"""IMAP4rev1/IMAP4rev2 (RFC 3501 / RFC 9051) sans-IO: bytes in, events out; replies as bytes.

Nothing here touches a socket, asyncio or the store. The server feeds received bytes to
`ImapParser.receive_data()` and takes events from `next_event()`:

    Command(tag, name, args, uid)   a complete command; literals already read
    Continuation(text)              the server must send "+ <text>" (synchronizing literal)
    Reject(tag, status, text)       the server must send "<tag> <status> <text>"; the
                                    session goes on (bad syntax, overlong line, big literal)
    ClientLine(data)                one raw line, only after `expect_line()` (AUTHENTICATE
                                    responses, IDLE's DONE)
    NEED_DATA                       feed more bytes

Everything that decides which command is allowed in which state lives in `COMMAND_STATES`.
Argument values: atoms are `str`, quoted strings and literals are `bytes`, lists are `list`.

Bounds (every buffer is bounded):
- `max_line`: one command line without its literals. RFC 9051 section 4 leaves the limit to
  the server; RFC 7162 section 4 asks servers to accept at least 8192 octets. Beyond it the
  rest of the line is discarded and the command answered BAD [TOOBIG] (RFC 9051 7.1).
- `max_literal`: one literal, and the sum of the literals of one command. A synchronizing
  literal above it is refused before "+" (RFC 9051 section 4.3); a non-synchronizing one
  (LITERAL+, RFC 7888 section 3) is read and discarded without being kept, then BAD [TOOBIG]
  as RFC 7888 section 4 requires.
- `MAX_LIST_DEPTH`, `MAX_SEARCH_DEPTH`, `MAX_SEARCH_KEYS`, `MAX_NUMBER_DIGITS`,
  `MAX_NUMBER64_DIGITS`: the nesting of parenthesised lists, of SEARCH keys (NOT, OR, lists),
  the number of keys in one SEARCH, and the digits of a number. Beyond them the command is
  answered BAD [LIMIT] (RFC 9051 7.1) naming the bound; nothing recurses without a bound.
"""

from __future__ import annotations

import calendar
import re
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final, TypeAlias

from relay.protocol.numbers import ascii_number

Arg: TypeAlias = str | bytes | list["Arg"]

# --- events --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Command:
    tag: str
    name: str                   # upper case; "UID FETCH" is name="FETCH", uid=True
    args: tuple[Arg, ...]
    uid: bool = False


@dataclass(frozen=True)
class Continuation:
    text: str


@dataclass(frozen=True)
class Reject:
    tag: str
    status: str                 # "BAD" | "NO"
    text: str

    def to_bytes(self) -> bytes:
        return f"{self.tag} {self.status} {self.text}\r\n".encode()


@dataclass(frozen=True)
class ClientLine:
    data: bytes


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = _NeedData()
Event: TypeAlias = Command | Continuation | Reject | ClientLine | _NeedData


class ImapSyntaxError(ValueError):
    """Malformed arguments; the server answers `<tag> BAD <message>`."""


# --- states --------------------------------------------------------------------------------

NOT_AUTH, AUTH, SELECTED, LOGOUT = "not-authenticated", "authenticated", "selected", "logout"
_ANY = frozenset({NOT_AUTH, AUTH, SELECTED})
_AUTHED = frozenset({AUTH, SELECTED})

# Everything about which command is valid in which state (RFC 9051 section 3 and 6).
COMMAND_STATES: Final[dict[str, frozenset[str]]] = {
    "CAPABILITY": _ANY, "NOOP": _ANY, "LOGOUT": _ANY, "ID": _ANY,
    "STARTTLS": frozenset({NOT_AUTH}), "LOGIN": frozenset({NOT_AUTH}),
    "AUTHENTICATE": frozenset({NOT_AUTH}),
    "ENABLE": _AUTHED, "SELECT": _AUTHED, "EXAMINE": _AUTHED, "LIST": _AUTHED, "LSUB": _AUTHED,
    "NAMESPACE": _AUTHED, "STATUS": _AUTHED, "CREATE": _AUTHED, "DELETE": _AUTHED,
    "RENAME": _AUTHED, "SUBSCRIBE": _AUTHED, "UNSUBSCRIBE": _AUTHED, "APPEND": _AUTHED,
    "IDLE": _AUTHED, "GETQUOTAROOT": _AUTHED, "GETQUOTA": _AUTHED,
    "CLOSE": frozenset({SELECTED}), "UNSELECT": frozenset({SELECTED}),
    "CHECK": frozenset({SELECTED}), "EXPUNGE": frozenset({SELECTED}),
    "SEARCH": frozenset({SELECTED}), "FETCH": frozenset({SELECTED}),
    "STORE": frozenset({SELECTED}), "COPY": frozenset({SELECTED}), "MOVE": frozenset({SELECTED}),
}
UID_COMMANDS: Final = frozenset({"FETCH", "SEARCH", "STORE", "COPY", "MOVE", "EXPUNGE"})


def check_state(cmd: Command, state: str) -> Reject | None:
    """None when `cmd` may run in `state`; else the BAD to send."""
    allowed = COMMAND_STATES.get(cmd.name)
    if allowed is None:
        return Reject(cmd.tag, "BAD", "Unknown command")
    if state not in allowed:
        if state == NOT_AUTH:
            return Reject(cmd.tag, "BAD", "Log in first")
        if cmd.name in ("LOGIN", "AUTHENTICATE", "STARTTLS"):
            return Reject(cmd.tag, "BAD", "Already authenticated")
        return Reject(cmd.tag, "BAD", "No mailbox selected")
    return None


# --- the parser ----------------------------------------------------------------------------

_LITERAL_RE = re.compile(rb"\{(\d{1,19})(\+?)\}\Z")
_TAG_RE = re.compile(rb"^[\x21\x23\x24\x26\x27\x2c-\x5a\x5e-\x7a\x7c\x7e]+\Z")   # astring-char minus "+"
_NONSYNC_TAIL = 32                  # enough to see "{<19 digits>+}" at the end of a dropped line

# --- bounds on arguments (RFC 9051 leaves them to the server; BAD [LIMIT] beyond them) ---------
# Parenthesised lists nested in one command. The deepest any command needs is 3 (SEARCH lists
# inside OR inside a list); 32 leaves room for generated searches, keeps recursion small.
MAX_LIST_DEPTH: Final = 32
# NOT / OR / (list) nesting in one SEARCH program: each level is a parser and a matcher frame.
MAX_SEARCH_DEPTH: Final = 32
# Search keys in one SEARCH: a match costs keys x messages; Dovecot-sized searches use tens.
MAX_SEARCH_KEYS: Final = 1000
# RFC 9051 9: number = 1*DIGIT with a 32-bit unsigned value, so at most 10 digits;
# number64 (LARGER, SMALLER, partial offsets) is a 63-bit value: at most 19 digits.
MAX_NUMBER_DIGITS: Final = 10
MAX_NUMBER64_DIGITS: Final = 19


def limit_error(what: str, bound: int) -> ImapSyntaxError:
    """BAD [LIMIT] naming the bound that was hit."""
    return ImapSyntaxError(f"[LIMIT] {what} (limit {bound})")


class ImapParser:
    def __init__(self, max_line: int = 64 * 1024, max_literal: int = 64 * 1024) -> None:
        self.max_line = max_line
        self.max_literal = max_literal
        self._buf = bytearray()
        self._scan = 0                       # CRLF search resumes here
        self._text: list[bytes] = []         # text of the current command; b"\0" marks a literal
        self._lits: list[bytes] = []
        self._text_size = 0
        self._lit_size = 0
        self._lit_left = 0                   # bytes of the current literal still to read
        self._lit = bytearray()
        self._discard = 0                    # bytes of a refused literal still to drop
        self._dropping_line: bytes | None = None   # tail of an overlong line being dropped
        self._line_mode = False
        self._pending: deque[Event] = deque()

    # -- input --
    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        self._buf += data

    @property
    def buffered(self) -> int:
        """Bytes received and not yet consumed (for flow control by the server)."""
        return len(self._buf)

    def expect_line(self) -> None:
        """The next complete line is returned raw as ClientLine (AUTHENTICATE, IDLE)."""
        self._line_mode = True

    def next_event(self) -> Event:
        if self._pending:
            return self._pending.popleft()
        while True:
            if self._discard:
                n = min(self._discard, len(self._buf))
                del self._buf[:n]
                self._scan = 0
                self._discard -= n
                if self._discard:
                    return NEED_DATA
            if self._lit_left:
                n = min(self._lit_left, len(self._buf))
                self._lit += self._buf[:n]
                del self._buf[:n]
                self._scan = 0
                self._lit_left -= n
                if self._lit_left:
                    return NEED_DATA
                self._lits.append(bytes(self._lit))
                self._lit = bytearray()
            i = self._buf.find(b"\r\n", self._scan)
            if i < 0:
                if self._dropping_line is not None:
                    keep = self._buf[-_NONSYNC_TAIL:]
                    self._dropping_line = (self._dropping_line + bytes(keep))[-_NONSYNC_TAIL:]
                    self._buf.clear()
                    self._scan = 0
                    return NEED_DATA
                if len(self._buf) + self._text_size > self.max_line:
                    tag = self._tag_of(bytes(self._text[0] if self._text else self._buf[:64]))
                    if self._line_mode:
                        self._line_mode = False
                        tag = "*"
                    self._reset_command()
                    self._dropping_line = bytes(self._buf[-_NONSYNC_TAIL:])
                    self._buf.clear()
                    self._scan = 0
                    return Reject(tag, "BAD", "[TOOBIG] Command line too long")
                self._scan = max(0, len(self._buf) - 1)
                return NEED_DATA
            line = bytes(self._buf[:i])
            del self._buf[:i + 2]
            self._scan = 0
            if self._dropping_line is not None:
                tail = (self._dropping_line + line)[-_NONSYNC_TAIL:]
                self._dropping_line = None
                m = _LITERAL_RE.search(tail)
                if m and m.group(2):
                    self._discard = int(m.group(1))
                    self._dropping_line = b""         # and the rest of that command
                continue
            if self._line_mode:
                self._line_mode = False
                if len(line) > self.max_line:
                    return Reject("*", "BAD", "[TOOBIG] Line too long")
                return ClientLine(line)
            if len(line) + self._text_size > self.max_line:
                tag = self._tag_of(self._text[0] if self._text else line)
                self._reset_command()
                m = _LITERAL_RE.search(line)
                if m and m.group(2):
                    self._discard = int(m.group(1))
                    self._dropping_line = b""
                return Reject(tag, "BAD", "[TOOBIG] Command line too long")
            if b"\0" in line:
                tag = self._tag_of(self._text[0] if self._text else line)
                self._reset_command()
                return Reject(tag, "BAD", "NUL is not allowed in commands")
            m = _LITERAL_RE.search(line)
            if m:
                ev = self._start_literal(line, m)
                if ev is not None:
                    return ev
                continue
            self._text.append(line)
            text, lits = b"".join(self._text), self._lits
            self._reset_command()
            return self._parse_command(text, lits)

    def _start_literal(self, line: bytes, m: re.Match[bytes]) -> Event | None:
        size, nonsync = int(m.group(1)), bool(m.group(2))
        self._text.append(line[:m.start()] + b"\0")
        self._text_size += m.start() + 1
        first = self._text[0]
        tag = self._tag_of(first)
        name = first.split(b" ", 2)[1].upper() if first.count(b" ") >= 1 else b""
        if name == b"APPEND":
            self._reset_command()
            self._refuse_literal(size, nonsync)
            return Reject(tag, "NO", "[CANNOT] APPEND is not supported: INBOX is filled by SMTP")
        if size > self.max_literal or self._lit_size + size > self.max_literal:
            self._reset_command()
            self._refuse_literal(size, nonsync)
            return Reject(tag, "BAD", f"[TOOBIG] Literal larger than {self.max_literal} octets")
        self._lit_size += size
        self._lit_left = size
        if size == 0:
            self._lits.append(b"")
        if nonsync:
            return None
        return Continuation("Ready for literal data")

    def _refuse_literal(self, size: int, nonsync: bool) -> None:
        """A refused synchronizing literal ends the command (the client sends nothing more,
        RFC 9051 4.3); a non-synchronizing one is still coming: drop it and the line's rest."""
        if nonsync:
            self._discard = size
            self._dropping_line = b""

    def _reset_command(self) -> None:
        self._text = []
        self._lits = []
        self._text_size = 0
        self._lit_size = 0
        self._lit_left = 0
        self._lit = bytearray()

    @staticmethod
    def _tag_of(line: bytes) -> str:
        tag = line.split(b" ", 1)[0]
        return tag.decode("ascii") if tag and _TAG_RE.match(tag) else "*"

    def _parse_command(self, text: bytes, lits: list[bytes]) -> Event:
        tag = self._tag_of(text)
        if tag == "*":
            return Reject("*", "BAD", "Missing or invalid tag")
        try:
            args = tokenize(text[len(tag):], lits)
        except ImapSyntaxError as e:
            return Reject(tag, "BAD", f"Syntax error: {e}")
        if not args or not isinstance(args[0], str):
            return Reject(tag, "BAD", "Missing command")
        name = args[0].upper()
        uid = False
        rest = args[1:]
        if name == "UID":
            if not rest or not isinstance(rest[0], str) or rest[0].upper() not in UID_COMMANDS:
                return Reject(tag, "BAD", "UID needs FETCH, SEARCH, STORE, COPY, MOVE or EXPUNGE")
            name, uid, rest = rest[0].upper(), True, rest[1:]
        return Command(tag, name, tuple(rest), uid)


_SECTION_CHARS = re.compile(rb"[\x20-\x7e]*\Z")     # inside "[...]": printable ASCII only


def tokenize(text: bytes, lits: list[bytes] | None = None) -> list[Arg]:
    """Split command arguments: atoms (str), quoted strings and literals (bytes), lists.
    A literal's place in `text` is marked by NUL; its bytes come from `lits` in order.
    An atom may contain a bracketed section with spaces ("BODY[HEADER.FIELDS (A B)]<0.9>")."""
    lit_iter = iter(lits or [])
    stack: list[list[Arg]] = [[]]
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == 0x20:
            i += 1
            continue
        if c == 0x28:                          # (
            if len(stack) > MAX_LIST_DEPTH:
                raise limit_error("Parentheses nested too deeply", MAX_LIST_DEPTH)
            stack.append([])
            i += 1
        elif c == 0x29:                        # )
            if len(stack) == 1:
                raise ImapSyntaxError("unbalanced ')'")
            done = stack.pop()
            stack[-1].append(done)
            i += 1
        elif c == 0x22:                        # "
            out = bytearray()
            i += 1
            while True:
                if i >= n:
                    raise ImapSyntaxError("unterminated quoted string")
                c = text[i]
                if c == 0x5C:
                    if i + 1 >= n or text[i + 1] not in (0x22, 0x5C):
                        raise ImapSyntaxError("bad escape in quoted string")
                    out.append(text[i + 1])
                    i += 2
                elif c == 0x22:
                    i += 1
                    break
                else:
                    out.append(c)
                    i += 1
            stack[-1].append(bytes(out))
        elif c == 0:
            try:
                stack[-1].append(next(lit_iter))
            except StopIteration:
                raise ImapSyntaxError("literal expected") from None
            i += 1
        else:
            start = i
            while i < n and text[i] not in (0x20, 0x28, 0x29, 0x22, 0):
                if text[i] == 0x5B:             # [ ... ] may hold spaces and parentheses
                    j = text.find(b"]", i)
                    if j < 0:
                        raise ImapSyntaxError("unterminated '['")
                    if not _SECTION_CHARS.match(text, i, j):
                        raise ImapSyntaxError("invalid character in section")
                    i = j + 1
                else:
                    if text[i] < 0x20 or text[i] > 0x7E:
                        raise ImapSyntaxError("invalid character in atom")
                    i += 1
            stack[-1].append(text[start:i].decode("ascii"))
    if len(stack) != 1:
        raise ImapSyntaxError("unbalanced '('")
    return stack[0]


# --- argument helpers ----------------------------------------------------------------------

def astring(arg: Arg) -> str:
    if isinstance(arg, list):
        raise ImapSyntaxError("string expected")
    if isinstance(arg, bytes):
        try:
            return arg.decode("utf-8")
        except UnicodeDecodeError:
            raise ImapSyntaxError("string is not UTF-8") from None
    return arg


def atom(arg: Arg) -> str:
    if not isinstance(arg, str):
        raise ImapSyntaxError("atom expected")
    return arg


def want_args(cmd: Command, low: int, high: int | None = None) -> None:
    n = len(cmd.args)
    if n < low or (high is not None and n > high):
        raise ImapSyntaxError(f"wrong number of arguments for {cmd.name}")


# --- sequence sets (RFC 9051 section 9, sequence-set) ---------------------------------------

_NUM_MAX = 2**32 - 1


@dataclass(frozen=True)
class SequenceSet:
    ranges: tuple[tuple[int | None, int | None], ...]   # None = "*"

    def contains(self, n: int, star: int) -> bool:
        """Is `n` in the set, when "*" stands for `star` (the largest number in use)?"""
        for a, b in self.ranges:
            lo = star if a is None else a
            hi = star if b is None else b
            if lo > hi:
                lo, hi = hi, lo
            if lo <= n <= hi:
                return True
        return False

    def select(self, numbers: list[int]) -> list[int]:
        """The members of `numbers` (ascending) in the set; "*" is the last of `numbers`."""
        if not numbers:
            return []
        star = numbers[-1]
        return [n for n in numbers if self.contains(n, star)]


def _seq_number(s: str) -> int | None:
    if s == "*":
        return None
    n = ascii_number(s, MAX_NUMBER_DIGITS)
    if n is None or s[0] == "0" or n > _NUM_MAX:
        raise ImapSyntaxError(f"invalid sequence number {s[:20]!r}")
    return n


def parse_sequence_set(s: str) -> SequenceSet:
    """"1:*", "2,4:7", "*" -> SequenceSet. Raises ImapSyntaxError when malformed."""
    if not s or len(s) > 64 * 1024:
        raise ImapSyntaxError("invalid sequence set")
    ranges = []
    for part in s.split(","):
        a, sep, b = part.partition(":")
        x = _seq_number(a)
        ranges.append((x, _seq_number(b) if sep else x))
    return SequenceSet(tuple(ranges))


# --- flags ---------------------------------------------------------------------------------

FLAG_LETTERS: Final = {"\\Draft": "D", "\\Flagged": "F", "\\Answered": "R", "\\Seen": "S",
                       "\\Deleted": "T"}
LETTER_FLAGS: Final = {v: k for k, v in FLAG_LETTERS.items()}
SYSTEM_FLAGS: Final = "\\Answered \\Flagged \\Deleted \\Seen \\Draft"


def flags_from_letters(letters: str) -> list[str]:
    return [LETTER_FLAGS[c] for c in sorted(letters) if c in LETTER_FLAGS]


def letters_from_flags(flags: list[str]) -> str:
    """IMAP system flags -> Maildir letters; keywords are not kept (PERMANENTFLAGS has no \\*)."""
    canon = {k.lower(): v for k, v in FLAG_LETTERS.items()}
    return "".join(sorted({canon[f.lower()] for f in flags if f.lower() in canon}))


@dataclass(frozen=True)
class StoreRequest:
    mode: str                    # "+", "-" or "" (replace)
    silent: bool
    letters: str                 # Maildir letters of the IMAP flags named

    def apply(self, current: str) -> str:
        keep = set(current)
        new = set(self.letters)
        if self.mode == "+":
            res = keep | new
        elif self.mode == "-":
            res = keep - new
        else:                                   # replace system flags, keep the rest (e.g. P)
            res = (keep - set(LETTER_FLAGS)) | new
        return "".join(sorted(res))


def parse_store(args: tuple[Arg, ...]) -> tuple[SequenceSet, StoreRequest]:
    if len(args) < 3:
        raise ImapSyntaxError("STORE needs a sequence set, an item and flags")
    seq = parse_sequence_set(atom(args[0]))
    item = atom(args[1]).upper()
    m = re.fullmatch(r"([+-]?)FLAGS(\.SILENT)?", item)
    if not m:
        raise ImapSyntaxError(f"unsupported STORE item {item}")
    raw: list[Arg] = list(args[2]) if isinstance(args[2], list) and len(args) == 3 else list(args[2:])
    flags = [atom(f) for f in raw]
    for f in flags:
        if not re.fullmatch(r"\\?[!#$&'+,\-./0-9:;<=>?@A-Z^_`a-z|~]+", f):
            raise ImapSyntaxError(f"invalid flag {f!r}")
    return seq, StoreRequest(m.group(1), bool(m.group(2)), letters_from_flags(flags))


# --- FETCH items (RFC 9051 section 6.4.5) --------------------------------------------------

@dataclass(frozen=True)
class Section:
    part: tuple[int, ...] = ()
    text: str = ""              # "", "HEADER", "HEADER.FIELDS", "HEADER.FIELDS.NOT", "TEXT", "MIME"
    fields: tuple[str, ...] = ()

    def spec(self) -> str:
        s = ".".join(str(p) for p in self.part)
        if self.text:
            s = f"{s}.{self.text}" if s else self.text
        if self.fields:
            s += " (" + " ".join(self.fields) + ")"
        return s


@dataclass(frozen=True)
class FetchAtt:
    name: str                   # UID FLAGS INTERNALDATE RFC822.SIZE RFC822 RFC822.HEADER
                                # RFC822.TEXT ENVELOPE BODYSTRUCTURE BODY BODY[...]
    section: Section | None = None
    peek: bool = False
    partial: tuple[int, int] | None = None

    def response_name(self) -> str:
        if self.section is None:
            return self.name
        s = f"BODY[{self.section.spec()}]"
        if self.partial is not None:
            s += f"<{self.partial[0]}>"
        return s

    @property
    def sets_seen(self) -> bool:
        return (self.section is not None and not self.peek) or self.name in ("RFC822", "RFC822.TEXT")


_SIMPLE_ATTS: Final = {"UID", "FLAGS", "INTERNALDATE", "RFC822.SIZE", "RFC822", "RFC822.HEADER",
                       "RFC822.TEXT", "ENVELOPE", "BODYSTRUCTURE", "BODY"}
_MACROS: Final = {"ALL": ("FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE"),
                  "FAST": ("FLAGS", "INTERNALDATE", "RFC822.SIZE"),
                  "FULL": ("FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE", "BODY")}
_BODY_RE = re.compile(r"^(BODY|BODY\.PEEK)\[([^\]]*)\](?:<([0-9]{1,19})\.([0-9]{1,19})>)?$", re.IGNORECASE)
# The largest MIME part number in a section ("BODY[10000]"): mimetree keeps at most 2000 parts.
MAX_SECTION_PART: Final = 10000
_FIELD_RE = re.compile(r"^[\x21-\x39\x3b-\x7e]+\Z")       # RFC 5322 ftext


def parse_section(spec: str) -> Section:
    head, _, flist = spec.partition(" ")
    parts: list[int] = []
    words = head.split(".") if head else []
    while words and words[0][:1].isdigit():
        n = ascii_number(words[0], MAX_NUMBER_DIGITS)
        if n is None or words[0].startswith("0") or n > MAX_SECTION_PART:
            raise ImapSyntaxError("invalid section part")
        parts.append(n)
        words.pop(0)
    text = ".".join(words).upper()
    if text not in ("", "HEADER", "HEADER.FIELDS", "HEADER.FIELDS.NOT", "TEXT", "MIME"):
        raise ImapSyntaxError(f"invalid section {spec!r}")
    if text == "MIME" and not parts:
        raise ImapSyntaxError("MIME needs a part number")
    fields: tuple[str, ...] = ()
    if text.startswith("HEADER.FIELDS"):
        inner = flist.strip()
        if not (inner.startswith("(") and inner.endswith(")")):
            raise ImapSyntaxError("HEADER.FIELDS needs a list of field names")
        items = tokenize(inner[1:-1].encode("ascii", "replace"))
        fields = tuple(astring(f) for f in items)
        if not fields or not all(_FIELD_RE.match(f) for f in fields):
            raise ImapSyntaxError("invalid header field list")
    elif flist:
        raise ImapSyntaxError(f"invalid section {spec!r}")
    return Section(tuple(parts), text, fields)


def parse_fetch_atts(arg: Arg) -> list[FetchAtt]:
    items: list[Arg] = arg if isinstance(arg, list) else [arg]
    if not items:
        raise ImapSyntaxError("empty FETCH item list")
    out: list[FetchAtt] = []
    for it in items:
        name = atom(it)
        up = name.upper()
        if up in _MACROS and not isinstance(arg, list):
            out += [FetchAtt(x) for x in _MACROS[up]]
        elif up in _SIMPLE_ATTS:
            out.append(FetchAtt(up))
        else:
            m = _BODY_RE.match(name)
            if not m:
                raise ImapSyntaxError(f"unknown FETCH item {name}")
            partial = None
            if m.group(3) is not None:
                length = int(m.group(4))
                if length == 0:
                    raise ImapSyntaxError("partial length must be positive")
                partial = (int(m.group(3)), length)
            out.append(FetchAtt("BODY", parse_section(m.group(2)), m.group(1).upper() == "BODY.PEEK",
                                partial))
    return out


# --- SEARCH (RFC 9051 section 6.4.4) -------------------------------------------------------

@dataclass(frozen=True)
class MessageFacts:
    """What SEARCH may look at, per message."""
    seq: int
    uid: int
    letters: str
    internaldate: float
    size: int


@dataclass(frozen=True)
class SearchKey:
    op: str                                   # ALL AND OR NOT FLAG NOFLAG SINCE BEFORE ON
                                              # LARGER SMALLER UID SEQ NONE
    value: int | str | SequenceSet | None = None
    children: tuple[SearchKey, ...] = ()

    def matches(self, m: MessageFacts, max_seq: int, max_uid: int) -> bool:
        return self.compile(max_seq, max_uid)(m.seq, m.uid, m.letters, m.internaldate, m.size)

    def compile(self, max_seq: int, max_uid: int) -> Predicate:
        """A function (seq, uid, letters, internaldate, size) -> bool: one closure per key, so
        a SEARCH over 10,000 messages costs a few ms ("*" is max_seq / max_uid)."""
        op, v = self.op, self.value
        if op == "ALL":
            return lambda *_: True
        if op == "NONE":
            return lambda *_: False
        kids = [c.compile(max_seq, max_uid) for c in self.children]
        if op in ("AND", "OR"):                 # flat: 1000 keys are one frame, not 1000
            if len(kids) == 1:
                return kids[0]
            if len(kids) == 2:
                return _both(*kids) if op == "AND" else _either(*kids)
            if op == "AND":
                return lambda *a: all(k(*a) for k in kids)
            return lambda *a: any(k(*a) for k in kids)
        if op == "NOT":
            kid = kids[0]
            return lambda *a: not kid(*a)
        if isinstance(v, SequenceSet):
            star = max_uid if op == "UID" else max_seq
            ranges = [(star if a is None else a, star if b is None else b) for a, b in v.ranges]
            ranges = [(min(a, b), max(a, b)) for a, b in ranges]
            if len(ranges) == 1:
                lo, hi = ranges[0]
                if op == "UID":
                    return lambda seq, uid, *_: lo <= uid <= hi
                return lambda seq, *_: lo <= seq <= hi
            if op == "UID":
                return lambda seq, uid, *_: any(a <= uid <= b for a, b in ranges)
            return lambda seq, *_: any(a <= seq <= b for a, b in ranges)
        if isinstance(v, str):
            letter = v
            if op == "FLAG":
                return lambda seq, uid, letters, *_: letter in letters
            return lambda seq, uid, letters, *_: letter not in letters
        assert isinstance(v, int)
        n = v
        if op == "SINCE":
            return lambda seq, uid, letters, t, size: t // 86400 >= n
        if op == "BEFORE":
            return lambda seq, uid, letters, t, size: t // 86400 < n
        if op == "ON":
            return lambda seq, uid, letters, t, size: t // 86400 == n
        if op == "LARGER":
            return lambda seq, uid, letters, t, size: size > n
        return lambda seq, uid, letters, t, size: size < n


Predicate: TypeAlias = Callable[[int, int, str, float, int], bool]


def _both(f: Predicate, g: Predicate) -> Predicate:
    return lambda *a: f(*a) and g(*a)


def _either(f: Predicate, g: Predicate) -> Predicate:
    return lambda *a: f(*a) or g(*a)


_FLAG_KEYS: Final = {"SEEN": ("FLAG", "S"), "UNSEEN": ("NOFLAG", "S"),
                     "DELETED": ("FLAG", "T"), "UNDELETED": ("NOFLAG", "T"),
                     "FLAGGED": ("FLAG", "F"), "UNFLAGGED": ("NOFLAG", "F"),
                     "ANSWERED": ("FLAG", "R"), "UNANSWERED": ("NOFLAG", "R"),
                     "DRAFT": ("FLAG", "D"), "UNDRAFT": ("NOFLAG", "D")}
_MONTHS: Final = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def parse_date(s: str) -> int:
    """RFC 9051 date "1-Feb-1994" -> days since the epoch (UTC)."""
    m = re.fullmatch(r"([0-9]{1,2})-([A-Za-z]{3})-([0-9]{4})", s)
    if not m or m.group(2).capitalize() not in _MONTHS:
        raise ImapSyntaxError(f"invalid date {s!r}")
    month = _MONTHS.index(m.group(2).capitalize()) + 1
    try:
        t = calendar.timegm((int(m.group(3)), month, int(m.group(1)), 0, 0, 0))
        time.gmtime(t)
    except (ValueError, OverflowError):
        raise ImapSyntaxError(f"invalid date {s!r}") from None
    if int(m.group(1)) < 1 or int(m.group(1)) > calendar.monthrange(int(m.group(3)), month)[1]:
        raise ImapSyntaxError(f"invalid date {s!r}")
    return t // 86400


def parse_search(args: tuple[Arg, ...] | list[Arg]) -> SearchKey:
    """A SEARCH program -> SearchKey. Nesting (NOT, OR, lists) is bounded by MAX_SEARCH_DEPTH
    and the number of keys by MAX_SEARCH_KEYS: beyond them ImapSyntaxError("[LIMIT] ...")."""
    count = [0]
    return _parse_search(args, 0, count)


def _parse_search(args: tuple[Arg, ...] | list[Arg], depth: int, count: list[int]) -> SearchKey:
    items = list(args)
    if len(items) >= 2 and isinstance(items[0], str) and items[0].upper() == "CHARSET":
        cs = astring(items[1]).upper()
        if cs not in ("US-ASCII", "UTF-8"):
            raise ImapSyntaxError("[BADCHARSET (US-ASCII UTF-8)] unsupported charset")
        items = items[2:]
    if not items:
        raise ImapSyntaxError("SEARCH needs a search key")
    pos = 0

    def one(level: int) -> SearchKey:
        nonlocal pos
        if pos >= len(items):
            raise ImapSyntaxError("search key expected")
        if level > MAX_SEARCH_DEPTH:
            raise limit_error("Search keys nested too deeply", MAX_SEARCH_DEPTH)
        count[0] += 1
        if count[0] > MAX_SEARCH_KEYS:
            raise limit_error("Too many search keys", MAX_SEARCH_KEYS)
        it = items[pos]
        pos += 1
        if isinstance(it, list):
            if not it:
                raise ImapSyntaxError("empty search list")
            return _parse_search(it, level + 1, count)
        word = astring(it)
        up = word.upper() if word.isascii() else word     # '"ſeen"'.upper() is not SEEN

        def arg() -> str:
            nonlocal pos
            if pos >= len(items):
                raise ImapSyntaxError(f"{up} needs an argument")
            pos += 1
            return astring(items[pos - 1])

        if up == "ALL":
            return SearchKey("ALL")
        if up in _FLAG_KEYS:
            op, letter = _FLAG_KEYS[up]
            return SearchKey(op, letter)
        if up in ("NEW", "RECENT"):
            return SearchKey("NONE")             # no \Recent in IMAP4rev2; we never set it
        if up == "OLD":
            return SearchKey("ALL")
        if up == "KEYWORD":
            arg()
            return SearchKey("NONE")             # keywords are not stored
        if up == "UNKEYWORD":
            arg()
            return SearchKey("ALL")
        if up in ("SINCE", "BEFORE", "ON"):
            return SearchKey(up, parse_date(arg()))
        if up in ("LARGER", "SMALLER"):
            n = ascii_number(arg(), MAX_NUMBER64_DIGITS)
            if n is None:
                raise ImapSyntaxError(f"{up} needs a number of 1 to {MAX_NUMBER64_DIGITS} digits")
            return SearchKey(up, n)
        if up == "UID":
            return SearchKey("UID", parse_sequence_set(arg()))
        if up == "NOT":
            return SearchKey("NOT", None, (one(level + 1),))
        if up == "OR":
            left = one(level + 1)
            return SearchKey("OR", None, (left, one(level + 1)))
        if up[:1].isdigit() or up[:1] == "*":
            return SearchKey("SEQ", parse_sequence_set(word))
        raise ImapSyntaxError(f"unsupported search key {word}")

    keys = []
    while pos < len(items):
        keys.append(one(depth))
    return keys[0] if len(keys) == 1 else SearchKey("AND", None, tuple(keys))


# --- response formatting -------------------------------------------------------------------

_QUOTABLE = re.compile(rb"^[\x01-\x09\x0b\x0c\x0e-\x7f]*\Z")


def quote(s: str | bytes) -> bytes:
    """A string as IMAP quoted string, or as literal when it holds CR, LF, NUL or 8-bit.
    A str may carry surrogate escapes (8-bit header bytes as parsed): they become those bytes."""
    b = s.encode("utf-8", "surrogateescape") if isinstance(s, str) else s
    if b"\0" in b:                              # RFC 9051 4.3: no NUL even in a literal;
        b = b.replace(b"\0", b"\x80")           # Dovecot sends 0x80 in its place
    if len(b) < 1024 and _QUOTABLE.match(b):
        return b'"' + b.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'
    return literal_header(len(b)) + b


def literal_header(n: int) -> bytes:
    return b"{%d}\r\n" % n


def render(v: object) -> bytes:
    """Nested data as IMAP: None -> NIL, int -> number, str/bytes -> string, list -> (...)."""
    if v is None:
        return b"NIL"
    if isinstance(v, bool):
        raise TypeError("bool is not an IMAP value")
    if isinstance(v, int):
        return str(v).encode()
    if isinstance(v, (str, bytes)):
        return quote(v)
    if isinstance(v, (list, tuple)):
        return b"(" + b" ".join(render(x) for x in v) + b")"
    raise TypeError(f"cannot render {type(v).__name__}")


def imap_datetime(t: float) -> str:
    """INTERNALDATE: "17-Jul-1996 02:44:25 +0000" (UTC)."""
    g = time.gmtime(t)
    return f"{g.tm_mday:02d}-{_MONTHS[g.tm_mon - 1]}-{g.tm_year} {g.tm_hour:02d}:{g.tm_min:02d}:{g.tm_sec:02d} +0000"


def render_flags(letters: str) -> bytes:
    return ("(" + " ".join(flags_from_letters(letters)) + ")").encode()


def tagged(tag: str, status: str, text: str) -> bytes:
    return f"{tag} {status} {text}\r\n".encode()


def untagged(text: str | bytes) -> bytes:
    b = text.encode() if isinstance(text, str) else text
    return b"* " + b + b"\r\n"


@dataclass
class FetchResponse:
    """Build "* <seq> FETCH (...)" piece by piece; big literals are streamed by the caller.
    `parts` holds bytes, and ("file", offset, count) markers where the caller sends file bytes."""
    seq: int
    parts: list[bytes | tuple[str, int, int]] = field(default_factory=list)
    _first: bool = True

    def _sep(self) -> bytes:
        if self._first:
            self._first = False
            return b"* %d FETCH (" % self.seq
        return b" "

    def add(self, name: str, value: bytes) -> None:
        self.parts.append(self._sep() + name.encode() + b" " + value)

    def add_literal_bytes(self, name: str, data: bytes) -> None:
        self.parts.append(self._sep() + name.encode() + b" " + literal_header(len(data)) + data)

    def add_file_literal(self, name: str, offset: int, count: int) -> None:
        self.parts.append(self._sep() + name.encode() + b" " + literal_header(count))
        self.parts.append(("file", offset, count))

    def finish(self) -> None:
        if self._first:
            self.parts.append(self._sep())
        self.parts.append(b")\r\n")
