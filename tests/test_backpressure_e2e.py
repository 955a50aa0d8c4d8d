"""Quota, disk and pacing decisions through the real SMTP server, with smtplib."""

from __future__ import annotations

import os
import smtplib
import time
from typing import Any

import pytest

KiB = 1024


def stored(relay: Any, address: str) -> list[str]:
    local, domain = address.split("@")
    md = relay.data_dir / "mail" / domain / local
    return sorted(os.listdir(md / "new")) + sorted(os.listdir(md / "cur"))


async def reserved(store: Any, address: str) -> tuple[int, int]:
    """(bytes, messages) the ledger holds for deliveries in flight to the address."""
    u = await store.ledger.usage(address)
    return (u.reserved_bytes, u.reserved_messages)


def tmp_files(relay: Any, address: str) -> list[str]:
    local, domain = address.split("@")
    return os.listdir(relay.data_dir / "mail" / domain / local / "tmp")


def body(n: int) -> bytes:
    line = b"A" * 76 + b"\r\n"
    return b"Subject: study\r\n\r\n" + line * (n // len(line))


def small_and_large(relay_factory: Any) -> Any:
    """A relay where a@ has a 100 KiB quota and b@ 10,000 KiB."""
    r = relay_factory(quota={"default_bytes": 100 * KiB})
    r.add_user("a@example.test")
    r.add_user("b@example.test", quota_bytes=10_000 * KiB)
    return r


def test_rcpt_with_size_over_quota_gets_452_per_recipient(relay_factory: Any) -> None:
    r = small_and_large(relay_factory)
    with smtplib.SMTP("127.0.0.1", r.smtp_port, timeout=30) as s:
        s.ehlo("gw.test")
        assert s.mail("gw@hospital.test", ["SIZE=200000"])[0] == 250
        code, text = s.rcpt("a@example.test")
        assert (code, text.split()[0]) == (452, b"4.2.2")
        assert s.rcpt("b@example.test")[0] == 250
        code, _ = s.data(body(150 * KiB))
        assert code == 250
    assert stored(r, "a@example.test") == [] and len(stored(r, "b@example.test")) == 1
    st = r.call(lambda relay: relay.policy.statistics())
    assert st.deferrals["quota"] == 1


def test_quota_crossed_while_streaming_defers_the_whole_message(relay_factory: Any) -> None:
    r = small_and_large(relay_factory)
    with smtplib.SMTP("127.0.0.1", r.smtp_port, timeout=30) as s:
        s.ehlo("gw.test")
        assert s.mail("gw@hospital.test")[0] == 250                  # no SIZE= declared
        assert s.rcpt("a@example.test")[0] == 250 and s.rcpt("b@example.test")[0] == 250
        code, text = s.data(body(150 * KiB))
        assert (code, text.split()[0]) == (452, b"4.2.2")           # one reply for every recipient
        # the session stays usable, and a message that fits goes through
        assert s.sendmail("gw@hospital.test", ["a@example.test"], body(50 * KiB)) == {}
    assert len(stored(r, "a@example.test")) == 1 and stored(r, "b@example.test") == []
    assert tmp_files(r, "a@example.test") == []


class _Raw:
    """A raw SMTP socket (replies read one complete line at a time)."""

    def __init__(self, port: int) -> None:
        import socket
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.buf = b""
        self.reply()

    def reply(self) -> str:
        while True:
            for line in self.buf.split(b"\r\n")[:-1]:
                self.buf = self.buf.split(b"\r\n", 1)[1]
                if line[3:4] == b" ":
                    return line.decode()
            chunk = self.sock.recv(65536)
            assert chunk, f"closed; buffer {self.buf!r}"
            self.buf += chunk

    def cmd(self, line: bytes) -> str:
        self.sock.sendall(line + b"\r\n")
        return self.reply()

    def bdat(self, data: bytes) -> str:
        self.sock.sendall(b"BDAT %d LAST\r\n" % len(data) + data)
        return self.reply()


def test_quota_crossed_while_streaming_stops_writing_at_once(relay_factory: Any) -> None:
    """Without SIZE= the reservation grows as the data streams: once the message no longer
    fits, its tmp file is removed at once (the disk does not fill with a message that will
    be refused), the rest is drained, and the final dot gets 452 4.2.2."""
    r = relay_factory(quota={"default_bytes": "1MiB"}, backpressure={"soft_backlog": "1TiB"})
    r.add_user("a@example.test")
    c = _Raw(r.smtp_port)
    try:
        c.cmd(b"EHLO gw.test")
        assert c.cmd(b"MAIL FROM:<gw@hospital.test>").startswith("250")
        assert c.cmd(b"RCPT TO:<a@example.test>").startswith("250")
        assert c.cmd(b"DATA").startswith("354")
        c.sock.sendall(body(6 * 1024 * KiB))          # past the quota and one RESERVE_STEP
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and (
                tmp_files(r, "a@example.test")
                or r.call(lambda relay: relay.policy.statistics().deferrals["quota_end_of_data"]) == 0):
            time.sleep(0.02)
        assert tmp_files(r, "a@example.test") == []   # refused before the end of the data
        c.sock.sendall(b"more\r\n" * 1000)           # drained, not stored
        reply = c.cmd(b".")
        assert reply.startswith("452 4.2.2"), reply
        assert c.cmd(b"NOOP").startswith("250")         # the session goes on
        assert r.call(lambda relay: reserved(relay.store, "a@example.test")) == (0, 0)
        st = r.call(lambda relay: relay.policy.statistics())
        assert st.deferrals["quota_end_of_data"] == 1
        assert st.recipients["a@example.test"].backlog_bytes == 0     # nothing left in flight
    finally:
        c.sock.close()
    assert stored(r, "a@example.test") == [] and tmp_files(r, "a@example.test") == []


def test_failed_message_releases_its_reservations(relay_factory: Any) -> None:
    """A message the store cannot take (here: tmp/ unusable at the first BDAT chunk) is
    drained and refused; what it reserved is released at once, not when the session ends."""
    r = relay_factory(quota={"default_bytes": 100 * KiB, "default_messages": 1})
    r.add_user("a@example.test")
    local_tmp = r.data_dir / "mail" / "example.test" / "a" / "tmp"
    c = _Raw(r.smtp_port)
    try:
        c.cmd(b"EHLO gw.test")
        assert c.cmd(b"MAIL FROM:<gw@hospital.test> SIZE=60000").startswith("250")
        assert c.cmd(b"RCPT TO:<a@example.test>").startswith("250")
        local_tmp.rmdir()
        assert c.bdat(b"abcd").startswith("451 4.3.0")
        local_tmp.mkdir()
        assert r.call(lambda relay: reserved(relay.store, "a@example.test")) == (0, 0)
        # the next transaction of the same session is not refused by a leftover reservation
        assert c.cmd(b"MAIL FROM:<gw@hospital.test> SIZE=60000").startswith("250")
        assert c.cmd(b"RCPT TO:<a@example.test>").startswith("250")
        assert c.bdat(b"abcd").startswith("250 2.0.0")
        assert r.call(lambda relay: reserved(relay.store, "a@example.test")) == (0, 0)
    finally:
        c.sock.close()
    assert len(stored(r, "a@example.test")) == 1


def test_message_count_quota(relay_factory: Any) -> None:
    r = relay_factory(quota={"default_messages": 1})
    r.add_user("a@example.test")
    with smtplib.SMTP("127.0.0.1", r.smtp_port, timeout=30) as s:
        assert s.sendmail("gw@hospital.test", ["a@example.test"], body(KiB)) == {}
        with pytest.raises(smtplib.SMTPRecipientsRefused) as e:
            s.sendmail("gw@hospital.test", ["a@example.test"], body(KiB))
        code, text = e.value.recipients["a@example.test"]
        assert (code, text.split()[0]) == (452, b"4.2.2")


def test_low_disk_gets_452_431(relay_factory: Any) -> None:
    r = relay_factory(backpressure={"min_free_disk": "1000TiB"})
    r.add_user("a@example.test")
    with smtplib.SMTP("127.0.0.1", r.smtp_port, timeout=30) as s:
        with pytest.raises(smtplib.SMTPRecipientsRefused) as e:
            s.sendmail("gw@hospital.test", ["a@example.test"], body(KiB))
        code, text = e.value.recipients["a@example.test"]
        assert (code, text.split()[0]) == (452, b"4.3.1")
    assert stored(r, "a@example.test") == []
    assert r.call(lambda relay: relay.policy.statistics()).deferrals["disk"] == 1


def test_congested_recipient_slows_the_sender(relay_factory: Any) -> None:
    """The receiver never drains: above the soft backlog intake runs at pace_floor. The pause
    after a read delays the next read (of this message or the next command), so the rate is
    measured over several messages."""
    floor = 256 * KiB
    r = relay_factory(quota={"default_bytes": "100MiB"},
                      backpressure={"soft_backlog": "1%", "pace_floor": floor})
    r.add_user("slow@example.test", quota_bytes=6400 * KiB)        # soft backlog 64 KiB
    r.add_user("other@example.test")
    size, n = 256 * KiB, 2
    with smtplib.SMTP("127.0.0.1", r.smtp_port, timeout=60) as s:
        assert s.sendmail("gw@hospital.test", ["slow@example.test"], body(100 * KiB)) == {}  # now congested
        t0 = time.monotonic()
        for _ in range(n):
            assert s.sendmail("gw@hospital.test", ["slow@example.test"], body(size)) == {}
        paced = time.monotonic() - t0
        for _ in range(n):
            assert s.sendmail("gw@hospital.test", ["other@example.test"], body(size)) == {}
    assert paced >= 0.7 * (n - 1) * size / floor, paced      # reads paused: about the floor rate
    st = r.call(lambda relay: relay.policy.statistics())
    assert st.recipients["slow@example.test"].congested and not st.recipients["other@example.test"].congested
    assert st.recipients["other@example.test"].backlog_bytes > n * size   # below its 1 MiB soft
    # every byte to slow@ was paced (and part of the first message), none to other@
    assert 0.9 * n * size / floor <= st.paced_seconds <= 1.1 * (n * size + 100 * KiB) / floor
    assert len(stored(r, "slow@example.test")) == n + 1


@pytest.mark.timeout(200)
def test_fast_sender_slow_imap_receiver(relay_factory: Any, tmp_path: Any) -> None:
    """A sender as fast as loopback allows, a receiver draining 512 KiB/s through IMAP: the
    sender is slowed (paced), then deferred at the quota (452 4.2.2, it retries), and every
    message arrives exactly once."""
    import threading

    from relay.clients.imap import ImapClient
    from relay.clients.smtp import SmtpClient, SmtpError

    quota, msg, drain = 1024 * KiB, 64 * KiB, 512 * KiB
    r = relay_factory(quota={"default_bytes": quota},
                      backpressure={"soft_backlog": "25%", "pace_floor": "1MiB", "drain_halflife": 2})
    r.add_user("practice@example.test", "pw")
    sent: list[int] = []
    received: list[int] = []
    deferrals: list[str] = []
    peak = [0]
    sending = threading.Event()
    sending.set()

    def receive() -> None:
        with ImapClient("127.0.0.1", r.imap_port, timeout=30) as c:
            c.login("practice@example.test", "pw")
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline:
                c.select()
                uids = c.uid_search("ALL")
                if not uids and not sending.is_set():
                    return
                for uid in uids[:1]:
                    t0 = time.monotonic()
                    path = tmp_path / "fetched"
                    n = c.fetch_to_file(uid, path)
                    received.append(int(path.read_bytes().split(b"X-Seq: ", 1)[1].split(b"\r\n", 1)[0]))
                    c.delete([uid])
                    time.sleep(max(0.0, n / drain - (time.monotonic() - t0)))
                if not uids:
                    time.sleep(0.05)

    receiver = threading.Thread(target=receive, daemon=True)
    receiver.start()
    with SmtpClient("127.0.0.1", r.smtp_port, timeout=60) as c:
        # Send for at least 4 s, and on (bounded: 30 s) until the sender has been both paced
        # and deferred: on a loaded machine the receiver may drain slower than planned.
        seq, t_min, t_max = 0, time.monotonic() + 4.0, time.monotonic() + 30.0

        def seen_enough() -> bool:
            paced = r.call(lambda relay: relay.policy.statistics().paced_seconds)
            return bool(deferrals) and paced > 0.5 and len(sent) > 10

        while time.monotonic() < t_min or (time.monotonic() < t_max and not seen_enough()):
            seq += 1
            m = b"Subject: s\r\nX-Seq: %d\r\n\r\n" % seq + body(msg)
            try:
                c.send("ct@hospital.test", ["practice@example.test"], m)
                sent.append(seq)
            except SmtpError as e:
                assert e.temporary, e
                deferrals.append(f"{e.reply.code} {e.reply.enhanced}")
                time.sleep(0.2)                               # the MTA retries later
            peak[0] = max(peak[0], r.call(lambda relay: relay.store.ledger.usage("practice@example.test")).bytes)
    sending.clear()
    receiver.join(90)
    assert not receiver.is_alive()
    st = r.call(lambda relay: relay.policy.statistics())
    assert st.paced_seconds > 0.5                             # slowed ...
    assert deferrals and set(deferrals) == {"452 4.2.2"}      # ... then deferred at the quota
    assert peak[0] <= quota
    assert sorted(received) == sent and len(set(received)) == len(received) > 10   # exactly once
    assert r.call(lambda relay: relay.store.ledger.usage("practice@example.test")).messages == 0


@pytest.fixture
def small_fs(tmp_path: Any) -> Any:
    """A 4 MiB tmpfs the test mounts (root only; skipped otherwise). Request it before
    relay_factory, so that the relay on it is stopped before it is unmounted."""
    from tests import opsutil
    with opsutil.tmpfs(tmp_path / "small", "4m") as mnt:
        yield mnt


def test_disk_full_while_streaming_gets_452_431(small_fs: Any, relay_factory: Any) -> None:
    """A message larger than the space left (no SIZE=, so the RCPT check cannot know): the
    write fails with ENOSPC, the tmp file goes at once, the sender gets 452 4.3.1 (storage
    low, temporary) rather than a generic 451, and the next message that fits is stored."""
    r = relay_factory(data_dir=small_fs / "data", backpressure={"min_free_disk": "16KiB"})
    r.add_user("a@example.test")
    with smtplib.SMTP("127.0.0.1", r.smtp_port, timeout=30) as s:
        s.ehlo("gw.test")
        assert s.mail("gw@hospital.test")[0] == 250
        assert s.rcpt("a@example.test")[0] == 250
        code, text = s.data(body(6 * 1024 * KiB))
        assert (code, text.split()[0]) == (452, b"4.3.1")
        assert tmp_files(r, "a@example.test") == []
        assert s.sendmail("gw@hospital.test", ["a@example.test"], body(100 * KiB)) == {}
    assert len(stored(r, "a@example.test")) == 1
    assert r.call(lambda relay: reserved(relay.store, "a@example.test")) == (0, 0)
    assert r.call(lambda relay: relay.policy.statistics()).deferrals["disk"] == 1
