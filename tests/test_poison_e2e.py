"""A poison mailbox, end to end (issue 12): hostile messages delivered by smtplib, then read by
imaplib (ENVELOPE, BODYSTRUCTURE, ALL, FULL, BODY.PEEK[]) and poplib (RETR) over loopback.
Every FETCH answers OK, the session goes on, BODY.PEEK[] and RETR give the bytes that were sent.
Before issue 12 the first message dropped every IMAP session that asked for its ENVELOPE."""

from __future__ import annotations

import imaplib
import poplib
import re
import smtplib
import socket
from typing import Any

import pytest

from relay import mimetree

pytestmark = pytest.mark.e2e

ALICE = "alice@example.test"


def rfc822_chain(depth: int) -> bytes:
    m = b"From: leaf@x.test\r\nSubject: leaf\r\n\r\nleaf\r\n"
    for i in range(depth):
        m = b"From: (c%d) a@b.test\r\nContent-Type: message/rfc822\r\n\r\n" % i + m
    return m


def multipart_chain(depth: int) -> bytes:
    m = b"leaf\r\n"
    for i in range(depth):
        b = b"b%d" % i
        m = (b"Content-Type: multipart/mixed; boundary=" + b + b"\r\n\r\n--" + b + b"\r\n" + m
             + b"\r\n--" + b + b"--\r\n")
    return b"Subject: deep multipart\r\n" + m


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
