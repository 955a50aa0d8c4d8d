"""IMAP and POP3 read message bodies through relay.store.api.Body: with a file descriptor
(sendfile, preads: the Maildir backend) and without one (`read(offset, n)` only, as a backend
that keeps bodies in a database). Both ways give the stored bytes, byte for byte, to real
clients (imaplib, poplib)."""

from __future__ import annotations

import imaplib
import poplib
import smtplib
from collections.abc import Callable
from typing import Any

import pytest
from conftest import RunningRelay

from relay.store.maildir.backend import MaildirBody

ALICE = "alice@example.test"
BOUNDARY = b"=-=part=-="
MESSAGE = (b"From: ct@hospital.test\r\nTo: alice@example.test\r\nSubject: study\r\n"
           b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"" + BOUNDARY + b"\"\r\n\r\n"
           b"--" + BOUNDARY + b"\r\nContent-Type: text/plain\r\n\r\n.a line with a dot\r\nsecond line\r\n"
           b"--" + BOUNDARY + b"\r\nContent-Type: application/octet-stream\r\n"
           b"Content-Transfer-Encoding: base64\r\n\r\n" + b"QUJDRA==\r\n" * 40000 +
           b"--" + BOUNDARY + b"--\r\n")


@pytest.fixture(params=["fileno", "read-only"])
def relay_with_a_message(request: pytest.FixtureRequest, relay_factory: Callable[..., RunningRelay],
                         monkeypatch: pytest.MonkeyPatch) -> tuple[RunningRelay, bytes]:
    if request.param == "read-only":           # the store gives no file: read(offset, n) only
        monkeypatch.setattr(MaildirBody, "fileno", lambda self: None)
    r = relay_factory()
    r.add_user(ALICE, "secret")
    with smtplib.SMTP("127.0.0.1", r.smtp_port, timeout=30) as s:
        s.sendmail("ct@hospital.test", [ALICE], MESSAGE)

    def stored(relay: Any) -> bytes:
        mb = relay.store.engine.mailbox(ALICE)     # the Maildir file, to compare with
        data: bytes = mb.path(mb.messages()[0].uid).read_bytes()
        return data
    return r, r.call(stored)


def test_imap_fetches_whole_ranges_and_parts(relay_with_a_message: tuple[RunningRelay, bytes]) -> None:
    r, stored = relay_with_a_message
    assert stored.endswith(MESSAGE)
    m = imaplib.IMAP4("127.0.0.1", r.imap_port)
    try:
        m.login(ALICE, "secret")
        m.select("INBOX")
        typ, data = m.uid("FETCH", "1", "(BODY.PEEK[])")
        assert typ == "OK" and data[0][1] == stored                        # type: ignore[index]
        typ, data = m.uid("FETCH", "1", "(BODY.PEEK[]<100.5000>)")
        assert data[0][1] == stored[100:5100]                             # type: ignore[index]
        typ, data = m.uid("FETCH", "1", f"(BODY.PEEK[]<{len(stored) - 10}.100>)")
        assert data[0][1] == stored[-10:]                                 # type: ignore[index]
        typ, data = m.uid("FETCH", "1", "(BODY.PEEK[1])")
        assert typ == "OK" and data[0][1] == b".a line with a dot\r\nsecond line"  # type: ignore[index]
        typ, data = m.uid("FETCH", "1", "(BODYSTRUCTURE)")
        structure = data[0].upper()                                       # type: ignore[union-attr]
        assert b'("TEXT" "PLAIN"' in structure and b'("APPLICATION" "OCTET-STREAM"' in structure
        typ, data = m.uid("FETCH", "1", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
        assert data[0][1] == b"Subject: study\r\n\r\n"                    # type: ignore[index]
    finally:
        m.logout()


def test_pop3_retrieves_the_stored_bytes(relay_with_a_message: tuple[RunningRelay, bytes]) -> None:
    r, stored = relay_with_a_message
    p = poplib.POP3("127.0.0.1", r.pop3_port, timeout=30)
    try:
        p.user(ALICE)
        p.pass_("secret")
        _, lines, _ = p.retr(1)
        assert b"\r\n".join(lines) + b"\r\n" == stored                   # poplib unstuffs the dots
        _, top, _ = p.top(1, 0)
        assert b"\r\n".join(top) + b"\r\n" == stored[:stored.index(b"\r\n\r\n") + 4]
    finally:
        p.quit()
