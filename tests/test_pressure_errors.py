"""A bug while handling one command (issue 12 item 1, the server glue's part): the client gets
a generic temporary reply (SMTP 451 4.3.0, IMAP NO [SERVERBUG], POP3 -ERR [SYS/TEMP]), one log
line names the session, the command and the exception type, and the session goes on; when the
answer was cut in the middle (a literal, a multi-line RETR) the session ends cleanly instead.
The faults are injected into the running relay (the code that fails is the real one's)."""

from __future__ import annotations

import imaplib
import logging
import poplib
import smtplib
from typing import Any

import pytest

from relay.server import imap as imap_server
from relay.server import pop3 as pop3_server
from relay.store.maildir import delivery as delivery_mod

ALICE = "alice@example.test"


class Boom(RuntimeError):
    pass


def failure_lines(caplog: pytest.LogCaptureFixture, event: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage() == event]


def one_line(caplog: pytest.LogCaptureFixture, event: str, command: str) -> None:
    lines = failure_lines(caplog, event)
    assert len(lines) == 1, [r.getMessage() for r in caplog.records]
    fields = getattr(lines[0], "fields", {})
    assert fields["command"] == command and fields["error"] == "Boom" and fields["sid"]
    assert lines[0].exc_info is None                      # no traceback


def test_smtp_rcpt_bug_gets_451_and_the_session_goes_on(relay: Any, caplog: pytest.LogCaptureFixture,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    real_add = delivery_mod.Delivery.add_recipient

    async def add_recipient(self: Any, address: str, declared_size: int) -> Any:
        if address.startswith("boom"):
            raise Boom("injected")
        return await real_add(self, address, declared_size)

    monkeypatch.setattr(delivery_mod.Delivery, "add_recipient", add_recipient)
    with smtplib.SMTP("127.0.0.1", relay.smtp_port, timeout=10) as s:
        s.ehlo("bug.test")
        assert s.mail("x@bug.test")[0] == 250
        code, msg = s.rcpt("boom@example.test")
        assert (code, msg.split()[0]) == (451, b"4.3.0")
        assert s.rcpt(ALICE)[0] == 250
        assert s.data(b"Subject: after\r\n\r\nstill here\r\n")[0] == 250
    one_line(caplog, "command-failed", "RCPT")
    assert relay.call(lambda r: r.store.mailbox(ALICE).messages())


def test_smtp_bug_while_streaming_or_committing(relay: Any, caplog: pytest.LogCaptureFixture,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    real_write, real_commit = delivery_mod.Delivery.write, delivery_mod.Delivery.commit
    state = {"write": 1, "commit": 1}

    def write(self: Any, chunk: Any) -> None:
        if state["write"] and len(chunk) > 1000:   # message data, not the trace headers
            state["write"] -= 1
            raise Boom("injected")
        real_write(self, chunk)

    async def commit(self: Any) -> str:
        if state["commit"]:
            state["commit"] -= 1
            raise Boom("injected")
        return await real_commit(self)

    monkeypatch.setattr(delivery_mod.Delivery, "write", write)
    monkeypatch.setattr(delivery_mod.Delivery, "commit", commit)
    body = b"Subject: x\r\n\r\n" + b"y" * 200_000 + b"\r\n"
    with smtplib.SMTP("127.0.0.1", relay.smtp_port, timeout=10) as s:
        s.ehlo("bug.test")
        for _ in range(2):                    # the write fails, then the commit fails
            with pytest.raises(smtplib.SMTPDataError) as e:
                s.sendmail("x@bug.test", [ALICE], body)
            assert (e.value.smtp_code, e.value.smtp_error.split()[0]) == (451, b"4.3.0")
            s.rset()
        assert s.sendmail("x@bug.test", [ALICE], body) == {}     # and the session goes on
    assert len(failure_lines(caplog, "command-failed")) == 2
    assert len(relay.call(lambda r: r.store.mailbox(ALICE).messages())) == 1
    assert list((relay.config.data_dir / "mail" / "example.test" / "alice" / "tmp").iterdir()) == []


def test_imap_command_bug_gets_no_serverbug(relay: Any, caplog: pytest.LogCaptureFixture,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    async def noop(self: Any, cmd: Any) -> None:
        raise Boom("injected")

    monkeypatch.setattr(imap_server.ImapSession, "cmd_noop", noop)
    m = imaplib.IMAP4("127.0.0.1", relay.imap_port)
    m.login(ALICE, "secret")
    typ, data = m.noop()
    assert typ == "NO" and data[0].startswith(b"[SERVERBUG]")
    assert m.select("INBOX")[0] == "OK"                # the session goes on
    m.logout()
    one_line(caplog, "command_failed", "NOOP")


def test_imap_bug_inside_a_literal_ends_with_bye(relay: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    with smtplib.SMTP("127.0.0.1", relay.smtp_port, timeout=10) as s:
        s.sendmail("x@bug.test", [ALICE], b"Subject: lit\r\n\r\n" + b"z" * 5000 + b"\r\n")

    async def send_file(self: Any, fd: int, offset: int, count: int) -> None:
        self.write(b"partial")
        raise Boom("injected")

    monkeypatch.setattr(imap_server.ImapSession, "send_file", send_file)
    m = imaplib.IMAP4("127.0.0.1", relay.imap_port)
    m.login(ALICE, "secret")
    m.select("INBOX")
    with pytest.raises((imaplib.IMAP4.abort, imaplib.IMAP4.error, OSError)):
        m.fetch("1", "(BODY.PEEK[])")
    st = relay.call(lambda r: r.sessions.statistics())
    assert st.total.get(("imap", "error")) == 1


def test_pop3_command_bug_gets_sys_temp(relay: Any, caplog: pytest.LogCaptureFixture,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    with smtplib.SMTP("127.0.0.1", relay.smtp_port, timeout=10) as s:
        s.sendmail("x@bug.test", [ALICE], b"Subject: p\r\n\r\n" + b"p" * 70 + b"\r\n")
    real = pop3_server.Pop3Session._retrieve
    state = {"n": 1}

    async def retrieve(self: Any, ev: Any) -> None:
        if state["n"]:
            state["n"] -= 1
            raise Boom("injected")
        await real(self, ev)

    monkeypatch.setattr(pop3_server.Pop3Session, "_retrieve", retrieve)
    p = poplib.POP3("127.0.0.1", relay.pop3_port, timeout=10)
    p.user(ALICE)
    p.pass_("secret")
    with pytest.raises(poplib.error_proto, match=r"SYS/TEMP"):
        p.retr(1)
    assert p.retr(1)[1][-1] == b"p" * 70             # the session goes on
    p.quit()
    one_line(caplog, "command_failed", "RETR")


def test_pop3_bug_inside_a_multiline_answer_closes(relay: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    with smtplib.SMTP("127.0.0.1", relay.smtp_port, timeout=10) as s:
        s.sendmail("x@bug.test", [ALICE], b"Subject: p\r\n\r\n" + b"p" * 5000 + b"\r\n")

    async def next_chunk(self: Any) -> bytes:
        raise Boom("injected")

    monkeypatch.setattr(pop3_server._Prefetcher, "next", next_chunk)
    p = poplib.POP3("127.0.0.1", relay.pop3_port, timeout=10)
    p.user(ALICE)
    p.pass_("secret")
    with pytest.raises((poplib.error_proto, OSError, EOFError)):
        p.retr(1)
    st = relay.call(lambda r: r.sessions.statistics())
    assert st.total.get(("pop3", "error")) == 1


def test_a_failing_protocol_object_ends_the_session_cleanly(relay: Any, caplog: pytest.LogCaptureFixture,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """When the protocol object itself raises, its state cannot be trusted: SMTP says
    421 4.3.0, IMAP * BYE, and closes; one log line, no traceback; other sessions go on."""
    import socket

    from relay.protocol import imap as imap_proto
    from relay.protocol import smtp as smtp_proto

    real_smtp, real_imap = smtp_proto.SmtpConnection.receive_data, imap_proto.ImapParser.receive_data

    def smtp_receive(self: Any, data: Any, end: Any = None) -> None:
        if b"KABOOM" in bytes(data[:end] if end is not None else data):
            raise Boom("injected")
        real_smtp(self, data, end)

    def imap_receive(self: Any, data: Any) -> None:
        if b"KABOOM" in bytes(data):
            raise Boom("injected")
        real_imap(self, data)

    monkeypatch.setattr(smtp_proto.SmtpConnection, "receive_data", smtp_receive)
    monkeypatch.setattr(imap_proto.ImapParser, "receive_data", imap_receive)
    for port, hello, want in ((relay.smtp_port, b"", b"421 4.3.0"),
                              (relay.imap_port, b"", b"* BYE Internal error")):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        f = s.makefile("rb")
        f.readline()
        s.sendall(b"KABOOM\r\n")
        assert f.readline().startswith(want)
        assert f.readline() == b""
        s.close()
    assert len(failure_lines(caplog, "session-failed")) == 1      # smtp
    assert len(failure_lines(caplog, "session_failed")) == 1      # imap
    assert all(r.exc_info is None for r in caplog.records)
    with smtplib.SMTP("127.0.0.1", relay.smtp_port, timeout=10) as c:
        assert c.noop()[0] == 250
