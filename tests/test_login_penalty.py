"""Login penalties (issue 12 item 4): one throttle for SMTP AUTH, IMAP and POP3, growing delay
per client address and per account (Dovecot auth_penalty), argon2 on its own bounded pool."""

from __future__ import annotations

import asyncio
import base64
import imaplib
import poplib
import smtplib
import threading
import time
import urllib.request
from typing import Any

import pytest

from relay.config import Config, from_dict
from relay.policy.penalty import FORGET_AFTER, MAX_WAIT, LoginPenalty, Verdict
from relay.store import passwords as accounts_mod


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.t

    async def sleep(self, s: float) -> None:
        self.slept.append(round(s, 3))
        self.t += s


def penalty(clock: Clock, good: str = "right", **auth: Any) -> LoginPenalty:
    cfg: Config = from_dict({"auth": auth} if auth else {})

    async def verify(user: str, password: str) -> bool:
        return password == good

    return LoginPenalty(cfg, verify, clock=clock, sleep=clock.sleep)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_growing_delay_per_client_and_per_account() -> None:
    c = Clock()
    p = penalty(c)
    assert [p.delay(n) for n in range(7)] == [0, 2, 4, 8, 15, 15, 15]   # Dovecot: 2 s .. 15 s

    async def go() -> None:
        for _ in range(5):                    # one guesser, one account
            assert await p.verify("imap", "192.0.2.1", "a@x.test", "guess") is Verdict.FAILED
        assert c.slept == [2, 4, 8, 15]       # each attempt waited for its turn first
        # another address, same account: the account's penalty holds
        c.slept.clear()
        assert await p.verify("pop3", "192.0.2.2", "A@x.test", "guess") is Verdict.FAILED
        assert c.slept == [15]

    run(go())
    st = p.statistics()
    assert st.failures == {"imap": 5, "pop3": 1}
    assert st.delayed_seconds == pytest.approx(2 + 4 + 8 + 15 + 15)

    # the address's penalty: a new account name each time does not escape it
    c2 = Clock()
    p2 = penalty(c2)

    async def go2() -> None:
        for i in range(3):
            assert await p2.verify("smtp", "192.0.2.1", f"u{i}@x.test", "guess") is Verdict.FAILED
        assert c2.slept == [2, 4]
        c2.slept.clear()
        assert await p2.verify("smtp", "192.0.2.1", "b@x.test", "right") is Verdict.OK
        assert c2.slept == [8]
        c2.slept.clear()                      # success cleared the address
        assert await p2.verify("smtp", "192.0.2.1", "c@x.test", "right") is Verdict.OK
        assert c2.slept == []

    run(go2())


def test_parallel_attempts_take_turns_and_far_turns_are_refused_unchecked() -> None:
    c = Clock()
    checked: list[str] = []
    cfg = from_dict({})

    async def verify(user: str, password: str) -> bool:
        checked.append(password)
        return False

    async def sleep(s: float) -> None:       # waits "at the same time": the clock stands
        await asyncio.sleep(0)

    p = LoginPenalty(cfg, verify, clock=c, sleep=sleep)

    async def go() -> list[Verdict]:
        for i in range(4):
            await p.verify("imap", "198.51.100.7", f"u{i}@x.test", "g")
        checked.clear()
        # 48 connections guess at once from one address: each reserves the next turn
        # (15 s apart), those more than MAX_WAIT away are answered "try later" unchecked
        return list(await asyncio.gather(*(p.verify("imap", "198.51.100.7", f"v{i}@x.test", "g")
                                           for i in range(48))))

    verdicts = run(go())
    n_checked = len(checked)
    assert n_checked <= MAX_WAIT / 15 + 2
    assert verdicts.count(Verdict.BUSY) == 48 - n_checked
    assert p.statistics().refused == {"imap": 48 - n_checked}


def test_failures_are_forgotten() -> None:
    c = Clock()
    p = penalty(c)

    async def go() -> None:
        await p.verify("pop3", "192.0.2.9", "a@x.test", "bad")
        c.t += FORGET_AFTER + 1
        c.slept.clear()
        assert await p.verify("pop3", "192.0.2.9", "a@x.test", "right") is Verdict.OK
        assert c.slept == []

    run(go())
    assert p.statistics().tracked == 0


def test_password_hashing_runs_on_its_own_pool(relay_factory: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """argon2 runs on the "argon2" threads, never on the default executor where delivery
    commits fsync; a full queue answers "try later" (KdfBusy) instead of waiting."""
    r = relay_factory()
    r.add_user("a@example.test", "secret")
    threads: list[str] = []
    real = accounts_mod.check_hash

    def spy(stored: str, password: str) -> bool:
        threads.append(threading.current_thread().name)
        return real(stored, password)

    monkeypatch.setattr(accounts_mod, "check_hash", spy)
    m = imaplib.IMAP4("127.0.0.1", r.imap_port)
    m.login("a@example.test", "secret")
    m.logout()
    assert threads and all(t.startswith("argon2") for t in threads), threads
    monkeypatch.setattr(accounts_mod, "_kdf_pending", accounts_mod.KDF_QUEUE + accounts_mod.KDF_THREADS)
    p = poplib.POP3("127.0.0.1", r.pop3_port, timeout=10)
    p.user("a@example.test")
    with pytest.raises(poplib.error_proto, match=r"SYS/TEMP"):
        p.pass_("other-password")            # not in the credential cache: needs argon2
    p.quit()


def test_one_penalty_for_smtp_imap_and_pop3(relay_factory: Any) -> None:
    """Failures over SMTP AUTH delay the next IMAP and POP3 attempt from that address; each
    failure is counted (relay_auth_failures_total) and logged once."""
    r = relay_factory(auth={"failure_delay": 0.4, "failure_delay_max": 1.0})
    r.add_user("a@example.test", "secret")
    with smtplib.SMTP("127.0.0.1", r.smtp_port, timeout=10) as s:
        s.ehlo("guess.test")
        for _ in range(2):
            code, _text = s.docmd("AUTH", "PLAIN " + base64.b64encode(b"\0a@example.test\0wrong").decode())
            assert code == 535
    t0 = time.monotonic()
    m = imaplib.IMAP4("127.0.0.1", r.imap_port)
    with pytest.raises(imaplib.IMAP4.error):
        m.login("a@example.test", "still-wrong")
    assert time.monotonic() - t0 >= 0.75               # waited its turn: 0.4 x 2
    m.logout()
    t0 = time.monotonic()
    p = poplib.POP3("127.0.0.1", r.pop3_port, timeout=10)
    p.user("a@example.test")
    assert p.pass_("secret").startswith(b"+OK")        # the right password after its turn
    assert time.monotonic() - t0 >= 0.95               # 0.4 x 4, at most 1.0
    p.quit()
    st = r.call(lambda relay: relay.logins.statistics())
    assert st.failures == {"smtp": 2, "imap": 1}
    port = r.port("metrics")
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    assert 'relay_auth_failures_total{protocol="smtp"} 2.0' in body
    assert 'relay_auth_failures_total{protocol="imap"} 1.0' in body


def test_smtp_auth_guessing_ends_the_session(relay_factory: Any) -> None:
    r = relay_factory()
    r.add_user("a@example.test", "secret")
    import socket
    s = socket.create_connection(("127.0.0.1", r.smtp_port), timeout=10)
    f = s.makefile("rb")
    f.readline()
    s.sendall(b"EHLO g.test\r\n")
    while not f.readline().startswith(b"250 "):
        pass
    replies = []
    for i in range(5):
        s.sendall(b"AUTH PLAIN " + base64.b64encode(b"\0a@example.test\0bad%d" % i) + b"\r\n")
        replies.append(f.readline()[:9])
    assert replies == [b"535 5.7.8"] * 5
    assert f.readline().startswith(b"421 4.7.0")
    assert f.readline() == b""
    s.close()
