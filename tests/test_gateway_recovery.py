"""The gateway when things go wrong: crashes, a relay that is down, messages that cannot be
parsed, mailboxes changed behind its back, and a network that changes under it. Same real
relay, real commands and helpers as test_gateway_e2e.py."""

from __future__ import annotations

import os
import subprocess
from typing import Any

import pytest

from relay.gateway.pgp import generate_key
from relay.gateway.synthetic import synthetic_study
from tests.test_gateway_e2e import (
    CT,
    RAD,
    Net,
    _quarantine,
    gw,
    keys,
    left_in_mailbox,
    net,
    relay_cli,
)

__all__ = ["keys", "net"]        # fixtures, used by name

pytestmark = pytest.mark.e2e


def test_a_study_is_recorded_before_it_leaves_and_forgotten_if_sending_fails(
        net: Net, monkeypatch: pytest.MonkeyPatch) -> None:
    """The receiver may import and send its MDN before the sender has even closed its SMTP
    session: the sent record must already exist then, or the MDN would match nothing."""
    from relay.gateway import send, transport
    from relay.gateway.config import load
    from relay.gateway.core import Gateway
    from tests.test_gateway_pacs import free_port

    files = synthetic_study(net.tmp / "order", n=1)
    recorded_while_sending: list[list[str]] = []
    real_send = transport.SmtpSession.send

    def watching(self: transport.SmtpSession, sender: str, to: str, chunks: Any, size: int) -> str:
        recorded_while_sending.append([s.message_id for s in g.state.sent(unconfirmed_only=True)])
        return real_send(self, sender, to, chunks, size)

    monkeypatch.setattr(transport.SmtpSession, "send", watching)
    with Gateway(load(net.gateway(CT))) as g:
        [rep] = send.send_paths(g, RAD, [files[0]])
        assert recorded_while_sending == [[rep.message_id]]
        assert rep.method == "BDAT"                       # the relay offers CHUNKING
        g.cfg = g.cfg.replace(smtp=f"127.0.0.1:{free_port()}")     # the relay is gone
        with pytest.raises(transport.TransportError):
            send.send_paths(g, RAD, [files[0]])
        assert [s.message_id for s in g.state.sent()] == [rep.message_id]


def test_a_pop3_error_leaves_the_message_for_the_next_round(net: Net) -> None:
    """-ERR on RETR (a message gone, trouble on the server) is a temporary transport error:
    the round goes on, reports the failure, and the next round imports the study."""
    from relay.gateway import transport
    from relay.gateway.config import load
    from relay.gateway.core import Gateway
    from relay.gateway.receive import Receiver

    files = synthetic_study(net.tmp / "pop3err", n=1)
    gw("send", net.gateway(CT), "--to", RAD, str(files[0]))
    rad = net.gateway(RAD, pop3=f"127.0.0.1:{net.relay.pop3_port}")

    class Refusing(transport.Pop3Source):
        def messages(self) -> list[tuple[str, int]]:
            got = super().messages()
            self._num = {k: 9999 for k in self._num}      # RETR 9999: -ERR no such message
            return got

    with Gateway(load(rad)) as g:
        src = Refusing(g.cfg)
        try:
            s = Receiver(g, src).run_once()
        finally:
            src.close()
        assert s.failed >= 1 and s.imported == [] and s.quarantined == []
    r = gw("receive", rad, "--once")
    assert "imported 1 study" in r.stdout and "failed" not in r.stdout


def test_messages_that_cannot_be_taken_apart_are_quarantined_not_fatal(net: Net) -> None:
    """A receiver must never stop on one message (it would stop on it again at every start):
    broken MIME anywhere - in a message claiming to be from the directory, in a boundary, in
    a base64 attachment - is quarantined as malformed, and the round goes on."""
    rad = net.gateway(RAD)
    directory = "directory@example.test"
    broken = {
        "unclosed multipart from the directory": (
            f"From: {directory}\r\nTo: {RAD}\r\nSubject: Re: GET\r\nMIME-Version: 1.0\r\n"
            'Content-Type: multipart/mixed; boundary="b"\r\n\r\n--b\r\n'
            'Content-Type: application/json; name="directory.json"\r\n\r\n{}\r\n'),
        "bad base64 from the directory": (
            f"From: {directory}\r\nTo: {RAD}\r\nSubject: Re: GET\r\nMIME-Version: 1.0\r\n"
            'Content-Type: multipart/mixed; boundary="b"\r\n\r\n--b\r\n'
            'Content-Type: application/json; name="directory.json"\r\n'
            "Content-Transfer-Encoding: base64\r\n\r\nQUJDR\r\n--b\r\n"
            'Content-Type: application/pgp-signature; name="directory.json.asc"\r\n\r\nx\r\n--b--\r\n'),
        "non-ASCII boundary": (
            f"From: {CT}\r\nTo: {RAD}\r\nSubject: DICOM\r\nMIME-Version: 1.0\r\n"
            'Content-Type: multipart/encrypted; protocol="application/pgp-encrypted"; '
            'boundary="\u00e4\u00f6"\r\n\r\n--\u00e4\u00f6\r\n\r\nVersion: 1\r\n--\u00e4\u00f6--\r\n'),
    }
    # and a "study" From: the directory is checked like any other, not taken for a reply
    forged = (f"From: {directory}\r\nTo: {RAD}\r\nSubject: DICOM\r\nMIME-Version: 1.0\r\n"
              'Content-Type: multipart/encrypted; protocol="application/pgp-encrypted"; boundary="b"\r\n'
              "\r\n--b\r\nContent-Type: application/pgp-encrypted\r\n\r\nVersion: 1\r\n--b\r\n"
              "Content-Type: application/octet-stream\r\n\r\n-----BEGIN PGP MESSAGE-----\r\n\r\n"
              "hQEMA0Jvb2dhYm9vZ2E=\r\n-----END PGP MESSAGE-----\r\n--b--\r\n")
    for raw in [*broken.values(), forged]:
        net.inject(RAD, raw.encode("utf-8"))
    r = gw("receive", rad, "--once", check=False)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert f"quarantined {len(broken) + 1}" in r.stdout, r.stdout
    assert sorted(_quarantine(rad).values()) == ["malformed"] * len(broken) + ["undecryptable"]
    assert not left_in_mailbox(net.relay.data_dir / "mail" / "example.test" / "rad")


def test_leftovers_of_killed_processes_and_vanished_messages_are_removed(net: Net) -> None:
    """Scratch folders of a gateway process that died mid-study are swept at the next start
    (a live process's are kept); a half download of a message that left the mailbox meanwhile
    is dropped with its file."""
    from relay.gateway import transport
    from relay.gateway.config import load
    from relay.gateway.core import Gateway
    from relay.gateway.receive import Receiver

    rad = net.gateway(RAD)
    state = rad.parent / "state"
    dead = _dead_pid()
    leftovers = [state / "outgoing" / f"20260101T000000-{dead}-0badf00d",
                 state / "incoming" / f"20260101T000000-{dead}-0badf00e"]
    live = state / "incoming" / f"20260101T000000-{os.getpid()}-0badf00f"
    for d in (*leftovers, live):
        d.mkdir(parents=True)
        (d / "message.eml").write_bytes(b"x" * 1000)
    with Gateway(load(rad)) as g:
        assert not any(d.exists() for d in leftovers) and live.exists()
        half = state / "downloads" / "gone.eml"
        half.parent.mkdir(parents=True, exist_ok=True)
        half.write_bytes(b"half a message")
        g.state.set_download("imap:1:999999", half, 10**6, "downloading")
        src = transport.open_source(g.cfg)
        try:
            Receiver(g, src).run_once()
        finally:
            src.close()
        assert not half.exists() and g.state.download("imap:1:999999") is None


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_a_receipt_the_relay_did_not_take_is_sent_at_the_next_round(net: Net) -> None:
    """SMTP down when the study is imported: the receipt is owed (not lost), and goes out at
    the next `receive`; the sender's study is then confirmed."""
    from tests.test_gateway_pacs import free_port

    ct = net.gateway(CT)
    files = synthetic_study(net.tmp / "owed", n=1)
    gw("send", ct, "--to", RAD, str(files[0]))
    no_smtp = net.gateway(RAD, smtp=f"127.0.0.1:{free_port()}")
    r = gw("receive", no_smtp, "--once")
    assert "imported 1 study" in r.stdout and "receipts sent 0" in r.stdout and "mdn_send_failed" in r.stderr
    assert "MDNs 0" in gw("receive", ct, "--once").stdout
    rad = net.gateway(RAD)                      # the same gateway (same state dir), SMTP back
    assert "receipts sent 1" in gw("receive", rad, "--once").stdout
    assert "receipts sent 0" in gw("receive", rad, "--once").stdout      # owed once, sent once
    assert "MDNs 1" in gw("receive", ct, "--once").stdout
    assert "all sent studies are confirmed" in gw("status", ct).stdout


def test_a_new_participant_is_reachable_without_reconfiguring_anyone(net: Net) -> None:
    """Issue 7's promise, seen from a gateway: the operator adds a participant with the CLI;
    the relay pushes the signed directory; an existing gateway adopts it while receiving and
    can send to the newcomer at once, who imports the study."""
    from tests.test_gateway_pacs import wait_for

    new = "us@example.test"
    ct = net.gateway(CT)
    files = synthetic_study(net.tmp / "to-new", n=1)
    r = gw("send", ct, "--to", new, str(files[0]), check=False)
    assert r.returncode == 1 and "not an active participant" in r.stderr
    net.keys[new] = generate_key(net.tmp / "newkey", f"gateway <{new}>")
    (net.tmp / "new.pub").write_text(net.keys[new][1])
    relay_cli("participant", "add", new, "--key", str(net.tmp / "new.pub"), "--password-stdin",
              "--config", str(net.relay_toml), stdin="secret\n")
    wait_for(lambda: net.relay.call(lambda relay: relay.directory.statistics().pushed_serial) == 4, 30)
    r = gw("receive", ct, "--once")
    assert "directory updates 0" not in r.stdout, r.stdout        # the push, verified and adopted
    gw("send", ct, "--to", new, str(files[0]))
    us = net.gateway(new)
    assert "imported 1 study" in gw("receive", us, "--once").stdout


@pytest.mark.parametrize("proto", ["imap", "pop3"])
def test_an_incomplete_set_whose_parts_left_the_mailbox_is_still_quarantined(net: Net, proto: str) -> None:
    """Parts held, then removed from the mailbox by another client: when the set expires it is
    quarantined all the same, and the next round is clean (over POP3, deleting the vanished
    parts raised KeyError, so the set failed again at every round)."""
    from relay.clients.imap import ImapClient
    from relay.gateway import message as M

    extra = {"pop3": f"127.0.0.1:{net.relay.pop3_port}"} if proto == "pop3" else {}
    part = (f"From: {CT}\r\nTo: {RAD}\r\nSubject: DICOM\r\nMessage-ID: <p1@x>\r\nMIME-Version: 1.0\r\n"
            f'Content-Type: message/partial; id="{M.new_message_id("example.test")}"; number=1; total=2\r\n'
            f"\r\nFrom: {CT}\r\nSubject: DICOM\r\nContent-Type: text/plain\r\n\r\nstart\r\n").encode()
    net.inject(RAD, part)
    r = gw("receive", net.gateway(RAD, **extra), "--once")
    assert "parts held 1" in r.stdout
    c = ImapClient("127.0.0.1", net.relay.imap_port)       # another client empties the mailbox
    c.login(RAD, "secret")
    c.select("INBOX")
    c.delete(c.uid_search("ALL"))
    c.logout()
    expired = net.gateway(RAD, reassembly_timeout=0.0, **extra)
    r = gw("receive", expired, "--once", check=False)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert list(_quarantine(expired).values()) == ["incomplete"]
    assert gw("receive", expired, "--once").returncode == 0


def test_keys_that_expire_soon_are_reported_and_expired_ones_refused(net: Net) -> None:
    """docs/directory.md promises that gateways warn about keys close to expiry: `relay gateway
    directory` lists them; sending to a key that has expired meanwhile is refused with a clear
    message instead of a gpg error."""
    import dataclasses
    import time

    from relay.gateway import send
    from relay.gateway.config import load
    from relay.gateway.core import Gateway, GatewayError

    soon = "soon@example.test"
    home = net.tmp / "soonkey"
    home.mkdir(mode=0o700)

    def g(*args: str) -> str:
        return subprocess.run(["gpg", "--homedir", str(home), "--batch", "--passphrase", "", *args],
                              check=True, capture_output=True, text=True, timeout=60).stdout
    g("--quick-gen-key", f"gateway <{soon}>", "ed25519", "sign", "10d")
    fpr = next(ln.split(":")[9] for ln in g("--with-colons", "--list-keys").splitlines() if ln.startswith("fpr"))
    g("--quick-add-key", fpr, "cv25519", "encr", "10d")
    (net.tmp / "soon.pub").write_text(g("--armor", "--export", fpr))
    subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "gpg-agent"], capture_output=True, check=False)
    relay_cli("participant", "add", soon, "--key", str(net.tmp / "soon.pub"), "--config", str(net.relay_toml))
    net.export_directory()
    ct = net.gateway(CT)
    out = gw("directory", ct, "--file", str(net.tmp / "dir" / "directory.json")).stdout
    assert f"key of {soon} expires in 10 days" in out or f"key of {soon} expires in 9 days" in out, out
    assert "key of rad@example.test" not in out                     # keys that never expire

    files = synthetic_study(net.tmp / "exp", n=1)
    with Gateway(load(ct)) as gwy:
        peer = gwy.directory.peers[RAD]
        gwy.directory.peers[RAD] = dataclasses.replace(peer, expires=time.time() - 60)   # time passed
        with pytest.raises(GatewayError, match="has expired"):
            send.send_paths(gwy, RAD, [files[0]])
        assert gwy.state.sent() == []


def test_a_study_signed_with_a_key_expired_since_is_quarantined_as_expired_key(net: Net) -> None:
    """A key that was in the directory and has expired since: gpg says EXPKEYSIG (the content
    is intact). Quarantined as expired-key, not as a bad signature (which would suggest
    tampering). The message is made with pgpy: gpg refuses to sign with an expired key."""
    import datetime
    import warnings

    from relay.gateway.config import load
    from relay.gateway.core import Gateway
    from tests.test_directory_keys import make_key, public

    rad = net.gateway(RAD)
    ago = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=30)
    old = make_key(CT, created=ago, expires=datetime.timedelta(days=1))
    with Gateway(load(rad)) as g:
        g.ring.import_public(public(old))       # it was in the directory while it was valid
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pgpy  # type: ignore[import-untyped]
        rad_key, _ = pgpy.PGPKey.from_blob(net.keys[RAD][1])
        msg = pgpy.PGPMessage.new(b"Content-Type: text/plain\r\n\r\nx\r\n")
        msg |= old.sign(msg)
        armored = str(rad_key.encrypt(msg)).replace("\n", "\r\n")
    net.inject(RAD, (f"From: {CT}\r\nTo: {RAD}\r\nSubject: DICOM\r\nMessage-ID: <expired@x>\r\n"
                     "MIME-Version: 1.0\r\nContent-Type: multipart/encrypted; "
                     'protocol="application/pgp-encrypted"; boundary="b"\r\n\r\n--b\r\n'
                     "Content-Type: application/pgp-encrypted\r\n\r\nVersion: 1\r\n\r\n--b\r\n"
                     f"Content-Type: application/octet-stream\r\n\r\n{armored}\r\n--b--\r\n").encode())
    r = gw("receive", rad, "--once", check=False)
    assert r.returncode == 1 and list(_quarantine(rad).values()) == ["expired-key"], r.stdout


def test_a_part_delivered_twice_is_held_once(net: Net) -> None:
    """The same message/partial part twice in the mailbox (a sender's retry): the copy is
    dropped; the held part stays held and is not taken up again at every round."""
    from relay.gateway import message as M

    rad = net.gateway(RAD)
    part = (f"From: {CT}\r\nTo: {RAD}\r\nSubject: DICOM\r\nMessage-ID: <p1@x>\r\nMIME-Version: 1.0\r\n"
            f'Content-Type: message/partial; id="{M.new_message_id("example.test")}"; number=1; total=2\r\n'
            f"\r\nFrom: {CT}\r\nSubject: DICOM\r\nContent-Type: text/plain\r\n\r\nstart\r\n").encode()
    net.inject(RAD, part)
    net.inject(RAD, part)
    assert "parts held 1" in gw("receive", rad, "--once").stdout
    assert len(left_in_mailbox(net.relay.data_dir / "mail" / "example.test" / "rad")) == 1
    assert "parts held 0" in gw("receive", rad, "--once").stdout
