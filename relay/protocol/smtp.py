"""ESMTP server protocol, sans-IO (the h11 model): bytes in, events out, replies as bytes.

Everything that affects the state of a session lives in this file: the transition table
`_ALLOWED` says which command is valid in which state, and `SmtpConnection.reply` moves the
state on when the server answers an event that needed its decision.

    conn = SmtpConnection("relay.example.org", max_size=4 << 30)
    transport.write(conn.data_to_send())            # the 220 banner
    conn.receive_data(buf, nbytes)                  # buf unchanged until NEED_DATA
    while (ev := conn.next_event()) is not NEED_DATA:
        if ev is PAUSED: ...                        # an event awaits conn.reply(...)
        ...
    transport.write(conn.data_to_send())

Events that need the server's decision (answer with `conn.reply(Reply)`): MailFrom, RcptTo,
DataStart (354 enters DATA), DataEnd, BdatEnd, AuthPlain, AuthLogin. Until then
`next_event()` returns PAUSED and parses nothing further, so pipelined commands (RFC 2920)
are answered in order. Every other event is informational: its reply is already queued.

DATA: `DataChunk.data` is a memoryview into the caller's buffer, already dot-unstuffed,
valid until the next `receive_data`. End-of-data detection searches for the rare b"."
(bytes.find, memchr speed) and looks at the two bytes before it; the bytes carried across
reads are at most ".\\r" plus the last two bytes seen (FACTS: ~37 GB/s vs ~1.7 GB/s for
find(b"\\r\\n.")). BDAT (RFC 3030) counts octets exactly and never scans.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable
from dataclasses import dataclass

# --- bounds ------------------------------------------------------------------------------
# RFC 5321 4.5.3.1.4: a command line is at most 512 octets including the CRLF.
MAX_COMMAND_LINE = 512
# RFC 5321 4.5.3.1.4 lets extensions raise that limit for their parameters (RFC 1870 SIZE adds
# 26, RFC 3030 BODY=BINARYMIME, RFC 6531 SMTPUTF8 and UTF-8 addresses of up to 4 octets per
# character): MAIL and RCPT lines may use 1024 octets.
MAX_PARAM_LINE = 1024
# RFC 4954 4: an AUTH command line and a SASL response line may be up to 12288 octets. This is
# also the most we ever buffer for one line; a longer "line" gets 500 5.5.2 at once and its
# rest is discarded as it arrives.
MAX_AUTH_LINE = 12288

CR, LF, DOT = 13, 10, 46


class _Sentinel:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


NEED_DATA = _Sentinel("NEED_DATA")     # feed more bytes
_LINE_TOO_LONG = _Sentinel("LINE_TOO_LONG")
PAUSED = _Sentinel("PAUSED")           # an event awaits conn.reply(...)


@dataclass(frozen=True, slots=True)
class Reply:
    """An SMTP reply: code, RFC 3463 enhanced status ("" for none), text ("\\n" separates
    the lines of a multi-line reply)."""
    code: int
    enhanced: str
    text: str

    def lines(self) -> list[str]:
        pre = f"{self.enhanced} " if self.enhanced else ""
        return [f"{pre}{t}" for t in self.text.split("\n")]

    def render(self) -> bytes:
        """RFC 5321 4.2.1: "250-first", ..., "250 last"; the enhanced code on every line."""
        ls = self.lines()
        out = [f"{self.code}-{t}\r\n" for t in ls[:-1]]
        out.append(f"{self.code} {ls[-1]}\r\n")
        return "".join(out).encode("utf-8")

    @property
    def ok(self) -> bool:
        return 200 <= self.code < 400


# Replies the protocol gives on its own (the contract's table, RFC 5321, RFC 3463).
R_OK = Reply(250, "2.0.0", "OK")
R_354 = Reply(354, "", "End data with <CR><LF>.<CR><LF>")
R_BYE = Reply(221, "2.0.0", "Bye")
R_VRFY = Reply(252, "2.5.0", "Cannot VRFY user, but will accept message and attempt delivery")
R_TLS_GO = Reply(220, "2.0.0", "Ready to start TLS")
R_AUTH_OK = Reply(235, "2.7.0", "Authentication successful")
R_AUTH_FAILED = Reply(535, "5.7.8", "Authentication credentials invalid")
R_AUTH_B64 = Reply(501, "5.5.2", "Cannot decode response")
R_AUTH_CANCELLED = Reply(501, "5.0.0", "Authentication cancelled")
R_AUTH_NEEDS_TLS = Reply(538, "5.7.11", "Encryption required for requested authentication mechanism")
R_AUTH_MECH = Reply(504, "5.5.4", "Unrecognized authentication type")
R_UNKNOWN = Reply(500, "5.5.2", "Command unrecognized")
R_TOO_LONG = Reply(500, "5.5.2", "Line too long")
R_BAD_UTF8 = Reply(500, "5.5.2", "Command line is not valid UTF-8")
R_SYNTAX = Reply(501, "5.5.4", "Syntax error in parameters or arguments")
R_NOT_IMPL = Reply(502, "5.5.1", "Command not implemented")
R_SEQUENCE = Reply(503, "5.5.1", "Bad sequence of commands")
R_BAD_PARAM = Reply(555, "5.5.4", "MAIL FROM/RCPT TO parameters not recognized or not implemented")
R_BAD_SENDER = Reply(501, "5.1.7", "Bad sender address syntax")
R_BAD_RCPT = Reply(501, "5.1.3", "Bad recipient address syntax")
R_NON_ASCII = Reply(553, "5.6.7", "Non-ASCII address requires SMTPUTF8")
R_TOO_BIG = Reply(552, "5.3.4", "Message size exceeds fixed maximum message size")
R_TOO_MANY_RCPTS = Reply(452, "4.5.3", "Too many recipients")
R_TOO_MANY_ERRORS = Reply(421, "4.7.0", "Too many errors, closing connection")
R_BINARYMIME_DATA = Reply(503, "5.5.1", "BINARYMIME requires BDAT")
_HELP = Reply(214, "2.0.0", "Commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY HELP "
              "STARTTLS AUTH\nSee RFC 5321")


# --- events ------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Ehlo:
    name: str


@dataclass(frozen=True, slots=True)
class Helo:
    name: str


@dataclass(frozen=True, slots=True)
class MailFrom:
    address: str                 # "" for the null reverse-path <>
    size: int | None             # RFC 1870 SIZE=
    body: str | None             # "7BIT" | "8BITMIME" | "BINARYMIME"
    smtputf8: bool


@dataclass(frozen=True, slots=True)
class RcptTo:
    address: str


@dataclass(frozen=True, slots=True)
class DataStart:
    pass


@dataclass(frozen=True, slots=True)
class DataChunk:
    data: memoryview             # dot-unstuffed; valid until the next receive_data


@dataclass(frozen=True, slots=True)
class DataEnd:
    size: int                    # message octets (after unstuffing)


@dataclass(frozen=True, slots=True)
class BdatStart:
    size: int
    last: bool
    first: bool                  # the transaction's first chunk


@dataclass(frozen=True, slots=True)
class BdatEnd:
    size: int                    # this chunk
    last: bool
    total: int                   # the transaction so far


@dataclass(frozen=True, slots=True)
class DataAborted:
    """Size limit crossed (or the server failed the transaction): the server drops what it
    began; the protocol drains the rest of the data and then answers `reply` itself."""
    reply: Reply


@dataclass(frozen=True, slots=True)
class Rset:
    pass


@dataclass(frozen=True, slots=True)
class Quit:
    pass


@dataclass(frozen=True, slots=True)
class Noop:
    pass


@dataclass(frozen=True, slots=True)
class Help:
    pass


@dataclass(frozen=True, slots=True)
class Vrfy:
    argument: str


@dataclass(frozen=True, slots=True)
class StartTls:
    """220 is queued; write it, then start TLS and call conn.tls_started()."""


@dataclass(frozen=True, slots=True)
class AuthPlain:
    response: bytes              # base64 of authzid NUL user NUL password (b"" for "=")


@dataclass(frozen=True, slots=True)
class AuthLogin:
    username: bytes              # base64
    password: bytes              # base64


@dataclass(frozen=True, slots=True)
class ProtocolError:
    """The protocol refused input; `reply` is already queued."""
    reply: Reply


Event = (Ehlo | Helo | MailFrom | RcptTo | DataStart | DataChunk | DataEnd | BdatStart | BdatEnd
         | DataAborted | Rset | Quit | Noop | Help | Vrfy | StartTls | AuthPlain | AuthLogin
         | ProtocolError)
_NEEDS_REPLY = (MailFrom, RcptTo, DataStart, DataEnd, BdatEnd, AuthPlain, AuthLogin)


# --- states and the transition table ------------------------------------------------------
class State(enum.Enum):
    START = "start"              # before EHLO/HELO (RFC 5321 4.1.4: MAIL needs a greeting)
    GREETED = "greeted"
    MAIL = "mail"                # MAIL accepted, no recipient yet
    RCPT = "rcpt"                # at least one recipient accepted
    BDAT_TXN = "bdat_txn"        # between non-LAST BDAT chunks (RFC 3030)
    DATA = "data"                # streaming DATA octets
    BDAT = "bdat"                # streaming one BDAT chunk
    AUTH_PLAIN = "auth_plain"    # waiting for the PLAIN response line (RFC 4954)
    AUTH_LOGIN_USER = "auth_login_user"
    AUTH_LOGIN_PASS = "auth_login_pass"
    TLS_PENDING = "tls_pending"  # 220 sent for STARTTLS; input ignored until tls_started()
    CLOSED = "closed"            # after QUIT or 421


_ANYTIME = frozenset({"RSET", "NOOP", "QUIT", "HELP", "VRFY", "EHLO", "HELO"})
_ALLOWED: dict[State, frozenset[str]] = {
    State.START: _ANYTIME | {"STARTTLS"},
    State.GREETED: _ANYTIME | {"MAIL", "STARTTLS", "AUTH"},
    State.MAIL: _ANYTIME | {"RCPT"},
    State.RCPT: _ANYTIME | {"RCPT", "DATA", "BDAT"},
    State.BDAT_TXN: _ANYTIME | {"BDAT"},
}
_KNOWN = frozenset({"EHLO", "HELO", "MAIL", "RCPT", "DATA", "BDAT", "RSET", "NOOP", "QUIT",
                    "VRFY", "HELP", "STARTTLS", "AUTH"})
_NOT_IMPLEMENTED = frozenset({"EXPN", "TURN", "ETRN", "SEND", "SOML", "SAML"})
_LINE_STATES = {State.START, State.GREETED, State.MAIL, State.RCPT, State.BDAT_TXN,
                State.AUTH_PLAIN, State.AUTH_LOGIN_USER, State.AUTH_LOGIN_PASS}

_PATH_RE = re.compile(r"^(FROM|TO):\s*<([^<>]*)>(.*)$", re.IGNORECASE | re.DOTALL)
_BDAT_RE = re.compile(r"^(\d{1,19})(?:\s+(LAST))?\s*$", re.IGNORECASE)
_B64_RE = re.compile(rb"^[A-Za-z0-9+/]*={0,2}$")
_CR_VIEW = memoryview(b"\r")


def _check_address(addr: str) -> bool:
    """A mailbox local@domain (RFC 5321 4.1.2, checked loosely: the store decides the rest)."""
    local, at, domain = addr.rpartition("@")
    return bool(at and local and domain) and not any(c in addr for c in " \t\r\n")


class SmtpConnection:
    """One ESMTP session, server side. Nothing here does I/O."""

    def __init__(self, hostname: str, max_size: int = 0, *, max_recipients: int = 100,
                 max_errors: int = 20, tls_available: bool = False, tls_active: bool = False,
                 auth_allowed: bool = False, banner: bool = True,
                 on_reply: Callable[[Reply], None] | None = None) -> None:
        self.hostname = hostname
        self.max_size = max_size                  # 0 = no limit
        self.max_recipients = max_recipients      # 0 = no limit
        self.max_errors = max_errors              # 0 = no limit
        self.tls_available = tls_available
        self.tls_active = tls_active
        self.auth_allowed = auth_allowed          # may a password be sent now (plaintext policy)
        self.authenticated: str | None = None     # set by the server after a good AUTH
        self.on_reply = on_reply
        self.state = State.START
        self.client_name = ""
        self.esmtp = False
        self.errors = 0
        self.mail: MailFrom | None = None
        self.rcpt_count = 0
        self._out = bytearray()
        self._pending: Event | None = None
        # input: the caller's buffer, read from _pos to _end (never copied on the DATA path)
        self._src: bytes | bytearray = b""
        self._pos = 0
        self._end = 0
        self._line = bytearray()                  # a command line split over reads
        self._discard_line = False                # inside an over-long line
        self._login_user = b""
        # message state
        self._tail = (CR, LF)                     # the last two wire bytes before _pos (DATA)
        self._carry = 0                           # 1: "." at line start seen, 2: ".\r" seen
        self._msg_size = 0                        # octets of this message so far
        self._bdat_left = 0
        self._bdat_size = 0
        self._bdat_last = False
        self._resume_state = State.GREETED      # where a BDAT chunk returns to
        self._failure: Reply | None = None        # data is drained, then this is the reply
        if banner:
            self._send(Reply(220, "", f"{hostname} ESMTP relay"))

    # --- output ------------------------------------------------------------------------
    def _send(self, reply: Reply) -> None:
        self._out += reply.render()
        if self.on_reply is not None:
            self.on_reply(reply)

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    @property
    def closed(self) -> bool:
        return self.state is State.CLOSED

    @property
    def in_message(self) -> bool:
        """Receiving message octets (DATA or a BDAT chunk): the data timeout applies."""
        return self.state in (State.DATA, State.BDAT)

    def close_with(self, reply: Reply) -> None:
        """Queue a final reply (e.g. 421 4.4.2 on a timeout) and close."""
        self._send(reply)
        self.state = State.CLOSED

    # --- input -------------------------------------------------------------------------
    def receive_data(self, data: bytes | bytearray | memoryview, end: int | None = None) -> None:
        """Feed bytes; `data[:end]` is read in place and must stay unchanged until
        next_event() returns NEED_DATA. A memoryview of a whole bytes/bytearray is read in
        place too; any other memoryview is copied once."""
        if isinstance(data, memoryview):
            base = data.obj
            if isinstance(base, (bytes, bytearray)) and data.nbytes == len(base) and data.contiguous:
                data = base                       # a view of a whole buffer: read the buffer
            else:
                data = data.tobytes() if end is None else data[:end].tobytes()
                end = None
        if end is None:
            end = len(data)
        if self._pos < self._end:                 # unread input left: join (rare)
            data = bytes(self._src[self._pos:self._end]) + bytes(data[:end])
            end = len(data)
        self._src, self._pos, self._end = data, 0, end

    def next_event(self) -> Event | _Sentinel:
        while True:
            if self._pending is not None:
                return PAUSED
            st = self.state
            if st is State.CLOSED or st is State.TLS_PENDING:
                self._pos = self._end             # RFC 3207 5: nothing read before TLS counts
                return NEED_DATA
            if st is State.DATA:
                ev = self._data_step()
            elif st is State.BDAT:
                ev = self._bdat_step()
            else:
                line = self._read_line()
                if line is None:
                    return NEED_DATA
                ev = self._handle_line(line)
            if ev is NEED_DATA:
                return NEED_DATA
            if ev is not None:
                assert not isinstance(ev, _Sentinel)
                if isinstance(ev, _NEEDS_REPLY):
                    self._pending = ev
                return ev

    def _read_line(self) -> bytes | _Sentinel | None:
        """The next command line without its line ending, or None (need more bytes)."""
        src, pos, end = self._src, self._pos, self._end
        while pos < end:
            k = src.find(b"\n", pos, end)
            stop = end if k < 0 else k + 1
            if self._discard_line:
                pos = stop
                if k >= 0:
                    self._discard_line = False
                continue
            if len(self._line) + (stop - pos) > MAX_AUTH_LINE:
                self._pos = stop
                self._line.clear()
                self._discard_line = k < 0
                return _LINE_TOO_LONG
            self._line += src[pos:stop]
            pos = stop
            if k >= 0:
                self._pos = pos
                line = bytes(self._line)
                self._line.clear()
                return line.rstrip(b"\r\n")
        self._pos = pos
        return None

    # --- commands ----------------------------------------------------------------------
    def _error(self, reply: Reply) -> ProtocolError:
        self.errors += 1
        self._send(reply)
        if self.max_errors and self.errors >= self.max_errors and self.state is not State.CLOSED:
            self.close_with(R_TOO_MANY_ERRORS)
        return ProtocolError(reply)

    def _reset_transaction(self) -> None:
        self.mail = None
        self.rcpt_count = 0
        self._msg_size = 0
        self._failure = None
        if self.state in (State.MAIL, State.RCPT, State.BDAT_TXN, State.DATA, State.BDAT):
            self.state = State.GREETED

    def _handle_line(self, raw: bytes | _Sentinel) -> Event | None:
        if isinstance(raw, _Sentinel):
            self._auth_done()
            return self._error(R_TOO_LONG)
        if self.state in (State.AUTH_PLAIN, State.AUTH_LOGIN_USER, State.AUTH_LOGIN_PASS):
            return self._sasl_line(raw.strip())
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            return self._error(R_BAD_UTF8)
        verb, _, arg = line.partition(" ")
        verb = verb.upper()
        arg = arg.strip()
        limit = (MAX_AUTH_LINE if verb == "AUTH" else MAX_PARAM_LINE if verb in ("MAIL", "RCPT")
                 else MAX_COMMAND_LINE)
        if len(raw) + 2 > limit:
            return self._error(R_TOO_LONG)
        if verb not in _KNOWN:
            return self._error(R_NOT_IMPL if verb in _NOT_IMPLEMENTED else R_UNKNOWN)
        if verb not in _ALLOWED[self.state]:
            if verb == "BDAT":
                return self._bdat_refused(arg, R_SEQUENCE)
            return self._error(R_SEQUENCE)
        handler: Callable[[str], Event | None] = getattr(self, f"_cmd_{verb.lower()}")
        return handler(arg)

    def _greet(self, arg: str, esmtp: bool) -> Event | None:
        if not arg:
            return self._error(R_SYNTAX)
        self._reset_transaction()
        self.state = State.GREETED
        self.client_name = arg.split()[0]
        self.esmtp = esmtp
        if not esmtp:
            self._send(Reply(250, "", self.hostname))
            return Helo(self.client_name)
        caps = [f"{self.hostname} Hello {self.client_name}",
                f"SIZE {self.max_size}" if self.max_size else "SIZE",
                "PIPELINING", "8BITMIME", "BINARYMIME", "CHUNKING", "ENHANCEDSTATUSCODES",
                "SMTPUTF8"]
        if self.tls_available and not self.tls_active:
            caps.append("STARTTLS")
        if self.auth_allowed and self.authenticated is None:
            caps.append("AUTH PLAIN LOGIN")
        caps.append("HELP")
        self._send(Reply(250, "", "\n".join(caps)))
        return Ehlo(self.client_name)

    def _cmd_ehlo(self, arg: str) -> Event | None:
        return self._greet(arg, True)

    def _cmd_helo(self, arg: str) -> Event | None:
        return self._greet(arg, False)

    def _cmd_rset(self, arg: str) -> Event | None:
        if arg:
            return self._error(R_SYNTAX)
        self._reset_transaction()
        self._send(R_OK)
        return Rset()

    def _cmd_noop(self, arg: str) -> Event | None:
        self._send(R_OK)                          # RFC 5321 4.1.1.9: a parameter is ignored
        return Noop()

    def _cmd_quit(self, arg: str) -> Event | None:
        if arg:
            return self._error(R_SYNTAX)
        self.close_with(R_BYE)
        return Quit()

    def _cmd_help(self, arg: str) -> Event | None:
        self._send(_HELP)
        return Help()

    def _cmd_vrfy(self, arg: str) -> Event | None:
        if not arg:
            return self._error(R_SYNTAX)
        self._send(R_VRFY)                        # RFC 5321 3.5.3: 252 when not verifying
        return Vrfy(arg)

    def _cmd_starttls(self, arg: str) -> Event | None:
        if arg:
            return self._error(R_SYNTAX)
        if not self.tls_available:
            return self._error(R_NOT_IMPL)
        if self.tls_active:
            return self._error(R_SEQUENCE)
        self._send(R_TLS_GO)
        self.state = State.TLS_PENDING
        self._pos = self._end                     # drop anything pipelined after STARTTLS
        return StartTls()

    def tls_started(self) -> None:
        """RFC 3207 4.2: after the handshake the session starts over (EHLO again)."""
        self.tls_active = True
        self.auth_allowed = True
        self.state = State.START
        self._reset_transaction()
        self.esmtp = False

    def _cmd_mail(self, arg: str) -> Event | None:
        m = _PATH_RE.match(arg)
        if not m or m.group(1).upper() != "FROM":
            return self._error(R_SYNTAX)
        address, params = m.group(2).strip(), m.group(3).split()
        size: int | None = None
        body: str | None = None
        smtputf8 = False
        for p in params:
            key, eq, value = p.partition("=")
            key = key.upper()
            if key == "SIZE" and eq and value.isdigit() and len(value) <= 20:
                size = int(value)
            elif key == "BODY" and value.upper() in ("7BIT", "8BITMIME", "BINARYMIME"):
                body = value.upper()
            elif key == "SMTPUTF8" and not eq:
                smtputf8 = True
            elif key == "AUTH" and eq:            # RFC 4954 5: accepted, not trusted
                pass
            elif key in ("SIZE", "BODY", "SMTPUTF8", "AUTH"):
                return self._error(R_SYNTAX)
            else:
                return self._error(R_BAD_PARAM)
        if address and not _check_address(address):
            return self._error(R_BAD_SENDER)
        if not smtputf8 and not address.isascii():
            return self._error(R_NON_ASCII)
        if size is not None and self.max_size and size > self.max_size:
            return self._error(R_TOO_BIG)         # RFC 1870 6.1
        return MailFrom(address, size, body, smtputf8)

    def _cmd_rcpt(self, arg: str) -> Event | None:
        m = _PATH_RE.match(arg)
        if not m or m.group(1).upper() != "TO":
            return self._error(R_SYNTAX)
        address, params = m.group(2).strip(), m.group(3).split()
        if params:
            return self._error(R_BAD_PARAM)
        if address.lower() != "postmaster" and not _check_address(address):
            return self._error(R_BAD_RCPT)
        if not address.isascii() and not (self.mail and self.mail.smtputf8):
            return self._error(R_NON_ASCII)
        if self.max_recipients and self.rcpt_count >= self.max_recipients:
            self._send(R_TOO_MANY_RCPTS)          # RFC 5321 4.5.3.1.10; not an error count
            return None
        return RcptTo(address)

    def _cmd_data(self, arg: str) -> Event | None:
        if arg:
            return self._error(R_SYNTAX)
        if self.mail is not None and self.mail.body == "BINARYMIME":
            return self._error(R_BINARYMIME_DATA)  # RFC 3030 3
        return DataStart()

    def _parse_bdat(self, arg: str) -> tuple[int, bool] | None:
        m = _BDAT_RE.match(arg)
        if not m:
            return None
        return int(m.group(1)), m.group(2) is not None

    def _bdat_refused(self, arg: str, reply: Reply) -> Event | None:
        """RFC 3030: a refused BDAT's octets still follow on the wire: drain them, then reply.
        Not counted against max_errors: chunks pipelined after a failed one are legitimate
        (RFC 3030 4.2), and draining costs us only reading."""
        parsed = self._parse_bdat(arg)
        if parsed is None:
            return self._error(R_SYNTAX)
        self._start_bdat(parsed[0], parsed[1], failure=reply)
        return None

    def _cmd_bdat(self, arg: str) -> Event | None:
        parsed = self._parse_bdat(arg)
        if parsed is None:
            return self._error(R_SYNTAX)
        size, last = parsed
        first = self.state is State.RCPT
        if self.max_size and self._msg_size + size > self.max_size:
            self._start_bdat(size, last, failure=R_TOO_BIG)
            return DataAborted(R_TOO_BIG)
        self._start_bdat(size, last, failure=None)
        return BdatStart(size, last, first)

    def _start_bdat(self, size: int, last: bool, failure: Reply | None) -> None:
        self._bdat_left = self._bdat_size = size
        self._bdat_last = last
        self._failure = failure
        self._resume_state = self.state
        self.state = State.BDAT

    def _cmd_auth(self, arg: str) -> Event | None:
        if not self.esmtp or self.authenticated is not None:
            return self._error(R_SEQUENCE)
        mech, _, initial = arg.partition(" ")
        mech, initial = mech.upper(), initial.strip()
        if mech not in ("PLAIN", "LOGIN"):
            return self._error(R_AUTH_MECH if mech else R_SYNTAX)
        if not self.auth_allowed:
            return self._error(R_AUTH_NEEDS_TLS)
        if initial and not _B64_RE.match(initial.encode()) and initial != "=":
            return self._error(R_AUTH_B64)
        if mech == "PLAIN":
            if initial:
                return AuthPlain(b"" if initial == "=" else initial.encode())
            self.state = State.AUTH_PLAIN
            self._send(Reply(334, "", ""))
            return None
        if initial:
            self._login_user = initial.encode()
            self.state = State.AUTH_LOGIN_PASS
            self._send(Reply(334, "", "UGFzc3dvcmQ6"))
        else:
            self.state = State.AUTH_LOGIN_USER
            self._send(Reply(334, "", "VXNlcm5hbWU6"))
        return None

    def _auth_done(self) -> None:
        if self.state in (State.AUTH_PLAIN, State.AUTH_LOGIN_USER, State.AUTH_LOGIN_PASS):
            self.state = State.GREETED
        self._login_user = b""

    def _sasl_line(self, line: bytes) -> Event | None:
        st = self.state
        if line == b"*":                          # RFC 4954 4: the client cancels
            self._auth_done()
            return self._error(R_AUTH_CANCELLED)
        if not _B64_RE.match(line):
            self._auth_done()
            return self._error(R_AUTH_B64)
        if st is State.AUTH_PLAIN:
            self._auth_done()
            return AuthPlain(line)
        if st is State.AUTH_LOGIN_USER:
            self._login_user = line
            self.state = State.AUTH_LOGIN_PASS
            self._send(Reply(334, "", "UGFzc3dvcmQ6"))
            return None
        user = self._login_user
        self._auth_done()
        return AuthLogin(user, line)

    # --- the server's decisions ------------------------------------------------------------
    def reply(self, reply: Reply) -> None:
        """Answer the pending event; the state moves on according to the reply."""
        ev = self._pending
        if ev is None:
            raise RuntimeError("no event awaits a reply")
        self._pending = None
        if reply.code >= 500:
            self.errors += 1
        self._send(reply)
        if isinstance(ev, MailFrom):
            if reply.ok:
                self.mail = ev
                self.rcpt_count = 0
                self.state = State.MAIL
        elif isinstance(ev, RcptTo):
            if reply.ok:
                self.rcpt_count += 1
                self.state = State.RCPT
        elif isinstance(ev, DataStart):
            if reply.code == 354:
                self.state = State.DATA
                self._tail = (CR, LF)             # "DATA\r\n.\r\n" is an empty message
                self._carry = 0
                self._msg_size = 0
                self._failure = None
        elif isinstance(ev, DataEnd):
            self._reset_transaction()
        elif isinstance(ev, BdatEnd):
            if ev.last or not reply.ok:
                self._reset_transaction()
            else:
                self.state = State.BDAT_TXN
        elif (isinstance(ev, (AuthPlain, AuthLogin)) and reply.code == 235
              and self.authenticated is None):
            self.authenticated = ""               # the server sets the user name first
        if self.max_errors and self.errors >= self.max_errors and self.state is not State.CLOSED:
            self.close_with(R_TOO_MANY_ERRORS)

    def fail_message(self, reply: Reply) -> None:
        """The server cannot keep this message (store error...): the rest of the data is
        drained and then answered with `reply`. Call it while in_message."""
        if self.in_message and self._failure is None:
            self._failure = reply

    # --- message octets ----------------------------------------------------------------
    def _chunk(self, a: int, b: int) -> Event | None:
        """Octets src[a:b] of the message: a DataChunk, or nothing when draining."""
        if a == b or self._failure is not None:
            return None
        self._msg_size += b - a
        if self.max_size and self._msg_size > self.max_size:
            self._failure = R_TOO_BIG
            return DataAborted(R_TOO_BIG)
        return DataChunk(memoryview(self._src)[a:b])

    def _set_tail(self, a: int, b: int) -> None:
        src = self._src
        if b - a >= 2:
            self._tail = (src[b - 2], src[b - 1])
        elif b - a == 1:
            self._tail = (self._tail[1], src[b - 1])

    def _end_of_data(self) -> Event | None:
        if self._failure is not None:
            reply = self._failure
            self._reset_transaction()
            self._send(reply)
            return None
        return DataEnd(self._msg_size)

    def _data_step(self) -> Event | _Sentinel | None:
        src, end = self._src, self._end
        pos = self._pos
        if pos >= end:
            return NEED_DATA
        if self._carry:                           # a line-start "." or ".\r" ended the last read
            c = src[pos]
            if self._carry == 1:
                if c == CR:
                    self._carry, self._pos, self._tail = 2, pos + 1, (DOT, CR)
                    return None
                self._carry = 0                   # stuffed dot: dropped
            else:
                self._carry = 0
                if c == LF:
                    self._pos = pos + 1
                    return self._end_of_data()
                self._tail = (DOT, CR)            # stuffed dot dropped, its "\r" is content
                if self._failure is not None:
                    return None
                self._msg_size += 1
                if self.max_size and self._msg_size > self.max_size:
                    self._failure = R_TOO_BIG
                    return DataAborted(R_TOO_BIG)
                return DataChunk(_CR_VIEW)
        i = pos
        misses = 0
        while True:
            if misses < 16:
                j = src.find(b".", i, end)
            else:                                 # dense dots (text): find line starts instead
                k = src.find(b"\n.", i - 1, end)
                j = k + 1 if k >= 0 else -1
            if j < 0:
                self._set_tail(pos, end)
                self._pos = end
                return self._chunk(pos, end)
            if j >= pos + 2:
                bol = src[j - 1] == LF and src[j - 2] == CR
            elif j == pos + 1:
                bol = src[j - 1] == LF and self._tail[1] == CR
            else:
                bol = self._tail == (CR, LF)
            if not bol:
                misses += 1
                i = j + 1
                continue
            if j > pos:                           # the content before this line-start dot
                self._set_tail(pos, j)
                self._pos = j
                return self._chunk(pos, j)
            if j + 1 >= end:
                self._carry, self._pos, self._tail = 1, end, (LF, DOT)
                return NEED_DATA
            if src[j + 1] == CR:
                if j + 2 >= end:
                    self._carry, self._pos, self._tail = 2, end, (DOT, CR)
                    return NEED_DATA
                if src[j + 2] == LF:
                    self._pos = j + 3
                    return self._end_of_data()
            # a stuffed dot (RFC 5321 4.5.2): drop it, go on after it
            pos = i = self._pos = j + 1
            self._tail = (LF, DOT)

    def _bdat_step(self) -> Event | _Sentinel | None:
        if self._bdat_left:
            pos = self._pos
            n = min(self._bdat_left, self._end - pos)
            if n <= 0:
                return NEED_DATA
            self._pos = pos + n
            self._bdat_left -= n
            return self._chunk(pos, pos + n)
        last = self._bdat_last
        self.state = self._resume_state if self._resume_state is not State.RCPT else State.BDAT_TXN
        if self._failure is not None:
            reply = self._failure
            self._failure = None
            if self._resume_state in (State.RCPT, State.BDAT_TXN):
                self._reset_transaction()
            else:
                self.state = self._resume_state
            self._send(reply)
            if self.max_errors and self.errors >= self.max_errors:
                self.close_with(R_TOO_MANY_ERRORS)
            return None
        return BdatEnd(self._bdat_size, last, self._msg_size)
