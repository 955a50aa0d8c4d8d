"""RFC 5321 4.5.1: <postmaster> and postmaster@<every served domain> are accepted and delivered
to a configured account ([smtp] postmaster; empty = the oldest account)."""

from __future__ import annotations

import smtplib
import time
from typing import Any

ADMIN, OTHER = "admin@example.test", "b@other.test"


def count(r: Any, address: str) -> int:
    return len(r.call(lambda relay: relay.store.mailbox(address).messages()))


def send(r: Any, rcpt: str) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", r.smtp_port, timeout=10) as s:
        s.ehlo("mta.test")
        s.mail("someone@far.test")
        code, text = s.rcpt(rcpt)
        if code == 250:
            assert s.data(b"Subject: to the postmaster\r\n\r\nhello\r\n")[0] == 250
        return code, text


def test_postmaster_goes_to_the_oldest_account_by_default(relay_factory: Any) -> None:
    r = relay_factory()
    r.add_user(ADMIN)
    time.sleep(0.01)
    r.add_user(OTHER)
    for rcpt in ("<postmaster>", "PostMaster", "postmaster@example.test", "postmaster@other.test",
                 "postmaster@relay.test"):                 # bare, each served domain, hostname
        assert send(r, rcpt)[0] == 250, rcpt
    assert count(r, ADMIN) == 5 and count(r, OTHER) == 0
    code, text = send(r, "postmaster@not-served.test")
    assert (code, text.split()[0]) == (550, b"5.7.1")      # not ours: still no relaying


def test_configured_postmaster_and_a_real_postmaster_account(relay_factory: Any) -> None:
    r = relay_factory(smtp={"postmaster": OTHER})
    r.add_user(ADMIN)
    r.add_user(OTHER)
    r.add_user("postmaster@example.test")
    assert send(r, "<postmaster>")[0] == 250
    assert send(r, "postmaster@other.test")[0] == 250
    assert send(r, "postmaster@example.test")[0] == 250   # its own account wins
    assert count(r, OTHER) == 2 and count(r, "postmaster@example.test") == 1
    assert count(r, ADMIN) == 0
