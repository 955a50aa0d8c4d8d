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
import enum
import fnmatch
import re
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Final, Protocol, TypeAlias

from relay.auth import AuthError, decode_plain
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

class State(enum.Enum):
    """RFC 9051 section 3: the connection's state (ImapConnection.state)."""
    NOT_AUTHENTICATED = "not-authenticated"
    AUTHENTICATED = "authenticated"
    SELECTED = "selected"
    LOGOUT = "logout"


NOT_AUTH, AUTH, SELECTED, LOGOUT = (State.NOT_AUTHENTICATED, State.AUTHENTICATED, State.SELECTED,
                                    State.LOGOUT)
_ANY = frozenset({NOT_AUTH, AUTH, SELECTED})
_AUTHED = frozenset({AUTH, SELECTED})

# Everything about which command is valid in which state (RFC 9051 section 3 and 6).
COMMAND_STATES: Final[dict[str, frozenset[State]]] = {
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
# Outcome in a state -> next state (ImapConnection). Nothing else changes the state.
TRANSITIONS: Final[dict[tuple[State, str], State]] = {
    (NOT_AUTH, "login"): AUTH,
    (AUTH, "select"): SELECTED, (SELECTED, "select"): SELECTED,
    (AUTH, "deselect"): AUTH, (SELECTED, "deselect"): AUTH,     # CLOSE, UNSELECT, SELECT failing
    (NOT_AUTH, "logout"): LOGOUT, (AUTH, "logout"): LOGOUT, (SELECTED, "logout"): LOGOUT,
}


def check_state(cmd: Command, state: State) -> Reject | None:
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


@dataclass(frozen=True)
class BodyRange:
    """In a FETCH response: send `count` bytes of the message from `offset` here."""
    offset: int
    count: int


@dataclass
class FetchResponse:
    """Build "* <seq> FETCH (...)" piece by piece; big literals are streamed by the caller.
    `parts` holds bytes, and BodyRange markers where the caller sends the message's bytes."""
    seq: int
    parts: list[bytes | BodyRange] = field(default_factory=list)
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
        self.parts.append(BodyRange(offset, count))

    def finish(self) -> None:
        if self._first:
            self.parts.append(self._sep())
        self.parts.append(b")\r\n")


# --- the connection: everything IMAP decides, as events for the server ----------------------
#
#     conn = ImapConnection(hostname, max_line=..., max_literal=..., tls_available=...,
#                           tls_active=..., plaintext_allowed=...)
#     write(conn.greeting())
#     loop: conn.receive_data(bytes); ev = conn.next_event() until NEED_DATA; act on ev:
#
#     Respond(data, close)      write data; when `close` (the session's outcome), end the session
#     Authenticate(user, password, mechanism)
#                               verify; then write(conn.login_succeeded(address) or
#                               conn.login_failed(kind))
#     StartTls()                nothing else sent by the client may wait in the server's own
#                               buffers: write(conn.starttls_refused()) and end, or
#                               write(conn.starttls_accepted()), upgrade, conn.tls_started()
#     OpenMailbox(readonly)     SELECT/EXAMINE: write(conn.mailbox_opened(messages, uidvalidity,
#                               uidnext)) and follow the mailbox's changes (conn.mailbox_changed())
#     MailboxStatus()           write(conn.status_result(messages, uidvalidity, uidnext))
#     QuotaRequest()            write(conn.quota_result(bytes, messages, quota_bytes, quota_messages))
#     Refresh(full)             write(conn.refreshed(messages)); the command goes on at next_event()
#     Expunge(uids, close)      remove those of `uids` that carry \\Deleted now; write(conn.expunged(gone))
#     StoreFlags(targets, request)
#                               per (seq, uid): set request.apply(flags now); write(conn.flags_stored(
#                               seq, message or None)); then write(conn.store_done())
#     Fetch(targets, ...)       per target: set \\Seen when asked, open the body when `needs_body`,
#                               parts = conn.fetch_message(seq, content, seen); write the bytes and
#                               send each BodyRange of the body; then write(conn.fetch_done(missing))
#     Idle()                    write(IDLE_CONTINUATION); until next_event() gives the Respond that
#                               ends it: write(conn.update(messages)) on each change of the mailbox
#
# A command whose I/O failed is ended with write(conn.failed(kind)). The state changes only
# through TRANSITIONS; `view` is the message list the client knows (sequence number = index + 1).

IDLE_CONTINUATION: Final = b"+ idling\r\n"
# RFC 9051 6.3.1: the flags this server keeps (no keywords: PERMANENTFLAGS has no \\*)
PERMANENT: Final = SYSTEM_FLAGS
_SIMPLE_ITEMS: Final = frozenset({"UID", "FLAGS", "INTERNALDATE", "RFC822.SIZE"})
_TREE_ITEMS: Final = frozenset({"RFC822.HEADER", "RFC822.TEXT", "ENVELOPE", "BODYSTRUCTURE", "BODY"})
_STATUS_ITEMS: Final = ("MESSAGES", "UIDNEXT", "UIDVALIDITY", "RECENT", "UNSEEN", "DELETED", "SIZE")


class ProtocolError(RuntimeError):
    """The server called the connection out of order (a bug in the server, not client input)."""


class MessageView(Protocol):
    """What the connection keeps per message of the view: any object with these attributes
    (the store's message listing as it is, or a translation of it)."""
    @property
    def uid(self) -> int: ...
    @property
    def size(self) -> int: ...
    @property
    def internaldate(self) -> float: ...
    @property
    def flags(self) -> str: ...          # system flags as letters (FLAG_LETTERS), e.g. "FS"


class MessageContent(Protocol):
    """One message opened for FETCH by the server (MIME structure from relay.mimetree)."""
    @property
    def size(self) -> int: ...

    def envelope(self) -> bytes:
        """The rendered ENVELOPE value."""
        ...

    def bodystructure(self, extended: bool) -> bytes:
        """The rendered BODYSTRUCTURE (extended) or BODY value."""
        ...

    def locate(self, section: Section) -> tuple[int, int] | bytes | None:
        """What BODY[section] names: (offset, count) of the message bytes, the bytes themselves
        (HEADER.FIELDS), or None when the part does not exist (NIL)."""
        ...


@dataclass(frozen=True)
class FetchParts:
    parts: tuple[bytes | BodyRange, ...]
    whole: bool                          # the whole message up to its last byte is sent


@dataclass(frozen=True)
class Respond:
    data: bytes
    close: str | None = None             # the session ends with this outcome after `data`


@dataclass(frozen=True)
class Authenticate:
    user: str
    password: str
    mechanism: str                       # "LOGIN" or "PLAIN"


@dataclass(frozen=True)
class StartTls:
    pass


@dataclass(frozen=True)
class OpenMailbox:
    readonly: bool                       # EXAMINE


@dataclass(frozen=True)
class MailboxStatus:
    pass


@dataclass(frozen=True)
class QuotaRequest:
    pass


@dataclass(frozen=True)
class Refresh:
    full: bool                           # False: only new messages (EXISTS), no EXPUNGE/FLAGS


@dataclass(frozen=True)
class Expunge:
    uids: frozenset[int]                 # remove those that carry \\Deleted now
    close: bool                          # CLOSE: no EXPUNGE responses, back to AUTHENTICATED


@dataclass(frozen=True)
class StoreFlags:
    targets: tuple[tuple[int, int], ...]   # (seq, uid)
    request: StoreRequest


@dataclass(frozen=True)
class Fetch:
    targets: tuple[tuple[int, int, bool], ...]   # (seq, uid, set \\Seen first)
    needs_body: bool                     # open the message (anything beyond UID FLAGS ...)
    needs_tree: bool                     # its MIME structure (part sections, ENVELOPE, BODY...)
    needs_lines: bool                    # with line counts (BODY, BODYSTRUCTURE)


@dataclass(frozen=True)
class Idle:
    pass


ConnEvent: TypeAlias = (Respond | Authenticate | StartTls | OpenMailbox | MailboxStatus | QuotaRequest
                        | Refresh | Expunge | StoreFlags | Fetch | Idle)


@dataclass(frozen=True)
class ConnectionStats:
    commands: int                        # tagged commands parsed (valid or not)


def is_inbox(name: str) -> bool:
    return name.upper() == "INBOX"


def matches_inbox(reference: str, pattern: str) -> bool:
    """LIST wildcards (* and %) against the one mailbox name."""
    full = (reference + pattern).replace("%", "*")
    return fnmatch.fnmatchcase("INBOX", full.upper().replace("[", "[[]"))


def _bad_text(e: ImapSyntaxError) -> str:
    return str(e) if str(e).startswith("[") else f"Syntax error: {e}"


class ImapConnection:
    """One IMAP session's protocol state; see the comment above for the server's loop."""

    def __init__(self, hostname: str, *, max_line: int = 64 * 1024, max_literal: int = 64 * 1024,
                 tls_available: bool = False, tls_active: bool = False,
                 plaintext_allowed: bool = True, version: str = "") -> None:
        self.hostname = hostname
        self.version = version
        self.max_line, self.max_literal = max_line, max_literal
        self.tls_available = tls_available
        self.tls_active = tls_active
        self.plaintext_allowed = plaintext_allowed or tls_active
        self.state = NOT_AUTH
        self.user: str | None = None
        self.readonly = False
        self.view: list[MessageView] = []
        self.parser = ImapParser(max_line, max_literal)
        self._changed = False                # the store announced a change since the last refresh
        self._tag = "*"                      # of the command in progress
        self._name = ""
        self._busy: str | None = None        # waiting for the server: an event's result
        self._resume: Command | None = None  # go on with this command after a Refresh
        self._sasl = False                   # AUTHENTICATE PLAIN sent "+ ", response line expected
        self._idling = False
        self._fetch: list[FetchAtt] = []
        self._missing = 0
        self._commands = 0

    # --- server API ----------------------------------------------------------------------------
    def greeting(self) -> bytes:
        return untagged(f"OK [CAPABILITY {self.capabilities()}] {self.hostname} IMAP ready")

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        self.parser.receive_data(data)

    @property
    def buffered(self) -> int:
        return self.parser.buffered

    @property
    def idling(self) -> bool:
        return self._idling

    @property
    def busy(self) -> str | None:
        """The result the connection waits for (None: call next_event())."""
        return self._busy

    @property
    def command(self) -> str:
        """The name of the command in progress (or the last one), for the server's logs."""
        return self._name

    def statistics(self) -> ConnectionStats:
        return ConnectionStats(self._commands)

    def capabilities(self) -> str:
        caps = ["IMAP4rev1", "SASL-IR", "ID", "ENABLE", "IDLE", "LITERAL+"]
        if self.state is NOT_AUTH:
            if self.tls_available and not self.tls_active:
                caps.append("STARTTLS")
            caps.append("AUTH=PLAIN" if self.plaintext_allowed else "LOGINDISABLED")
        else:
            caps += ["UIDPLUS", "UNSELECT", "NAMESPACE", "QUOTA", "QUOTA=RES-STORAGE",
                     "QUOTA=RES-MESSAGE"]
        return " ".join(caps)

    def next_event(self) -> ConnEvent | _NeedData:
        if self._busy is not None:
            raise ProtocolError(f"next_event() while waiting for the {self._busy} result")
        if self._resume is not None:
            cmd, self._resume = self._resume, None
            return self._run(cmd, resumed=True)
        while self.state is not LOGOUT:
            ev = self.parser.next_event()
            if ev is NEED_DATA:
                return NEED_DATA
            if self._idling:
                return self._idle_line(ev)
            if self._sasl:
                return self._sasl_line(ev)
            if isinstance(ev, Continuation):
                return Respond(f"+ {ev.text}\r\n".encode())
            if isinstance(ev, Reject):
                return Respond(ev.to_bytes())
            if isinstance(ev, ClientLine):          # only expected inside a command
                return Respond(b"* BAD Unexpected line\r\n")
            assert isinstance(ev, Command)
            self._commands += 1
            bad = check_state(ev, self.state)
            if bad is not None:
                return Respond(bad.to_bytes())
            self._tag, self._name = ev.tag, ev.name
            return self._run(ev, resumed=False)
        return NEED_DATA

    def failed(self, kind: str = "temp") -> bytes:
        """The server could not do the I/O of the command in progress: "temp" (store trouble,
        try again), "bug" (an error in the server). The session goes on."""
        self._busy, self._resume, self._fetch = None, None, []
        if kind == "temp":
            return tagged(self._tag, "NO", "[UNAVAILABLE] Temporary failure, try again later")
        return tagged(self._tag, "NO", "[SERVERBUG] Internal error, try again later")

    def login_succeeded(self, address: str) -> bytes:
        self._expect("login")
        self._to("login")
        self.user = address
        return tagged(self._tag, "OK", f"[CAPABILITY {self.capabilities()}] Logged in")

    def login_failed(self, kind: str = "auth") -> bytes:
        """kind: "auth" (bad credentials), "busy" (too many attempts, the penalty)."""
        self._expect("login")
        if kind == "auth":
            return tagged(self._tag, "NO", "[AUTHENTICATIONFAILED] Authentication failed")
        return tagged(self._tag, "NO", "[UNAVAILABLE] Too many attempts, try again later")

    def starttls_refused(self) -> bytes:
        """Bytes followed STARTTLS before the handshake (RFC 9051 6.2.1: command injection)."""
        self._expect("tls")
        return (tagged(self._tag, "BAD", "Nothing may follow STARTTLS before the handshake")
                + untagged("BYE Command injection refused"))

    def starttls_accepted(self) -> bytes:
        self._expect("tls")
        self._busy = "tls-handshake"
        return tagged(self._tag, "OK", "Begin TLS negotiation now")

    def tls_started(self) -> None:
        """The transport speaks TLS now: forget everything received before."""
        self._expect("tls-handshake")
        self.tls_active = True
        self.plaintext_allowed = True
        self.parser = ImapParser(self.max_line, self.max_literal)

    def mailbox_opened(self, messages: Sequence[MessageView], uidvalidity: int, uidnext: int) -> bytes:
        self._expect("select")
        self._to("select")
        self.view = list(messages)
        self._changed = False
        out = [untagged(f"FLAGS ({PERMANENT})"),
               untagged(f"OK [PERMANENTFLAGS ({'' if self.readonly else PERMANENT})] Flags permitted"),
               untagged(f"{len(self.view)} EXISTS"), untagged("0 RECENT")]
        unseen = next((i + 1 for i, m in enumerate(self.view) if "S" not in m.flags), None)
        if unseen is not None:
            out.append(untagged(f"OK [UNSEEN {unseen}] First unseen"))
        out.append(untagged(f"OK [UIDVALIDITY {uidvalidity}] UIDs valid"))
        out.append(untagged(f"OK [UIDNEXT {uidnext}] Predicted next UID"))
        mode = "READ-ONLY" if self.readonly else "READ-WRITE"
        out.append(tagged(self._tag, "OK", f"[{mode}] {'EXAMINE' if self.readonly else 'SELECT'} completed"))
        return b"".join(out)

    def status_result(self, messages: Sequence[MessageView], uidvalidity: int, uidnext: int) -> bytes:
        self._expect("status")
        items, self._status_items = self._status_items, ()
        values = {"MESSAGES": len(messages), "UIDNEXT": uidnext, "UIDVALIDITY": uidvalidity,
                  "RECENT": 0, "UNSEEN": sum(1 for m in messages if "S" not in m.flags),
                  "DELETED": sum(1 for m in messages if "T" in m.flags),
                  "SIZE": sum(m.size for m in messages)}
        out = " ".join(f"{name} {values[name]}" for name in items)
        return untagged(f"STATUS INBOX ({out})") + tagged(self._tag, "OK", "STATUS completed")

    def quota_result(self, used_bytes: int, used_messages: int, quota_bytes: int,
                     quota_messages: int) -> bytes:
        """RFC 9208 5.1: STORAGE in units of 1024 octets; a resource without limit (0) is left out."""
        self._expect("quota")
        res = []
        if quota_bytes:
            res.append(f"STORAGE {(used_bytes + 1023) // 1024} {quota_bytes // 1024}")
        if quota_messages:
            res.append(f"MESSAGE {used_messages} {quota_messages}")
        line = untagged(f'QUOTA "" ({" ".join(res)})')
        if self._quota_root:
            return untagged('QUOTAROOT INBOX ""') + line + tagged(self._tag, "OK", "GETQUOTAROOT completed")
        return line + tagged(self._tag, "OK", "GETQUOTA completed")

    def mailbox_changed(self) -> None:
        """The store announced new mail or an expunge in the selected mailbox."""
        self._changed = True

    def refreshed(self, messages: Sequence[MessageView]) -> bytes:
        """The result of Refresh: the updates to send; the command goes on at next_event()."""
        full = self._busy == "refresh"
        self._expect("refresh" if full else "refresh-new")
        return self._update(messages) if full else self._new_only(messages)

    def update(self, messages: Sequence[MessageView]) -> bytes:
        """Unsolicited updates while idling (or between commands): EXPUNGE for vanished
        messages (highest first), FETCH FLAGS for changed flags, EXISTS for new ones."""
        if self._busy is not None:
            raise ProtocolError(f"update() while waiting for the {self._busy} result")
        return self._update(messages)

    def expunged(self, gone: Iterable[int]) -> bytes:
        self._expect("expunge")
        if self._closing:
            self._deselect()
            return tagged(self._tag, "OK", "CLOSE completed")
        gone = set(gone)
        out = []
        for seq in range(len(self.view), 0, -1):
            if self.view[seq - 1].uid in gone:
                del self.view[seq - 1]
                out.append(untagged(f"{seq} EXPUNGE"))
        out.append(tagged(self._tag, "OK", "EXPUNGE completed"))
        return b"".join(out)

    def flags_stored(self, seq: int, message: MessageView | None) -> bytes:
        """One target of StoreFlags: its flags now, or None when it was expunged meanwhile."""
        self._check("store")
        if message is None:
            return b""
        self.view[seq - 1] = message
        if self._store_silent:
            return b""
        uid = b" UID %d" % message.uid if self._uid else b""
        return untagged(b"%d FETCH (FLAGS %s%s)" % (seq, render_flags(message.flags), uid))

    def store_done(self) -> bytes:
        self._expect("store")
        return tagged(self._tag, "OK", "STORE completed")

    def fetch_message(self, seq: int, content: MessageContent | None,
                      seen: MessageView | None = None) -> FetchParts:
        """The response for one target of Fetch. `content`: the opened message (None when
        needs_body is False); `seen`: the message after the server set \\Seen for it."""
        self._check("fetch")
        atts = self._fetch
        if seen is not None:
            self.view[seq - 1] = seen
            if not any(a.name == "FLAGS" for a in atts):
                atts = [*atts, FetchAtt("FLAGS")]
        m = self.view[seq - 1]
        size = content.size if content is not None else m.size
        resp = FetchResponse(seq)
        whole = False
        for a in atts:
            whole |= self._render_att(resp, a, m, content, size)
        resp.finish()
        return FetchParts(tuple(resp.parts), whole)

    def fetch_missing(self) -> None:
        """A target of Fetch was expunged before it could be read."""
        self._check("fetch")
        self._missing += 1

    def fetch_done(self) -> bytes:
        self._expect("fetch")
        self._fetch = []
        missing, self._missing = self._missing, 0
        if missing:
            return tagged(self._tag, "NO", "[EXPUNGEISSUED] Some messages no longer exist")
        return tagged(self._tag, "OK", "FETCH completed")

    def view_uids(self) -> list[int]:
        return [m.uid for m in self.view]

    # --- internals -------------------------------------------------------------------------------
    _status_items: tuple[str, ...] = ()
    _quota_root = False
    _closing = False
    _store_silent = False
    _uid = False

    def _check(self, what: str) -> None:
        if self._busy != what:
            raise ProtocolError(f"{what} result given while waiting for {self._busy}")

    def _expect(self, what: str) -> None:
        self._check(what)
        self._busy = None

    def _to(self, outcome: str) -> None:
        self.state = TRANSITIONS[(self.state, outcome)]

    def _wait(self, what: str, ev: ConnEvent) -> ConnEvent:
        self._busy = what
        return ev

    def _ok(self, text: str, *lines: str | bytes) -> Respond:
        return Respond(b"".join(untagged(x) for x in lines) + tagged(self._tag, "OK", text))

    def _no(self, text: str) -> Respond:
        return Respond(tagged(self._tag, "NO", text))

    def _deselect(self) -> None:
        self._to("deselect")
        self.view = []
        self.readonly = False
        self._changed = False

    def _run(self, cmd: Command, resumed: bool) -> ConnEvent:
        handler = _HANDLERS.get(cmd.name)
        if handler is None:                      # COMMAND_STATES and _HANDLERS disagree: a bug
            return Respond(tagged(cmd.tag, "BAD", "Unknown command"))
        try:
            return handler(self, cmd, resumed)
        except ImapSyntaxError as e:
            self._busy, self._resume = None, None
            return Respond(tagged(cmd.tag, "BAD", _bad_text(e)))

    def _catch_up(self, cmd: Command, resumed: bool) -> ConnEvent | None:
        """Mail that arrived since the last command becomes visible to SEARCH and FETCH
        without a NOOP (pollers that stay selected and only UID SEARCH): a UID command may
        carry every update, a sequence-number command only EXISTS, since EXPUNGE would shift
        the numbers it names (RFC 9051 7.4.1). A UID command always compares the flags too:
        the store announces new mail and expunges, not flag changes."""
        if resumed or self.state is not SELECTED:
            return None
        if cmd.uid:
            self._resume = cmd
            return self._wait("refresh", Refresh(True))
        if not self._changed:
            return None
        self._resume = cmd
        return self._wait("refresh-new", Refresh(False))

    def _update(self, messages: Sequence[MessageView]) -> bytes:
        self._changed = False
        if self.state is not SELECTED:
            return b""
        by_uid = {m.uid: m for m in messages}
        out = []
        view = self.view
        for seq in range(len(view), 0, -1):
            if view[seq - 1].uid not in by_uid:
                del view[seq - 1]
                out.append(untagged(f"{seq} EXPUNGE"))
        for i, m in enumerate(view):
            now = by_uid[m.uid]
            if now.flags != m.flags:
                view[i] = now
                out.append(untagged(b"%d FETCH (FLAGS %s UID %d)" % (i + 1, render_flags(now.flags), m.uid)))
        top = view[-1].uid if view else 0
        new = [m for m in messages if m.uid > top]
        if new:
            view += new
            out.append(untagged(f"{len(view)} EXISTS"))
        return b"".join(out)

    def _new_only(self, messages: Sequence[MessageView]) -> bytes:
        top = self.view[-1].uid if self.view else 0
        new = [m for m in messages if m.uid > top]
        if not new:
            return b""
        self.view += new
        return untagged(f"{len(self.view)} EXISTS")

    def _targets(self, cmd: Command, spec: Arg) -> list[tuple[int, MessageView]]:
        """(seq, message) of the messages a sequence set (or UID set) names."""
        seqset = parse_sequence_set(atom(spec))
        view = self.view
        if cmd.uid:
            if not view:
                return []
            star = view[-1].uid
            return [(i + 1, m) for i, m in enumerate(view) if seqset.contains(m.uid, star)]
        n = len(view)
        for a, b in seqset.ranges:
            for x in (a, b):
                if x is not None and x > n:
                    raise ImapSyntaxError("Invalid message sequence number")
        if not n:
            raise ImapSyntaxError("No messages")
        return [(i + 1, m) for i, m in enumerate(view) if seqset.contains(i + 1, n)]

    # --- any state -------------------------------------------------------------------------------
    def _cmd_capability(self, cmd: Command, resumed: bool) -> ConnEvent:
        return self._ok("Capability completed", "CAPABILITY " + self.capabilities())

    def _cmd_noop(self, cmd: Command, resumed: bool) -> ConnEvent:
        if not resumed and self.state is SELECTED:
            self._resume = cmd
            return self._wait("refresh", Refresh(True))
        return self._ok(f"{cmd.name} completed")

    def _cmd_logout(self, cmd: Command, resumed: bool) -> ConnEvent:
        self._to("logout")
        return Respond(untagged("BYE Logging out") + tagged(cmd.tag, "OK", "Logout completed"), close="ok")

    def _cmd_id(self, cmd: Command, resumed: bool) -> ConnEvent:
        return self._ok("ID completed", b"ID " + render(["name", "relay", "version", self.version]))

    # --- not authenticated -----------------------------------------------------------------------
    def _cmd_starttls(self, cmd: Command, resumed: bool) -> ConnEvent:
        if not self.tls_available or self.tls_active:
            return Respond(tagged(cmd.tag, "BAD", "STARTTLS not available"))
        if self.parser.buffered:
            return Respond(tagged(cmd.tag, "BAD", "Nothing may follow STARTTLS before the handshake")
                           + untagged("BYE Command injection refused"), close="protocol_error")
        return self._wait("tls", StartTls())

    def _plaintext_refused(self) -> Respond | None:
        if self.plaintext_allowed:
            return None
        return self._no("[PRIVACYREQUIRED] Use STARTTLS or TLS first")

    def _cmd_login(self, cmd: Command, resumed: bool) -> ConnEvent:
        want_args(cmd, 2, 2)
        user, password = astring(cmd.args[0]), astring(cmd.args[1])
        return self._plaintext_refused() or self._wait("login", Authenticate(user, password, "LOGIN"))

    def _cmd_authenticate(self, cmd: Command, resumed: bool) -> ConnEvent:
        want_args(cmd, 1, 2)
        if atom(cmd.args[0]).upper() != "PLAIN":
            return self._no("Unsupported authentication mechanism")
        refused = self._plaintext_refused()
        if refused is not None:
            return refused
        if len(cmd.args) == 1:
            self._sasl = True
            self.parser.expect_line()
            return Respond(b"+ \r\n")
        response = astring(cmd.args[1]).encode()            # SASL-IR (RFC 4959)
        return self._plain(b"" if response == b"=" else response)

    def _sasl_line(self, ev: Event) -> ConnEvent:
        self._sasl = False
        if not isinstance(ev, ClientLine):
            return Respond(tagged(self._tag, "BAD", "Authentication exchange failed"))
        response = ev.data.strip()
        if response == b"*":
            return Respond(tagged(self._tag, "BAD", "Authentication cancelled"))
        return self._plain(response)

    def _plain(self, response: bytes) -> ConnEvent:
        try:
            _, user, password = decode_plain(response)
        except AuthError as e:
            return Respond(tagged(self._tag, "BAD", f"Invalid SASL PLAIN response: {e}"))
        return self._wait("login", Authenticate(user, password, "PLAIN"))

    # --- authenticated ---------------------------------------------------------------------------
    def _cmd_enable(self, cmd: Command, resumed: bool) -> ConnEvent:
        want_args(cmd, 1)
        return self._ok("ENABLE completed", "ENABLED")           # nothing to enable

    def _cmd_list(self, cmd: Command, resumed: bool) -> ConnEvent:
        want_args(cmd, 2, 2)
        ref, pattern = astring(cmd.args[0]), astring(cmd.args[1])
        kind = cmd.name
        lines: list[str | bytes] = []
        if kind == "LIST" and pattern == "":
            lines.append(b'LIST (\\Noselect) "/" ""')
        elif matches_inbox(ref, pattern):
            attrs = "\\HasNoChildren" if kind == "LIST" else ""
            lines.append(f'{kind} ({attrs}) "/" INBOX')
        return self._ok(f"{kind} completed", *lines)

    def _cmd_namespace(self, cmd: Command, resumed: bool) -> ConnEvent:
        return self._ok("NAMESPACE completed", 'NAMESPACE (("" "/")) NIL NIL')

    def _no_such_mailbox(self) -> Respond:
        return self._no("[NONEXISTENT] Only INBOX exists")

    def _cmd_create(self, cmd: Command, resumed: bool) -> ConnEvent:      # also DELETE, RENAME
        return self._no("[CANNOT] Only INBOX exists here")

    def _cmd_subscribe(self, cmd: Command, resumed: bool) -> ConnEvent:   # also UNSUBSCRIBE
        want_args(cmd, 1, 1)
        if not is_inbox(astring(cmd.args[0])):
            return self._no_such_mailbox()
        return self._ok(f"{cmd.name} completed")

    def _cmd_append(self, cmd: Command, resumed: bool) -> ConnEvent:
        return self._no("[CANNOT] APPEND is not supported: INBOX is filled by SMTP")

    def _cmd_copy(self, cmd: Command, resumed: bool) -> ConnEvent:        # also MOVE
        return self._no(f"[CANNOT] {cmd.name} is not supported: only INBOX exists")

    def _cmd_status(self, cmd: Command, resumed: bool) -> ConnEvent:
        want_args(cmd, 2, 2)
        if not is_inbox(astring(cmd.args[0])):
            return self._no_such_mailbox()
        raw = cmd.args[1] if isinstance(cmd.args[1], list) else [cmd.args[1]]
        items = tuple(atom(it).upper() for it in raw)
        for name in items:
            if name not in _STATUS_ITEMS:
                raise ImapSyntaxError(f"unknown STATUS item {name}")
        self._status_items = items
        return self._wait("status", MailboxStatus())

    def _cmd_select(self, cmd: Command, resumed: bool) -> ConnEvent:      # also EXAMINE
        want_args(cmd, 1, 2)
        self._deselect()
        if not is_inbox(astring(cmd.args[0])):
            return self._no_such_mailbox()
        self.readonly = cmd.name == "EXAMINE"
        return self._wait("select", OpenMailbox(self.readonly))

    def _cmd_getquotaroot(self, cmd: Command, resumed: bool) -> ConnEvent:
        want_args(cmd, 1, 1)
        if not is_inbox(astring(cmd.args[0])):
            return self._no_such_mailbox()
        self._quota_root = True
        return self._wait("quota", QuotaRequest())

    def _cmd_getquota(self, cmd: Command, resumed: bool) -> ConnEvent:
        want_args(cmd, 1, 1)
        if astring(cmd.args[0]) != "":
            return self._no("[NONEXISTENT] No such quota root")
        self._quota_root = False
        return self._wait("quota", QuotaRequest())

    def _cmd_idle(self, cmd: Command, resumed: bool) -> ConnEvent:
        self._idling = True
        self.parser.expect_line()
        return Idle()

    def _idle_line(self, ev: Event) -> ConnEvent:
        self._idling = False
        if isinstance(ev, ClientLine) and ev.data.strip().upper() == b"DONE":
            return Respond(tagged(self._tag, "OK", "IDLE terminated"))
        return Respond(tagged(self._tag, "BAD", "Expected DONE"))

    # --- selected --------------------------------------------------------------------------------
    def _cmd_close(self, cmd: Command, resumed: bool) -> ConnEvent:
        if self.readonly:
            self._deselect()
            return self._ok("CLOSE completed")
        self._closing = True
        return self._wait("expunge", Expunge(frozenset(self.view_uids()), close=True))

    def _cmd_unselect(self, cmd: Command, resumed: bool) -> ConnEvent:
        self._deselect()
        return self._ok("UNSELECT completed")

    def _cmd_check(self, cmd: Command, resumed: bool) -> ConnEvent:
        return self._cmd_noop(cmd, resumed)

    def _cmd_expunge(self, cmd: Command, resumed: bool) -> ConnEvent:
        if self.readonly:
            return self._no("[READ-ONLY] Mailbox is read-only")
        if cmd.uid:
            want_args(cmd, 1, 1)
            named = frozenset(m.uid for _, m in self._targets(cmd, cmd.args[0]))
        else:
            want_args(cmd, 0, 0)
            named = frozenset(self.view_uids())
        self._closing = False
        return self._wait("expunge", Expunge(named, close=False))

    def _cmd_search(self, cmd: Command, resumed: bool) -> ConnEvent:
        ev = self._catch_up(cmd, resumed)
        if ev is not None:
            return ev
        args = list(cmd.args)
        if args and isinstance(args[0], str) and args[0].upper() == "RETURN":
            raise ImapSyntaxError("SEARCH RETURN (ESEARCH) is not supported")
        key = parse_search(args)
        view = self.view
        match = key.compile(len(view), view[-1].uid if view else 0)
        hits = [m.uid if cmd.uid else i for i, m in enumerate(view, 1)
                if match(i, m.uid, m.flags, m.internaldate, m.size)]
        return self._ok("SEARCH completed", "SEARCH" + "".join(f" {h}" for h in hits))

    def _cmd_store(self, cmd: Command, resumed: bool) -> ConnEvent:
        seqset_arg = cmd.args[0] if cmd.args else ""
        _, req = parse_store(cmd.args)
        if self.readonly:
            return self._no("[READ-ONLY] Mailbox is read-only")
        targets = self._targets(cmd, seqset_arg)
        if not targets:
            return self._ok("STORE completed")
        self._store_silent, self._uid = req.silent, cmd.uid
        return self._wait("store", StoreFlags(tuple((seq, m.uid) for seq, m in targets), req))

    def _cmd_fetch(self, cmd: Command, resumed: bool) -> ConnEvent:
        ev = self._catch_up(cmd, resumed)
        if ev is not None:
            return ev
        want_args(cmd, 2, 2)
        atts = parse_fetch_atts(cmd.args[1])
        if cmd.uid and not any(a.name == "UID" for a in atts):
            atts.insert(0, FetchAtt("UID"))
        targets = self._targets(cmd, cmd.args[0])
        if not targets:
            return self._ok("FETCH completed")
        seen = not self.readonly and any(a.sets_seen for a in atts)
        # the MIME tree only for structure items and part sections: BODY[] and its partials
        # are plain byte ranges (a partial of a 2 GB message reads only its range)
        tree = any((a.section is None and a.name in _TREE_ITEMS)
                   or (a.section is not None and a.section != Section()) for a in atts)
        lines = any(a.name == "BODYSTRUCTURE" or (a.name == "BODY" and a.section is None) for a in atts)
        self._fetch, self._missing = atts, 0
        return self._wait("fetch", Fetch(tuple((seq, m.uid, seen and "S" not in m.flags) for seq, m in targets),
                                         needs_body=any(a.name not in _SIMPLE_ITEMS for a in atts),
                                         needs_tree=tree, needs_lines=lines))

    def _render_att(self, resp: FetchResponse, a: FetchAtt, m: MessageView,
                    content: MessageContent | None, size: int) -> bool:
        """Add one item; True when it sends the whole message up to its last byte."""
        name = a.name
        if name == "UID":
            resp.add("UID", str(m.uid).encode())
        elif name == "FLAGS":
            resp.add("FLAGS", render_flags(m.flags))
        elif name == "INTERNALDATE":
            resp.add("INTERNALDATE", quote(imap_datetime(m.internaldate)))
        elif name == "RFC822.SIZE":
            resp.add("RFC822.SIZE", str(size).encode())
        else:
            if content is None:
                raise ProtocolError(f"FETCH {name} needs the message content")
            if name == "RFC822":
                resp.add_file_literal("RFC822", 0, size)
                return True
            if name == "RFC822.HEADER":
                self._add_located(resp, name, content.locate(Section((), "HEADER")))
            elif name == "RFC822.TEXT":
                self._add_located(resp, name, content.locate(Section((), "TEXT")))
            elif name == "ENVELOPE":
                resp.add(name, content.envelope())
            elif name == "BODYSTRUCTURE" or (name == "BODY" and a.section is None):
                resp.add(name, content.bodystructure(name == "BODYSTRUCTURE"))
            else:
                return self._render_section(resp, a, content, size)
        return False

    @staticmethod
    def _add_located(resp: FetchResponse, name: str, where: tuple[int, int] | bytes | None) -> None:
        if where is None:
            resp.add(name, b"NIL")
        elif isinstance(where, bytes):
            resp.add_literal_bytes(name, where)
        else:
            resp.add_file_literal(name, where[0], where[1])

    def _render_section(self, resp: FetchResponse, a: FetchAtt, content: MessageContent, size: int) -> bool:
        sec = a.section
        assert sec is not None
        rname = a.response_name()
        where: tuple[int, int] | bytes | None
        where = (0, size) if sec == Section() else content.locate(sec)
        if where is None:
            resp.add(rname, b"NIL")
            return False
        if a.partial is not None:
            off, length = a.partial
            if isinstance(where, bytes):
                where = where[off:off + length]
            else:
                start = min(off, where[1])
                where = (where[0] + start, max(0, min(length, where[1] - start)))
        self._add_located(resp, rname, where)
        return (not isinstance(where, bytes) and not sec.part and not sec.text
                and where[0] + where[1] >= size and where[1] > 0)


_Handler: TypeAlias = Callable[[ImapConnection, Command, bool], ConnEvent]
_HANDLERS: Final[dict[str, _Handler]] = {
    "CAPABILITY": ImapConnection._cmd_capability, "NOOP": ImapConnection._cmd_noop,
    "LOGOUT": ImapConnection._cmd_logout, "ID": ImapConnection._cmd_id,
    "STARTTLS": ImapConnection._cmd_starttls, "LOGIN": ImapConnection._cmd_login,
    "AUTHENTICATE": ImapConnection._cmd_authenticate, "ENABLE": ImapConnection._cmd_enable,
    "SELECT": ImapConnection._cmd_select, "EXAMINE": ImapConnection._cmd_select,
    "LIST": ImapConnection._cmd_list, "LSUB": ImapConnection._cmd_list,
    "NAMESPACE": ImapConnection._cmd_namespace, "STATUS": ImapConnection._cmd_status,
    "CREATE": ImapConnection._cmd_create, "DELETE": ImapConnection._cmd_create,
    "RENAME": ImapConnection._cmd_create, "SUBSCRIBE": ImapConnection._cmd_subscribe,
    "UNSUBSCRIBE": ImapConnection._cmd_subscribe, "APPEND": ImapConnection._cmd_append,
    "IDLE": ImapConnection._cmd_idle, "GETQUOTAROOT": ImapConnection._cmd_getquotaroot,
    "GETQUOTA": ImapConnection._cmd_getquota, "CLOSE": ImapConnection._cmd_close,
    "UNSELECT": ImapConnection._cmd_unselect, "CHECK": ImapConnection._cmd_check,
    "EXPUNGE": ImapConnection._cmd_expunge, "SEARCH": ImapConnection._cmd_search,
    "FETCH": ImapConnection._cmd_fetch, "STORE": ImapConnection._cmd_store,
    "COPY": ImapConnection._cmd_copy, "MOVE": ImapConnection._cmd_copy,
}


def deleted_now(messages: Iterable[MessageView], uids: frozenset[int]) -> list[int]:
    """For Expunge: the UIDs of `uids` whose message carries \\Deleted in `messages` (the
    flags now, not as last viewed: another session may have set or cleared it since)."""
    return [m.uid for m in messages if "T" in m.flags and m.uid in uids]
