"""Pure-bytes tests of relay.protocol.imap.ImapConnection: client bytes in, events and reply
bytes out; the server's I/O is played by the test (a mailbox as a list, message bytes in
memory). No server, no sockets, no store."""

from __future__ import annotations

import calendar
from typing import NamedTuple

import pytest

from relay.protocol import imap as p
from relay.protocol.imap import (
    AUTH,
    LOGOUT,
    NEED_DATA,
    NOT_AUTH,
    SELECTED,
    TRANSITIONS,
    Authenticate,
    BodyRange,
    Expunge,
    Fetch,
    Idle,
    ImapConnection,
    MailboxStatus,
    OpenMailbox,
    ProtocolError,
    QuotaRequest,
    Refresh,
    Respond,
    StartTls,
    StoreFlags,
)

T0 = calendar.timegm((2026, 12, 1, 10, 0, 0))


class Msg(NamedTuple):
    uid: int
    size: int
    internaldate: float
    flags: str


MESSAGE = b"From: a@example.test\r\nSubject: hello\r\n\r\nline one\r\nline two\r\n"
HEADER_END = MESSAGE.index(b"\r\n\r\n") + 4


class Flat:
    """One single-part message in memory (what the server's mimetree adapter answers)."""

    size = len(MESSAGE)

    def envelope(self) -> bytes:
        return b'(NIL "hello" NIL NIL NIL NIL NIL NIL NIL NIL)'

    def bodystructure(self, extended: bool) -> bytes:
        return b'("TEXT" "PLAIN" NIL NIL NIL "7BIT" 20 2%s)' % (b" NIL NIL NIL NIL" if extended else b"")

    def locate(self, sec: p.Section) -> tuple[int, int] | bytes | None:
        if sec.part not in ((), (1,)):
            return None
        if sec.text in ("HEADER", "MIME"):
            return 0, HEADER_END
        if sec.text in ("", "TEXT"):
            return HEADER_END, len(MESSAGE) - HEADER_END
        return b"Subject: hello\r\n\r\n"


def wire(parts: p.FetchParts) -> bytes:
    """The bytes a server sends for these parts (BodyRange -> the message's bytes)."""
    return b"".join(x if isinstance(x, bytes) else MESSAGE[x.offset:x.offset + x.count] for x in parts.parts)


def events(conn: ImapConnection, data: bytes = b"") -> list[object]:
    """Feed `data`; the events up to NEED_DATA or to one that waits for the server."""
    if data:
        conn.receive_data(data)
    out: list[object] = []
    while conn.busy is None and (ev := conn.next_event()) is not NEED_DATA:
        out.append(ev)
        if isinstance(ev, Respond) and ev.close:
            break
    return out


def say(conn: ImapConnection, line: bytes) -> bytes:
    """One command whose answer needs no I/O: the bytes of its Respond events."""
    evs = events(conn, line + b"\r\n")
    assert all(isinstance(e, Respond) for e in evs), evs
    return b"".join(e.data for e in evs if isinstance(e, Respond))


def logged_in(**kw: bool) -> ImapConnection:
    conn = ImapConnection("relay.test", version="9.9", **kw)
    assert events(conn, b"a LOGIN alice@example.test secret\r\n") == [
        Authenticate("alice@example.test", "secret", "LOGIN")]
    assert conn.login_succeeded("alice@example.test").startswith(b"a OK [CAPABILITY IMAP4rev1 ")
    return conn


VIEW = [Msg(3, 100, T0, ""), Msg(5, 200, T0 + 60, "S"), Msg(9, len(MESSAGE), T0 + 120, "FST")]


def selected(readonly: bool = False, messages: list[Msg] | None = None) -> ImapConnection:
    conn = logged_in()
    verb = b"EXAMINE" if readonly else b"SELECT"
    assert events(conn, b"s " + verb + b" inbox\r\n") == [OpenMailbox(readonly)]
    conn.mailbox_opened(VIEW if messages is None else messages, 77, 10)
    assert conn.state is SELECTED
    return conn


# --- greeting, capabilities, states ----------------------------------------------------------

def test_greeting_and_capabilities_follow_state_and_tls() -> None:
    conn = ImapConnection("relay.test", tls_available=True, plaintext_allowed=False)
    assert conn.greeting() == (b"* OK [CAPABILITY IMAP4rev1 SASL-IR ID ENABLE IDLE LITERAL+ STARTTLS "
                               b"LOGINDISABLED] relay.test IMAP ready\r\n")
    assert say(conn, b"a CAPABILITY") == (b"* CAPABILITY IMAP4rev1 SASL-IR ID ENABLE IDLE LITERAL+ STARTTLS "
                                          b"LOGINDISABLED\r\na OK Capability completed\r\n")
    assert say(conn, b"b LOGIN alice x") == b"b NO [PRIVACYREQUIRED] Use STARTTLS or TLS first\r\n"
    assert say(conn, b"c AUTHENTICATE PLAIN AGEAYg==") == b"c NO [PRIVACYREQUIRED] Use STARTTLS or TLS first\r\n"
    assert events(conn, b"d STARTTLS\r\n") == [StartTls()]
    assert conn.starttls_accepted() == b"d OK Begin TLS negotiation now\r\n"
    conn.tls_started()
    assert "AUTH=PLAIN" in conn.capabilities() and "STARTTLS" not in conn.capabilities()
    assert "LOGINDISABLED" not in conn.capabilities()
    conn = logged_in()
    assert conn.capabilities().endswith("UIDPLUS UNSELECT NAMESPACE QUOTA QUOTA=RES-STORAGE QUOTA=RES-MESSAGE")


def test_commands_in_the_wrong_state_and_unknown_ones() -> None:
    conn = ImapConnection("relay.test")
    assert say(conn, b"a SELECT INBOX") == b"a BAD Log in first\r\n"
    assert say(conn, b"b FROB") == b"b BAD Unknown command\r\n"
    conn = logged_in()
    assert say(conn, b"c LOGIN a b") == b"c BAD Already authenticated\r\n"
    assert say(conn, b"d FETCH 1 FLAGS") == b"d BAD No mailbox selected\r\n"
    assert conn.statistics().commands == 3


def test_transitions_table_is_the_only_way_between_states() -> None:
    assert {s for (s, _), _t in TRANSITIONS.items()} == {NOT_AUTH, AUTH, SELECTED}
    assert not any(s is LOGOUT for s, _ in TRANSITIONS)           # nothing leaves LOGOUT
    assert TRANSITIONS[(NOT_AUTH, "login")] is AUTH
    assert TRANSITIONS[(SELECTED, "deselect")] is AUTH


def test_logout_closes_and_nothing_follows() -> None:
    conn = ImapConnection("relay.test")
    assert events(conn, b"a LOGOUT\r\nb NOOP\r\n") == [
        Respond(b"* BYE Logging out\r\na OK Logout completed\r\n", close="ok")]
    assert conn.state is LOGOUT
    assert conn.next_event() is NEED_DATA


def test_parser_rejects_and_literal_continuations_pass_through() -> None:
    conn = ImapConnection("relay.test", max_line=100)
    assert say(conn, b"a NOOP " + b"x" * 200) == b"a BAD [TOOBIG] Command line too long\r\n"
    assert events(conn, b"b LOGIN {5}\r\n") == [Respond(b"+ Ready for literal data\r\n")]
    assert events(conn, b"alice secret\r\n") == [Authenticate("alice", "secret", "LOGIN")]


def test_login_failures_name_the_reason() -> None:
    conn = ImapConnection("relay.test")
    events(conn, b"a LOGIN alice wrong\r\n")
    assert conn.login_failed("auth") == b"a NO [AUTHENTICATIONFAILED] Authentication failed\r\n"
    events(conn, b"b LOGIN alice wrong\r\n")
    assert conn.login_failed("busy") == b"b NO [UNAVAILABLE] Too many attempts, try again later\r\n"
    assert conn.state is NOT_AUTH
    assert say(conn, b"c LOGIN onlyone").startswith(b"c BAD Syntax error: wrong number of arguments")


def test_authenticate_plain_exchange() -> None:
    conn = ImapConnection("relay.test")
    assert events(conn, b"a AUTHENTICATE PLAIN\r\n") == [Respond(b"+ \r\n")]
    assert events(conn, b"AGFsaWNlAHNlY3JldA==\r\n") == [Authenticate("alice", "secret", "PLAIN")]
    conn.login_failed()
    assert say(conn, b"b AUTHENTICATE PLAIN\r\n*") == b"+ \r\nb BAD Authentication cancelled\r\n"
    assert say(conn, b"c AUTHENTICATE PLAIN !!") .startswith(b"c BAD Invalid SASL PLAIN response")
    assert say(conn, b"d AUTHENTICATE CRAM-MD5") == b"d NO Unsupported authentication mechanism\r\n"
    assert events(conn, b"e AUTHENTICATE PLAIN AGFsaWNlAHNlY3JldA==\r\n") == [
        Authenticate("alice", "secret", "PLAIN")]


def test_starttls_refuses_pipelined_bytes_and_forgets_what_came_before() -> None:
    conn = ImapConnection("relay.test")
    assert say(conn, b"a STARTTLS") == b"a BAD STARTTLS not available\r\n"
    conn = ImapConnection("relay.test", tls_available=True)
    assert events(conn, b"a STARTTLS\r\nb LOGIN alice secret\r\n") == [Respond(
        b"a BAD Nothing may follow STARTTLS before the handshake\r\n* BYE Command injection refused\r\n",
        close="protocol_error")]
    conn = ImapConnection("relay.test", tls_available=True)
    assert events(conn, b"a STARTTLS\r\n") == [StartTls()]
    assert conn.starttls_refused() == (b"a BAD Nothing may follow STARTTLS before the handshake\r\n"
                                       b"* BYE Command injection refused\r\n")


def test_results_out_of_order_are_server_bugs() -> None:
    conn = ImapConnection("relay.test")
    events(conn, b"a LOGIN alice secret\r\n")
    with pytest.raises(ProtocolError):
        conn.next_event()
    with pytest.raises(ProtocolError):
        conn.mailbox_opened([], 1, 1)
    assert conn.failed("temp") == b"a NO [UNAVAILABLE] Temporary failure, try again later\r\n"
    assert conn.busy is None and conn.state is NOT_AUTH
    events(conn, b"b LOGIN alice secret\r\n")
    assert conn.failed("bug") == b"b NO [SERVERBUG] Internal error, try again later\r\n"


# --- authenticated ---------------------------------------------------------------------------

def test_mailbox_names_list_and_no_other_mailboxes() -> None:
    conn = logged_in()
    assert say(conn, b'a LIST "" "*"') == b'* LIST (\\HasNoChildren) "/" INBOX\r\na OK LIST completed\r\n'
    assert say(conn, b'b LIST "" ""') == b'* LIST (\\Noselect) "/" ""\r\nb OK LIST completed\r\n'
    assert say(conn, b'c LSUB "" "%"') == b'* LSUB () "/" INBOX\r\nc OK LSUB completed\r\n'
    assert say(conn, b'd LIST "" "Sent*"') == b"d OK LIST completed\r\n"
    assert say(conn, b'e SELECT "../bob"') == b"e NO [NONEXISTENT] Only INBOX exists\r\n"
    assert say(conn, b"f RENAME INBOX x") == b"f NO [CANNOT] Only INBOX exists here\r\n"
    assert say(conn, b"g SUBSCRIBE INBOX") == b"g OK SUBSCRIBE completed\r\n"
    assert say(conn, b"h UNSUBSCRIBE Trash") == b"h NO [NONEXISTENT] Only INBOX exists\r\n"
    assert say(conn, b'i ID NIL') == b'* ID ("name" "relay" "version" "9.9")\r\ni OK ID completed\r\n'
    assert say(conn, b"j ENABLE CONDSTORE") == b"* ENABLED\r\nj OK ENABLE completed\r\n"
    assert say(conn, b"k NAMESPACE") == b'* NAMESPACE (("" "/")) NIL NIL\r\nk OK NAMESPACE completed\r\n'
    assert say(conn, b"l NOOP") == b"l OK NOOP completed\r\n"              # nothing selected: no I/O


def test_status_checks_items_before_asking_the_server() -> None:
    conn = logged_in()
    assert say(conn, b"a STATUS INBOX (MESSAGES FROB)") == b"a BAD Syntax error: unknown STATUS item FROB\r\n"
    assert events(conn, b"b STATUS inbox (MESSAGES UNSEEN DELETED SIZE UIDNEXT UIDVALIDITY RECENT)\r\n") == [
        MailboxStatus()]
    assert conn.status_result(VIEW, 77, 10) == (
        b"* STATUS INBOX (MESSAGES 3 UNSEEN 1 DELETED 1 SIZE %d UIDNEXT 10 UIDVALIDITY 77 RECENT 0)\r\n"
        b"b OK STATUS completed\r\n" % (300 + len(MESSAGE)))


def test_quota_lines_in_units_of_1024_octets() -> None:
    conn = logged_in()
    assert events(conn, b"a GETQUOTAROOT INBOX\r\n") == [QuotaRequest()]
    assert conn.quota_result(1025, 3, 10 * 1024 * 1024, 0) == (
        b'* QUOTAROOT INBOX ""\r\n* QUOTA "" (STORAGE 2 10240)\r\na OK GETQUOTAROOT completed\r\n')
    assert events(conn, b'b GETQUOTA ""\r\n') == [QuotaRequest()]
    assert conn.quota_result(0, 0, 0, 5) == b'* QUOTA "" (MESSAGE 0 5)\r\nb OK GETQUOTA completed\r\n'
    assert say(conn, b"c GETQUOTA other") == b"c NO [NONEXISTENT] No such quota root\r\n"


def test_select_and_examine_responses() -> None:
    conn = logged_in()
    events(conn, b"a SELECT INBOX\r\n")
    assert conn.mailbox_opened(VIEW, 77, 10) == (
        b"* FLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft)\r\n"
        b"* OK [PERMANENTFLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft)] Flags permitted\r\n"
        b"* 3 EXISTS\r\n* 0 RECENT\r\n* OK [UNSEEN 1] First unseen\r\n"
        b"* OK [UIDVALIDITY 77] UIDs valid\r\n* OK [UIDNEXT 10] Predicted next UID\r\n"
        b"a OK [READ-WRITE] SELECT completed\r\n")
    assert events(conn, b"b EXAMINE INBOX\r\n") == [OpenMailbox(True)]
    assert conn.state is AUTH                             # the old mailbox is closed first
    out = conn.mailbox_opened([Msg(1, 5, T0, "S")], 77, 2)
    assert b"[PERMANENTFLAGS ()]" in out and b"UNSEEN" not in out
    assert out.endswith(b"b OK [READ-ONLY] EXAMINE completed\r\n")
    assert say(conn, b"c SELECT Trash") == b"c NO [NONEXISTENT] Only INBOX exists\r\n"
    assert conn.state is AUTH and conn.view == []


# --- selected: updates -----------------------------------------------------------------------

def test_noop_brings_the_view_up_to_date() -> None:
    conn = selected()
    assert events(conn, b"n NOOP\r\n") == [Refresh(True)]
    now = [Msg(3, 100, T0, "S"), Msg(9, len(MESSAGE), T0, "FST"), Msg(12, 7, T0, ""), Msg(13, 7, T0, "")]
    assert conn.refreshed(now) == b"* 2 EXPUNGE\r\n* 1 FETCH (FLAGS (\\Seen) UID 3)\r\n* 4 EXISTS\r\n"
    assert events(conn) == [Respond(b"n OK NOOP completed\r\n")]
    assert [m.uid for m in conn.view] == [3, 9, 12, 13]


def test_sequence_commands_see_new_mail_but_no_expunge() -> None:
    conn = selected()
    assert say(conn, b"a SEARCH ALL") == b"* SEARCH 1 2 3\r\na OK SEARCH completed\r\n"   # no change: no I/O
    conn.mailbox_changed()
    assert events(conn, b"b SEARCH UNSEEN\r\n") == [Refresh(False)]
    assert conn.refreshed([VIEW[0], Msg(11, 1, T0, "")]) == b"* 4 EXISTS\r\n"     # 5 and 9 stay
    assert events(conn) == [Respond(b"* SEARCH 1 4\r\nb OK SEARCH completed\r\n")]


def test_uid_commands_refresh_first() -> None:
    conn = selected()
    assert events(conn, b"u UID SEARCH SEEN\r\n") == [Refresh(True)]
    assert conn.refreshed(VIEW[1:]) == b"* 1 EXPUNGE\r\n"
    assert events(conn) == [Respond(b"* SEARCH 5 9\r\nu OK SEARCH completed\r\n")]


def test_idle_pushes_updates_until_done() -> None:
    conn = selected()
    assert events(conn, b"i IDLE\r\n") == [Idle()]
    assert conn.idling and conn.next_event() is NEED_DATA
    assert conn.update([*VIEW, Msg(10, 1, T0, "")]) == b"* 4 EXISTS\r\n"
    assert events(conn, b"done\r\n") == [Respond(b"i OK IDLE terminated\r\n")]
    assert not conn.idling
    events(conn, b"j IDLE\r\n")
    assert events(conn, b"k NOOP\r\n") == [Respond(b"j BAD Expected DONE\r\n")]


# --- selected: FETCH -------------------------------------------------------------------------

def test_fetch_without_the_body() -> None:
    conn = selected()
    ev = events(conn, b"f FETCH 2:* (UID FLAGS RFC822.SIZE INTERNALDATE)\r\n")
    assert ev == [Fetch(((2, 5, False), (3, 9, False)), needs_body=False, needs_tree=False, needs_lines=False)]
    assert wire(conn.fetch_message(2, None)) == (
        b'* 2 FETCH (UID 5 FLAGS (\\Seen) RFC822.SIZE 200 INTERNALDATE "01-Dec-2026 10:01:00 +0000")\r\n')
    conn.fetch_missing()
    assert conn.fetch_done() == b"f NO [EXPUNGEISSUED] Some messages no longer exist\r\n"


def test_fetch_body_is_a_byte_range_and_sets_seen() -> None:
    conn = selected(messages=[Msg(9, len(MESSAGE), T0, "")])
    [ev] = events(conn, b"f UID FETCH 9 BODY[]\r\n")
    assert ev == Refresh(True)
    conn.refreshed([Msg(9, len(MESSAGE), T0, "")])
    [fetch] = events(conn)
    assert fetch == Fetch(((1, 9, True),), needs_body=True, needs_tree=False, needs_lines=False)
    parts = conn.fetch_message(1, Flat(), seen=Msg(9, len(MESSAGE), T0, "S"))
    assert parts.parts[2] == BodyRange(0, len(MESSAGE)) and parts.whole
    assert wire(parts) == (b"* 1 FETCH (UID 9 BODY[] {%d}\r\n" % len(MESSAGE) + MESSAGE
                           + b" FLAGS (\\Seen))\r\n")
    assert conn.fetch_done() == b"f OK FETCH completed\r\n"
    assert conn.view[0].flags == "S"


def test_fetch_peek_partial_and_sections() -> None:
    conn = selected(messages=[Msg(1, len(MESSAGE), T0, "")])
    [ev] = events(conn, b"f FETCH 1 (BODY.PEEK[]<5.10> BODY.PEEK[HEADER.FIELDS (Subject)] BODY.PEEK[3] "
                        b"RFC822.HEADER ENVELOPE BODYSTRUCTURE)\r\n")
    assert ev == Fetch(((1, 1, False),), needs_body=True, needs_tree=True, needs_lines=True)
    out = conn.fetch_message(1, Flat())
    assert not out.whole
    assert wire(out) == (b"* 1 FETCH (BODY[]<5> {10}\r\n" + MESSAGE[5:15]
                         + b" BODY[HEADER.FIELDS (Subject)] {18}\r\nSubject: hello\r\n\r\n"
                         + b" BODY[3] NIL"
                         + b" RFC822.HEADER {%d}\r\n" % HEADER_END + MESSAGE[:HEADER_END]
                         + b' ENVELOPE (NIL "hello" NIL NIL NIL NIL NIL NIL NIL NIL)'
                         + b' BODYSTRUCTURE ("TEXT" "PLAIN" NIL NIL NIL "7BIT" 20 2 NIL NIL NIL NIL))\r\n')
    conn.fetch_done()
    [ev] = events(conn, b"g FETCH 1 BODY[]<500.10>\r\n")
    assert wire(conn.fetch_message(1, Flat())) == b"* 1 FETCH (BODY[]<500> {0}\r\n)\r\n"


def test_fetch_arguments_are_checked_before_any_io() -> None:
    conn = selected()
    assert say(conn, b"a FETCH 4 FLAGS") == b"a BAD Syntax error: Invalid message sequence number\r\n"
    assert say(conn, b"b FETCH 1 (FLAGS") == b"b BAD Syntax error: unbalanced '('\r\n"
    assert say(conn, b"c FETCH 1 FROB").startswith(b"c BAD Syntax error: unknown FETCH item")
    conn = selected(messages=[])
    assert say(conn, b"d FETCH * FLAGS") == b"d BAD Syntax error: No messages\r\n"
    assert events(conn, b"e UID FETCH 1:* FLAGS\r\n") == [Refresh(True)]
    conn.refreshed([])
    assert events(conn) == [Respond(b"e OK FETCH completed\r\n")]


def test_examine_never_sets_seen() -> None:
    conn = selected(readonly=True, messages=[Msg(1, len(MESSAGE), T0, "")])
    [ev] = events(conn, b"f FETCH 1 RFC822\r\n")
    assert isinstance(ev, Fetch) and ev.targets == ((1, 1, False),)


# --- selected: STORE, EXPUNGE, CLOSE ---------------------------------------------------------

def test_store_reports_the_flags_the_server_set() -> None:
    conn = selected()
    [ev] = events(conn, b"s UID STORE 3,9 +FLAGS (\\Deleted)\r\n")
    assert isinstance(ev, StoreFlags) and ev.targets == ((1, 3), (3, 9))
    assert ev.request.apply("S") == "ST"                       # the server applies it to the flags now
    assert conn.flags_stored(1, Msg(3, 100, T0, "ST")) == b"* 1 FETCH (FLAGS (\\Seen \\Deleted) UID 3)\r\n"
    assert conn.flags_stored(3, None) == b""                    # expunged meanwhile
    assert conn.store_done() == b"s OK STORE completed\r\n"
    assert conn.view[0].flags == "ST"
    [ev] = events(conn, b"t STORE 2 FLAGS.SILENT (\\Flagged)\r\n")
    assert ev == StoreFlags(((2, 5),), p.StoreRequest("", True, "F"))
    assert conn.flags_stored(2, Msg(5, 200, T0, "F")) == b""
    assert conn.store_done() == b"t OK STORE completed\r\n"
    assert say(conn, b"u STORE 2 FLAGS.SILENT") .startswith(b"u BAD")
    assert say(conn, b"v UID STORE 100 +FLAGS (\\Seen)") == b"v OK STORE completed\r\n"


def test_read_only_mailbox_refuses_changes() -> None:
    conn = selected(readonly=True)
    assert say(conn, b"a STORE 1 +FLAGS (\\Seen)") == b"a NO [READ-ONLY] Mailbox is read-only\r\n"
    assert say(conn, b"b EXPUNGE") == b"b NO [READ-ONLY] Mailbox is read-only\r\n"
    assert say(conn, b"c CLOSE") == b"c OK CLOSE completed\r\n"          # nothing expunged
    assert conn.state is AUTH


def test_expunge_sends_the_numbers_highest_first() -> None:
    conn = selected()
    assert events(conn, b"e EXPUNGE\r\n") == [Expunge(frozenset({3, 5, 9}), close=False)]
    now = [Msg(3, 100, T0, "T"), Msg(5, 200, T0, "S"), Msg(9, 1, T0, "FST")]
    assert p.deleted_now(now, frozenset({3, 5, 9})) == [3, 9]
    assert conn.expunged([3, 9]) == b"* 3 EXPUNGE\r\n* 1 EXPUNGE\r\ne OK EXPUNGE completed\r\n"
    assert [m.uid for m in conn.view] == [5]


def test_uid_expunge_names_a_subset_and_close_says_nothing() -> None:
    conn = selected()
    assert events(conn, b"e UID EXPUNGE 4:9\r\n") == [Expunge(frozenset({5, 9}), close=False)]
    conn.expunged([])
    assert say(conn, b"f EXPUNGE 1") == b"f BAD Syntax error: wrong number of arguments for EXPUNGE\r\n"
    assert events(conn, b"c CLOSE\r\n") == [Expunge(frozenset({3, 5, 9}), close=True)]
    assert conn.expunged([9]) == b"c OK CLOSE completed\r\n"
    assert conn.state is AUTH and conn.view == []


def test_unselect_copy_and_search_return() -> None:
    conn = selected()
    assert say(conn, b"a COPY 1 Trash") == b"a NO [CANNOT] COPY is not supported: only INBOX exists\r\n"
    assert say(conn, b"b UID MOVE 1 Trash") == b"b NO [CANNOT] MOVE is not supported: only INBOX exists\r\n"
    assert say(conn, b"c SEARCH RETURN (MIN) ALL").startswith(b"c BAD Syntax error: SEARCH RETURN")
    assert say(conn, b"d UNSELECT") == b"d OK UNSELECT completed\r\n"
    assert conn.state is AUTH


def test_any_bytes_get_answers_never_exceptions() -> None:
    """Every line of a recorded imaplib session, cut at every offset, then garbage."""
    session = (b"a LOGIN alice secret\r\nb SELECT INBOX\r\nc UID FETCH 1:* (FLAGS BODY.PEEK[])\r\n"
               b"d UID STORE 3 +FLAGS (\\Deleted)\r\ne EXPUNGE\r\nf IDLE\r\nDONE\r\ng STATUS INBOX (MESSAGES)\r\n"
               b"h FETCH 1 BODY[HEADER.FIELDS (A)]\r\ni CLOSE\r\nj LOGOUT\r\n")
    for cut in range(0, len(session), 7):
        conn = ImapConnection("relay.test")
        answered = 0
        for chunk in (session[:cut], session[cut:], b"\x00\xff{99}\r\n"):
            conn.receive_data(chunk)
            while conn.state is not LOGOUT and (ev := conn.next_event()) is not NEED_DATA:
                answered += 1
                serve(conn, ev)
        assert answered >= 10 and conn.state is LOGOUT


def serve(conn: ImapConnection, ev: object) -> None:
    """The server's part, with a mailbox of VIEW, everything succeeding."""
    if isinstance(ev, Authenticate):
        conn.login_succeeded(ev.user)
    elif isinstance(ev, OpenMailbox):
        conn.mailbox_opened(VIEW, 1, 10)
    elif isinstance(ev, MailboxStatus):
        conn.status_result(VIEW, 1, 10)
    elif isinstance(ev, QuotaRequest):
        conn.quota_result(0, 0, 0, 0)
    elif isinstance(ev, Refresh):
        conn.refreshed(VIEW)
    elif isinstance(ev, Expunge):
        conn.expunged(p.deleted_now(VIEW, ev.uids))
    elif isinstance(ev, StoreFlags):
        for seq, uid in ev.targets:
            conn.flags_stored(seq, VIEW[[m.uid for m in VIEW].index(uid)])
        conn.store_done()
    elif isinstance(ev, Fetch):
        for seq, _uid, _seen in ev.targets:
            conn.fetch_message(seq, Flat() if ev.needs_body else None)
        conn.fetch_done()
    elif isinstance(ev, StartTls):
        conn.starttls_accepted()
        conn.tls_started()
    else:
        assert isinstance(ev, (Respond, Idle)), ev
