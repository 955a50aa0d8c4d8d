"""Pure-bytes tests of relay.protocol.imap: parser, bounds, sequence sets, FETCH/SEARCH/STORE
argument parsing and response formatting. No server, no sockets."""

from __future__ import annotations

import calendar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.protocol import imap as p
from relay.protocol.imap import (
    NEED_DATA,
    ClientLine,
    Command,
    Continuation,
    ImapParser,
    Reject,
)


def events(parser: ImapParser, data: bytes = b"") -> list[object]:
    if data:
        parser.receive_data(data)
    out = []
    while (ev := parser.next_event()) is not NEED_DATA:
        out.append(ev)
    return out


def one(data: bytes, **kw: int) -> object:
    evs = events(ImapParser(**kw), data)
    assert len(evs) == 1, evs
    return evs[0]


# --- commands and arguments ----------------------------------------------------------------

def test_simple_command() -> None:
    assert one(b"a1 NOOP\r\n") == Command("a1", "NOOP", ())


def test_name_is_upper_cased_and_args_kept() -> None:
    assert one(b"A2 login alice secret\r\n") == Command("A2", "LOGIN", ("alice", "secret"))


def test_quoted_strings_with_escapes() -> None:
    ev = one(b'a LOGIN "al ice" "se\\"c\\\\ret"\r\n')
    assert ev == Command("a", "LOGIN", (b"al ice", b'se"c\\ret'))


def test_lists_nested() -> None:
    ev = one(b"a FETCH 1:* (FLAGS (UID X) BODY.PEEK[])\r\n")
    assert ev == Command("a", "FETCH", ("1:*", ["FLAGS", ["UID", "X"], "BODY.PEEK[]"]))


def test_section_atom_keeps_spaces_and_parens() -> None:
    ev = one(b"a FETCH 1 (BODY.PEEK[HEADER.FIELDS (From To)]<0.100> UID)\r\n")
    assert isinstance(ev, Command)
    assert ev.args[1] == ["BODY.PEEK[HEADER.FIELDS (From To)]<0.100>", "UID"]


def test_uid_prefix() -> None:
    assert one(b"a UID fetch 1:5 FLAGS\r\n") == Command("a", "FETCH", ("1:5", "FLAGS"), uid=True)


def test_uid_with_unknown_subcommand_is_bad() -> None:
    ev = one(b"a UID FOO 1\r\n")
    assert isinstance(ev, Reject) and ev.tag == "a" and ev.status == "BAD"


def test_synchronizing_literal_asks_for_continuation() -> None:
    parser = ImapParser()
    assert events(parser, b"a LOGIN {5}\r\n") == [Continuation("Ready for literal data")]
    assert events(parser, b"al") == []
    assert events(parser, b"ice {6}\r\n") == [Continuation("Ready for literal data")]
    assert events(parser, b"se\r\nt!\r\n") == [Command("a", "LOGIN", (b"alice", b"se\r\nt!"))]


def test_nonsynchronizing_literal_needs_no_continuation() -> None:
    ev = events(ImapParser(), b"a LOGIN {5+}\r\nalice {6+}\r\nsecret\r\nb NOOP\r\n")
    assert ev == [Command("a", "LOGIN", (b"alice", b"secret")), Command("b", "NOOP", ())]


def test_zero_length_literal() -> None:
    assert one(b"a LOGIN {0+}\r\n {1+}\r\nx\r\n") == Command("a", "LOGIN", (b"", b"x"))


def test_literal_split_across_many_feeds() -> None:
    parser = ImapParser()
    data = b"t1 LOGIN {3+}\r\nabc xyz\r\nt2 NOOP\r\n"
    out: list[object] = []
    for i in range(len(data)):
        out += events(parser, data[i:i + 1])
    assert out == [Command("t1", "LOGIN", (b"abc", "xyz")), Command("t2", "NOOP", ())]


def test_pipelined_commands_in_one_chunk() -> None:
    evs = events(ImapParser(), b"1 NOOP\r\n2 CAPABILITY\r\n3 LOGOUT\r\n")
    assert [e.name for e in evs if isinstance(e, Command)] == ["NOOP", "CAPABILITY", "LOGOUT"]


def test_incomplete_line_needs_data() -> None:
    parser = ImapParser()
    assert events(parser, b"a NOOP") == []
    assert events(parser, b"\r") == []
    assert events(parser, b"\n") == [Command("a", "NOOP", ())]


@pytest.mark.parametrize("line", [b"NOOP\r\n", b"+x NOOP\r\n", b"a\"b NOOP\r\n", b"\r\n"])
def test_bad_or_missing_tag(line: bytes) -> None:
    ev = one(line)
    assert isinstance(ev, Reject) and ev.status == "BAD"


@pytest.mark.parametrize("line", [b'a LOGIN "unterminated\r\n', b"a FETCH 1 (FLAGS\r\n",
                                  b"a FETCH 1 FLAGS)\r\n", b'a LOGIN "bad\\escape" x\r\n',
                                  b"a FETCH 1 BODY[TEXT\r\n", b"a LOGIN al\x01ice x\r\n"])
def test_syntax_errors_are_tagged_bad(line: bytes) -> None:
    ev = one(line)
    assert isinstance(ev, Reject) and ev.tag == "a" and ev.status == "BAD"


def test_nul_in_command_is_refused() -> None:
    ev = one(b"a LOGIN al\x00ice x\r\n")
    assert isinstance(ev, Reject) and ev.tag == "a" and ev.status == "BAD"


def test_overlong_line_is_refused_and_session_goes_on() -> None:
    parser = ImapParser(max_line=100)
    evs = events(parser, b"a1 NOOP " + b"x" * 300)
    assert evs == [Reject("a1", "BAD", "[TOOBIG] Command line too long")]
    assert parser.buffered == 0                              # nothing kept of the long line
    assert events(parser, b"y" * 10_000) == []
    assert parser.buffered == 0
    assert events(parser, b"zz\r\na2 NOOP\r\n") == [Command("a2", "NOOP", ())]


def test_overlong_complete_line_in_one_chunk() -> None:
    evs = events(ImapParser(max_line=50), b"a1 NOOP " + b"x" * 60 + b"\r\na2 NOOP\r\n")
    assert evs == [Reject("a1", "BAD", "[TOOBIG] Command line too long"), Command("a2", "NOOP", ())]


def test_overlong_line_ending_in_nonsync_literal_discards_the_literal() -> None:
    parser = ImapParser(max_line=50)
    evs = events(parser, b"a1 LOGIN " + b"x" * 60 + b" {5+}\r\nhello" + b"\r\na2 NOOP\r\n")
    assert evs == [Reject("a1", "BAD", "[TOOBIG] Command line too long"), Command("a2", "NOOP", ())]


def test_sync_literal_too_big_is_refused_before_continuation() -> None:
    parser = ImapParser(max_literal=1000)
    evs = events(parser, b"a LOGIN {1001}\r\n")
    assert len(evs) == 1 and isinstance(evs[0], Reject) and evs[0].status == "BAD"
    assert "[TOOBIG]" in evs[0].text
    assert events(parser, b"b NOOP\r\n") == [Command("b", "NOOP", ())]


def test_nonsync_literal_too_big_is_discarded_unbuffered() -> None:
    parser = ImapParser(max_literal=1000)
    evs = events(parser, b"a LOGIN {5000+}\r\n" + b"z" * 2000)
    assert len(evs) == 1 and isinstance(evs[0], Reject) and "[TOOBIG]" in evs[0].text
    assert parser.buffered == 0
    assert events(parser, b"z" * 3000 + b" rest of line\r\nb NOOP\r\n") == [Command("b", "NOOP", ())]


def test_sum_of_literals_is_bounded() -> None:
    parser = ImapParser(max_literal=10)
    evs = events(parser, b"a LOGIN {6+}\r\nabcdef {6+}\r\nghijkl\r\nb NOOP\r\n")
    assert isinstance(evs[0], Reject) and "[TOOBIG]" in evs[0].text
    assert evs[-1] == Command("b", "NOOP", ())


def test_append_is_refused_at_the_literal() -> None:
    parser = ImapParser()
    evs = events(parser, b"a APPEND INBOX (\\Seen) {100000}\r\n")
    assert len(evs) == 1 and isinstance(evs[0], Reject) and evs[0].status == "NO"
    assert "[CANNOT]" in evs[0].text
    evs = events(parser, b"b APPEND INBOX {3+}\r\nabc\r\nc NOOP\r\n")
    assert isinstance(evs[0], Reject) and evs[0].tag == "b"
    assert evs[1:] == [Command("c", "NOOP", ())]


def test_expect_line_returns_raw_line() -> None:
    parser = ImapParser()
    assert events(parser, b"a AUTHENTICATE PLAIN\r\n") == [Command("a", "AUTHENTICATE", ("PLAIN",))]
    parser.expect_line()
    assert events(parser, b"AGFsaWNlAHNlY3JldA==\r\nb NOOP\r\n") == [
        ClientLine(b"AGFsaWNlAHNlY3JldA=="), Command("b", "NOOP", ())]


def test_expect_line_overlong() -> None:
    parser = ImapParser(max_line=20)
    parser.expect_line()
    evs = events(parser, b"x" * 40)
    assert len(evs) == 1 and isinstance(evs[0], Reject) and evs[0].tag == "*"
    assert events(parser, b"\r\nb NOOP\r\n") == [Command("b", "NOOP", ())]


def test_buffer_stays_bounded_under_a_flood_without_crlf() -> None:
    parser = ImapParser(max_line=1000)
    for _ in range(1000):
        events(parser, b"q" * 4096)
        assert parser.buffered <= 1000 + 4096


# --- states --------------------------------------------------------------------------------

def test_state_table() -> None:
    fetch = Command("a", "FETCH", ("1", "FLAGS"))
    assert p.check_state(fetch, p.SELECTED) is None
    bad = p.check_state(fetch, p.AUTH)
    assert bad is not None and bad.status == "BAD" and "No mailbox" in bad.text
    assert p.check_state(fetch, p.NOT_AUTH) == Reject("a", "BAD", "Log in first")
    assert p.check_state(Command("a", "LOGIN", ()), p.AUTH) == Reject("a", "BAD", "Already authenticated")
    assert p.check_state(Command("a", "XYZZY", ()), p.AUTH) == Reject("a", "BAD", "Unknown command")
    assert p.check_state(Command("a", "CAPABILITY", ()), p.NOT_AUTH) is None


# --- sequence sets -------------------------------------------------------------------------

@pytest.mark.parametrize("text,numbers,star,expected", [
    ("1:*", [1, 2, 3, 9], 9, [1, 2, 3, 9]),
    ("2,4:7", list(range(1, 10)), 9, [2, 4, 5, 6, 7]),
    ("*", [3, 5, 8], 8, [8]),
    ("7:4", list(range(1, 10)), 9, [4, 5, 6, 7]),
    ("5:*", [1, 2, 3], 3, [3]),                  # n:* with n beyond the largest: the largest
    ("100:200", [1, 2, 3], 3, []),
])
def test_sequence_sets(text: str, numbers: list[int], star: int, expected: list[int]) -> None:
    seq = p.parse_sequence_set(text)
    assert seq.select(numbers) == expected
    assert [n for n in numbers if seq.contains(n, star)] == expected


@pytest.mark.parametrize("text", ["", "0", "1:0", "a", "1:", ":2", "1,,2", "-1", "1.5", "4294967296",
                                  "1:*:3", "01"])
def test_malformed_sequence_sets(text: str) -> None:
    with pytest.raises(p.ImapSyntaxError):
        p.parse_sequence_set(text)


def test_empty_mailbox_selects_nothing() -> None:
    assert p.parse_sequence_set("1:*").select([]) == []


# --- FETCH items ---------------------------------------------------------------------------

def test_fetch_macros() -> None:
    assert [a.name for a in p.parse_fetch_atts("FAST")] == ["FLAGS", "INTERNALDATE", "RFC822.SIZE"]
    assert [a.name for a in p.parse_fetch_atts("ALL")][-1] == "ENVELOPE"
    assert [a.name for a in p.parse_fetch_atts("full")][-1] == "BODY"


def test_fetch_body_sections() -> None:
    atts = p.parse_fetch_atts(["UID", "BODY.PEEK[]<100.2000>", "BODY[HEADER.FIELDS (From Subject)]",
                               "body[1.2.MIME]", "BODY[TEXT]", "BODY[2]", "BODY[HEADER.FIELDS.NOT (X-A)]"])
    assert atts[0] == p.FetchAtt("UID")
    assert atts[1] == p.FetchAtt("BODY", p.Section(), True, (100, 2000))
    assert atts[1].response_name() == "BODY[]<100>"
    assert not atts[1].sets_seen
    assert atts[2].section == p.Section((), "HEADER.FIELDS", ("From", "Subject"))
    assert atts[2].response_name() == "BODY[HEADER.FIELDS (From Subject)]"
    assert atts[2].sets_seen
    assert atts[3].section == p.Section((1, 2), "MIME")
    assert atts[3].response_name() == "BODY[1.2.MIME]"
    assert atts[4].section == p.Section((), "TEXT")
    assert atts[5].section == p.Section((2,), "")
    assert atts[6].section == p.Section((), "HEADER.FIELDS.NOT", ("X-A",))


def test_rfc822_sets_seen_and_peek_does_not() -> None:
    rfc822, header, size = p.parse_fetch_atts(["RFC822", "RFC822.HEADER", "RFC822.SIZE"])
    assert rfc822.sets_seen and not header.sets_seen and not size.sets_seen


@pytest.mark.parametrize("item", ["BODY[MIME]", "BODY[FOO]", "BODY[1.X]", "BODY[]<1.0>", "BODY[0]",
                                  "BODY[HEADER.FIELDS]", "BODY[HEADER.FIELDS ()]", "ENVELOPES",
                                  "BODY[TEXT (A)]", "BODY[]<1>"])
def test_bad_fetch_items(item: str) -> None:
    with pytest.raises(p.ImapSyntaxError):
        p.parse_fetch_atts([item])


# --- STORE ---------------------------------------------------------------------------------

def test_store_parse_and_apply() -> None:
    seq, req = p.parse_store(("1:3", "+FLAGS.SILENT", ["\\Seen", "\\Deleted"]))
    assert seq.select([1, 2, 3, 4]) == [1, 2, 3]
    assert req == p.StoreRequest("+", True, "ST")
    assert req.apply("F") == "FST"
    _, req = p.parse_store(("1", "-FLAGS", "\\Seen"))
    assert req.apply("FS") == "F"
    _, req = p.parse_store(("1", "FLAGS", ["\\Flagged", "$Junk"]))
    assert req.letters == "F"
    assert req.apply("PRS") == "FP"                          # replaces IMAP flags, keeps P


@pytest.mark.parametrize("args", [("1",), ("1", "XFLAGS", ["\\Seen"]), ("x", "FLAGS", ["\\Seen"]),
                                  ("1", "FLAGS", ["bad)flag"])])
def test_store_errors(args: tuple[p.Arg, ...]) -> None:
    with pytest.raises(p.ImapSyntaxError):
        p.parse_store(args)


def test_flags_letters_round_trip() -> None:
    assert p.flags_from_letters("TSRFDP") == ["\\Draft", "\\Flagged", "\\Answered", "\\Seen", "\\Deleted"]
    assert p.letters_from_flags(["\\seen", "\\DELETED", "\\Answered"]) == "RST"
    assert p.render_flags("S") == b"(\\Seen)"


# --- SEARCH --------------------------------------------------------------------------------

DAY = 86400
T0 = calendar.timegm((2024, 3, 10, 12, 0, 0))
MSGS = [p.MessageFacts(1, 10, "", T0 - 2 * DAY, 100),
        p.MessageFacts(2, 11, "S", T0 - DAY, 5000),
        p.MessageFacts(3, 15, "ST", T0, 50),
        p.MessageFacts(4, 20, "F", T0 + DAY, 10**9)]


def search(*args: p.Arg) -> list[int]:
    key = p.parse_search(args)
    return [m.uid for m in MSGS if key.matches(m, 4, 20)]


def test_search_keys() -> None:
    assert search("ALL") == [10, 11, 15, 20]
    assert search("SEEN") == [11, 15]
    assert search("UNSEEN") == [10, 20]
    assert search("DELETED") == [15]
    assert search("UNDELETED", "SEEN") == [11]
    assert search("FLAGGED") == [20]
    assert search("UID", "11:15") == [11, 15]
    assert search("UID", "*") == [20]
    assert search("UID", "10,16:*") == [10, 20]
    assert search("1,3:2") == [10, 11, 15]
    assert search("2:3") == [11, 15]
    assert search("LARGER", "100") == [11, 20]
    assert search("SMALLER", "100") == [15]
    assert search("SINCE", "10-Mar-2024") == [15, 20]
    assert search("BEFORE", "10-Mar-2024") == [10, 11]
    assert search("ON", "9-Mar-2024") == [11]
    assert search("NOT", "SEEN") == [10, 20]
    assert search("OR", "DELETED", "FLAGGED") == [15, 20]
    assert search("OR", "SEEN", "LARGER", "10000", "NOT", "DELETED") == [11, 20]
    assert search(["SEEN", "UID", "15:*"]) == [15]
    assert search("CHARSET", "UTF-8", "UNSEEN") == [10, 20]
    assert search("NEW") == []
    assert search("UNKEYWORD", "$Junk") == [10, 11, 15, 20]


@pytest.mark.parametrize("args", [(), ("FOO",), ("SINCE",), ("SINCE", "31-Feb-2024"), ("SINCE", "1-Foo-2024"),
                                  ("LARGER", "x"), ("UID", "0"), ("OR", "SEEN"), ("NOT",),
                                  ("CHARSET", "KOI8-R", "ALL"), ([],)])
def test_search_errors(args: tuple[p.Arg, ...]) -> None:
    with pytest.raises(p.ImapSyntaxError):
        p.parse_search(args)


# --- formatting ----------------------------------------------------------------------------

def test_quote_and_literal() -> None:
    assert p.quote("abc") == b'"abc"'
    assert p.quote('a"b\\c') == b'"a\\"b\\\\c"'
    assert p.quote(b"a\r\nb") == b"{4}\r\na\r\nb"
    assert p.quote("Grüße") == b"{7}\r\nGr\xc3\xbc\xc3\x9fe"


def test_render_nested() -> None:
    assert p.render([None, 12, "x", ["a", None], b"b"]) == b'(NIL 12 "x" ("a" NIL) "b")'


def test_imap_datetime() -> None:
    assert p.imap_datetime(calendar.timegm((1996, 7, 17, 2, 44, 25))) == "17-Jul-1996 02:44:25 +0000"
    assert p.imap_datetime(calendar.timegm((2024, 1, 5, 0, 0, 0))) == "05-Jan-2024 00:00:00 +0000"


def test_fetch_response_pieces() -> None:
    r = p.FetchResponse(3)
    r.add("UID", b"42")
    r.add_file_literal("BODY[]", 0, 1000)
    r.add_literal_bytes("BODY[HEADER]", b"X: y\r\n\r\n")
    r.finish()
    assert r.parts == [b"* 3 FETCH (UID 42", b" BODY[] {1000}\r\n", p.BodyRange(0, 1000),
                       b" BODY[HEADER] {8}\r\nX: y\r\n\r\n", b")\r\n"]


def test_reject_bytes() -> None:
    assert Reject("a", "BAD", "nope").to_bytes() == b"a BAD nope\r\n"
    assert p.tagged("a", "OK", "done") == b"a OK done\r\n"
    assert p.untagged("3 EXISTS") == b"* 3 EXISTS\r\n"


def test_client_uid_set_collapses_runs() -> None:
    from relay.clients.imap import uid_set

    assert uid_set([9, 1, 2, 3, 7, 10, 3]) == b"1:3,7,9:10"
    assert uid_set([5]) == b"5"
    assert len(uid_set(list(range(1, 100_001)))) == len(b"1:100000")
    assert p.parse_sequence_set(uid_set([1, 2, 4]).decode()).select([1, 2, 3, 4]) == [1, 2, 4]


@settings(max_examples=150, deadline=None)
@given(st.lists(st.binary(max_size=300), max_size=20))
def test_parser_never_raises_and_stays_bounded(chunks: list[bytes]) -> None:
    parser = ImapParser(max_line=200, max_literal=100)
    for chunk in chunks:
        parser.receive_data(chunk)
        for _ in range(1000):
            ev = parser.next_event()
            if ev is NEED_DATA:
                break
            assert isinstance(ev, (Command, Continuation, Reject, ClientLine))
        assert parser.buffered <= 200 + 300 + 100


@settings(max_examples=100, deadline=None)
@given(st.lists(st.sampled_from([b"a NOOP", b'b LOGIN "x y" {3+}\r\nabc', b"c FETCH 1:* (FLAGS BODY.PEEK[1.MIME])",
                                 b"d UID SEARCH OR SEEN (UID 2:*)", b"e LOGIN {2}\r\nab x"]), min_size=1, max_size=8),
       st.integers(min_value=1, max_value=17))
def test_pipelined_commands_survive_any_split(cmds: list[bytes], step: int) -> None:
    data = b"".join(c + b"\r\n" for c in cmds)
    parser = ImapParser()
    names = []
    for i in range(0, len(data), step):
        parser.receive_data(data[i:i + step])
        while (ev := parser.next_event()) is not NEED_DATA:
            if isinstance(ev, Command):
                names.append(ev.tag)
    assert names == [c[:1].decode() for c in cmds]
