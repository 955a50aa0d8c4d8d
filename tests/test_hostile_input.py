"""Hostile input: every byte sequence gets a protocol reply, never an exception (issue 12).

Pure bytes, no server: the crashers found by hand and by fuzzing (fuzz/README.md) each with the
reply that names the bound, and a bounded deterministic run of the fuzz targets (fuzz/targets.py)
seeded with the recorded client sessions of fuzz/corpus/.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay import mimetree
from relay.protocol import imap as I
from relay.protocol import pop3 as P3
from relay.protocol import smtp as S
from relay.protocol.imap import Command, ImapParser, ImapSyntaxError, Reject

from poison import nested_multipart, nested_rfc822

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "fuzz" / "corpus"


def _load_targets() -> ModuleType:
    spec = importlib.util.spec_from_file_location("relay_fuzz_targets", ROOT / "fuzz" / "targets.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


targets = _load_targets()


# --- SMTP ------------------------------------------------------------------------------------

def smtp(*lines: bytes, **kw: object) -> list[str]:
    """Final reply lines ("250 2.0.0 OK") after the banner, every event answered 250/354."""
    conn = S.SmtpConnection("relay.test", max_size=10_000, **kw)  # type: ignore[arg-type]
    conn.data_to_send()
    conn.receive_data(b"".join(lines))
    while (ev := conn.next_event()) is not S.NEED_DATA:
        if ev is S.PAUSED:
            conn.reply(S.R_354 if isinstance(conn._pending, S.DataStart) else S.R_OK)
    return [ln for ln in conn.data_to_send().decode().split("\r\n") if re.match(r"\d{3} ", ln)]


def test_smtp_size_with_a_unicode_digit_is_a_syntax_error() -> None:
    # str.isdigit("²") is True and int("²") raises: this dropped the session
    assert smtp(b"EHLO c\r\n", b"MAIL FROM:<a@b.test> SIZE=\xc2\xb2\r\n")[-1].startswith("501 5.5.4")


@pytest.mark.parametrize("value", [b"9" * 21, b"9" * 900, b"\xd9\xa1\xd9\xa2", b"-1", b""])
def test_smtp_size_beyond_20_ascii_digits_is_refused(value: bytes) -> None:
    assert S.MAX_SIZE_DIGITS == 20                                   # RFC 1870 5
    assert smtp(b"EHLO c\r\n", b"MAIL FROM:<a@b.test> SIZE=" + value + b"\r\n")[-1].startswith("501 5.5.4")


def test_smtp_size_of_5000_digits_is_beyond_the_line_bound() -> None:
    assert smtp(b"EHLO c\r\n", b"MAIL FROM:<a@b.test> SIZE=" + b"9" * 5000 + b"\r\n")[-1] == \
        "500 5.5.2 Line too long"


def test_smtp_size_of_20_digits_is_a_number_then_too_big() -> None:
    assert smtp(b"EHLO c\r\n", b"MAIL FROM:<a@b.test> SIZE=" + b"9" * 20 + b"\r\n")[-1].startswith("552 5.3.4")


def test_smtp_bdat_takes_ascii_digits_only() -> None:
    # "١٢" (Arabic-Indic digits) matched \d and int() read it as 12
    got = smtp(b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\n",
               "BDAT \u0661\u0662 LAST\r\n".encode())
    assert got[-1].startswith("501 5.5.4")


@pytest.mark.parametrize("addr", [b"a\x00@b.test", b"a@b.test\x00", b"\x00", b"a\x01b@c.test",
                                  b"a@b\x7f.test", b"a\tb@c.test", b"a@b.test\x1f", b"\x1c",
                                  b"a\xc2\x85@b.test"])
def test_control_characters_in_the_sender_get_501_5_1_7(addr: bytes) -> None:
    got = smtp(b"EHLO c\r\n", b"MAIL FROM:<" + addr + b"> SMTPUTF8\r\n")
    assert got[-1].startswith("501 5.1.7"), got


@pytest.mark.parametrize("addr", [b"a\x00@b.test", b"x@y.test\x0b", b"post\x00master"])
def test_control_characters_in_a_recipient_are_refused(addr: bytes) -> None:
    got = smtp(b"EHLO c\r\nMAIL FROM:<a@b.test>\r\n", b"RCPT TO:<" + addr + b">\r\n")
    assert got[-1].startswith("501 5.1.3"), got          # RFC 3463: 5.1.3 for a destination


def test_null_sender_and_plain_addresses_still_accepted() -> None:
    got = smtp(b"EHLO c\r\nMAIL FROM:<>\r\nRCPT TO:<b@y.test>\r\nRSET\r\n",
               b"MAIL FROM:< a@b.test >\r\n")
    assert [g[:3] for g in got] == ["250", "250", "250", "250", "250"]


def test_non_ascii_parameter_name_is_not_a_parameter() -> None:
    got = smtp(b"EHLO c\r\n", "MAIL FROM:<a@b.test> \u017fIZE=10\r\n".encode())   # ſIZE
    assert got[-1].startswith("555 5.5.4")


def test_non_ascii_verb_is_not_a_command() -> None:
    # "quıt".upper() == "QUIT": a dotless i must not pass for an i
    assert smtp(b"EHLO c\r\n", "qu\u0131t\r\n".encode())[-1].startswith("500 5.5.2")


# --- bare CR / bare LF in DATA (docs/smtp.md "Bare CR and LF") -------------------------------

def smtp_message(wire: bytes) -> tuple[list[bytes], list[str]]:
    conn = S.SmtpConnection("relay.test", max_size=10_000)
    conn.data_to_send()
    conn.receive_data(b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nDATA\r\n" + wire)
    bodies, body = [], bytearray()
    while (ev := conn.next_event()) is not S.NEED_DATA:
        if isinstance(ev, S.DataChunk):
            body += ev.data
        elif isinstance(ev, S.DataEnd):
            bodies.append(bytes(body))
            body.clear()
        elif ev is S.PAUSED:
            conn.reply(S.R_354 if isinstance(conn._pending, S.DataStart) else S.R_OK)
    lines = [ln for ln in conn.data_to_send().decode().split("\r\n") if re.match(r"\d{3} ", ln)]
    return bodies, lines


@pytest.mark.parametrize("smuggle", [b"\n.\n", b"\n.\r\n", b"\r.\r", b"\r\n.\n", b"\n.\r"])
def test_only_crlf_dot_crlf_ends_data_so_nothing_is_smuggled(smuggle: bytes) -> None:
    # SMTP smuggling (CVE-2023-51764): a non-standard end of data followed by a second
    # transaction must stay content of the first message, byte for byte
    payload = b"Subject: a\r\n\r\nbody" + smuggle + b"MAIL FROM:<evil@x.test>\r\nRCPT TO:<c@d.test>\r\nDATA\r\n"
    bodies, lines = smtp_message(payload + b"\r\n.\r\n")
    assert bodies == [payload.replace(b"\r\n.", b"\r\n") + b"\r\n"]    # a stuffed dot goes
    assert lines[-1].startswith("250") and len([ln for ln in lines if ln.startswith("354")]) == 1


def test_bare_cr_and_lf_in_content_are_stored_as_sent() -> None:
    payload = b"Subject: a\n\nline one\nline two\rstill two\r\n.. dot\n"
    bodies, _ = smtp_message(payload + b"\r\n.\r\n")
    assert bodies == [b"Subject: a\n\nline one\nline two\rstill two\r\n. dot\n\r\n"]


def test_command_lines_ending_in_bare_lf_are_accepted() -> None:
    assert [g[:3] for g in smtp(b"EHLO c\nMAIL FROM:<a@b.test>\nRCPT TO:<c@d.test>\n")] == ["250"] * 3


# --- IMAP ------------------------------------------------------------------------------------

def imap_reply(line: bytes, state: str = I.SELECTED) -> str:
    """What the server answers before touching the store: BAD text, or "ok"."""
    p = ImapParser()
    p.receive_data(line)
    ev = p.next_event()
    if isinstance(ev, Reject):
        return f"{ev.status} {ev.text}"
    assert isinstance(ev, Command)
    bad = I.check_state(ev, state)
    if bad is not None:
        return f"{bad.status} {bad.text}"
    try:
        targets._imap_command(ev)
    except ImapSyntaxError as e:                     # as relay/server/imap.py answers it
        return f"BAD {e}" if str(e).startswith("[") else f"BAD Syntax error: {e}"
    return "ok"


def test_imap_non_ascii_section_before_login_is_bad() -> None:
    assert imap_reply(b"t FETCH 1 BODY[\xff]\r\n", I.NOT_AUTH) == "BAD Syntax error: invalid character in section"


@pytest.mark.parametrize("line", [b"t SEARCH " + b"NOT " * 3000 + b"ALL\r\n",
                                  b"t SEARCH " + b"OR ALL " * 3000 + b"ALL\r\n",
                                  b"t SEARCH " + b"NOT (" * 20 + b"ALL" + b")" * 20 + b"\r\n"])
def test_imap_search_nesting_is_bounded(line: bytes) -> None:
    assert imap_reply(line) == f"BAD [LIMIT] Search keys nested too deeply (limit {I.MAX_SEARCH_DEPTH})"


def test_imap_parentheses_nesting_is_bounded() -> None:
    line = b"t SEARCH " + b"(" * 3000 + b"ALL" + b")" * 3000 + b"\r\n"
    assert imap_reply(line) == f"BAD Syntax error: [LIMIT] Parentheses nested too deeply (limit {I.MAX_LIST_DEPTH})"


def test_imap_number_of_search_keys_is_bounded() -> None:
    assert imap_reply(b"t SEARCH" + b" ALL" * (I.MAX_SEARCH_KEYS + 1) + b"\r\n") == \
        f"BAD [LIMIT] Too many search keys (limit {I.MAX_SEARCH_KEYS})"
    assert imap_reply(b"t SEARCH" + b" ALL" * I.MAX_SEARCH_KEYS + b"\r\n") == "ok"


def test_imap_search_of_many_keys_evaluates_flat() -> None:
    # 1000 ANDed keys were 1000 nested closures: RecursionError at match time
    key = I.parse_search(["UNDELETED"] * I.MAX_SEARCH_KEYS)
    assert key.compile(1, 1)(1, 1, "S", 0.0, 10) is True
    assert key.compile(1, 1)(1, 1, "T", 0.0, 10) is False
    ors = I.parse_search(["OR", "DELETED", ["OR", "FLAGGED", "SEEN"]])
    assert ors.compile(1, 1)(1, 1, "S", 0.0, 10) and not ors.compile(1, 1)(1, 1, "", 0.0, 10)


@pytest.mark.parametrize("line, reply", [
    (b"t FETCH " + b"9" * 5000 + b" FLAGS\r\n", "BAD Syntax error: invalid sequence number '99999999999999999999'"),
    (b"t FETCH 1:" + b"1" * 11 + b" FLAGS\r\n", "BAD Syntax error: invalid sequence number '11111111111'"),
    (b"t SEARCH LARGER " + b"9" * 5000 + b"\r\n", "BAD Syntax error: LARGER needs a number of 1 to 19 digits"),
    (b't SEARCH SMALLER "\xc2\xb2"\r\n', "BAD Syntax error: SMALLER needs a number of 1 to 19 digits"),
    (b't SEARCH "\xc2\xb2"\r\n', "BAD Syntax error: invalid sequence number '\u00b2'"),
    (b"t FETCH 1 BODY[" + b"9" * 5000 + b"]\r\n", "BAD Syntax error: invalid section part"),
    (b"t FETCH 1 BODY[1.\xd9\xa1]\r\n", "BAD Syntax error: invalid character in section"),
    (b"t FETCH 1 BODY[]<" + b"9" * 20 + b".1>\r\n", "BAD Syntax error: unknown FETCH item BODY[]<" + "9" * 20 + ".1>"),
])
def test_imap_numbers_are_ascii_with_bounded_digits(line: bytes, reply: str) -> None:
    assert imap_reply(line) == reply


def test_imap_search_key_names_are_ascii() -> None:
    assert imap_reply('t SEARCH "\u017fEEN"\r\n'.encode()) == "BAD Syntax error: unsupported search key \u017fEEN"


def test_imap_search_date_takes_ascii_digits_only() -> None:
    assert imap_reply("t SEARCH SINCE \u0661-Jan-2020\r\n".encode()) == "BAD Syntax error: invalid character in atom"
    assert imap_reply('t SEARCH SINCE "\u0661-Jan-2020"\r\n'.encode()).startswith("BAD Syntax error: invalid date")


def test_imap_tag_with_a_bare_lf_is_not_echoed() -> None:
    # found by fuzzing: "^...+$" matched "UT\n", and the reply carried a bare LF to the client
    p = ImapParser()
    p.receive_data(b"UT\n\r\n")
    assert p.next_event() == Reject("*", "BAD", "Missing or invalid tag")


def test_imap_quoted_string_never_carries_a_trailing_lf() -> None:
    assert I.quote(b"abc\n") == b"{4}\r\nabc\n"
    assert I.quote("x\r") == b"{2}\r\nx\r"


def test_imap_literal_marker_before_a_bare_lf_is_not_a_literal() -> None:
    p = ImapParser()
    p.receive_data(b"t LOGIN {5}\n\r\n")
    assert p.next_event() == Reject("t", "BAD", "Syntax error: invalid character in atom")


# --- POP3 ------------------------------------------------------------------------------------

def pop3(*lines: bytes) -> list[bytes]:
    conn = P3.Pop3Connection("relay.test")
    out = []
    conn.receive_data(b"USER a\r\nPASS b\r\n" + b"".join(lines))
    while (ev := conn.next_event()) is not P3.NEED_DATA:
        if isinstance(ev, P3.Authenticate):
            out.append(conn.auth_succeeded(ev.user, 1, [P3.Message(1, 10), P3.Message(2, 20)]))
        elif isinstance(ev, P3.Respond):
            out.append(ev.data)
        elif isinstance(ev, P3.Retrieve):
            out.append(ev.head)
    return out[2:]


@pytest.mark.parametrize("line, reply", [
    (b"RETR \xc2\xb2\r\n", "-ERR Invalid message number '\u00b2'\r\n"),
    (b"DELE \xd9\xa1\r\n", "-ERR Invalid message number '\u0661'\r\n"),
    (b"LIST " + b"9" * 5000 + b"\r\n", "-ERR Line too long (limit 255 octets with CRLF)\r\n"),
    (b"TOP 1 " + b"9" * 10 + b"\r\n", "-ERR Invalid line count '9999999999' (at most 9 digits)\r\n"),
    (b"TOP 1 \xc2\xb3\r\n", "-ERR Invalid line count '\u00b3'\r\n"),
    ("\u017ftat\r\n".encode(), "-ERR Unknown command: '?'\r\n"),      # "ſtat".upper() == "STAT"
])
def test_pop3_numbers_are_ascii_with_bounded_digits(line: bytes, reply: str) -> None:
    assert pop3(line, b"STAT\r\n") == [reply.encode(), b"+OK 2 30\r\n"]


# --- MIME scanner ----------------------------------------------------------------------------

def many_parts(n: int) -> bytes:
    return (b"Content-Type: multipart/mixed; boundary=z\r\n\r\n"
            + b"--z\r\nContent-Type: text/plain\r\n\r\npart\r\n" * n + b"--z--\r\n")


def structure(tmp_path: Path, data: bytes) -> tuple[object, bytes, bytes]:
    path = tmp_path / "1.M1P1.t,S=1:2,"
    path.write_bytes(data)
    root = mimetree.parse(path)
    return mimetree.envelope(root), I.render(mimetree.envelope(root)), mimetree.bodystructure(root)


def test_from_with_3000_nested_comments_is_nil(tmp_path: Path) -> None:
    env, rendered, _ = structure(tmp_path, b"From: " + b"(" * 3000 + b"\r\nTo: b@c.test\r\n\r\nx")
    assert isinstance(env, list) and env[2] is None and env[5] == [[None, None, b"b", b"c.test"]]
    assert rendered.startswith(b"(NIL NIL NIL NIL NIL ((NIL NIL")


def test_comments_nested_up_to_the_bound_still_parse(tmp_path: Path) -> None:
    d = mimetree.MAX_COMMENT_DEPTH
    env, _, _ = structure(tmp_path, b"From: " + b"(" * d + b")" * d + b" a@b.test\r\n\r\nx")
    assert isinstance(env, list) and env[2] == [[None, None, b"a", b"b.test"]]


def test_address_groups_nested_5000_deep_are_nil(tmp_path: Path) -> None:
    env, _, _ = structure(tmp_path, b"To: " + b"a:" * 5000 + b"\r\n\r\nx")   # RecursionError
    assert isinstance(env, list) and env[5] is None


def test_overlong_address_field_is_nil(tmp_path: Path) -> None:
    field = b", ".join(b"u%d@example.test" % i for i in range(5000))
    assert len(field) > mimetree.MAX_STRUCTURED_FIELD
    env, _, _ = structure(tmp_path, b"Cc: " + field + b"\r\nTo: a@b.test\r\n\r\nx")
    assert isinstance(env, list) and env[6] is None and env[5] == [[None, None, b"a", b"b.test"]]


def test_deep_rfc822_nesting_stops_at_max_depth(tmp_path: Path) -> None:
    _, _, bs = structure(tmp_path, nested_rfc822(3000))
    assert bs.count(b'("message" "rfc822"') == mimetree.MAX_DEPTH
    assert bs.count(b'("application" "octet-stream"') == 1          # the rest: one flat part
    assert bs.count(b"(") == bs.count(b")")


def test_deep_multipart_nesting_stops_at_max_depth(tmp_path: Path) -> None:
    _, _, bs = structure(tmp_path, nested_multipart(3000))
    assert bs.count(b'"mixed"') == mimetree.MAX_DEPTH + 1
    assert bs.count(b"(") == bs.count(b")")


def test_thousands_of_parts_stop_at_max_parts(tmp_path: Path) -> None:
    _, _, bs = structure(tmp_path, many_parts(20000))
    assert bs.count(b'("text" "plain"') == mimetree.MAX_PARTS - 1      # the root counts too


@pytest.mark.parametrize("ctype", [b"text/plain; name*0*=x'y'%ff; name*1*=%zz",
                                   b"multipart/mixed; " + b"a=b; " * 20000,
                                   b"\xff\xfe/\x00; charset*=utf-16''%d8%00",
                                   b"multipart(/mixed; boundary=b"])
def test_unparsable_content_type_is_a_flat_text_part(tmp_path: Path, ctype: bytes) -> None:
    _, _, bs = structure(tmp_path, b"Content-Type: " + ctype + b"\r\n\r\n--b\r\nbody\r\n")
    assert bs.startswith(b'("text" "plain"') and bs.count(b"(") == bs.count(b")")


def test_nul_in_a_header_never_reaches_the_client(tmp_path: Path) -> None:
    # RFC 9051 4.3: a literal holds CHAR8, no NUL; Dovecot sends 0x80 in its place
    _, env, bs = structure(tmp_path, b"Subject: a\x00b\r\nContent-Type: text/x\x00y\r\n\r\nx")
    assert b"\x00" not in env and b"a\x80b" in env
    assert b"\x00" not in bs and bs.startswith(b'("text" "plain"')


# --- bounded fuzz run: the targets over seeded, mutated sessions -----------------------------

SPICE = [b"\x00", b"\r", b"\n", b"\r\n", b"\r\n.\r\n", b"\xc2\xb2", b"\xff", b"\xd9\xa1", b"(" * 40,
         b")", b"9" * 30, b"9" * 5000, b"{5}\r\n", b"{4+}\r\n", b" NOT" * 40, b"[", b"]", b"<", b">",
         b'"', b"\\", b"*", b":", b" ", b"BODY[1.2.MIME]", b"SIZE=", b"BDAT 3 LAST\r\n", b"DATA\r\n",
         b"AUTH PLAIN\r\n", b"=", b"\t", b"\x7f", b"RETR ", b"TOP 1 ", b"--", b"boundary=",
         b"Content-Type: message/rfc822\r\n\r\n", b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n"]


def seeds(name: str) -> list[bytes]:
    return [p.read_bytes() for p in sorted((CORPUS / name).iterdir())]


@st.composite
def mutated(draw: st.DrawFn, name: str) -> bytes:
    data = bytearray(draw(st.sampled_from(seeds(name))))
    for _ in range(draw(st.integers(0, 8))):
        pos = draw(st.integers(0, len(data)))
        op = draw(st.integers(0, 3))
        if op == 0:
            data[pos:pos] = draw(st.sampled_from(SPICE))
        elif op == 1:
            data[pos:pos + draw(st.integers(1, 40))] = b""
        elif op == 2:
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        else:
            data[pos:pos + 1] = draw(st.sampled_from(SPICE))
    if name != "mime" and data:
        data[0] = draw(st.integers(0, 255))                     # the read size
    return bytes(data)


FUZZ = settings(max_examples=150, derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.mark.parametrize("name", ["smtp", "imap", "pop3", "mime"])
def test_every_seed_runs_clean(name: str) -> None:
    for data in seeds(name):
        targets.TARGETS[name](data)


@FUZZ
@given(mutated("smtp"))
def test_fuzz_smtp(data: bytes) -> None:
    targets.smtp_one_input(data)


@FUZZ
@given(mutated("imap"))
def test_fuzz_imap(data: bytes) -> None:
    targets.imap_one_input(data)


@FUZZ
@given(mutated("pop3"))
def test_fuzz_pop3(data: bytes) -> None:
    targets.pop3_one_input(data)


@FUZZ
@given(mutated("mime"))
def test_fuzz_mime(data: bytes) -> None:
    targets.mime_one_input(data)


@FUZZ
@given(st.sampled_from(["smtp", "imap", "pop3", "mime"]), st.binary(max_size=600))
def test_fuzz_random_bytes(name: str, data: bytes) -> None:
    targets.TARGETS[name](data)


def test_header_bytes_parsed_per_message_are_bounded(tmp_path: Path) -> None:
    # 200 parts of 120 KiB headers held the GIL for 14 s in one BODYSTRUCTURE
    part = b"--z\r\nContent-Type: application/dicom\r\n" + b"a: b\r\n" * 20000 + b"\r\nDICM\r\n"
    data = b"Content-Type: multipart/mixed; boundary=z\r\n\r\n" + part * 200 + b"--z--\r\n"
    path = tmp_path / "1.M1P1.t,S=1:2,"
    path.write_bytes(data)
    root = mimetree.parse(path)
    assert len(root.children) == 200
    kinds = [(c.maintype, c.subtype) for c in root.children]
    budget_parts = mimetree.MAX_HEADERS_TOTAL // (len(part) - 10)
    assert kinds[:budget_parts - 1] == [("application", "dicom")] * (budget_parts - 1)
    assert kinds[budget_parts + 1:] == [("text", "plain")] * (200 - budget_parts - 1)
    with open(path, "rb") as f:          # offsets stay exact past the budget: BODY[200] works
        last = root.children[-1]
        f.seek(last.body_offset)
        assert f.read(last.body_size) == b"DICM"


@pytest.mark.parametrize("name", ["smtp", "imap", "pop3", "mime"])
def test_atheris_bounded_run(name: str, tmp_path: Path) -> None:
    """The coverage-guided fuzzer itself, a bounded run from the seeds (fixed seed and count);
    the long runs are documented in fuzz/README.md."""
    pytest.importorskip("atheris")      # the `fuzz` extra; .ci/run installs it
    work = tmp_path / "work"
    work.mkdir()
    p = subprocess.run([sys.executable, str(ROOT / "fuzz" / "run.py"), name, "-runs=1500",
                        "-seed=12", "-timeout=20", f"-artifact_prefix={tmp_path}/", str(work)],
                       capture_output=True, text=True, timeout=300, check=False)
    assert p.returncode == 0, p.stderr[-3000:]
    assert re.search(r"Done 1500 runs", p.stderr), p.stderr[-1000:]
    assert not list(tmp_path.glob("crash-*"))
