"""A full disk (issue 12 item 5): receivers can still log in and delete (the disk reserve,
bookkeeping best effort), and min_free_disk counts the declared SIZE of messages in progress.
Real file systems: a small tmpfs mounted by the test (root only; skipped otherwise)."""

from __future__ import annotations

import imaplib
import os
import poplib
import smtplib
import socket
from pathlib import Path
from typing import Any

import pytest

from relay.policy.reserve import RESERVE_FILE
from tests import opsutil

KiB = 1024
MiB = 1024 * KiB
A = "a@example.test"


@pytest.fixture
def tmpfs(tmp_path: Path) -> Any:
    """A 16 MiB tmpfs. Request it before relay_factory (the relay stops before the unmount)."""
    with opsutil.tmpfs(tmp_path / "small", "16m") as mnt:
        yield mnt


def fill(path: Path) -> Path:
    """Another writer takes every free byte."""
    filler = path / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (MiB, 64 * KiB, 4 * KiB, 512, 1):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError:
                continue
    finally:
        os.close(fd)
    st = os.statvfs(path)
    assert st.f_bavail == 0
    return filler


def test_receivers_drain_a_100_percent_full_disk(tmpfs: Path, relay_factory: Any) -> None:
    r = relay_factory(data_dir=tmpfs / "data",
                      backpressure={"min_free_disk": "64KiB", "disk_reserve": "1MiB"})
    r.add_user(A, "secret")
    reserve = tmpfs / "data" / RESERVE_FILE
    assert reserve.stat().st_size == MiB
    with smtplib.SMTP("127.0.0.1", r.smtp_port, timeout=10) as s:
        for i in range(6):
            s.sendmail("x@y.test", [A], b"Subject: %d\r\n\r\n" % i + b"m" * 20 * KiB + b"\r\n")
    filler = fill(tmpfs)
    m = imaplib.IMAP4("127.0.0.1", r.imap_port)
    assert m.login(A, "secret")[0] == "OK"               # last-poll write fails: best effort
    assert m.select("INBOX") == ("OK", [b"6"])
    assert m.store("1:2", "+FLAGS", "\\Deleted")[0] == "OK"
    typ, data = m.expunge()
    assert typ == "OK" and len(data) == 2                # two EXPUNGE responses
    m.logout()
    p = poplib.POP3("127.0.0.1", r.pop3_port, timeout=10)
    p.user(A)
    assert p.pass_("secret").startswith(b"+OK")
    assert p.stat()[0] == 4
    p.dele(1)
    p.dele(2)
    assert p.quit().startswith(b"+OK")
    assert len(r.call(lambda relay: relay.store.mailbox(A).messages())) == 2
    st = r.call(lambda relay: relay.reserve.statistics())
    assert st.releases == 1 and st.reserved_bytes == 0
    # space is back: the next deletion re-creates the reserve
    filler.unlink()
    p = poplib.POP3("127.0.0.1", r.pop3_port, timeout=10)
    p.user(A)
    p.pass_("secret")
    p.dele(1)
    assert p.quit().startswith(b"+OK")
    assert reserve.stat().st_size == MiB


def test_min_free_disk_counts_declared_sizes_in_progress(tmpfs: Path, relay_factory: Any) -> None:
    """Parallel senders with SIZE= each passed the free-disk check alone; now the declared
    bytes not yet written count as used until the message ends."""
    r = relay_factory(data_dir=tmpfs / "data",
                      backpressure={"min_free_disk": "4MiB", "disk_reserve": 0})
    r.add_user(A)
    free = os.statvfs(tmpfs).f_bavail * os.statvfs(tmpfs).f_frsize
    size = (free - 4 * MiB) * 2 // 3                    # one fits, two do not
    first = socket.create_connection(("127.0.0.1", r.smtp_port), timeout=10)
    f1 = first.makefile("rb")
    f1.readline()
    first.sendall(b"EHLO one.test\r\nMAIL FROM:<x@one.test> SIZE=%d\r\nRCPT TO:<%s>\r\n" % (size, A.encode()))
    replies = [f1.readline() for _ in range(12)]      # EHLO (10 lines), MAIL, RCPT
    assert replies[-1].startswith(b"250 2.1.5"), replies
    with smtplib.SMTP("127.0.0.1", r.smtp_port, timeout=10) as s:
        s.ehlo("two.test")
        assert s.mail("x@two.test", [f"SIZE={size}"])[0] == 250
        code, text = s.rcpt(A)
        assert (code, text.split()[0]) == (452, b"4.3.1")
        # a second recipient of the first message is not counted twice: shown by the first
        # session below; a small message still fits
        s.rset()
        assert s.sendmail("x@two.test", [A], b"Subject: small\r\n\r\nok\r\n") == {}
    first.sendall(b"RSET\r\n")                          # the first message ends unsent
    assert f1.readline().startswith(b"250")
    with smtplib.SMTP("127.0.0.1", r.smtp_port, timeout=10) as s:   # its claim is released
        s.ehlo("two.test")
        assert s.mail("x@two.test", [f"SIZE={size}"])[0] == 250
        assert s.rcpt(A)[0] == 250
    first.close()
    assert r.call(lambda relay: relay.policy._claimed) == 0
