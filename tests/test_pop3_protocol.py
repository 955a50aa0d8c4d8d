"""Pure-bytes tests of relay.protocol.pop3: no sockets, no store."""

from __future__ import annotations

import base64
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.protocol import pop3 as p
from relay.protocol.pop3 import (
    NEED_DATA,
    Authenticate,
    DotStuffer,
    DotUnstuffer,
    Message,
    Pop3Connection,
    ProtocolError,
    Quit,
    Respond,
    Retrieve,
    StartTls,
    State,
    TopFilter,
)

MAILDROP = [Message(uid=7, size=100), Message(uid=8, size=200), Message(uid=12, size=300)]


def feed(conn: Pop3Connection, data: bytes) -> list[object]:
    """Feed bytes, collect events up to NEED_DATA."""
    conn.receive_data(data)
    out = []
    while True:
        ev = conn.next_event()
        if ev is NEED_DATA:
            return out
        out.append(ev)
        if not isinstance(ev, Respond):
            return out


def reply(conn: Pop3Connection, data: bytes) -> bytes:
    evs = feed(conn, data)
    assert len(evs) == 1 and isinstance(evs[0], Respond), evs
    return evs[0].data


def logged_in(maildrop: list[Message] = MAILDROP) -> Pop3Connection:
    conn = Pop3Connection("relay.test")
    assert reply(conn, b"USER alice@example.test\r\n").startswith(b"+OK")
    [ev] = feed(conn, b"PASS secret\r\n")
    assert isinstance(ev, Authenticate)
    assert conn.auth_succeeded("alice@example.test", 0x1234, maildrop).startswith(b"+OK")
    assert conn.state is State.TRANSACTION
    return conn


def test_greeting_has_no_apop_timestamp() -> None:
    g = Pop3Connection("relay.test").greeting()
    assert g.startswith(b"+OK relay.test") and g.endswith(b"\r\n") and b"<" not in g


def test_user_pass_yields_authenticate_with_spaces_in_password() -> None:
    conn = Pop3Connection("relay.test")
    assert reply(conn, b"user bob@example.test\r\n") == b"+OK Send PASS\r\n"
    [ev] = feed(conn, b"PASS two words \r\n")
    assert ev == Authenticate("bob@example.test", "two words ", "USER")
    with pytest.raises(ProtocolError):
        conn.next_event()           # the glue must answer first
    assert conn.auth_failed("auth") == b"-ERR [AUTH] Authentication failed\r\n"
    assert conn.state is State.AUTHORIZATION
    # PASS needs a fresh USER after a failure
    assert reply(conn, b"PASS secret\r\n") == b"-ERR Send USER first\r\n"


def test_in_use_and_temporary_failures_carry_resp_codes() -> None:
    for kind, code in (("in-use", b"[IN-USE]"), ("temp", b"[SYS/TEMP]"), ("perm", b"[SYS/PERM]")):
        conn = Pop3Connection("relay.test")
        feed(conn, b"USER a\r\n")
        feed(conn, b"PASS b\r\n")
        assert conn.auth_failed(kind).startswith(b"-ERR " + code)


def test_auth_plain_initial_response_and_continuation() -> None:
    token = base64.b64encode(b"\0alice@example.test\0s3 cret")
    conn = Pop3Connection("relay.test")
    [ev] = feed(conn, b"AUTH PLAIN " + token + b"\r\n")
    assert ev == Authenticate("alice@example.test", "s3 cret", "PLAIN")
    conn.auth_failed()
    assert reply(conn, b"AUTH PLAIN\r\n") == b"+ \r\n"
    [ev] = feed(conn, token + b"\r\n")
    assert isinstance(ev, Authenticate) and ev.user == "alice@example.test"


def test_auth_plain_cancel_malformed_and_unknown_mechanism() -> None:
    conn = Pop3Connection("relay.test")
    assert reply(conn, b"AUTH PLAIN\r\n") == b"+ \r\n"
    assert reply(conn, b"*\r\n") == b"-ERR Authentication cancelled\r\n"
    assert reply(conn, b"AUTH PLAIN !!!notbase64\r\n").startswith(b"-ERR Malformed PLAIN")
    assert reply(conn, b"AUTH PLAIN =\r\n").startswith(b"-ERR Malformed PLAIN")
    assert reply(conn, b"AUTH CRAM-MD5\r\n").startswith(b"-ERR Unsupported mechanism")
    assert reply(conn, b"AUTH\r\n") == b"+OK Mechanisms follow\r\nPLAIN\r\n.\r\n"
    # still usable
    assert reply(conn, b"USER x\r\n").startswith(b"+OK")


def test_auth_continuation_line_may_exceed_the_command_bound() -> None:
    pw = "p" * 600
    token = base64.b64encode(f"\0u\0{pw}".encode())
    assert len(token) > p.MAX_LINE
    conn = Pop3Connection("relay.test")
    feed(conn, b"AUTH PLAIN\r\n")
    [ev] = feed(conn, token + b"\r\n")
    assert isinstance(ev, Authenticate) and ev.password == pw


def test_plaintext_refused_and_capa_hides_user_and_sasl() -> None:
    conn = Pop3Connection("relay.test", tls_available=True, plaintext_allowed=False)
    capa = reply(conn, b"CAPA\r\n")
    assert capa.startswith(b"+OK") and capa.endswith(b"\r\n.\r\n")
    lines = capa.split(b"\r\n")[1:-2]
    assert b"STLS" in lines and b"USER" not in lines and not any(x.startswith(b"SASL") for x in lines)
    for cmd in (b"USER alice\r\n", b"PASS x\r\n", b"AUTH PLAIN AGFAYgBj\r\n"):
        r = reply(conn, cmd)
        assert r.startswith(b"-ERR [AUTH] Plaintext authentication is not allowed"), r
        assert b"STLS" in r


def test_stls_then_capa_offers_user_and_drops_stls() -> None:
    conn = Pop3Connection("relay.test", tls_available=True, plaintext_allowed=False)
    # a command pipelined behind STLS must not survive the upgrade (RFC 2595 / CVE-2011-0411)
    [ev] = feed(conn, b"STLS\r\nUSER injected\r\n")
    assert ev == StartTls(b"+OK Begin TLS negotiation\r\n")
    conn.tls_started()
    assert conn.next_event() is NEED_DATA
    lines = reply(conn, b"CAPA\r\n").split(b"\r\n")
    assert b"USER" in lines and b"SASL PLAIN" in lines and b"STLS" not in lines
    assert reply(conn, b"STLS\r\n") == b"-ERR TLS is already active\r\n"
    assert reply(conn, b"PASS x\r\n") == b"-ERR Send USER first\r\n"


def test_stls_without_tls_configured() -> None:
    conn = Pop3Connection("relay.test")
    assert reply(conn, b"STLS\r\n") == b"-ERR TLS is not available\r\n"
    assert b"STLS" not in reply(conn, b"CAPA\r\n")


def test_capa_in_transaction_has_no_login_capabilities() -> None:
    conn = logged_in()
    lines = reply(conn, b"CAPA\r\n").split(b"\r\n")
    for cap in (b"TOP", b"UIDL", b"RESP-CODES", b"AUTH-RESP-CODE", b"PIPELINING"):
        assert cap in lines
    assert b"USER" not in lines and b"SASL PLAIN" not in lines


def test_stat_list_uidl() -> None:
    conn = logged_in()
    assert reply(conn, b"STAT\r\n") == b"+OK 3 600\r\n"
    assert reply(conn, b"LIST\r\n") == b"+OK 3 messages (600 octets)\r\n1 100\r\n2 200\r\n3 300\r\n.\r\n"
    assert reply(conn, b"LIST 2\r\n") == b"+OK 2 200\r\n"
    assert reply(conn, b"UIDL\r\n") == (b"+OK Unique-id listing follows\r\n"
                                        b"1 0000000700001234\r\n2 0000000800001234\r\n"
                                        b"3 0000000C00001234\r\n.\r\n")
    assert reply(conn, b"uidl 3\r\n") == b"+OK 3 0000000C00001234\r\n"
    assert p.parse_uidl("0000000C00001234") == (0x1234, 12)


def test_dele_rset_and_quit_expunges_marked_uids() -> None:
    conn = logged_in()
    assert reply(conn, b"DELE 2\r\n") == b"+OK Message 2 deleted\r\n"
    assert reply(conn, b"DELE 2\r\n") == b"-ERR Message 2 is deleted\r\n"
    assert reply(conn, b"STAT\r\n") == b"+OK 2 400\r\n"
    assert reply(conn, b"LIST\r\n") == b"+OK 2 messages (400 octets)\r\n1 100\r\n3 300\r\n.\r\n"
    assert reply(conn, b"RETR 2\r\n") == b"-ERR Message 2 is deleted\r\n"
    assert reply(conn, b"RSET\r\n") == b"+OK Maildrop has 3 messages (600 octets)\r\n"
    feed(conn, b"DELE 1\r\n")
    feed(conn, b"DELE 3\r\n")
    [ev] = feed(conn, b"QUIT\r\n")
    assert ev == Quit((7, 12))
    assert conn.state is State.UPDATE
    assert conn.update_done() == b"+OK relay.test signing off (2 messages deleted)\r\n"
    assert conn.state is State.CLOSED


def test_quit_update_failure_is_reported() -> None:
    conn = logged_in()
    feed(conn, b"DELE 1\r\n")
    feed(conn, b"QUIT\r\n")
    assert conn.update_done(failed=1) == b"-ERR [SYS/TEMP] 1 messages could not be deleted\r\n"


def test_quit_in_authorization_closes_without_update() -> None:
    conn = Pop3Connection("relay.test")
    [ev] = feed(conn, b"QUIT\r\n")
    assert isinstance(ev, Respond) and ev.close and ev.data.startswith(b"+OK")
    assert conn.state is State.CLOSED


def test_retr_and_top_events() -> None:
    conn = logged_in()
    [ev] = feed(conn, b"RETR 3\r\n")
    assert ev == Retrieve(3, 12, 300, None, b"+OK 300 octets\r\n")
    [ev] = feed(conn, b"TOP 1 5\r\n")
    assert ev == Retrieve(1, 7, 100, 5, b"+OK Top of message follows\r\n")


@pytest.mark.parametrize("cmd, answer", [
    (b"RETR 0\r\n", b"-ERR No such message: 0\r\n"),
    (b"RETR 4\r\n", b"-ERR No such message: 4\r\n"),
    (b"RETR x\r\n", b"-ERR Invalid message number 'x'\r\n"),
    (b"RETR -1\r\n", b"-ERR Invalid message number '-1'\r\n"),
    (b"RETR 99999999999999999999\r\n", b"-ERR Invalid message number '999999999999' (at most 9 digits)\r\n"),
    (b"RETR\r\n", b"-ERR Syntax: RETR msg\r\n"),
    (b"TOP 1\r\n", b"-ERR Syntax: TOP msg lines\r\n"),
    (b"TOP 1 x\r\n", b"-ERR Invalid line count 'x'\r\n"),
    (b"DELE 9\r\n", b"-ERR No such message: 9\r\n"),
    (b"LIST 1 2\r\n", b"-ERR Syntax: LIST [msg]\r\n"),
    (b"STAT 1\r\n", b"-ERR Syntax: STAT\r\n"),
    (b"USER x\r\n", b"-ERR USER is not valid in the TRANSACTION state\r\n"),
    (b"STLS\r\n", b"-ERR STLS is not valid in the TRANSACTION state\r\n"),
    (b"XYZZY\r\n", b"-ERR Unknown command: 'XYZZY'\r\n"),
    (b"\r\n", b"-ERR Empty command\r\n"),
    (b"LIST \xff\r\n", b"-ERR Command is not valid UTF-8\r\n"),
])
def test_bad_commands_in_transaction_keep_the_session_usable(cmd: bytes, answer: bytes) -> None:
    conn = logged_in()
    assert reply(conn, cmd) == answer
    assert reply(conn, b"STAT\r\n") == b"+OK 3 600\r\n"


@pytest.mark.parametrize("cmd", [b"STAT", b"LIST", b"UIDL", b"RETR 1", b"TOP 1 1", b"DELE 1",
                                 b"RSET", b"NOOP"])
def test_transaction_commands_refused_before_login(cmd: bytes) -> None:
    conn = Pop3Connection("relay.test")
    r = reply(conn, cmd + b"\r\n")
    assert r.startswith(b"-ERR ") and b"not valid in the AUTHORIZATION state" in r


def test_apop_is_refused_clearly() -> None:
    conn = Pop3Connection("relay.test")
    assert reply(conn, b"APOP alice 0123456789abcdef\r\n").startswith(b"-ERR APOP is not supported")


def test_overlong_line_is_refused_and_discarded() -> None:
    conn = logged_in()
    # a line of exactly 255 octets with CRLF is fine (RFC 2449 4)
    assert reply(conn, b"NOOP" + b" " * (255 - 6) + b"\r\n") == b"+OK NOOP\r\n"
    assert reply(conn, b"NOOP" + b" " * (256 - 6) + b"\r\n").startswith(b"-ERR Line too long")
    # a 1 MB "line" in pieces: one -ERR, bounded buffer, then the next command works
    evs = feed(conn, b"X" * 300)
    assert [e.data[:18] for e in evs if isinstance(e, Respond)] == [b"-ERR Line too long"]
    for _ in range(10):
        assert feed(conn, b"Y" * 100_000) == []
        assert conn.buffered == 0
    assert reply(conn, b"end of it\r\nSTAT\r\n") == b"+OK 3 600\r\n"


def test_pipelined_commands_answered_in_order() -> None:
    conn = logged_in()
    evs = feed(conn, b"STAT\r\nNOOP\r\nLIST 1\r\nRETR 1\r\nSTAT\r\n")
    assert [e.data for e in evs[:3]] == [b"+OK 3 600\r\n", b"+OK NOOP\r\n", b"+OK 1 100\r\n"]
    assert isinstance(evs[3], Retrieve)
    assert reply(conn, b"") == b"+OK 3 600\r\n"


def test_bare_lf_line_ends_are_accepted() -> None:
    conn = logged_in()
    assert reply(conn, b"STAT\n") == b"+OK 3 600\r\n"


def test_empty_maildrop() -> None:
    conn = logged_in([])
    assert reply(conn, b"STAT\r\n") == b"+OK 0 0\r\n"
    assert reply(conn, b"LIST\r\n") == b"+OK 0 messages (0 octets)\r\n.\r\n"
    assert reply(conn, b"UIDL\r\n") == b"+OK Unique-id listing follows\r\n.\r\n"


def test_transition_table_is_the_only_way_between_states() -> None:
    assert set(p.TRANSITIONS.values()) <= set(State)
    assert all(states for states in p.COMMANDS.values())
    assert not any(State.UPDATE in s for s in p.COMMANDS.values())


# --- transforms -----------------------------------------------------------------------------

def stuff(msg: bytes, sizes: list[int]) -> bytes:
    s, out, i = DotStuffer(), [], 0
    for k in sizes:
        out.append(s.feed(msg[i:i + k]))
        i += k
    out.append(s.feed(msg[i:]))
    return b"".join(out) + s.finish()


def unstuff(wire: bytes, sizes: list[int]) -> tuple[bytes, DotUnstuffer]:
    u, i = DotUnstuffer(), 0
    out: list[bytes | memoryview] = []
    for k in sizes:
        out += u.feed(wire[i:i + k])
        i += k
    out += u.feed(wire[i:])
    return b"".join(out), u


def test_dot_stuffing_first_line_and_boundaries() -> None:
    assert stuff(b".a\r\n", []) == b"..a\r\n.\r\n"
    assert stuff(b"a\r\n.b\r\n", [3]) == b"a\r\n..b\r\n.\r\n"        # "\n|." across chunks
    assert stuff(b"a\r\n.\r\n", [4]) == b"a\r\n..\r\n.\r\n"
    assert stuff(b"no end", []) == b"no end\r\n.\r\n"
    assert stuff(b"", []) == b".\r\n"
    assert stuff(b"x.y\r\n", []) == b"x.y\r\n.\r\n"


def test_dot_unstuffing_finds_terminator_and_keeps_what_follows() -> None:
    out, u = unstuff(b"..a\r\nb\r\n.\r\n+OK next\r\n", [1, 1, 1])
    assert out == b".a\r\nb\r\n" and u.done and u.rest == b"+OK next\r\n"
    out, u = unstuff(b".\r\n", [])
    assert out == b"" and u.done


@settings(max_examples=300, deadline=None)
@given(parts=st.lists(st.sampled_from([b".", b"\r\n", b"\n", b"a", b"\r", b"..", b".\r\n"]),
                      max_size=40),
       seed=st.integers(0, 2**32))
def test_stuff_unstuff_round_trip(parts: list[bytes], seed: int) -> None:
    msg = b"".join(parts)
    rnd = random.Random(seed)
    wire = stuff(msg, [rnd.randint(0, 6) for _ in range(rnd.randint(0, 12))])
    assert b"\r\n.\r\n" not in (b"\r\n" + wire)[:-3]      # the only terminator is the last
    expected = msg if msg.endswith(b"\r\n") or not msg else msg + b"\r\n"
    out, u = unstuff(wire + b"+OK", [rnd.randint(1, 6) for _ in range(rnd.randint(0, 20))])
    assert u.done and out == expected and u.rest == b"+OK"


def test_unstuffer_memory_is_bounded_for_a_huge_line() -> None:
    u = DotUnstuffer()
    total = 0
    for _ in range(50):
        total += sum(len(piece) for piece in u.feed(b"x" * 100_000 + b"\r"))
        assert len(u._carry) <= 1
    assert total == 50 * 100_001 - 1


def top(msg: bytes, n: int, sizes: list[int]) -> bytes:
    f, out, i = TopFilter(n), [], 0
    for k in [*sizes, len(msg)]:
        out.append(f.feed(msg[i:i + k]))
        i += k
        if f.done:
            break
    return b"".join(out)


MSG = b"Subject: x\r\nFrom: y\r\n\r\nl1\r\nl2\r\nl3\r\n"


@pytest.mark.parametrize("sizes", [[], [1] * 40, [10, 11, 1], [22, 1, 1], [21, 3]])
def test_top_header_and_n_lines_across_chunks(sizes: list[int]) -> None:
    assert top(MSG, 0, sizes) == b"Subject: x\r\nFrom: y\r\n\r\n"
    assert top(MSG, 2, sizes) == b"Subject: x\r\nFrom: y\r\n\r\nl1\r\nl2\r\n"
    assert top(MSG, 10, sizes) == MSG


def test_top_edge_cases() -> None:
    assert top(b"\r\nbody\r\n", 0, []) == b"\r\n"                 # no header at all
    assert top(b"A: b\nC: d\n\nx\ny\n", 1, []) == b"A: b\nC: d\n\nx\n"  # LF-only message
    assert top(b"A: b\r\nno blank line", 3, []) == b"A: b\r\nno blank line"
