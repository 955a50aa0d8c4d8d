"""POP3 end to end over loopback with real clients: poplib, the project's streaming client and
raw sockets where the bytes matter. Mail arrives over SMTP (smtplib)."""

from __future__ import annotations

import base64
import poplib
import smtplib
import socket
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from relay.clients.pop3 import Pop3Client, Pop3Error
from relay.protocol.pop3 import parse_uidl
from tests.conftest import RunningRelay
from tests.tlsutil import client_context, make_cert

pytestmark = pytest.mark.e2e

ALICE = "alice@example.test"
# lines starting with ".", a line that is only ".", and a "\r\n.\r\n"-like line inside
DOTTY = (b"Subject: dots\r\nFrom: x@remote.test\r\n\r\n.leading dot\r\n..two dots\r\n.\r\n"
         b"middle. dot\r\n" + b"A" * 1000 + b"\r\n.\r\n.end\r\nlast line\r\n")


def deliver(r: RunningRelay, body: bytes, rcpt: str = ALICE) -> None:
    with smtplib.SMTP("127.0.0.1", r.smtp_port, timeout=10) as s:
        s.sendmail("sender@remote.test", [rcpt], body)


def stored(r: RunningRelay, address: str = ALICE) -> list[tuple[int, Path, int]]:
    """(uid, path, size) of each message in the mailbox, from the store."""
    def get(relay: Any) -> list[tuple[int, Path, int]]:
        mb = relay.store.engine.mailbox(address)
        return [(m.uid, mb.path(m.uid), m.size) for m in mb.messages()]
    return r.call(get)  # type: ignore[no-any-return]


def pop(r: RunningRelay, user: str = ALICE, password: str = "secret") -> poplib.POP3:
    p = poplib.POP3("127.0.0.1", r.pop3_port, timeout=10)
    p.user(user)
    p.pass_(password)
    return p


def wait_unlocked(r: RunningRelay, address: str = ALICE, timeout: float = 5.0) -> None:
    """The server notices a dropped connection asynchronously."""
    deadline = time.monotonic() + timeout
    while r.call(lambda relay: address in relay.pop3.locks):
        assert time.monotonic() < deadline, "maildrop lock not released"
        time.sleep(0.02)


class Raw:
    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.f = self.sock.makefile("rb")
        self.greeting = self.line()

    def line(self) -> bytes:
        return self.f.readline()

    def cmd(self, data: bytes) -> bytes:
        self.sock.sendall(data + b"\r\n")
        return self.line()


def test_stat_list_uidl_retr_top_with_dot_lines(relay: RunningRelay) -> None:
    deliver(relay, DOTTY)
    deliver(relay, b"Subject: two\r\n\r\nsecond\r\n")
    msgs = stored(relay)
    p = pop(relay)
    assert p.stat() == (2, sum(size for _, _, size in msgs))
    _, listing, _ = p.list()
    assert listing == [f"{n} {size}".encode() for n, (_, _, size) in enumerate(msgs, 1)]
    _, lines, _ = p.retr(1)
    on_disk = msgs[0][1].read_bytes()
    assert b"\r\n".join(lines) + b"\r\n" == on_disk          # poplib unstuffed every dot line
    assert on_disk.endswith(DOTTY)
    _, top, _ = p.top(1, 2)
    head = on_disk.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
    assert top == head + [b"", b".leading dot", b"..two dots"]
    assert p.noop().startswith(b"+OK")
    p.quit()
    assert relay.call(lambda r: r.pop3.statistics().messages_fetched) == 1


def test_uidl_is_stable_across_sessions_and_matches_imap_uids(relay: RunningRelay) -> None:
    for i in range(3):
        deliver(relay, f"Subject: {i}\r\n\r\nbody {i}\r\n".encode())
    uidvalidity = relay.call(lambda r: r.store.mailbox(ALICE).uidvalidity())
    p = pop(relay)
    first = p.uidl()[1]
    p.dele(1)
    p.quit()
    p = pop(relay)
    second = p.uidl()[1]
    p.quit()
    ids = [line.split()[1] for line in second]
    assert [line.split()[1] for line in first[1:]] == ids   # the two left keep their unique-ids
    with Pop3Client("127.0.0.1", relay.pop3_port) as c:     # STAT + UIDL pipelined
        c.login(ALICE, "secret")
        count, octets, uidl = c.poll()
        c.quit()
    assert (count, octets) == (2, sum(size for _, _, size in stored(relay)))
    assert list(uidl.values()) == [i.decode() for i in ids]
    uids = [uid for uid, _, _ in stored(relay)]
    assert [parse_uidl(i.decode()) for i in ids] == [(uidvalidity, u) for u in uids]


def test_dele_quit_removes_files_and_frees_quota(relay: RunningRelay) -> None:
    deliver(relay, DOTTY)
    deliver(relay, b"Subject: keep\r\n\r\nkeep me\r\n")
    msgs = stored(relay)
    before = relay.call(lambda r: r.store.ledger.usage(ALICE))
    assert before.messages == 2
    p = pop(relay)
    assert p.dele(1).startswith(b"+OK")
    assert p.stat()[0] == 1
    assert p.quit().startswith(b"+OK")
    assert not msgs[0][1].exists() and msgs[1][1].exists()
    after = relay.call(lambda r: r.store.ledger.usage(ALICE))
    assert (after.messages, after.bytes) == (1, before.bytes - msgs[0][2])


def test_rset_unmarks(relay: RunningRelay) -> None:
    deliver(relay, b"Subject: a\r\n\r\na\r\n")
    p = pop(relay)
    p.dele(1)
    assert p.rset().startswith(b"+OK Maildrop has 1 messages")
    p.quit()
    assert len(stored(relay)) == 1


def test_dropped_connection_deletes_nothing_and_releases_the_lock(relay: RunningRelay) -> None:
    deliver(relay, b"Subject: a\r\n\r\na\r\n")
    raw = Raw(relay.pop3_port)
    raw.cmd(b"USER " + ALICE.encode())
    assert raw.cmd(b"PASS secret").startswith(b"+OK")
    assert raw.cmd(b"DELE 1").startswith(b"+OK")
    raw.f.close()
    raw.sock.close()                                # no QUIT
    wait_unlocked(relay)
    assert len(stored(relay)) == 1
    p = pop(relay)
    assert p.stat()[0] == 1
    p.quit()


def test_second_session_gets_in_use(relay: RunningRelay) -> None:
    p = pop(relay)
    with pytest.raises(poplib.error_proto, match=r"\[IN-USE\]"):
        pop(relay)
    with Pop3Client("127.0.0.1", relay.pop3_port) as c, pytest.raises(Pop3Error) as e:
        c.login(ALICE, "secret")
    assert e.value.code == "IN-USE"
    pop(relay, "bob@example.test").quit()       # another mailbox is not locked
    p.quit()
    pop(relay).quit()                             # free again after QUIT


def test_wrong_password_and_unknown_user_get_auth_code(relay: RunningRelay) -> None:
    for user, pw in ((ALICE, "wrong"), ("nobody@example.test", "secret"), ("not-an-address", "x")):
        with pytest.raises(poplib.error_proto, match=r"^b'-ERR \[AUTH\]"):
            pop(relay, user, pw)


def test_snapshot_at_login_and_bad_input_keeps_session_usable(relay: RunningRelay) -> None:
    deliver(relay, b"Subject: a\r\n\r\na\r\n")
    raw = Raw(relay.pop3_port)
    assert raw.cmd(b"STAT").startswith(b"-ERR STAT is not valid in the AUTHORIZATION state")
    raw.cmd(b"USER " + ALICE.encode())
    assert raw.cmd(b"PASS secret").startswith(b"+OK")
    deliver(relay, b"Subject: b\r\n\r\nb\r\n")      # arrives during the session
    assert raw.cmd(b"STAT").startswith(b"+OK 1 ")  # not in this session's maildrop
    assert raw.cmd(b"X" * 1000).startswith(b"-ERR Line too long")
    assert raw.cmd(b"RETR 7") == b"-ERR No such message: 7\r\n"
    assert raw.cmd(b"RETR one") == b"-ERR Invalid message number 'one'\r\n"
    assert raw.cmd(b"FOO") == b"-ERR Unknown command: 'FOO'\r\n"
    assert raw.cmd(b"STAT").startswith(b"+OK 1 ")
    assert raw.cmd(b"QUIT").startswith(b"+OK")
    p = pop(relay)
    assert p.stat()[0] == 2
    p.quit()


def test_pipelined_commands_with_retr_in_the_middle(relay: RunningRelay) -> None:
    deliver(relay, DOTTY)
    [(_, path, size)] = stored(relay)
    original = path.read_bytes()
    s = socket.create_connection(("127.0.0.1", relay.pop3_port), timeout=10)
    s.sendall(f"USER {ALICE}\r\nPASS secret\r\nSTAT\r\nRETR 1\r\nUIDL 1\r\nDELE 1\r\n"
              "QUIT\r\n".encode())
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    s.close()
    lines = data.split(b"\r\n")
    assert lines[0].startswith(b"+OK") and lines[1] == b"+OK Send PASS"
    assert lines[3] == f"+OK 1 {size}".encode() and lines[4] == f"+OK {size} octets".encode()
    body, after = data.split(f"+OK {size} octets\r\n".encode(), 1)[1].split(b"\r\n.\r\n", 1)
    assert body.replace(b"\r\n..", b"\r\n.") + b"\r\n" == original
    assert after.startswith(b"+OK 1 ") and b"+OK Message 1 deleted\r\n" in after
    assert after.endswith(b"(1 messages deleted)\r\n")
    assert stored(relay) == []


def test_retr_to_a_client_that_stops_reading_is_flow_controlled(relay: RunningRelay) -> None:
    line = b"A" * 76 + b"\r\n"
    deliver(relay, b"Subject: big\r\n\r\n" + line * (40_000_000 // len(line)))
    [(_, path, size)] = stored(relay)
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    s.settimeout(10)
    s.connect(("127.0.0.1", relay.pop3_port))
    s.sendall(f"USER {ALICE}\r\nPASS secret\r\nRETR 1\r\n".encode())

    def sent() -> int:
        return relay.call(lambda r: r.pop3.statistics().fetched_bytes)  # type: ignore[no-any-return]

    deadline = time.monotonic() + 10
    while sent() == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)                       # the client reads nothing meanwhile
    stalled = sent()
    # kernel buffers (a few MiB) + the transport's 2 MiB + one chunk: far below the message
    assert 0 < stalled < 12_000_000 < size
    data = bytearray()
    while not data.endswith(b"\r\n.\r\n"):
        data += s.recv(1 << 20)
    s.close()
    assert sent() == size
    assert data.endswith(b"+OK %d octets\r\n" % size + path.read_bytes() + b".\r\n")


def test_streaming_client_retr_to_file_exact_bytes(relay: RunningRelay, tmp_path: Path) -> None:
    # ~3 MB with dot lines spread over many 1 MiB chunks, and a long line without dots
    body = b"Subject: big\r\n\r\n" + b"".join(
        (b"." if i % 7 == 0 else b"") + f"line {i} ".encode() * 8 + b"\r\n" for i in range(30000)
    ) + b"y" * 2_000_000 + b"\r\n"
    deliver(relay, body)
    [(_, path, size)] = stored(relay)
    with Pop3Client("127.0.0.1", relay.pop3_port) as c:
        c.login(ALICE, "secret", method="user")
        assert c.stat() == (1, size)
        n = c.retr_to_file(1, tmp_path / "m.eml")
        assert n == size and (tmp_path / "m.eml").read_bytes() == path.read_bytes()
        assert c.top(1, 0).endswith(b"Subject: big\r\n\r\n")
        c.dele(1)
        assert "1 messages deleted" in c.quit()
    assert stored(relay) == []


def test_auth_plain_both_forms(relay: RunningRelay) -> None:
    with Pop3Client("127.0.0.1", relay.pop3_port) as c:
        assert "SASL" in c.capa()
        assert c.login(ALICE, "secret", method="plain").startswith("Logged in")
        c.quit()
    raw = Raw(relay.pop3_port)
    assert raw.cmd(b"AUTH PLAIN") == b"+ \r\n"
    assert raw.cmd(base64.b64encode(b"\0" + ALICE.encode() + b"\0secret")).startswith(b"+OK")
    raw.cmd(b"QUIT")


def test_plaintext_never_refuses_and_hides_user(relay_factory: Callable[..., RunningRelay]) -> None:
    r = relay_factory(auth={"plaintext": "never"})
    r.add_user(ALICE, "secret")
    raw = Raw(r.pop3_port)
    caps = [raw.cmd(b"CAPA")]
    while caps[-1] != b".\r\n":
        caps.append(raw.line())
    assert b"USER\r\n" not in caps and not any(c.startswith(b"SASL") for c in caps)
    assert raw.cmd(b"USER " + ALICE.encode()).startswith(b"-ERR [AUTH] Plaintext authentication")
    assert raw.cmd(b"AUTH PLAIN AGFAYgBj").startswith(b"-ERR [AUTH] Plaintext authentication")


def test_stls_and_implicit_tls(relay_factory: Callable[..., RunningRelay], tmp_path: Path) -> None:
    cert, key = make_cert(tmp_path / "tls")
    r = relay_factory(tls={"cert": str(cert), "key": str(key)}, auth={"plaintext": "never"},
                      pop3={"listen_tls": ["127.0.0.1:0"]})
    r.add_user(ALICE, "secret")
    deliver(r, DOTTY)
    ctx = client_context(cert)
    p = poplib.POP3("127.0.0.1", r.pop3_port, timeout=10)
    assert "STLS" in p.capa() and "USER" not in p.capa()
    p.stls(ctx)
    assert "STLS" not in p.capa() and "USER" in p.capa()
    p.user(ALICE)
    p.pass_("secret")
    assert p.retr(1)[1][-1] == b"last line"
    p.quit()
    p = poplib.POP3_SSL("127.0.0.1", r.port("pop3_tls"), context=ctx, timeout=10)
    assert "STLS" not in p.capa()
    p.user(ALICE)
    p.pass_("secret")
    assert p.stat()[0] == 1
    p.quit()
    with Pop3Client("127.0.0.1", r.pop3_port, ssl_context=ctx, starttls=True) as c:
        c.login(ALICE, "secret")
        assert c.retr(1).endswith(DOTTY)
        c.quit()


def test_idle_timeout_closes_without_deleting(relay_factory: Callable[..., RunningRelay]) -> None:
    r = relay_factory(pop3={"idle_timeout": 0.5})
    r.add_user(ALICE, "secret")
    deliver(r, b"Subject: a\r\n\r\na\r\n")
    raw = Raw(r.pop3_port)
    raw.cmd(b"USER " + ALICE.encode())
    raw.cmd(b"PASS secret")
    raw.cmd(b"DELE 1")
    assert raw.line().startswith(b"-ERR Idle timeout")
    assert raw.line() == b""                        # closed
    wait_unlocked(r)
    assert len(stored(r)) == 1


def test_shutdown_with_a_session_in_transaction_deletes_nothing(relay: RunningRelay) -> None:
    deliver(relay, b"Subject: a\r\n\r\na\r\n")
    [(_, path, _)] = stored(relay)
    raw = Raw(relay.pop3_port)
    raw.cmd(b"USER " + ALICE.encode())
    raw.cmd(b"PASS secret")
    assert raw.cmd(b"DELE 1").startswith(b"+OK")
    relay.stop()                       # grace 2 s, then open sessions are closed
    assert raw.line() == b""
    assert path.exists()


def _reset(s: socket.socket) -> None:
    """Close with a TCP RST (SO_LINGER 0), as a crashed or killed receiver does."""
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()


def test_a_receiver_dropped_mid_retr_is_a_dropped_session_not_an_error(relay: RunningRelay) -> None:
    """A gateway killed during a download is ordinary: the session ends as "dropped" (not
    "error" with a traceback), nothing counts as fetched, and the lock is released."""
    deliver(relay, b"Subject: big\r\n\r\n" + (b"z" * 998 + b"\r\n") * 20_000)
    s = socket.create_connection(("127.0.0.1", relay.pop3_port), timeout=10)
    s.sendall(f"USER {ALICE}\r\nPASS secret\r\nRETR 1\r\n".encode())
    got = 0
    while got < 200_000:
        got += len(s.recv(65536))
    _reset(s)
    wait_unlocked(relay)
    deadline = time.monotonic() + 5
    while not relay.call(lambda r: r.sessions.statistics().total.get(("pop3", "dropped"))):
        assert time.monotonic() < deadline, relay.call(lambda r: r.sessions.statistics())
        time.sleep(0.02)
    st = relay.call(lambda r: r.sessions.statistics())
    assert ("pop3", "error") not in st.total
    assert relay.call(lambda r: r.pop3.statistics().messages_fetched) == 0
    assert len(stored(relay)) == 1


def test_message_expunged_by_imap_meanwhile_is_sys_perm(relay: RunningRelay) -> None:
    """RESP-CODES e2e: the maildrop is a snapshot; a message an IMAP session of the same
    account expunged meanwhile answers RETR with -ERR [SYS/PERM], and its DELE + QUIT
    counts nothing as deleted by POP3."""
    import imaplib

    deliver(relay, b"Subject: a\r\n\r\na\r\n")
    deliver(relay, b"Subject: b\r\n\r\nb\r\n")
    p = pop(relay)
    m = imaplib.IMAP4("127.0.0.1", relay.imap_port)
    m.login(ALICE, "secret")
    m.select()
    m.store("1", "+FLAGS", "(\\Deleted)")
    m.expunge()
    m.logout()
    with pytest.raises(poplib.error_proto, match=r"-ERR \[SYS/PERM\]"):
        p.retr(1)
    assert p.retr(2)[1][-1] == b"b"                      # the session goes on
    p.dele(1)
    p.dele(2)
    assert b"messages deleted" in p.quit()
    assert stored(relay) == []
    assert relay.call(lambda r: r.pop3.statistics().messages_deleted) == 1


def test_pipelined_listings_to_a_client_that_reads_nothing_stay_bounded(relay: RunningRelay) -> None:
    """LIST pipelined 20,000 times on 3,000 messages (~30 KB per 6-byte command): the write
    buffer stops at its bound rather than holding the answers to a whole read (~7-20 MB)."""
    import gc

    from relay.server.pop3 import WRITE_HIGH_WATER, Pop3Session

    local, domain = ALICE.split("@")
    new = relay.data_dir / "mail" / domain / local / "new"
    body = b"Subject: x\r\n\r\nx\r\n"
    for i in range(3000):
        (new / f"{1700000000 + i}.M{i}P1Q1.relay.test,S={len(body)}").write_bytes(body)
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", relay.pop3_port))
    s.sendall(f"USER {ALICE}\r\nPASS secret\r\n".encode() + b"LIST\r\n" * 20000)
    peak = 0
    for _ in range(15):                                    # bounded: ~1.5 s of samples
        time.sleep(0.1)
        sizes = relay.call(lambda r: [o.writer.transport.get_write_buffer_size()
                                      for o in gc.get_objects() if isinstance(o, Pop3Session)])
        peak = max([peak, *sizes])
    s.close()
    assert WRITE_HIGH_WATER // 4 < peak < WRITE_HIGH_WATER + 256 * 1024, peak


def test_too_many_failed_logins_close_the_connection(relay: RunningRelay) -> None:
    """Password guessing: after 5 failures on one connection (USER/PASS or AUTH PLAIN) the
    server closes it, as IMAP does; each failure is answered -ERR [AUTH]."""
    raw = Raw(relay.pop3_port)
    for i in range(4):
        assert raw.cmd(b"USER " + ALICE.encode()).startswith(b"+OK")
        assert raw.cmd(b"PASS wrong%d" % i).startswith(b"-ERR [AUTH]")
    bad = base64.b64encode(b"\0" + ALICE.encode() + b"\0nope")
    assert raw.cmd(b"AUTH PLAIN " + bad).startswith(b"-ERR [AUTH]")
    assert raw.line() == b""                                         # closed
    assert pop(relay).stat()[0] == 0                                  # others are served
    st = relay.call(lambda r: r.sessions.statistics())
    assert st.total.get(("pop3", "auth_failures")) == 1
