"""Pure-bytes tests of the sans-IO SMTP state machine (relay.protocol.smtp): no sockets."""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.protocol import smtp as P
from relay.protocol.smtp import NEED_DATA, PAUSED, Reply, SmtpConnection

Decide = Callable[[P.Event], Reply]


def default_decide(ev: P.Event) -> Reply:
    if isinstance(ev, P.DataStart):
        return P.R_354
    if isinstance(ev, P.BdatEnd):
        return Reply(250, "2.0.0", f"{ev.size} octets received" if not ev.last else "queued")
    if isinstance(ev, P.DataEnd):
        return Reply(250, "2.0.0", "queued")
    if isinstance(ev, (P.AuthPlain, P.AuthLogin)):
        return P.R_AUTH_OK
    return P.R_OK


class Session:
    """Feeds bytes, answers events with `decide`, records events, replies and message bodies."""

    def __init__(self, decide: Decide = default_decide, **kw: object) -> None:
        kw.setdefault("max_size", 10_000)
        self.conn = SmtpConnection("relay.test", **kw)  # type: ignore[arg-type]
        self.decide = decide
        self.events: list[P.Event] = []
        self.body = bytearray()
        self.messages: list[bytes] = []
        self.out = self.conn.data_to_send()

    def feed(self, *chunks: bytes) -> bytes:
        """Feed each chunk in turn; return the replies written meanwhile."""
        start = len(self.out)
        for c in chunks:
            self.conn.receive_data(bytearray(c))    # a mutable buffer, like the server's
            self.drain()
        return self.out[start:]

    def drain(self) -> None:
        while True:
            ev = self.conn.next_event()
            if ev is NEED_DATA:
                break
            assert ev is not PAUSED
            assert not isinstance(ev, P._Sentinel)
            if isinstance(ev, P.DataChunk):
                self.body += ev.data
                continue
            self.events.append(ev)
            if isinstance(ev, (P.DataStart, P.BdatStart)) and not (
                    isinstance(ev, P.BdatStart) and not ev.first):
                self.body.clear()
            if isinstance(ev, P.DataEnd) or (isinstance(ev, P.BdatEnd) and ev.last):
                self.messages.append(bytes(self.body))
            if isinstance(ev, P._NEEDS_REPLY):
                assert self.conn.next_event() is PAUSED
                self.conn.reply(self.decide(ev))
        self.out += self.conn.data_to_send()

    def codes(self, data: bytes | None = None) -> list[str]:
        """'250 2.0.0' for each final reply line in `data` (default: all output after banner)."""
        text = (self.out if data is None else data).decode()
        return [m.group(1) + (" " + m.group(2) if m.group(2) else "")
                for m in re.finditer(r"^(\d{3}) (\d\.\d{1,3}\.\d{1,3})?", text, re.MULTILINE)]


def txn(s: Session) -> None:
    s.feed(b"EHLO c.test\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\n")


# --- replies -------------------------------------------------------------------------------
def test_reply_render_single_and_multiline() -> None:
    assert Reply(250, "2.0.0", "OK").render() == b"250 2.0.0 OK\r\n"
    assert Reply(250, "", "a\nb\nc").render() == b"250-a\r\n250-b\r\n250 c\r\n"
    assert Reply(452, "4.2.2", "x\ny").render() == b"452-4.2.2 x\r\n452 4.2.2 y\r\n"
    assert Reply(334, "", "").render() == b"334 \r\n"


def test_banner() -> None:
    s = Session()
    assert s.out == b"220 relay.test ESMTP relay\r\n"


def test_ehlo_capabilities() -> None:
    s = Session(max_size=4096)
    out = s.feed(b"EHLO client.test\r\n").decode()
    lines = out.split("\r\n")
    assert lines[0] == "250-relay.test Hello client.test"
    for cap in ("SIZE 4096", "PIPELINING", "8BITMIME", "BINARYMIME", "CHUNKING",
                "ENHANCEDSTATUSCODES", "SMTPUTF8"):
        assert f"250-{cap}" in lines
    assert lines[-2] == "250 HELP"
    assert "STARTTLS" not in out and "AUTH" not in out
    assert s.events == [P.Ehlo("client.test")]


def test_ehlo_advertises_starttls_and_auth_when_allowed() -> None:
    s = Session(tls_available=True, auth_allowed=True)
    out = s.feed(b"EHLO c\r\n").decode()
    assert "250-STARTTLS" in out and "250-AUTH PLAIN LOGIN" in out


def test_helo() -> None:
    s = Session()
    assert s.feed(b"HELO c.test\r\n") == b"250 relay.test\r\n"
    assert s.events == [P.Helo("c.test")]


@pytest.mark.parametrize("line", [b"EHLO", b"HELO", b"EHLO   "])
def test_greeting_needs_argument(line: bytes) -> None:
    s = Session()
    assert s.codes(s.feed(line + b"\r\n")) == ["501 5.5.4"]


# --- a whole transaction -----------------------------------------------------------------------
def test_data_transaction() -> None:
    s = Session()
    out = s.feed(b"EHLO c\r\n", b"MAIL FROM:<a@x.test> SIZE=100 BODY=8BITMIME\r\n",
                 b"RCPT TO:<b@y.test>\r\n", b"RCPT TO:<c@y.test>\r\n", b"DATA\r\n",
                 b"Subject: hi\r\n\r\nline\r\n..dot\r\n.\r\n", b"QUIT\r\n")
    assert s.codes(out)[1:] == ["250 2.0.0"] * 3 + ["354", "250 2.0.0", "221 2.0.0"]
    assert s.messages == [b"Subject: hi\r\n\r\nline\r\n.dot\r\n"]
    mail = s.events[1]
    assert mail == P.MailFrom("a@x.test", 100, "8BITMIME", False)
    assert s.conn.closed


def test_pipelined_commands_answered_in_order() -> None:
    s = Session()
    out = s.feed(b"EHLO c\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nRCPT TO:<bad>\r\n"
                 b"RCPT TO:<c@y.test>\r\nDATA\r\n")
    assert s.codes(out)[1:] == ["250 2.0.0", "250 2.0.0", "501 5.1.3", "250 2.0.0", "354"]


def test_pipelined_mail_after_end_of_data() -> None:
    s = Session()
    txn(s)
    out = s.feed(b"DATA\r\n", b"x\r\n.\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<z@y.test>\r\nDATA\r\n"
                 b"y\r\n.\r\nQUIT\r\n")
    assert s.codes(out) == ["354", "250 2.0.0", "250 2.0.0", "250 2.0.0", "354", "250 2.0.0",
                            "221 2.0.0"]
    assert s.messages == [b"x\r\n", b"y\r\n"]


def test_next_event_pauses_until_reply() -> None:
    conn = SmtpConnection("relay.test")
    conn.receive_data(b"EHLO c\r\nMAIL FROM:<a@x.test>\r\nNOOP\r\n")
    assert isinstance(conn.next_event(), P.Ehlo)
    assert isinstance(conn.next_event(), P.MailFrom)
    assert conn.next_event() is PAUSED
    assert conn.next_event() is PAUSED
    conn.reply(P.R_OK)
    assert isinstance(conn.next_event(), P.Noop)
    assert conn.next_event() is NEED_DATA
    with pytest.raises(RuntimeError):
        conn.reply(P.R_OK)


def test_rejected_mail_keeps_state() -> None:
    s = Session(decide=lambda ev: Reply(451, "4.3.0", "no") if isinstance(ev, P.MailFrom)
                else default_decide(ev))
    out = s.feed(b"EHLO c\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\n")
    assert s.codes(out)[1:] == ["451 4.3.0", "503 5.5.1"]


def test_rejected_recipients_then_data_is_bad_sequence() -> None:
    s = Session(decide=lambda ev: Reply(550, "5.1.1", "unknown") if isinstance(ev, P.RcptTo)
                else default_decide(ev))
    out = s.feed(b"EHLO c\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\n")
    assert s.codes(out)[1:] == ["250 2.0.0", "550 5.1.1", "503 5.5.1"]


def test_null_sender_and_postmaster() -> None:
    s = Session()
    out = s.feed(b"EHLO c\r\nMAIL FROM:<>\r\nRCPT TO:<Postmaster>\r\n")
    assert s.codes(out)[1:] == ["250 2.0.0", "250 2.0.0"]
    assert s.events[1] == P.MailFrom("", None, None, False)


def test_mail_from_lenient_space_and_case() -> None:
    s = Session()
    out = s.feed(b"ehlo c\r\nmail from: <A@X.test> smtputf8 body=binarymime\r\n")
    assert s.codes(out)[1:] == ["250 2.0.0"]
    assert s.events[1] == P.MailFrom("A@X.test", None, "BINARYMIME", True)


# --- sequence errors (503 5.5.1) --------------------------------------------------------------
@pytest.mark.parametrize("lines", [
    b"MAIL FROM:<a@x.test>\r\n",                                   # before EHLO
    b"EHLO c\r\nRCPT TO:<b@y.test>\r\n",                           # RCPT without MAIL
    b"EHLO c\r\nDATA\r\n",                                         # DATA without MAIL
    b"EHLO c\r\nMAIL FROM:<a@x.test>\r\nDATA\r\n",                 # DATA without RCPT
    b"EHLO c\r\nMAIL FROM:<a@x.test>\r\nMAIL FROM:<a@x.test>\r\n",  # nested MAIL
    b"HELO c\r\nAUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n",              # AUTH after HELO
])
def test_bad_sequence(lines: bytes) -> None:
    s = Session(auth_allowed=True)
    assert s.codes(s.feed(lines))[-1] == "503 5.5.1"


def test_auth_in_transaction_is_bad_sequence() -> None:
    s = Session(auth_allowed=True)
    txn(s)
    assert s.codes(s.feed(b"AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n")) == ["503 5.5.1"]


def test_auth_twice_is_bad_sequence() -> None:
    s = Session(auth_allowed=True)
    s.feed(b"EHLO c\r\nAUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n")
    assert s.codes(s.feed(b"AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n")) == ["503 5.5.1"]


# --- syntax errors --------------------------------------------------------------------------
@pytest.mark.parametrize("line,code", [
    (b"FOO bar", "500 5.5.2"),
    (b"", "500 5.5.2"),
    (b"EXPN list", "502 5.5.1"),
    (b"MAIL a@x.test", "501 5.5.4"),
    (b"MAIL TO:<a@x.test>", "501 5.5.4"),
    (b"MAIL FROM:a@x.test", "501 5.5.4"),
    (b"MAIL FROM:<a@x.test> SIZE=abc", "501 5.5.4"),
    (b"MAIL FROM:<a@x.test> SIZE=", "501 5.5.4"),
    (b"MAIL FROM:<a@x.test> BODY=9BIT", "501 5.5.4"),
    (b"MAIL FROM:<a@x.test> SMTPUTF8=yes", "501 5.5.4"),
    (b"MAIL FROM:<a@x.test> RET=FULL", "555 5.5.4"),
    (b"MAIL FROM:<a@x.test> FOO", "555 5.5.4"),
    (b"MAIL FROM:<nodomain>", "501 5.1.7"),
    (b"MAIL FROM:<@x.test>", "501 5.1.7"),
    (b"MAIL FROM:<a b@x.test>", "501 5.1.7"),
    (b"MAIL FROM:<a@x.test> SIZE=10001", "552 5.3.4"),
    ("MAIL FROM:<j\u00f6rg@x.test>".encode(), "553 5.6.7"),
    (b"MAIL FROM:<a@x.test\xff>", "500 5.5.2"),
    (b"RSET now", "501 5.5.4"),
    (b"QUIT now", "501 5.5.4"),
    (b"VRFY", "501 5.5.4"),
    (b"STARTTLS", "502 5.5.1"),
])
def test_syntax_errors(line: bytes, code: str) -> None:
    s = Session()
    if not line.startswith((b"EHLO", b"HELO")):
        s.feed(b"EHLO c\r\n")
    assert s.codes(s.feed(line + b"\r\n"))[-1] == code


@pytest.mark.parametrize("line,code", [
    (b"RCPT TO:<nodomain>", "501 5.1.3"),
    (b"RCPT FROM:<b@y.test>", "501 5.5.4"),
    (b"RCPT TO:b@y.test", "501 5.5.4"),
    (b"RCPT TO:<b@y.test> NOTIFY=NEVER", "555 5.5.4"),
    ("RCPT TO:<j\u00f6rg@y.test>".encode(), "553 5.6.7"),
])
def test_rcpt_syntax_errors(line: bytes, code: str) -> None:
    s = Session()
    s.feed(b"EHLO c\r\nMAIL FROM:<a@x.test>\r\n")
    assert s.codes(s.feed(line + b"\r\n")) == [code]


def test_smtputf8_addresses_accepted() -> None:
    s = Session()
    out = s.feed("EHLO c\r\nMAIL FROM:<j\u00f6rg@x.test> SMTPUTF8\r\nRCPT TO:<m\u00fcller@y.test>\r\n"
                 .encode())
    assert s.codes(out)[1:] == ["250 2.0.0", "250 2.0.0"]
    assert s.events[2] == P.RcptTo("m\u00fcller@y.test")


def test_data_with_argument_is_syntax_error() -> None:
    s = Session()
    txn(s)
    assert s.codes(s.feed(b"DATA now\r\n")) == ["501 5.5.4"]


def test_bare_lf_command_lines_accepted() -> None:
    s = Session()
    assert s.codes(s.feed(b"EHLO c\nNOOP\n")) == ["250", "250 2.0.0"]


# --- simple commands -----------------------------------------------------------------------
def test_noop_rset_help_vrfy_quit() -> None:
    s = Session()
    out = s.feed(b"NOOP\r\nNOOP ignored\r\nHELP\r\nVRFY alice\r\nRSET\r\nQUIT\r\n")
    assert s.codes(out) == ["250 2.0.0", "250 2.0.0", "214 2.0.0", "252 2.5.0", "250 2.0.0",
                            "221 2.0.0"]
    assert [type(e) for e in s.events] == [P.Noop, P.Noop, P.Help, P.Vrfy, P.Rset, P.Quit]
    assert s.conn.closed


def test_input_after_quit_ignored() -> None:
    s = Session()
    s.feed(b"QUIT\r\n")
    assert s.feed(b"NOOP\r\n") == b""


def test_rset_clears_transaction() -> None:
    s = Session()
    txn(s)
    out = s.feed(b"RSET\r\nRCPT TO:<b@y.test>\r\nMAIL FROM:<a@x.test>\r\n")
    assert s.codes(out) == ["250 2.0.0", "503 5.5.1", "250 2.0.0"]


def test_ehlo_resets_transaction() -> None:
    s = Session()
    txn(s)
    out = s.feed(b"EHLO again\r\nDATA\r\n")
    assert s.codes(out)[-1] == "503 5.5.1"


# --- line length bounds -------------------------------------------------------------------------
def test_command_line_512_ok_513_refused() -> None:
    s = Session()
    ok = b"NOOP " + b"x" * (512 - 7) + b"\r\n"
    assert len(ok) == 512
    assert s.codes(s.feed(ok)) == ["250 2.0.0"]
    bad = b"NOOP " + b"x" * (513 - 7) + b"\r\n"
    assert s.codes(s.feed(bad)) == ["500 5.5.2"]


def test_mail_line_may_use_1024() -> None:
    s = Session()
    s.feed(b"EHLO c\r\n")
    local = b"a" * (1024 - len(b"MAIL FROM:<@x.test>\r\n"))
    assert s.codes(s.feed(b"MAIL FROM:<" + local + b"@x.test>\r\n")) == ["250 2.0.0"]
    s.feed(b"RSET\r\n")
    assert s.codes(s.feed(b"MAIL FROM:<a" + local + b"@x.test>\r\n")) == ["500 5.5.2"]


def test_huge_line_refused_at_once_without_buffering() -> None:
    s = Session()
    out = s.feed(b"NOOP " + b"x" * 20000)            # no line end yet
    assert s.codes(out) == ["500 5.5.2"]               # answered before the line ends
    for _ in range(100):
        assert s.feed(b"y" * 100_000) == b""
        assert len(s.conn._line) == 0
    out = s.feed(b"zz\r\nNOOP\r\n")                      # the rest of the long line is dropped
    assert s.codes(out) == ["250 2.0.0"]


def test_auth_line_may_be_long() -> None:
    s = Session(auth_allowed=True)
    s.feed(b"EHLO c\r\n")
    out = s.feed(b"AUTH PLAIN " + b"A" * 8000 + b"\r\n")
    assert s.codes(out) == ["235 2.7.0"]


def test_line_split_across_reads() -> None:
    s = Session()
    out = s.feed(b"EH", b"LO c\r", b"\nNO", b"OP\r\n")
    assert s.codes(out) == ["250", "250 2.0.0"]


# --- limits ---------------------------------------------------------------------------------------
def test_max_recipients() -> None:
    s = Session(max_recipients=2)
    out = s.feed(b"EHLO c\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nRCPT TO:<c@y.test>\r\n"
                 b"RCPT TO:<d@y.test>\r\nDATA\r\n")
    assert s.codes(out)[1:] == ["250 2.0.0", "250 2.0.0", "250 2.0.0", "452 4.5.3", "354"]


def test_max_errors_closes_with_421() -> None:
    s = Session(max_errors=3)
    out = s.feed(b"FOO\r\nBAR\r\nBAZ\r\nNOOP\r\n")
    assert s.codes(out) == ["500 5.5.2", "500 5.5.2", "500 5.5.2", "421 4.7.0"]
    assert s.conn.closed


def test_server_rejections_count_as_errors() -> None:
    s = Session(max_errors=2, decide=lambda ev: Reply(550, "5.1.1", "no")
                if isinstance(ev, P.RcptTo) else default_decide(ev))
    out = s.feed(b"EHLO c\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nRCPT TO:<c@y.test>\r\n")
    assert s.codes(out)[-2:] == ["550 5.1.1", "421 4.7.0"]


def test_size_limit_while_streaming_data() -> None:
    s = Session(max_size=100)
    txn(s)
    out = s.feed(b"DATA\r\n", b"x" * 60 + b"\r\n", b"y" * 60 + b"\r\n", b"z" * 500 + b"\r\n.\r\n",
                 b"NOOP\r\n")
    assert s.codes(out) == ["354", "552 5.3.4", "250 2.0.0"]
    assert [e for e in s.events if isinstance(e, P.DataAborted)] == [P.DataAborted(P.R_TOO_BIG)]
    assert not any(isinstance(e, P.DataEnd) for e in s.events)
    assert len(s.body) <= 100
    # the session stays usable: a new transaction works
    out = s.feed(b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\nsmall\r\n.\r\n")
    assert s.codes(out) == ["250 2.0.0", "250 2.0.0", "354", "250 2.0.0"]
    assert s.messages[-1] == b"small\r\n"


def test_size_exactly_at_limit_accepted() -> None:
    s = Session(max_size=10)
    txn(s)
    out = s.feed(b"DATA\r\n12345678\r\n.\r\n")
    assert s.codes(out) == ["354", "250 2.0.0"]


def test_server_fail_message_drains_then_replies() -> None:
    s = Session()
    txn(s)
    s.feed(b"DATA\r\nfirst part\r\n")
    s.conn.fail_message(Reply(451, "4.3.0", "store error"))
    out = s.feed(b"more\r\n.\r\nNOOP\r\n")
    assert s.codes(out) == ["451 4.3.0", "250 2.0.0"]
    assert s.body == b"first part\r\n"


# --- BDAT (RFC 3030) --------------------------------------------------------------------------------
def test_bdat_single_last() -> None:
    s = Session()
    txn(s)
    out = s.feed(b"BDAT 5 LAST\r\nhello")
    assert s.codes(out) == ["250 2.0.0"]
    assert s.messages == [b"hello"]
    start = [e for e in s.events if isinstance(e, P.BdatStart)]
    assert start == [P.BdatStart(5, True, True)]


def test_bdat_pipelined_chunks_no_unstuffing() -> None:
    s = Session()
    txn(s)
    out = s.feed(b"BDAT 7\r\n.\r\n..\r\nBDAT 3\r\nabcBDAT 0 LAST\r\nQUIT\r\n")
    assert s.codes(out) == ["250 2.0.0"] * 3 + ["221 2.0.0"]
    assert s.messages == [b".\r\n..\r\nabc"]
    ends = [e for e in s.events if isinstance(e, P.BdatEnd)]
    assert ends == [P.BdatEnd(7, False, 7), P.BdatEnd(3, False, 10), P.BdatEnd(0, True, 10)]


def test_bdat_chunk_split_over_reads() -> None:
    s = Session()
    txn(s)
    out = s.feed(b"BDAT 10 LAST\r\n012", b"3456", b"789NOOP\r\n")
    assert s.codes(out) == ["250 2.0.0", "250 2.0.0"]
    assert s.messages == [b"0123456789"]


def test_bdat_binary_with_crlf_dot_crlf_inside() -> None:
    payload = bytes(range(256)) + b"\r\n.\r\n" + b"\x00" * 10
    s = Session()
    s.feed(b"EHLO c\r\nMAIL FROM:<a@x.test> BODY=BINARYMIME\r\nRCPT TO:<b@y.test>\r\n")
    s.feed(b"BDAT %d LAST\r\n" % len(payload) + payload)
    assert s.messages == [payload]


def test_bdat_without_transaction_drained_then_503() -> None:
    s = Session()
    s.feed(b"EHLO c\r\n")
    out = s.feed(b"BDAT 12 LAST\r\nNOOP\r\nNOOP\r\nNOOP\r\n")
    assert s.codes(out) == ["503 5.5.1", "250 2.0.0"]     # the 12 octets were not commands


def test_bdat_without_rcpt_drained_then_503() -> None:
    s = Session()
    s.feed(b"EHLO c\r\nMAIL FROM:<a@x.test>\r\n")
    out = s.feed(b"BDAT 4\r\nRSETNOOP\r\n")
    assert s.codes(out) == ["503 5.5.1", "250 2.0.0"]


def test_bdat_bad_size_syntax() -> None:
    s = Session()
    txn(s)
    for arg in (b"BDAT\r\n", b"BDAT x\r\n", b"BDAT 5 FIRST\r\n", b"BDAT -5\r\n"):
        assert s.codes(s.feed(arg)) == ["501 5.5.4"]


def test_bdat_over_size_drained_552_then_following_chunks_503() -> None:
    s = Session(max_size=10)
    txn(s)
    out = s.feed(b"BDAT 6\r\nabcdef", b"BDAT 6\r\nghijkl", b"BDAT 2 LAST\r\nmn", b"NOOP\r\n")
    assert s.codes(out) == ["250 2.0.0", "552 5.3.4", "503 5.5.1", "250 2.0.0"]
    assert P.DataAborted(P.R_TOO_BIG) in s.events
    assert s.messages == []


def test_bdat_then_data_is_bad_sequence() -> None:
    s = Session()
    txn(s)
    out = s.feed(b"BDAT 1\r\nxDATA\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<q@y.test>\r\n")
    assert s.codes(out) == ["250 2.0.0", "503 5.5.1", "503 5.5.1", "503 5.5.1"]


def test_bdat_rejected_chunk_resets_transaction() -> None:
    s = Session(decide=lambda ev: Reply(451, "4.3.0", "store") if isinstance(ev, P.BdatEnd)
                else default_decide(ev))
    txn(s)
    out = s.feed(b"BDAT 1\r\nxBDAT 1 LAST\r\ny")
    assert s.codes(out) == ["451 4.3.0", "503 5.5.1"]


def test_binarymime_requires_bdat() -> None:
    s = Session()
    out = s.feed(b"EHLO c\r\nMAIL FROM:<a@x.test> BODY=BINARYMIME\r\nRCPT TO:<b@y.test>\r\n"
                 b"DATA\r\n")
    assert s.codes(out)[-1] == "503 5.5.1"


def test_rset_in_bdat_transaction() -> None:
    s = Session()
    txn(s)
    out = s.feed(b"BDAT 2\r\nabRSET\r\nBDAT 1 LAST\r\nz")
    assert s.codes(out) == ["250 2.0.0", "250 2.0.0", "503 5.5.1"]
    assert s.messages == []


# --- AUTH (RFC 4954) --------------------------------------------------------------------------------
def test_auth_plain_initial_response() -> None:
    s = Session(auth_allowed=True)
    s.feed(b"EHLO c\r\n")
    out = s.feed(b"AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n")
    assert s.codes(out) == ["235 2.7.0"]
    assert s.events[-1] == P.AuthPlain(b"AGFsaWNlAHNlY3JldA==")


def test_auth_plain_challenge() -> None:
    s = Session(auth_allowed=True)
    s.feed(b"EHLO c\r\n")
    assert s.feed(b"AUTH PLAIN\r\n") == b"334 \r\n"
    out = s.feed(b"AGFsaWNlAHNlY3JldA==\r\n")
    assert s.events[-1] == P.AuthPlain(b"AGFsaWNlAHNlY3JldA==")
    assert s.codes(out) == ["235 2.7.0"]


def test_auth_login_steps() -> None:
    s = Session(auth_allowed=True)
    s.feed(b"EHLO c\r\n")
    assert s.feed(b"AUTH LOGIN\r\n") == b"334 VXNlcm5hbWU6\r\n"
    assert s.feed(b"YWxpY2U=\r\n") == b"334 UGFzc3dvcmQ6\r\n"
    s.feed(b"c2VjcmV0\r\n")
    assert s.events[-1] == P.AuthLogin(b"YWxpY2U=", b"c2VjcmV0")


def test_auth_login_initial_user() -> None:
    s = Session(auth_allowed=True)
    s.feed(b"EHLO c\r\n")
    assert s.feed(b"AUTH LOGIN YWxpY2U=\r\n") == b"334 UGFzc3dvcmQ6\r\n"
    s.feed(b"c2VjcmV0\r\n")
    assert s.events[-1] == P.AuthLogin(b"YWxpY2U=", b"c2VjcmV0")


def test_auth_failure_allows_retry() -> None:
    s = Session(auth_allowed=True, decide=lambda ev: P.R_AUTH_FAILED
                if isinstance(ev, P.AuthPlain) else default_decide(ev))
    s.feed(b"EHLO c\r\n")
    out = s.feed(b"AUTH PLAIN AGFsaWNlAHdyb25n\r\nAUTH PLAIN AGFsaWNlAHdyb25n\r\n")
    assert s.codes(out) == ["535 5.7.8", "535 5.7.8"]


@pytest.mark.parametrize("lines,code", [
    (b"AUTH CRAM-MD5\r\n", "504 5.5.4"),
    (b"AUTH\r\n", "501 5.5.4"),
    (b"AUTH PLAIN !!!\r\n", "501 5.5.2"),
    (b"AUTH PLAIN\r\n*\r\n", "501 5.0.0"),
    (b"AUTH PLAIN\r\n%%%\r\n", "501 5.5.2"),
    (b"AUTH LOGIN\r\n*\r\n", "501 5.0.0"),
    (b"AUTH LOGIN\r\nYWxpY2U=\r\n*\r\n", "501 5.0.0"),
])
def test_auth_errors(lines: bytes, code: str) -> None:
    s = Session(auth_allowed=True)
    s.feed(b"EHLO c\r\n")
    assert s.codes(s.feed(lines))[-1] == code
    assert s.codes(s.feed(b"NOOP\r\n")) == ["250 2.0.0"]   # back in command mode


def test_auth_refused_without_tls_when_not_allowed() -> None:
    s = Session(auth_allowed=False, tls_available=True)
    s.feed(b"EHLO c\r\n")
    assert s.codes(s.feed(b"AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n")) == ["538 5.7.11"]


# --- STARTTLS (RFC 3207) --------------------------------------------------------------------------
def test_starttls_discards_pipelined_input_and_restarts() -> None:
    s = Session(tls_available=True)
    s.feed(b"EHLO c\r\n")
    out = s.feed(b"STARTTLS\r\nMAIL FROM:<evil@x.test>\r\n")
    assert s.codes(out) == ["220 2.0.0"]
    assert isinstance(s.events[-1], P.StartTls)
    assert s.feed(b"NOOP\r\n") == b""                 # ignored until the handshake is done
    s.conn.tls_started()
    out = s.feed(b"MAIL FROM:<a@x.test>\r\n")
    assert s.codes(out) == ["503 5.5.1"]              # EHLO again first
    out = s.feed(b"EHLO c\r\n").decode()
    assert "STARTTLS" not in out and "AUTH PLAIN LOGIN" in out
    assert s.codes(s.feed(b"STARTTLS\r\n")) == ["503 5.5.1"]


# --- DATA end detection and unstuffing ------------------------------------------------------------
def reference(wire: bytes) -> tuple[bytes, bytes] | None:
    """(message, rest after the terminator) by the plain definition, or None if unterminated."""
    w = b"\r\n" + wire
    k = w.find(b"\r\n.\r\n")
    if k < 0:
        return None
    body = w[2:k + 2]
    return re.sub(rb"(^|\r\n)\.", rb"\1", body), w[k + 5:]


def run_data(wire: bytes, cuts: list[int]) -> tuple[bytes, bytes, bool]:
    """Feed DATA octets split at `cuts`; return (message, bytes left, ended)."""
    conn = SmtpConnection("relay.test")
    conn.receive_data(b"EHLO c\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\n")
    ended = False
    body = bytearray()

    def drain() -> None:
        nonlocal ended
        while not ended:
            ev = conn.next_event()
            if ev is NEED_DATA:
                return
            if isinstance(ev, P.DataChunk):
                body.extend(ev.data)
            elif isinstance(ev, P.DataEnd):
                ended = True
                assert ev.size == len(body)
            elif isinstance(ev, P._NEEDS_REPLY):
                conn.reply(default_decide(ev))
    drain()
    bounds = [0, *sorted(set(cuts)), len(wire)]
    rest = b""
    for a, b in itertools.pairwise(bounds):
        piece = wire[a:b]
        if ended:
            rest += piece
            continue
        conn.receive_data(bytearray(piece))
        drain()
        if ended:
            rest += bytes(conn._src[conn._pos:conn._end])
    return bytes(body), rest, ended


CASES = [
    b".\r\n",
    b"a\r\n.\r\n",
    b"..\r\n.\r\n",
    b"...\r\n.\r\n",
    b".a\r\n.\r\nREST",
    b"a.b\r\n.c\r\n.\r\n",
    b"\r\n.\r\n",
    b"a\r\n.\r\r\n.\r\n",
    b".\rX\r\n.\r\n",
    b"a\n.\r\n.\r\n",
    b"a\r.\r\n.\r\n",
    b"x\r\n..\r\n\r\n.\r\nQUIT\r\n",
    b"no end\r\n. \r\n",
    b"line\r\n.\r",
    b"a" * 40 + b"." * 40 + b"\r\n.b\r\n.\r\n",
    b"a. b. c. d. e. f. g. h. i. j. k. l. m. n. o. p. q. r. s. t.\r\n.x\r\nu.\r\n.\r\n",
]


@pytest.mark.parametrize("wire", CASES)
def test_data_against_reference_at_every_split(wire: bytes) -> None:
    ref = reference(wire)
    for i in range(len(wire) + 1):
        for j in range(i, min(len(wire), i + 4) + 1):
            body, rest, ended = run_data(wire, [i, j])
            if ref is None:
                assert not ended
            else:
                assert ended and (body, rest) == ref, (i, j)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from([b".", b"\r", b"\n", b"\r\n", b"a", b"..", b"\r\n.", b"\r\n.\r\n"]),
                max_size=30),
       st.lists(st.integers(min_value=0, max_value=200), max_size=6))
def test_data_property_matches_reference(parts: list[bytes], cuts: list[int]) -> None:
    wire = b"".join(parts) + b"\r\n.\r\nNOOP\r\n"
    cuts = [c for c in cuts if c <= len(wire)]
    body, rest, ended = run_data(wire, cuts)
    ref = reference(wire)
    assert ref is not None and ended
    assert (body, rest) == ref


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=300), st.lists(st.integers(min_value=0, max_value=400), max_size=5))
def test_data_property_random_binary(payload: bytes, cuts: list[int]) -> None:
    wire = payload + b"\r\n.\r\n"
    body, rest, ended = run_data(wire, [c for c in cuts if c <= len(wire)])
    assert ended and (body, rest) == reference(wire)


def test_data_chunks_are_views_into_caller_buffer() -> None:
    conn = SmtpConnection("relay.test")
    conn.receive_data(b"EHLO c\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\n")
    while (ev := conn.next_event()) is not NEED_DATA:
        if isinstance(ev, P._NEEDS_REPLY):
            conn.reply(default_decide(ev))
    buf = bytearray(b"Z" * 1000 + b"\r\n.\r\n" + b"\x00" * 100)
    conn.receive_data(buf, 1007)
    ev = conn.next_event()
    assert isinstance(ev, P.DataChunk)
    assert ev.data.obj is buf and len(ev.data) == 1002
    assert isinstance(conn.next_event(), P.DataEnd)


def test_dense_dots_fall_back_and_stay_correct() -> None:
    text = b"".join(b"Sentence %d. Another. And more... \r\n" % i for i in range(500))
    text += b".leading\r\n"
    wire = text + b".\r\n"
    body, rest, ended = run_data(wire, [len(wire) // 3, len(wire) // 2])
    assert ended and (body, rest) == reference(wire)


def test_on_reply_hook_sees_every_reply() -> None:
    seen: list[Reply] = []
    conn = SmtpConnection("relay.test", on_reply=seen.append)
    conn.receive_data(b"NOOP\r\nFOO\r\n")
    while conn.next_event() is not NEED_DATA:
        pass
    assert [r.code for r in seen] == [220, 250, 500]


def test_close_with_timeout_reply() -> None:
    conn = SmtpConnection("relay.test")
    conn.data_to_send()
    conn.close_with(Reply(421, "4.4.2", "relay.test Timeout"))
    assert conn.data_to_send() == b"421 4.4.2 relay.test Timeout\r\n"
    assert conn.closed


def test_many_pipelined_bdat_after_failure_do_not_hit_max_errors() -> None:
    s = Session(max_size=10, max_errors=3)
    txn(s)
    out = s.feed(b"BDAT 11\r\n" + b"x" * 11 + b"BDAT 1\r\ny" * 10 + b"NOOP\r\n")
    assert s.codes(out) == ["552 5.3.4"] + ["503 5.5.1"] * 10 + ["250 2.0.0"]
    assert not s.conn.closed


def test_memoryview_input_whole_buffer_in_place_and_slice_copied() -> None:
    for make in (lambda b: memoryview(b), lambda b: memoryview(b)[:len(b) - 3]):
        conn = SmtpConnection("relay.test")
        conn.receive_data(make(bytearray(b"NOOP\r\nFOO")))
        assert isinstance(conn.next_event(), P.Noop)
        assert conn.next_event() is NEED_DATA
        assert conn.data_to_send().endswith(b"250 2.0.0 OK\r\n")
