"""End-to-end SMTP over loopback with real clients: smtplib, swaks, the project's BDAT client,
raw sockets for bad input, and `relay serve` as a real subprocess."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import smtplib
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from relay.clients.smtp import SmtpClient, SmtpError, send_message
from relay.protocol.smtp import Reply
from tests.conftest import RunningRelay
from tests.tlsutil import client_context, make_cert

pytestmark = pytest.mark.e2e

ALICE, BOB = "alice@example.test", "bob@example.test"
# A body with lines starting with ".", a line that is only ".", and "\r\n.\r\n"-like content
DOTTY = (b"Subject: dots\r\nFrom: x@remote.test\r\n\r\n.leading dot\r\n..two dots\r\n.\r\n"
         b"middle. dot\r\n. space\r\n" + b"A" * 5000 + b"\r\n.\r\r\n.end\r\n")


# --- helpers ------------------------------------------------------------------------------------
def maildir(r: RunningRelay, address: str) -> Path:
    local, domain = address.split("@")
    return r.data_dir / "mail" / domain / local


def add_account(r: RunningRelay, address: str, **kw: Any) -> None:
    """An account without a password (no argon2: these tests need no AUTH)."""
    r.call(lambda rl: rl.store.accounts.add(address, **kw))


def new_files(r: RunningRelay, address: str) -> list[Path]:
    return sorted((maildir(r, address) / "new").iterdir())


def tmp_files(r: RunningRelay) -> list[Path]:
    return [p for p in (r.data_dir / "mail").rglob("tmp/*")]


def stored_body(path: Path, sent: bytes) -> bytes:
    """The file must be trace headers (Return-Path, Received and its folded lines) + `sent`."""
    data = path.read_bytes()
    assert data.endswith(sent)
    prefix = data[:len(data) - len(sent)]
    lines = prefix.split(b"\r\n")
    assert lines[0].startswith(b"Return-Path: <") and lines[-1] == b""
    assert lines[1].startswith(b"Received: ")
    assert all(ln.startswith(b"\t") for ln in lines[2:-1])
    return prefix


def wait_no_sessions(r: RunningRelay, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not r.call(lambda rl: rl.sessions.live()):
            return
        time.sleep(0.02)
    raise AssertionError("sessions still open")


class Raw:
    """A raw SMTP socket for bad input."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.buf = b""
        self.banner = self.reply()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> str:
        """One complete (possibly multi-line) reply, e.g. '250 2.0.0 OK'."""
        while True:
            lines = self.buf.split(b"\r\n")
            for i, line in enumerate(lines[:-1]):
                if len(line) >= 4 and line[3:4] == b" ":
                    self.buf = b"\r\n".join(lines[i + 1:])
                    return line.decode()
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"closed; buffer {self.buf!r}")
            self.buf += chunk

    def cmd(self, line: str | bytes) -> str:
        self.send((line.encode() if isinstance(line, str) else line) + b"\r\n")
        return self.reply()

    def closed(self) -> bool:
        self.sock.settimeout(5)
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def relay(relay_factory: Callable[..., RunningRelay]) -> RunningRelay:
    """Overrides conftest's: alice and bob without passwords (argon2 costs ~0.5 s a user on
    this loaded machine); a test that logs in sets one."""
    r = relay_factory()
    add_account(r, ALICE)
    add_account(r, BOB)
    return r


@pytest.fixture
def raw(relay: RunningRelay) -> Iterator[Callable[[], Raw]]:
    opened: list[Raw] = []

    def make() -> Raw:
        c = Raw(relay.smtp_port)
        opened.append(c)
        return c
    yield make
    for c in opened:
        c.close()


# --- smtplib (DATA) --------------------------------------------------------------------------
def test_smtplib_data_byte_identical(relay: RunningRelay) -> None:
    with smtplib.SMTP("127.0.0.1", relay.smtp_port) as s:
        code, _ = s.ehlo("client.test")
        assert code == 250
        assert s.has_extn("pipelining") and s.has_extn("chunking") and s.has_extn("size")
        assert s.sendmail("sender@remote.test", [ALICE], DOTTY) == {}
    [f] = new_files(relay, ALICE)
    prefix = stored_body(f, DOTTY)
    assert b"Return-Path: <sender@remote.test>" in prefix
    assert b"by relay.test (relay) with ESMTP id " in prefix
    assert f.name.endswith(f",S={f.stat().st_size}")
    assert tmp_files(relay) == []


def test_smtplib_multi_recipient_stored_once(relay: RunningRelay) -> None:
    with smtplib.SMTP("127.0.0.1", relay.smtp_port) as s:
        assert s.sendmail("s@remote.test", [ALICE, BOB], b"Subject: two\r\n\r\nhi\r\n") == {}
    [a], [b] = new_files(relay, ALICE), new_files(relay, BOB)
    assert a.stat().st_ino == b.stat().st_ino and a.stat().st_nlink == 2


def test_unknown_user_and_foreign_domain(relay: RunningRelay) -> None:
    with smtplib.SMTP("127.0.0.1", relay.smtp_port) as s:
        s.ehlo()
        s.mail("s@remote.test")
        assert s.rcpt("nobody@example.test")[:1] == (550,)
        assert s.rcpt("nobody@example.test")[1].startswith(b"5.1.1")
        code, text = s.rcpt("someone@elsewhere.test")
        assert (code, text[:5]) == (550, b"5.7.1")
        code, text = s.rcpt(ALICE)
        assert code == 250
        s.rset()
        refused = s.sendmail("s@remote.test", [ALICE, "x@elsewhere.test"], b"\r\nbody\r\n")
        assert refused == {"x@elsewhere.test": (550, b"5.7.1 Relaying denied")}
    assert len(new_files(relay, ALICE)) == 1


def test_authenticated_client_still_cannot_relay(relay: RunningRelay) -> None:
    relay.call(lambda rl: rl.store.accounts.set_password(ALICE, "secret"))
    with smtplib.SMTP("127.0.0.1", relay.smtp_port) as s:
        s.login(ALICE, "secret")
        with pytest.raises(smtplib.SMTPRecipientsRefused) as e:
            s.sendmail(ALICE, ["x@elsewhere.test"], b"\r\nbody\r\n")
    assert e.value.recipients["x@elsewhere.test"][0] == 550


def test_declared_size_over_limit_552(relay_factory: Callable[..., RunningRelay]) -> None:
    r = relay_factory(smtp={"max_message_size": 1000})
    add_account(r, ALICE)
    with smtplib.SMTP("127.0.0.1", r.smtp_port) as s:
        s.ehlo()
        assert s.esmtp_features["size"] == "1000"
        code, text = s.mail("s@remote.test", ["SIZE=1001"])
        assert (code, text[:5]) == (552, b"5.3.4")
        with pytest.raises(smtplib.SMTPSenderRefused) as e:      # smtplib sends SIZE= itself
            s.sendmail("s@remote.test", [ALICE], b"x" * 2000)
        assert e.value.smtp_code == 552


def test_streaming_over_limit_552_then_session_usable(relay_factory: Callable[..., RunningRelay]) -> None:
    r = relay_factory(smtp={"max_message_size": 100_000})
    add_account(r, ALICE)
    big = (b"y" * 998 + b"\r\n") * 300                  # 300 kB, SIZE not declared
    with SmtpClient("127.0.0.1", r.smtp_port) as c:
        for bdat in (False, True):
            with pytest.raises(SmtpError) as e:
                c.send("s@remote.test", [ALICE], iter([big[i:i + 7000] for i in range(0, len(big), 7000)]),
                       bdat=bdat, chunk_size=7000)
            assert (e.value.reply.code, e.value.reply.enhanced) == (552, "5.3.4")
            res = c.send("s@remote.test", [ALICE], b"Subject: small\r\n\r\nok\r\n", bdat=bdat)
            assert res.final is not None and res.final.code == 250
    assert len(new_files(r, ALICE)) == 2
    assert tmp_files(r) == []


def test_quota_declared_and_while_streaming(relay_factory: Callable[..., RunningRelay]) -> None:
    r = relay_factory()
    add_account(r, ALICE, quota_bytes=10_000)
    with SmtpClient("127.0.0.1", r.smtp_port) as c:
        with pytest.raises(SmtpError) as e:
            c.send("s@remote.test", [ALICE], b"x" * 20_000)       # SIZE=20000 at RCPT
        assert (e.value.command, e.value.reply.code, e.value.reply.enhanced) == ("RCPT", 452, "4.2.2")
        with pytest.raises(SmtpError) as e:                       # no SIZE: found at the end
            c.send("s@remote.test", [ALICE], iter([b"x" * 20_000]))
        assert (e.value.reply.code, e.value.reply.enhanced) == (452, "4.2.2")
        assert c.send("s@remote.test", [ALICE], b"x" * 5000).final.code == 250  # type: ignore[union-attr]
    assert len(new_files(r, ALICE)) == 1 and tmp_files(r) == []


# --- the project's client (BDAT) -------------------------------------------------------------
def test_bdat_client_pipelined_chunks_byte_identical(relay: RunningRelay, tmp_path: Path) -> None:
    payload = DOTTY + bytes(range(256)) * 200 + b"\r\n.\r\n" + b"tail"
    src = tmp_path / "msg.eml"
    src.write_bytes(payload)
    res = send_message("127.0.0.1", relay.smtp_port, "s@remote.test", [ALICE, BOB], src,
                       chunk_size=4096, mail_params="BODY=BINARYMIME")
    assert res.method == "BDAT" and res.size == len(payload)
    assert res.final is not None and (res.final.code, res.final.enhanced) == (250, "2.0.0")
    assert set(res.accepted) == {ALICE, BOB}
    [f] = new_files(relay, ALICE)
    stored_body(f, payload)


def test_client_data_path_from_iterator_byte_identical(relay: RunningRelay) -> None:
    chunks = [DOTTY[i:i + 7] for i in range(0, len(DOTTY), 7)]   # "\r\n." split every way
    res = send_message("127.0.0.1", relay.smtp_port, "s@remote.test", [ALICE], iter(chunks),
                       bdat=False)
    assert res.method == "DATA" and res.final is not None and res.final.code == 250
    stored_body(new_files(relay, ALICE)[0], DOTTY)


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 7, 4096])
def test_client_data_path_from_file_byte_identical(relay: RunningRelay, tmp_path: Path,
                                                   chunk_size: int) -> None:
    payload = b"A" * 4100 + DOTTY[:200] + b"B" * 5000 + b"\r\n"   # dot-free and dotted pieces
    src = tmp_path / "m.eml"
    src.write_bytes(payload)
    res = send_message("127.0.0.1", relay.smtp_port, "s@remote.test", [ALICE], src, bdat=False,
                       chunk_size=chunk_size)
    assert res.method == "DATA" and res.size == len(payload)
    stored_body(new_files(relay, ALICE)[0], payload)


def test_client_raises_on_refused_recipients(relay: RunningRelay) -> None:
    with pytest.raises(SmtpError) as e:
        send_message("127.0.0.1", relay.smtp_port, "s@remote.test", ["n@example.test"], b"x\r\n")
    assert e.value.command == "RCPT" and e.value.reply.code == 550
    assert e.value.rcpt["n@example.test"].enhanced == "5.1.1"
    res = send_message("127.0.0.1", relay.smtp_port, "s@remote.test", ["n@example.test", BOB],
                       b"x\r\n")
    assert res.accepted == [BOB] and res.rcpt["n@example.test"].code == 550


def test_whole_transactions_pipelined_back_to_back(relay: RunningRelay, raw: Callable[[], Raw]) -> None:
    c = raw()
    c.cmd("EHLO c")
    bodies = [b"first\r\n", b"second" * 50_000, b"third\r\n"]
    wire = b"".join(b"MAIL FROM:<s@remote.test>\r\nRCPT TO:<%s>\r\nBDAT %d LAST\r\n%s"
                    % (ALICE.encode(), len(b), b) for b in bodies)
    c.send(wire + b"MAIL FROM:<s@remote.test>\r\nRCPT TO:<%s>\r\nDATA\r\n" % BOB.encode())
    replies = [c.reply()[:9] for _ in range(3 * 3 + 3)]
    assert replies == ["250 2.1.0", "250 2.1.5", "250 2.0.0"] * 3 + ["250 2.1.0", "250 2.1.5", "354 End d"]
    assert c.cmd(b"fourth\r\n.").startswith("250 2.0.0")
    stored = sorted(f.read_bytes() for f in new_files(relay, ALICE))
    assert sorted(next(d for d in stored if d.endswith(b)) for b in bodies) == stored


# --- STARTTLS and AUTH ----------------------------------------------------------------------------
@pytest.fixture
def tls_relay(relay_factory: Callable[..., RunningRelay], tmp_path: Path) -> RunningRelay:
    cert, key = make_cert(tmp_path / "tls")
    r = relay_factory(tls={"cert": str(cert), "key": str(key)}, auth={"plaintext": "never"})
    r.add_user(ALICE, "secret")
    r.cert = cert  # type: ignore[attr-defined]
    return r


def test_starttls_auth_and_bdat_with_own_client(tls_relay: RunningRelay) -> None:
    ctx = client_context(tls_relay.cert)  # type: ignore[attr-defined]
    with SmtpClient("127.0.0.1", tls_relay.smtp_port, ssl_context=ctx) as c:
        ext = c.ehlo()
        assert "STARTTLS" in ext and "AUTH" not in ext            # plaintext = "never"
        r = c.command("AUTH PLAIN AGFsaWNlQGV4YW1wbGUudGVzdABzZWNyZXQ=")
        assert (r.code, r.enhanced) == (538, "5.7.11")
        c.starttls()
        assert c.extensions["AUTH"] == "PLAIN LOGIN" and "STARTTLS" not in c.extensions
        with pytest.raises(SmtpError) as e:
            c.login(ALICE, "wrong")
        assert (e.value.reply.code, e.value.reply.enhanced) == (535, "5.7.8")
        c.login(ALICE, "secret")
        res = c.send("s@remote.test", [ALICE], DOTTY, chunk_size=1000)
        assert res.final is not None and res.final.code == 250
    prefix = stored_body(new_files(tls_relay, ALICE)[0], DOTTY)
    assert b"with ESMTPSA id" in prefix


def swaks(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["swaks", "--hide-informational", *args], check=False, capture_output=True,
                          text=True, timeout=60)


def test_swaks_pipelining(relay: RunningRelay) -> None:
    p = swaks("--server", f"127.0.0.1:{relay.smtp_port}", "--pipeline", "--from", "s@remote.test",
              "--to", f"{ALICE},{BOB}", "--body", ".dotted line\nsecond")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "PIPELINING" in p.stdout and "250 2.0.0 Ok: queued" in p.stdout
    assert len(new_files(relay, ALICE)) == 1 and len(new_files(relay, BOB)) == 1
    data = new_files(relay, ALICE)[0].read_bytes()
    assert b"\r\n.dotted line\r\nsecond\r\n" in data


def test_swaks_starttls_and_auth(tls_relay: RunningRelay) -> None:
    common = ["--server", f"127.0.0.1:{tls_relay.smtp_port}", "--from", "s@remote.test",
              "--to", ALICE]
    p = swaks(*common, "-tls", "--auth", "PLAIN", "--auth-user", ALICE, "--auth-password", "secret")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "235 2.7.0" in p.stdout and "250 2.0.0" in p.stdout
    p = swaks(*common, "-tls", "--auth", "LOGIN", "--auth-user", ALICE, "--auth-password", "bad")
    assert p.returncode != 0 and "535 5.7.8" in p.stdout
    p = swaks(*common, "--auth", "PLAIN", "--auth-user", ALICE, "--auth-password", "secret")
    assert p.returncode != 0                     # no AUTH offered without TLS ("never")
    assert len(new_files(tls_relay, ALICE)) == 1


# --- dropped connections ---------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["DATA", "BDAT"])
def test_connection_dropped_mid_message_leaves_nothing(relay: RunningRelay, raw: Callable[[], Raw],
                                                       mode: str) -> None:
    c = raw()
    c.cmd("EHLO c")
    c.cmd("MAIL FROM:<s@remote.test>")
    assert c.cmd(f"RCPT TO:<{ALICE}>").startswith("250")
    if mode == "DATA":
        assert c.cmd("DATA").startswith("354")
        c.send(b"Subject: half\r\n\r\n" + b"z" * 200_000)
    else:
        c.send(b"BDAT 1000000 LAST\r\n" + b"z" * 200_000)
    deadline = time.monotonic() + 5
    while not tmp_files(relay) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert tmp_files(relay), "the message was being written"
    c.close()
    wait_no_sessions(relay)
    assert tmp_files(relay) == [] and new_files(relay, ALICE) == []


def test_store_errors_answer_451_and_leave_nothing(relay: RunningRelay, raw: Callable[[], Raw]) -> None:
    tmp, new = maildir(relay, ALICE) / "tmp", maildir(relay, ALICE) / "new"
    c = raw()
    c.cmd("EHLO c")
    tmp.rmdir()                                       # the tmp file cannot be created
    c.cmd("MAIL FROM:<s@remote.test>")
    c.cmd(f"RCPT TO:<{ALICE}>")
    assert c.cmd("DATA").startswith("451 4.3.0")
    c.send(b"BDAT 4 LAST\r\nabcd")
    assert c.reply().startswith("451 4.3.0")          # the chunk was drained
    tmp.mkdir()
    new.rmdir()                                       # the link into new/ fails at commit
    c.cmd("MAIL FROM:<s@remote.test>")
    c.cmd(f"RCPT TO:<{ALICE}>")
    c.cmd("DATA")
    assert c.cmd(b"Subject: x\r\n\r\nbody\r\n.").startswith("451 4.3.0")
    new.mkdir()
    assert tmp_files(relay) == [] and new_files(relay, ALICE) == []
    assert c.cmd("NOOP").startswith("250")            # the session goes on


def test_rset_mid_bdat_removes_tmp(relay: RunningRelay, raw: Callable[[], Raw]) -> None:
    c = raw()
    c.cmd("EHLO c")
    c.cmd("MAIL FROM:<s@remote.test>")
    c.cmd(f"RCPT TO:<{ALICE}>")
    c.send(b"BDAT 5\r\nhello")
    assert c.reply().startswith("250 2.0.0")
    assert tmp_files(relay)
    assert c.cmd("RSET") == "250 2.0.0 OK"
    assert tmp_files(relay) == [] and new_files(relay, ALICE) == []


# --- bad input (issue 2 item 6) -------------------------------------------------------------------
def test_bad_commands_over_the_wire(relay: RunningRelay, raw: Callable[[], Raw]) -> None:
    c = raw()
    assert c.banner == "220 relay.test ESMTP relay"
    assert c.cmd("MAIL FROM:<s@remote.test>") == "503 5.5.1 Bad sequence of commands"
    assert c.cmd("FROB").startswith("500 5.5.2")
    assert c.cmd("EHLO").startswith("501 5.5.4")
    c.cmd("EHLO c")
    assert c.cmd("MAIL FROM:<s@remote.test> FOO=1").startswith("555 5.5.4")
    assert c.cmd("MAIL FROM:s@remote.test").startswith("501 5.5.4")
    assert c.cmd("RCPT TO:<a@b.test>").startswith("503 5.5.1")
    assert c.cmd("DATA").startswith("503 5.5.1")
    c.send(b"BDAT 3 LAST\r\nabc")
    assert c.reply().startswith("503 5.5.1")                     # drained, not commands
    assert c.cmd("NOOP") == "250 2.0.0 OK"
    assert c.cmd("VRFY alice").startswith("252 2.5.0")
    assert c.cmd("QUIT").startswith("221 2.0.0")
    assert c.closed()


def test_overlong_line_refused_without_buffering(relay: RunningRelay, raw: Callable[[], Raw]) -> None:
    c = raw()
    c.cmd("EHLO c")
    c.send(b"NOOP " + b"x" * 600 + b"\r\n")
    assert c.reply().startswith("500 5.5.2")
    c.send(b"MAIL FROM:<" + b"x" * 2_000_000)            # 2 MB "line": refused at once
    assert c.reply().startswith("500 5.5.2")
    c.send(b"@remote.test>\r\n")
    assert c.cmd("NOOP") == "250 2.0.0 OK"


def test_client_that_never_reads_replies_cannot_grow_server_memory(
        relay_factory: Callable[..., RunningRelay]) -> None:
    """Pipelined commands from a client that reads no reply: once the replies waiting in
    the server pass the transport's high-water mark, reading is paused (TCP then stops the
    client) instead of buffering every reply in memory; the command timeout still ends it."""
    import select

    r = relay_factory(smtp={"command_timeout": 1})
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    sock.connect(("127.0.0.1", r.smtp_port))
    try:
        sock.setblocking(False)
        block = b"NOOP\r\n" * 100_000                 # 600 kB; replies take 2.5x that
        sent = 0
        while sent < 40 * len(block):               # bounded: 24 MB of commands at most
            if not select.select([], [sock], [], 0.5)[1]:
                break                               # the server stopped reading
            try:
                sent += sock.send(block[sent % len(block):])
            except BlockingIOError:
                continue

        def buffered(rl: Any) -> int:
            return sum(s.closer.__self__.transport.get_write_buffer_size()
                       for s in rl.sessions.live() if s.protocol == "smtp")
        waiting = r.call(buffered)
        assert waiting < 8 * 1024 * 1024, (sent, waiting)
        assert sent < 40 * len(block)                # the client was stopped by TCP
        wait_no_sessions(r, timeout=15)              # idle (reads nothing): timed out
    finally:
        sock.close()


def test_max_recipients(relay_factory: Callable[..., RunningRelay]) -> None:
    r = relay_factory(smtp={"max_recipients": 2})
    for n in range(3):
        add_account(r, f"u{n}@example.test")
    c = Raw(r.smtp_port)
    c.cmd("EHLO c")
    c.cmd("MAIL FROM:<s@remote.test>")
    assert [c.cmd(f"RCPT TO:<u{n}@example.test>")[:9] for n in range(3)] == \
        ["250 2.1.5", "250 2.1.5", "452 4.5.3"]
    c.close()


def test_max_errors_then_421(relay_factory: Callable[..., RunningRelay]) -> None:
    r = relay_factory(smtp={"max_errors": 3})
    c = Raw(r.smtp_port)
    c.send(b"A\r\nB\r\nC\r\n")
    assert [c.reply()[:9] for _ in range(4)] == ["500 5.5.2"] * 3 + ["421 4.7.0"]
    assert c.closed()
    c.close()


def test_session_limits_421(relay_factory: Callable[..., RunningRelay]) -> None:
    r = relay_factory(smtp={"max_sessions_per_client": 1})
    first = Raw(r.smtp_port)
    s = socket.create_connection(("127.0.0.1", r.smtp_port), timeout=5)
    assert s.recv(1000).startswith(b"421 4.7.0")
    s.close()
    first.close()
    wait_no_sessions(r)
    assert Raw(r.smtp_port).banner.startswith("220")


def test_command_timeout_421(relay_factory: Callable[..., RunningRelay]) -> None:
    r = relay_factory(smtp={"command_timeout": 0.3})
    c = Raw(r.smtp_port)
    t0 = time.monotonic()
    assert c.reply().startswith("421 4.4.2")
    assert 0.25 < time.monotonic() - t0 < 3
    assert c.closed()
    c.close()


def test_data_timeout_reset_by_data_then_421(relay_factory: Callable[..., RunningRelay]) -> None:
    r = relay_factory(smtp={"data_timeout": 0.4, "command_timeout": 5})
    add_account(r, ALICE)
    c = Raw(r.smtp_port)
    c.cmd("EHLO c")
    c.cmd("MAIL FROM:<s@remote.test>")
    c.cmd(f"RCPT TO:<{ALICE}>")
    c.cmd("DATA")
    for _ in range(6):                     # 1.2 s of slow data: longer than the timeout
        c.send(b"x" * 100 + b"\r\n")
        time.sleep(0.2)
    c.send(b".\r\n")
    assert c.reply().startswith("250 2.0.0")
    c.cmd("MAIL FROM:<s@remote.test>")
    c.cmd(f"RCPT TO:<{ALICE}>")
    c.cmd("DATA")
    c.send(b"stalls\r\n")
    assert c.reply().startswith("421 4.4.2")
    c.close()
    wait_no_sessions(r)
    assert len(new_files(r, ALICE)) == 1 and tmp_files(r) == []


# --- policy hooks (a tiny fake: the real one is relay/policy) ----------------------------------------
class FakePacer:
    def __init__(self, log: list[Any]) -> None:
        self.log = log
        self.delayed = False

    def on_data(self, n: int) -> float:
        self.log.append(("on_data", n))
        if not self.delayed:
            self.delayed = True
            return 0.2
        return 0.0

    def close(self) -> None:
        self.log.append(("close",))


class FakePolicy:
    def __init__(self) -> None:
        self.log: list[Any] = []

    def check_rcpt(self, address: str, size: int | None, claim: Any = None) -> Reply | None:
        self.log.append(("check_rcpt", address, size))
        return Reply(452, "4.3.1", "Insufficient system storage") if address == BOB else None

    def claim_disk(self, declared: int) -> Any:
        import types
        return types.SimpleNamespace(wrote=lambda n: None, release=lambda: None, remaining=0)

    def pacer(self, recipients: list[str]) -> FakePacer:
        self.log.append(("pacer", tuple(recipients)))
        return FakePacer(self.log)

    def deferred(self, reason: str, mailbox: str, **fields: Any) -> None:
        self.log.append(("deferred", reason, mailbox))


def test_policy_hooks_called_in_order(relay: RunningRelay, raw: Callable[[], Raw]) -> None:
    policy = FakePolicy()
    relay.call(lambda r: setattr(r, "policy", policy))
    body = b"Subject: p\r\n\r\n" + b"p" * 30_000 + b"\r\n"
    c = raw()
    c.cmd("EHLO c")
    c.cmd(f"MAIL FROM:<s@remote.test> SIZE={len(body)}")
    assert c.cmd(f"RCPT TO:<{ALICE}>").startswith("250")
    assert c.cmd(f"RCPT TO:<{BOB}>").startswith("452 4.3.1")
    c.cmd("DATA")
    c.send(body[:1000])
    time.sleep(0.05)
    t0 = time.monotonic()
    c.send(body[1000:] + b".\r\n")
    assert c.reply().startswith("250 2.0.0")
    assert time.monotonic() - t0 >= 0.1                   # reading paused for the pacer's delay
    kinds = [e[0] for e in policy.log]
    assert policy.log[0] == ("check_rcpt", ALICE, len(body))
    assert policy.log[1] == ("check_rcpt", BOB, len(body))
    assert kinds[2] == "pacer" and policy.log[2] == ("pacer", (ALICE,))
    assert "on_data" in kinds
    assert sum(e[1] for e in policy.log if e[0] == "on_data") == len(body)
    assert kinds[-1] == "close"
    policy.log.clear()                     # quotas are the store's: over it at the end of data
    relay.call(lambda r: r.store.accounts.set_quota(ALICE, quota_bytes=50_000))
    c.cmd("MAIL FROM:<s@remote.test>")                   # no SIZE=: found at the end of data
    assert c.cmd(f"RCPT TO:<{ALICE}>").startswith("250")
    assert c.cmd("DATA").startswith("354")
    assert c.cmd(b"q" * 60_000 + b"\r\n.").startswith("452 4.2.2")
    assert policy.log[-2:] == [("deferred", "quota_end_of_data", ALICE), ("close",)]
    assert len(new_files(relay, ALICE)) == 1 and tmp_files(relay) == []


# --- statistics and logs ----------------------------------------------------------------------------
def test_statistics_and_log_lines(relay: RunningRelay, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="relay.smtp")
    send_message("127.0.0.1", relay.smtp_port, "s@remote.test", [ALICE], b"x" * 1000)
    with pytest.raises(SmtpError):
        send_message("127.0.0.1", relay.smtp_port, "s@remote.test", ["n@example.test"], b"x")
    wait_no_sessions(relay)
    st = relay.call(lambda r: r.smtp_stats.statistics())
    assert st.messages_received == 1 and st.received_bytes == 1000 and st.sessions == 2
    assert st.replies[("2xx", "2.0.0")] >= 1 and st.replies[("5xx", "5.1.1")] == 1
    assert sum(st.ingest_duration.counts) == 1 and sum(st.message_size.counts) == 1
    msgs = [r for r in caplog.records if r.getMessage() == "message"]
    sessions = [r for r in caplog.records if r.getMessage() == "session"]
    assert len(msgs) == 1 and len(sessions) == 2
    sid = msgs[0].fields["sid"]  # type: ignore[attr-defined]
    assert msgs[0].fields["size"] == 1000 and msgs[0].fields["outcome"] == "accepted"  # type: ignore[attr-defined]
    assert sid in {s.fields["sid"] for s in sessions}  # type: ignore[attr-defined]
    assert f"id {sid}".encode() in new_files(relay, ALICE)[0].read_bytes()


# --- shutdown ----------------------------------------------------------------------------------------
def test_stop_after_the_grace_period_closes_a_stalled_message(relay: RunningRelay,
                                                              raw: Callable[[], Raw]) -> None:
    c = raw()
    c.cmd("EHLO c")
    c.cmd("MAIL FROM:<s@remote.test>")
    c.cmd(f"RCPT TO:<{ALICE}>")
    assert c.cmd("DATA").startswith("354")
    c.send(b"Subject: stalled\r\n\r\n" + b"x" * 10_000)
    deadline = time.monotonic() + 5
    while not tmp_files(relay) and time.monotonic() < deadline:
        time.sleep(0.01)
    asyncio.run_coroutine_threadsafe(relay.relay.stop(grace=0.5), relay.loop).result(15)
    assert c.reply().startswith("421 4.3.2") and c.closed()
    assert tmp_files(relay) == [] and new_files(relay, ALICE) == []


def test_shutdown_closes_idle_sessions_at_once_and_lets_a_message_finish(
        relay: RunningRelay, raw: Callable[[], Raw]) -> None:
    """Between messages a session holds nothing: shutdown answers it 421 4.3.2 at once. A
    session in a transaction finishes its message (250 after the fsync), then gets 421."""
    idle, busy = raw(), raw()
    idle.cmd("EHLO idle")
    busy.cmd("EHLO busy")
    busy.cmd("MAIL FROM:<s@remote.test>")
    busy.cmd(f"RCPT TO:<{ALICE}>")
    t0 = time.monotonic()
    stopping = asyncio.run_coroutine_threadsafe(relay.relay.stop(grace=30), relay.loop)
    assert idle.reply().startswith("421 4.3.2") and idle.closed()
    assert time.monotonic() - t0 < 5                          # not the 30 s grace
    assert not stopping.done()                                # the busy session holds it
    assert busy.cmd("DATA").startswith("354")
    busy.send(b"Subject: last one\r\n\r\nbody\r\n.\r\n")
    assert busy.reply().startswith("250 2.0.0")
    assert busy.reply().startswith("421 4.3.2") and busy.closed()
    stopping.result(10)
    assert len(new_files(relay, ALICE)) == 1


# --- `relay serve` as a real process --------------------------------------------------------------------
def _serve(tmp_path: Path) -> tuple[subprocess.Popen[bytes], int]:
    """`relay serve` on a config of its own with ALICE; returns the process and its SMTP port."""
    import json

    data = tmp_path / "data"
    cfg = tmp_path / "relay.toml"
    cfg.write_text(f'data_dir = "{data}"\nhostname = "relay.test"\ngrace_period = 10\n'
                   '[smtp]\nlisten = ["127.0.0.1:0"]\n[imap]\nlisten = []\n[pop3]\nlisten = []\n'
                   '[metrics]\nlisten = "127.0.0.1:0"\n')
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    subprocess.run([sys.executable, "-m", "relay", "user", "add", ALICE, "--config", str(cfg)],
                   check=True, env=env, capture_output=True, timeout=60)
    proc = subprocess.Popen([sys.executable, "-m", "relay", "serve", "--config", str(cfg)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    listeners = data / "run" / "listeners.json"
    deadline = time.monotonic() + 30
    while not listeners.exists() and time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(proc.stderr.read())  # type: ignore[union-attr]
        time.sleep(0.05)
    return proc, json.loads(listeners.read_text())["smtp"][0][1]


def test_relay_serve_sigint_stops_cleanly(tmp_path: Path) -> None:
    proc, port = _serve(tmp_path)
    try:
        with smtplib.SMTP("127.0.0.1", port) as s:
            assert s.noop()[0] == 250
        proc.send_signal(signal.SIGINT)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "app stopped" in proc.stderr.read().decode()  # type: ignore[union-attr]


def test_relay_serve_subprocess_sigterm_lets_session_finish(tmp_path: Path) -> None:
    data = tmp_path / "data"
    proc, port = _serve(tmp_path)
    try:
        with smtplib.SMTP("127.0.0.1", port) as s:
            assert s.sendmail("s@remote.test", [ALICE], b"Subject: 1\r\n\r\none\r\n") == {}
        c = Raw(port)                                 # a session in progress
        c.cmd("EHLO c")
        c.cmd("MAIL FROM:<s@remote.test>")
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        with pytest.raises(ConnectionRefusedError):   # no longer accepting
            socket.create_connection(("127.0.0.1", port), timeout=2)
        assert c.cmd(f"RCPT TO:<{ALICE}>").startswith("250")
        assert c.cmd("DATA").startswith("354")
        assert c.cmd(b"Subject: 2\r\n\r\ntwo\r\n.").startswith("250 2.0.0")
        assert c.reply().startswith("421 4.3.2") and c.closed()   # its message done: closed
        c.close()
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert len(list((data / "mail" / "example.test" / "alice" / "new").iterdir())) == 2
    stderr = proc.stderr.read().decode()  # type: ignore[union-attr]
    assert "smtp session" in stderr and "smtp message" in stderr
