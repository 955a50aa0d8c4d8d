"""A poison mailbox, end to end (issue 12): hostile messages delivered by smtplib, then read by
imaplib (ENVELOPE, BODYSTRUCTURE, ALL, FULL, BODY.PEEK[]) and poplib (RETR) over loopback.
Every FETCH answers OK, the session goes on, BODY.PEEK[] and RETR give the bytes that were sent.
Before issue 12 the first message dropped every IMAP session that asked for its ENVELOPE."""

from __future__ import annotations

import imaplib
import poplib
import random
import re
import smtplib
import socket
from pathlib import Path
from typing import Any

import pytest

from relay import mimetree

from poison import nested_multipart, nested_rfc822
from tests.test_imap_session import Raw

pytestmark = pytest.mark.e2e

ALICE = "alice@example.test"


def rfc822_chain(depth: int) -> bytes:
    return nested_rfc822(depth, numbered=True)


def multipart_chain(depth: int) -> bytes:
    return b"Subject: deep multipart\r\n" + nested_multipart(depth)


POISON = {
    "parens": b"From: " + b"(" * 3000 + b"\r\nTo: alice@example.test\r\nSubject: parens\r\n\r\nhi\r\n",
    "groups": b"To: " + b"a:" * 5000 + b"\r\nSubject: groups\r\n\r\nhi\r\n",
    "rfc822": b"Subject: deep rfc822\r\n" + rfc822_chain(3000),
    "multipart": multipart_chain(3000),
    "parts": (b"Subject: many parts\r\nContent-Type: multipart/mixed; boundary=z\r\n\r\n"
              + b"--z\r\nContent-Type: application/dicom\r\n\r\nDICM\r\n" * 5000 + b"--z--\r\n"),
    "broken": (b"Subject: broken \x00 header \xff\xfe\r\nno colon on this line\r\n"
               b" continuation of nothing\r\nFrom: \"unterminated <a@b.test>\r\n"
               b"Content-Type: \xff\xfe/\x00; boundary=\"; charset*=utf-16''%d8%00\r\n"
               b"Content-Disposition: attachment; filename*0*=x'y'%ff; filename*1*=%zz\r\n"
               b"Date: Mon, 99 Foo 20x 99:99:99 +9999\r\n\r\nbody\r\n.. two dots\r\n"),
    "endless-header": b"X-Long: " + b"x" * (mimetree.MAX_HEADER + 4096) + b"\r\n\r\nbody\r\n",
}


def send(relay: Any, body: bytes) -> None:
    with smtplib.SMTP("127.0.0.1", relay.smtp_port, timeout=60) as s:
        s.sendmail("ct@a.test", [ALICE], body)


def as_stored(got: bytes, sent: bytes) -> bool:
    """`got` is `sent` behind the trace fields the relay adds (Return-Path, Received)."""
    trace = got[:len(got) - len(sent)]
    return (got.endswith(sent) and trace.startswith(b"Return-Path: <ct@a.test>\r\nReceived: ")
            and trace.endswith(b"\r\n") and b"\r\n\r\n" not in trace)


def literal(data: Any) -> bytes:
    """The literal of a one-item imaplib FETCH answer."""
    assert isinstance(data[0], tuple), data
    return bytes(data[0][1])


def test_poison_mailbox_is_read_over_imap_and_pop3(relay: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # poplib refuses lines over 2048 octets (its own bound); these messages have longer ones
    monkeypatch.setattr(poplib, "_MAXLINE", 2 * mimetree.MAX_HEADER)
    names = list(POISON)
    for name in names:
        send(relay, POISON[name])
    c = imaplib.IMAP4("127.0.0.1", relay.imap_port, timeout=60)
    try:
        c.login(ALICE, "secret")
        typ, data = c.select("INBOX")
        assert typ == "OK" and int(data[0]) == len(names)
        for seq, name in enumerate(names, 1):
            for item in ("ENVELOPE", "BODYSTRUCTURE", "ALL", "FULL", "(ENVELOPE BODYSTRUCTURE BODY)"):
                typ, data = c.fetch(str(seq), item)
                assert typ == "OK", (name, item, data)
                head = data[0][0] if isinstance(data[0], tuple) else data[0]
                assert head.startswith(b"%d (" % seq), (name, item)
            typ, data = c.fetch(str(seq), "(BODY.PEEK[])")
            assert typ == "OK" and as_stored(literal(data), POISON[name]), name
            assert c.noop()[0] == "OK"                         # the session goes on
        typ, data = c.fetch("1:*", "(UID ENVELOPE BODYSTRUCTURE)")
        assert typ == "OK" and sum(isinstance(d, tuple) or bool(d) for d in data) >= len(names)
        # the deep From: is NIL in ENVELOPE, the To: is still there
        typ, data = c.fetch("1", "ENVELOPE")
        flat = b"".join(x if isinstance(x, bytes) else b"".join(x) for x in data)
        assert b'"parens" NIL NIL NIL ((NIL NIL "alice" "example.test"))' in flat
        # hostile commands on the same session: tagged BAD naming the bound, session goes on
        with pytest.raises(imaplib.IMAP4.error, match=r"LIMIT.*nested too deeply"):
            c.search(None, *(["NOT"] * 3000 + ["ALL"]))
        with pytest.raises(imaplib.IMAP4.error, match="invalid sequence number"):
            c.fetch("9" * 5000, "FLAGS")
        typ, data = c.search(None, "ALL")
        assert typ == "OK" and data[0].split() == [str(i).encode() for i in range(1, len(names) + 1)]
    finally:
        c.logout()

    p = poplib.POP3("127.0.0.1", relay.pop3_port, timeout=60)
    try:
        p.user(ALICE)
        p.pass_("secret")
        assert p.stat()[0] == len(names)
        with pytest.raises(poplib.error_proto, match="Invalid message number"):
            p._shortcmd("RETR \u00b2")
        for n, name in enumerate(names, 1):
            _, lines, octets = p.retr(n)
            assert as_stored(b"\r\n".join(lines) + b"\r\n", POISON[name]), name
        assert p.noop().startswith(b"+OK")
    finally:
        p.quit()


def test_hostile_first_command_before_login_gets_bad(relay: Any) -> None:
    with socket.create_connection(("127.0.0.1", relay.imap_port), timeout=30) as s:
        f = s.makefile("rb")
        f.readline()                                            # greeting
        s.sendall(b"t FETCH 1 BODY[\xff]\r\nu SEARCH " + b"(" * 3000 + b"\r\nv NOOP\r\n")
        assert f.readline().startswith(b"t BAD ")
        assert f.readline().startswith(b"u BAD ")
        assert re.match(rb"v (OK|BAD) ", f.readline())          # still served


def mutated_commands(n: int, seed: int) -> list[bytes]:
    """`n` command lines (without tags) from the recorded imaplib/fetchmail sessions
    (fuzz/corpus/imap), mutated with hostile pieces; a fixed seed: the same lines every run.
    Lines that would wait for more input (literals, IDLE, AUTHENTICATE) or end the session
    (LOGOUT, STARTTLS) are left out: each line must get its tagged answer."""
    corpus = Path(__file__).resolve().parents[1] / "fuzz" / "corpus" / "imap"
    lines = [ln.split(b" ", 1)[1] for f in sorted(corpus.iterdir())
             for ln in f.read_bytes()[1:].split(b"\r\n") if b" " in ln]
    spice = [b"\x00", b"\xff", b"\xc2\xb2", b"(" * 40, b")", b"9" * 30, b"9" * 5000, b"[",
             b"]", b"<", b'"', b"\\", b"*", b":", b" NOT" * 40, b"1.2.3.4.5.6", b"\n", b"\r",
             b"BODY[1.MIME]", b"BODY[2.HEADER.FIELDS (FROM TO)]", b"BODYSTRUCTURE", b"ENVELOPE",
             b"OR", b"UID", b"1:*", b"*:1", b"0", b"4294967296", b"RFC822.TEXT", b"<0.1>"]
    rnd = random.Random(seed)
    out = []
    while len(out) < n:
        line = bytearray(rnd.choice(lines))
        for _ in range(rnd.randint(1, 4)):
            pos = rnd.randint(0, len(line))
            if rnd.random() < 0.7:
                line[pos:pos] = rnd.choice(spice)
            else:
                del line[pos:pos + rnd.randint(1, 8)]
        text = bytes(line).replace(b"\r\n", b"")
        upper = text.upper()
        if b"{" in text or any(w in upper for w in (b"IDLE", b"AUTHENTICATE", b"LOGOUT", b"STARTTLS")):
            continue
        out.append(text)
    return out


def test_mutated_commands_on_a_poison_mailbox_all_get_their_answer(
        relay: Any, caplog: pytest.LogCaptureFixture) -> None:
    for name in ("parens", "rfc822", "parts", "broken"):
        send(relay, POISON[name])
    c = Raw(relay.imap_port)
    c.sock.settimeout(60)
    assert c.cmd(b"a LOGIN alice@example.test secret")[-1].startswith(b"a OK")
    assert c.cmd(b"b SELECT INBOX")[-1].startswith(b"b OK")
    caplog.clear()
    commands = mutated_commands(400, seed=12)
    for i, text in enumerate(commands):
        tag = b"h%d" % i
        if b"\n" in text or b"\r" in text:            # a bare CR/LF: the parser sees two lines
            c.send(tag + b" " + text + b"\r\n" + tag + b"x NOOP\r\n")
            tag += b"x"
        else:
            c.send(tag + b" " + text + b"\r\n")
        while True:
            line = c.line()
            if line.startswith(tag + b" "):
                assert re.match(rb"(OK|NO|BAD) ", line[len(tag) + 1:]), (text[:200], line[:200])
                break
        if b"CLOSE" in text.upper() or b"UNSELECT" in text.upper():
            c.cmd(b"s SELECT INBOX")
    assert c.cmd(b"z NOOP")[-1] == b"z OK NOOP completed"
    failures = [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]
    assert not failures, [r.getMessage() for r in failures[:5]]
