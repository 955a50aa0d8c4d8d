"""Connection pressure (issue 12 item 3): read buffers lent per read, a deadline per request
that trickled bytes do not reset, a minimum data rate, stress mode with shorter timeouts and
eviction of idle sessions, for SMTP, and for IMAP and POP3 before login."""

from __future__ import annotations

import smtplib
import socket
import time
from typing import Any

import pytest

from relay.server.listener import SessionRegistry
from relay.server.pressure import MIN_IDLE_TO_EVICT, Deadline, ReadBuffers, stress_level


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


# --- pure logic ------------------------------------------------------------------------------

def test_deadline_is_not_moved_by_bytes_without_a_rate() -> None:
    clock = Clock()
    d = Deadline(clock)
    d.start(300.0)
    for _ in range(100):                      # one byte every 299 s used to hold the slot
        clock.t += 2.9
        d.progress(1)
    assert d.remaining() == pytest.approx(300.0 - 290.0)
    clock.t += 10.0
    assert d.remaining() <= 0


def test_deadline_min_rate_keeps_a_fast_sender_and_cuts_a_slow_one() -> None:
    clock = Clock()
    fast, slow = Deadline(clock), Deadline(clock)
    fast.start(10.0, min_rate=500)
    slow.start(10.0, min_rate=500)
    for _ in range(60):                       # a minute: longer than the timeout
        clock.t += 1.0
        fast.progress(600)                    # above the minimum rate
        slow.progress(100)                    # below it
    assert fast.remaining() == pytest.approx(10.0)   # capped at one timeout from now
    assert slow.remaining() <= 0


def test_deadline_shortened_under_stress() -> None:
    clock = Clock()
    d = Deadline(clock)
    d.start(300.0)
    clock.t += 4.0
    d.shorten(1000.0, 10.0)
    assert d.remaining() == pytest.approx(6.0)


def test_read_buffers_are_reused_not_multiplied() -> None:
    pool = ReadBuffers(size=1024, kept=2)
    for _ in range(1000):                     # reads of many sessions, one after the other
        pair = pool.acquire()
        pool.release(pair)
    st = pool.statistics()
    assert (st.allocated, st.lent, st.peak_in_use) == (1, 1000, 1)
    pairs = [pool.acquire() for _ in range(3)]
    for p in pairs:
        pool.release(p)
    assert pool.statistics().allocated == 2   # only `kept` stay


def test_stress_level() -> None:
    assert not stress_level(74, 100, 0.75)
    assert stress_level(75, 100, 0.75)
    assert not stress_level(1000, 0, 0.75)    # no limit
    assert not stress_level(100, 100, 0.0)    # stress mode off


def test_registry_evicts_the_longest_idle_session_only_under_stress() -> None:
    reg = SessionRegistry()
    evicted: list[str] = []
    sessions = []
    for i in range(4):
        s = reg.open("smtp", f"10.0.0.{i}", max_total=4, stress_threshold=0.5)
        assert s is not None
        s.evict = lambda s=s: evicted.append(s.sid)
        sessions.append(s)
    assert reg.stressed("smtp")
    now = time.monotonic()
    sessions[0].idle_since = now - 5 * MIN_IDLE_TO_EVICT      # idle, but in a transaction: None
    sessions[0].idle_since = None
    sessions[1].idle_since = now - 3 * MIN_IDLE_TO_EVICT
    sessions[2].idle_since = now - 9 * MIN_IDLE_TO_EVICT      # the longest idle
    sessions[3].idle_since = now                               # just connected: not yet
    new = reg.open("smtp", "192.0.2.1", max_total=4, stress_threshold=0.5)
    assert new is not None and evicted == [sessions[2].sid]
    assert reg.statistics().evicted == {"smtp": 1}
    assert reg.statistics().total[("smtp", "evicted")] == 1
    # without stress mode a full registry refuses, as before
    reg2 = SessionRegistry()
    for i in range(2):
        s = reg2.open("pop3", "10.0.0.1", max_total=2)
        assert s is not None
        s.idle_since, s.evict = now - 60, (lambda: None)
    assert reg2.open("pop3", "10.0.0.2", max_total=2) is None


# --- over loopback ---------------------------------------------------------------------------

def _connect(port: int, source: str = "127.0.0.1") -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    s.settimeout(10)
    return s


def _read_until_closed(s: socket.socket, limit: float = 10.0) -> bytes:
    out = b""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            data = s.recv(4096)
        except (ConnectionError, TimeoutError):
            break
        if not data:
            break
        out += data
    return out


def test_smtp_command_deadline_is_not_reset_by_trickled_bytes(relay_factory: Any) -> None:
    r = relay_factory(smtp={"command_timeout": 1.5})
    s = _connect(r.smtp_port)
    assert s.recv(100).startswith(b"220")
    started = time.monotonic()
    s.settimeout(0.3)
    got = b""
    for ch in b"EHLO trickle.test":          # one byte every 0.3 s: 5 s for the line
        try:
            s.sendall(bytes([ch]))
        except OSError:
            break
        try:
            got += s.recv(200)
        except TimeoutError:
            continue
        if got:
            break
    elapsed = time.monotonic() - started
    assert got.startswith(b"421 4.4.2"), got
    assert 1.3 < elapsed < 4.0, elapsed       # the line's deadline, not 0.3 s after the last byte
    s.close()


def test_smtp_min_data_rate(relay_factory: Any) -> None:
    """DATA slower than min_data_rate is cut after data_timeout; a sender above the rate goes
    on for longer than data_timeout and gets its 250."""
    r = relay_factory(smtp={"data_timeout": 1.0, "min_data_rate": 2000})
    r.add_user("a@example.test")
    s = _connect(r.smtp_port)
    s.recv(100)
    s.sendall(b"EHLO slow.test\r\nMAIL FROM:<x@slow.test>\r\nRCPT TO:<a@example.test>\r\nDATA\r\n")
    time.sleep(0.3)
    assert b"354" in s.recv(4096)
    started = time.monotonic()
    s.settimeout(0.25)
    reply = b""
    while time.monotonic() - started < 8 and not reply:
        try:
            s.sendall(b"x" * 100 + b"\r\n")          # ~400 bytes/s
        except OSError:
            break
        try:
            reply = s.recv(200)
        except TimeoutError:
            pass
    assert reply.startswith(b"421 4.4.2"), reply
    assert time.monotonic() - started < 4
    s.close()
    # at ~20 kB/s for 2.5 s (data_timeout 1 s): accepted
    with smtplib.SMTP("127.0.0.1", r.smtp_port, timeout=10) as c:
        c.ehlo("fast.test")
        c.mail("x@fast.test")
        c.rcpt("a@example.test")
        c.putcmd("DATA")
        assert c.getreply()[0] == 354
        t0 = time.monotonic()
        while time.monotonic() - t0 < 2.5:
            c.send(b"y" * 1000 + b"\r\n")
            time.sleep(0.05)
        c.send(b".\r\n")
        assert c.getreply()[0] == 250


def test_smtp_stress_lets_a_real_sender_in_and_times_out_idle_sessions(relay_factory: Any) -> None:
    """The flood of issue 12 in small: idle connections from several addresses fill every
    slot; under stress the idle ones get the short timeout, and a sender from another
    address is admitted at once by closing the longest-idle session."""
    r = relay_factory(smtp={"max_sessions": 12, "max_sessions_per_client": 4,
                            "stress_threshold": 0.5, "stress_command_timeout": 3.0})
    r.add_user("a@example.test")
    idle = []
    for i in range(12):
        s = _connect(r.smtp_port, f"127.0.0.{10 + i // 4}")
        assert s.recv(100).startswith(b"220")
        idle.append(s)
    over = _connect(r.smtp_port, "127.0.0.10")        # per-client limit still holds
    assert over.recv(100).startswith(b"421 4.7.0")
    over.close()
    time.sleep(MIN_IDLE_TO_EVICT + 0.2)
    t0 = time.monotonic()
    with smtplib.SMTP("127.0.0.1", r.smtp_port, timeout=10, source_address=("127.0.0.99", 0)) as c:
        assert c.sendmail("real@sender.test", ["a@example.test"], b"Subject: hi\r\n\r\nhello\r\n") == {}
    assert time.monotonic() - t0 < 2.0
    st = r.call(lambda relay: relay.sessions.statistics())
    assert st.evicted.get("smtp", 0) >= 1
    first = _read_until_closed(idle[0], 2)
    assert first.startswith(b"421 4.7.0"), first      # the longest idle made room
    # those that connected under stress (from the 6th on) have the stress timeout: 3 s
    t0 = time.monotonic()
    late = [_read_until_closed(s, 8) for s in idle[6:]]
    assert all(x.startswith(b"421 4.4.2") for x in late), late
    assert time.monotonic() - t0 < 6
    # below the threshold again: no stress, the others keep the normal timeout
    st = r.call(lambda relay: relay.sessions.statistics())
    assert st.stressed == {"smtp": 0} and 1 <= st.current["smtp"] <= 5
    for s in idle:
        s.close()


def test_idle_smtp_sessions_hold_no_receive_buffer(relay_factory: Any) -> None:
    r = relay_factory()
    r.add_user("a@example.test")
    conns = [_connect(r.smtp_port) for _ in range(40)]
    for s in conns:
        assert s.recv(100).startswith(b"220")
        s.sendall(b"EHLO idle.test\r\n")
    for s in conns:
        assert b"250 " in s.recv(4096)
    with smtplib.SMTP("127.0.0.1", r.smtp_port, timeout=10) as c:
        c.sendmail("x@y.test", ["a@example.test"], b"Subject: m\r\n\r\n" + b"z" * 3_000_000 + b"\r\n")
    st = r.call(lambda relay: relay.read_buffers.statistics())
    assert st.allocated <= 2 and st.peak_in_use == 1, st
    for s in conns:
        s.close()


def test_imap_and_pop3_login_deadline_not_reset_by_trickled_bytes(relay_factory: Any) -> None:
    r = relay_factory(imap={"login_timeout": 1.5}, pop3={"login_timeout": 1.5})
    for port, prefix in ((r.imap_port, b"* BYE Login timeout"), (r.pop3_port, b"-ERR")):
        s = _connect(port)
        s.recv(200)
        started = time.monotonic()
        s.settimeout(0.3)
        got = b""
        for ch in b"a CAPABILITY-and-more-and-more":
            try:
                s.sendall(bytes([ch]))
                got += s.recv(200)
            except TimeoutError:
                continue
            except OSError:
                break
            if got:
                break
        assert got.startswith(prefix), got
        assert 1.3 < time.monotonic() - started < 4.0
        s.close()


def test_imap_and_pop3_stress_evicts_clients_that_do_not_log_in(relay_factory: Any) -> None:
    r = relay_factory(imap={"max_sessions": 4, "stress_threshold": 0.5},
                      pop3={"max_sessions": 4, "stress_threshold": 0.5})
    r.add_user("a@example.test", "secret")
    import imaplib
    import poplib

    for port in (r.imap_port, r.pop3_port):
        idle = [_connect(port, "127.0.0.20") for _ in range(4)]
        for s in idle:
            s.recv(200)
        time.sleep(MIN_IDLE_TO_EVICT + 0.2)
        if port == r.imap_port:
            m = imaplib.IMAP4("127.0.0.1", port, timeout=10)
            assert m.login("a@example.test", "secret")[0] == "OK"
            m.logout()
            assert _read_until_closed(idle[0], 2).startswith(b"* BYE [UNAVAILABLE]")
        else:
            p = poplib.POP3("127.0.0.1", port, timeout=10)
            p.user("a@example.test")
            assert p.pass_("secret").startswith(b"+OK")
            p.quit()
            assert _read_until_closed(idle[0], 2).startswith(b"-ERR [SYS/TEMP]")
        for s in idle:
            s.close()
    assert r.call(lambda relay: relay.sessions.statistics()).evicted == {"imap": 1, "pop3": 1}
