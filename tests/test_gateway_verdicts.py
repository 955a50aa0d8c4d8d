"""The gateway's verdicts and receipts (issue 15): a signature made while the key was valid
stays good after the key expired (or was revoked as superseded/retired); a replay of an
imported message under a new Message-ID is refused; a plain message with a spoofed
`From: directory@...` is quarantined; refused studies get a negative MDN and the sender sees
them (REFUSED, OVERDUE) in `relay gateway status`; the directory GET is a proper message.

Real relay, real GnuPG, the gateway's own commands (tests/test_gateway_e2e.py's harness)."""

from __future__ import annotations

import email
import email.policy
import re
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom
import pytest

from relay.gateway.pgp import (
    Keyring,
    SigStatus,
    generate_key,
    generate_key_expiring,
    parse_status,
    signature_still_good,
)
from relay.gateway.synthetic import synthetic_study
from tests.test_gateway_e2e import CT, EVE, RAD, Net, _quarantine, gw, keys, make_net, net  # noqa: F401

T = 1_800_000_000.0


def _st(*lines: str) -> SigStatus:
    return parse_status([ln.split() for ln in lines])


def test_status_lines_decide_by_the_signature_time() -> None:
    fpr = "A" * 40
    valid = f"VALIDSIG {fpr} 2027-01-15 {T:.0f} 0 4 0 22 10 00 {fpr}"
    before = _st(f"KEYEXPIRED {T + 35:.0f}", "SIG_ID abc 2027-01-15 1800000000", "EXPKEYSIG 1234 s", valid)
    assert before.sig_id == "abc" and before.sig_time == T and before.signer == fpr
    assert signature_still_good(before, None)[0]                     # signed 35 s before expiry
    after = _st(f"KEYEXPIRED {T - 1:.0f}", "EXPKEYSIG 1234 s", valid)
    good, why = signature_still_good(after, None)
    assert not good and "after the key expired" in why
    assert not signature_still_good(_st("EXPKEYSIG 1234 s", valid), None)[0]   # no expiry known
    revoked = _st("REVKEYSIG 1234 s", valid, "KEYREVOKED")
    assert signature_still_good(revoked, (T + 10, 1))[0]             # superseded after signing
    assert signature_still_good(revoked, (T + 10, 3))[0]             # retired after signing
    assert not signature_still_good(revoked, (T - 10, 1))[0]         # superseded before signing
    assert not signature_still_good(revoked, (T + 10, 2))[0]         # compromised: all void
    assert not signature_still_good(revoked, (T + 10, 0))[0]         # no reason: all void
    assert not signature_still_good(revoked, None)[0]
    assert not signature_still_good(_st("EXPKEYSIG 1234 s"), None)[0]   # no VALIDSIG: no signature


def _revoke(home: Path, fpr: str, code: int) -> None:
    """A revocation with reason `code` (RFC 4880 5.2.3.23), made and imported in `home`.
    gpg's menu numbers them differently: 0 none, 1 compromised, 2 superseded, 3 retired."""
    menu = {0: 0, 1: 2, 2: 1, 3: 3}[code]
    answers = f"y\n{menu}\nrevoked by the test\n\ny\n"
    cert = home / f"rev-{code}.asc"
    subprocess.run(["gpg", "--homedir", str(home), "--no-tty", "--command-fd", "0", "--pinentry-mode",
                    "loopback", "--passphrase", "", "--yes", "--armor", "--output", str(cert),
                    "--gen-revoke", fpr], input=answers, text=True, check=True, capture_output=True, timeout=60)
    subprocess.run(["gpg", "--homedir", str(home), "--batch", "--import", str(cert)], check=True,
                   capture_output=True, timeout=60)


@pytest.mark.parametrize(("code", "kept"), [(1, True), (3, True), (2, False), (0, False)])
def test_revocation_reason_decides_old_signatures(tmp_path: Path, code: int, kept: bool) -> None:
    s_sec, s_pub = generate_key(tmp_path / "s-gen", "signer <s@example.test>")
    r_sec, _ = generate_key(tmp_path / "r-gen", "receiver <r@example.test>")
    (tmp_path / "s.sec").write_text(s_sec)
    (tmp_path / "r.sec").write_text(r_sec)
    signer, receiver = Keyring(tmp_path / "s", tmp_path / "s.sec"), Keyring(tmp_path / "r", tmp_path / "r.sec")
    try:
        receiver.import_public(s_pub)
        signer.import_public(receiver.export_public())
        (tmp_path / "plain").write_bytes(b"a study\r\n")
        signer.encrypt_sign(tmp_path / "plain", tmp_path / "msg.asc", receiver.fingerprint)
        time.sleep(1.1)                  # the revocation comes a second after the signature
        _revoke(signer.home, signer.fingerprint, code)
        receiver.import_public(str(signer.gpg.export_keys(signer.fingerprint)))
        v = receiver.decrypt_verify(tmp_path / "msg.asc", tmp_path / "out")
    finally:
        signer.close()
        receiver.close()
    assert "REVKEYSIG" in v.status and v.decrypted
    assert v.key_expired and v.good is kept             # revoked since; good if superseded/retired
    assert (tmp_path / "out").exists() is kept          # refused output is deleted


# --- end to end --------------------------------------------------------------------------------

LIFETIME = 40           # seconds: the sender's key expires this long after it was made (room for a
                        # loaded machine to register it and send before then)


@pytest.fixture
def short_lived(tmp_path_factory: pytest.TempPathFactory,
                keys: dict[str, tuple[str, str]]) -> tuple[dict[str, tuple[str, str]], float]:  # noqa: F811
    """ct's key expires LIFETIME seconds from now; the others never."""
    made = time.time()
    ct = generate_key_expiring(tmp_path_factory.mktemp("shortkey"), f"gateway <{CT}>", f"seconds={LIFETIME}")
    return {**keys, CT: ct}, made + LIFETIME


def test_study_signed_before_the_key_expired_is_imported_after(
        relay_factory: Callable[..., Any], tmp_path: Path,
        short_lived: tuple[dict[str, tuple[str, str]], float]) -> None:
    """Friday's study fetched after the weekend: signed while ct's key was valid, received
    after it expired (gpg: EXPKEYSIG) -> imported, with its MDN."""
    the_keys, expires = short_lived
    n = make_net(relay_factory, tmp_path, the_keys)
    try:
        ct, rad = n.gateway(CT), n.gateway(RAD)
        files = synthetic_study(tmp_path / "friday", n=2)
        gw("send", ct, "--to", RAD, *map(str, files))
        assert time.time() < expires - 1, "signing came too late: the test machine is too slow"
        time.sleep(max(0.0, expires - time.time()) + 1.5)
        r = gw("receive", rad, "--once")
        assert "imported 1 study, quarantined 0" in r.stdout, r.stdout + r.stderr
        assert "signature_predates_key_end" in r.stderr
        uid = str(pydicom.dcmread(files[0]).StudyInstanceUID)
        assert len(list((rad.parent / "received" / uid).iterdir())) == 2
        # ... but the expired key itself signs nothing new: one line, exit 1, no traceback
        r = gw("send", ct, "--to", RAD, *map(str, files), check=False)
        assert r.returncode == 1 and "own key" in r.stderr and "expired" in r.stderr
        assert "Traceback" not in r.stderr
    finally:
        _kill_agents(tmp_path)


def _kill_agents(tmp: Path) -> None:
    for d in tmp.glob("*/state/gnupg"):
        subprocess.run(["gpgconf", "--homedir", str(d), "--kill", "gpg-agent"], capture_output=True, check=False)


def _maildir(net: Net, who: str) -> Path:
    return net.relay.data_dir / "mail" / "example.test" / who.split("@")[0]


def _new_messages(net: Net, who: str) -> list[Path]:
    return sorted((_maildir(net, who) / "new").iterdir(), key=lambda p: p.stat().st_mtime_ns)


def test_replay_under_a_new_message_id_is_refused(net: Net) -> None:  # noqa: F811
    ct, rad = net.gateway(CT), net.gateway(RAD)
    files = synthetic_study(net.tmp / "once", n=2)
    gw("send", ct, "--to", RAD, *map(str, files))
    sent = next(p for p in _new_messages(net, RAD) if b"multipart/encrypted" in p.read_bytes()[:4000])
    raw = sent.read_bytes()
    rad = net.gateway(RAD)                  # the directory's pushes are its own again
    assert "imported 1 study, quarantined 0" in gw("receive", rad, "--once").stdout
    # the attacker re-sends the same encrypted body under a new Message-ID (and a fresh Date)
    body = raw[raw.index(b"\r\n\r\n"):]
    head = raw[:raw.index(b"\r\n\r\n")].decode()
    head = "\r\n".join(ln for ln in head.split("\r\n")
                       if not ln.lower().startswith(("return-path:", "received:", " ", "\t")))
    replay = re.sub(r"(?im)^Message-ID: .*$", "Message-ID: <replay-1@example.test>", head).encode() + body
    net.inject(RAD, replay)
    r = gw("receive", rad, "--once", check=False)
    assert r.returncode == 1 and "imported 0 studies, quarantined 1" in r.stdout, r.stdout
    assert list(_quarantine(rad).values()) == ["replay"]
    reason = next((rad.parent / "quarantine").iterdir()) / "reason.txt"
    assert "imported already as <" in reason.read_text()
    # exactly one receipt went back to ct (for the original), none for the replay
    mdns = [p for p in _new_messages(net, CT) if b"disposition-notification" in p.read_bytes()]
    assert len(mdns) == 1 and b"<replay-1@example.test>" not in mdns[0].read_bytes()
    r = gw("receive", ct, "--once")
    assert "MDNs 1" in r.stdout and "all sent studies are confirmed" in gw("status", ct).stdout


def test_plain_mail_with_a_spoofed_directory_sender_is_quarantined(net: Net) -> None:  # noqa: F811
    rad = net.gateway(RAD)
    gw("receive", rad, "--once")            # the directory's own pushes first
    net.inject(RAD, (f"From: directory@example.test\r\nTo: {RAD}\r\nSubject: unchanged\r\n"
                     "Message-ID: <spoof@x.test>\r\nMIME-Version: 1.0\r\nContent-Type: text/plain\r\n\r\n"
                     "unchanged: serial 99\r\nplease call +1 555 0100\r\n").encode())
    r = gw("receive", rad, "--once", check=False)
    assert r.returncode == 1 and "quarantined 1" in r.stdout
    assert list(_quarantine(rad).values()) == ["not-encrypted"]
    q = next((rad.parent / "quarantine").iterdir())
    assert b"please call" in (q / "message.eml").read_bytes()
    assert not [p for p in _new_messages(net, RAD) if b"<spoof@x.test>" in p.read_bytes()]


def test_directory_get_has_date_message_id_and_asks_since(net: Net) -> None:  # noqa: F811
    """The GET goes to eve's mailbox here (nobody answers): read it as the directory would."""
    rad = net.gateway(RAD, directory_address=EVE)
    r = gw("directory", rad, "--wait", "0.5", check=False)
    assert r.returncode == 1 and "no answer" in r.stderr and "Traceback" not in r.stderr
    get = [p for p in _new_messages(net, EVE) if b"GET" in p.read_bytes()]
    assert len(get) == 1
    msg = email.message_from_bytes(get[0].read_bytes(), policy=email.policy.default)
    assert msg["Date"] and re.fullmatch(r"<[^@\s]+@example\.test>", msg["Message-ID"])
    # serial 3 adopted from the local copy: the Subject asks only for changes since then
    assert msg["Subject"] == "GET SINCE 3" and msg.get_content().strip() == "GET SINCE 3"
    # and no study waiting in the mailbox was touched by `directory`
    ct = net.gateway(CT)
    files = synthetic_study(net.tmp / "waiting", n=1)
    gw("send", ct, "--to", RAD, str(files[0]))
    r = gw("directory", rad, "--wait", "0.5", check=False)
    assert not (rad.parent / "received").exists() or not any((rad.parent / "received").iterdir())
    rad = net.gateway(RAD)                  # the directory's pushes are its own again
    assert "imported 1 study, quarantined 0" in gw("receive", rad, "--once").stdout


def test_refused_study_gets_a_negative_mdn_and_shows_as_refused(net: Net) -> None:  # noqa: F811
    """ct's PACS handed it something that is not DICOM: rad quarantines it (not-dicom) and
    answers `deleted/error`; ct's status says REFUSED with the reason and exits 1."""
    from relay.gateway import message as M
    from relay.gateway import transport
    from relay.gateway.config import load
    from relay.gateway.core import Gateway

    ct, rad = net.gateway(CT), net.gateway(RAD)
    entity = net.tmp / "notdicom.mime"
    entity.write_bytes(b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n--b\r\n'
                       b"Content-Type: application/dicom\r\nContent-Transfer-Encoding: base64\r\n\r\n"
                       b"bm90IGRpY29tIGF0IGFsbA==\r\n--b--\r\n")
    with Gateway(load(ct)) as g:
        peer = g.directory.peer(RAD)
        assert peer is not None
        mid = M.new_message_id("example.test")
        M.build_encrypted(entity, net.tmp / "m.eml", g.ring, peer.fingerprint, CT, RAD, mid)
        g.state.add_sent(mid, "1.2.3.4", RAD, 1, 10, 1)
        data = (net.tmp / "m.eml").read_bytes()
        with transport.smtp_session(g.cfg) as smtp:
            smtp.send(CT, RAD, [data], size=len(data))
    r = gw("receive", rad, "--once", check=False)
    assert r.returncode == 1 and list(_quarantine(rad).values()) == ["not-dicom"]
    assert "receipts sent 1" in r.stdout
    mdn = next(p for p in _new_messages(net, CT) if b"disposition-notification" in p.read_bytes())
    text = mdn.read_bytes()
    assert b"Disposition: automatic-action/MDN-sent-automatically; deleted/error" in text
    assert b"Error: not-dicom:" in text and f"Original-Message-ID: {mid}".encode() in text
    assert "MDNs 1" in gw("receive", ct, "--once", check=False).stdout
    r = gw("status", ct, check=False)
    assert r.returncode == 1 and "REFUSED" in r.stdout and "not-dicom" in r.stdout


def test_unconfirmed_study_is_overdue_and_logged_once(net: Net) -> None:  # noqa: F811
    ct = net.gateway(CT, unconfirmed_after=0.0)
    files = synthetic_study(net.tmp / "late", n=1)
    gw("send", ct, "--to", RAD, str(files[0]))
    r = gw("status", ct, check=False)
    assert r.returncode == 1 and "OVERDUE" in r.stdout and "needs attention" in r.stdout
    first = gw("receive", ct, "--once")
    assert first.stderr.count("study_unconfirmed") == 1
    assert "study_unconfirmed" not in gw("receive", ct, "--once").stderr      # once per study
    rad = net.gateway(RAD)
    gw("receive", rad, "--once")
    gw("receive", ct, "--once")
    assert gw("status", ct).returncode == 0


def _cd_export(src: list[Path], cd: Path) -> list[Path]:
    """A CD export as a PACS burns it: DICOMDIR at the root, files under IHE-style IDs
    (PT000000/ST000000/SE000000/IM000000), a viewer and autorun.inf beside them."""
    from pydicom.fileset import FileSet

    fs = FileSet()
    for f in src:
        ds = pydicom.dcmread(f)
        # what PS3.3 F.5 wants in the directory records (a real CT has them)
        ds.StudyTime, ds.StudyID, ds.AccessionNumber, ds.SeriesNumber = "120000", "1", "A1", 1
        fs.add(ds)
    fs.write(cd)
    (cd / "AUTORUN.INF").write_text("[autorun]\nopen=viewer.exe\n")
    (cd / "VIEWER").mkdir()
    (cd / "VIEWER" / "viewer.exe").write_bytes(b"MZ not DICOM")
    files = [p for p in cd.rglob("*") if p.is_file() and p.parent.name.startswith("SE")]
    assert len(files) == len(src)
    return files


def test_cd_export_with_dicomdir_is_sent_without_its_dicomdir(net: Net) -> None:  # noqa: F811
    ct, rad = net.gateway(CT), net.gateway(RAD)
    src = synthetic_study(net.tmp / "src", n=3)
    on_cd = _cd_export(src, net.tmp / "cd")
    out = gw("send", ct, "--to", RAD, str(net.tmp / "cd")).stdout
    assert out.count("sent study") == 1 and ": 3 files" in out
    assert "imported 1 study, quarantined 0" in gw("receive", rad, "--once").stdout
    uid = str(pydicom.dcmread(src[0]).StudyInstanceUID)
    got = {p.name: p.read_bytes() for p in (rad.parent / "received" / uid).iterdir()}
    assert got == {f"{pydicom.dcmread(f).SOPInstanceUID}.dcm": f.read_bytes() for f in on_cd}
    # the DICOMDIR named alone means its file set; a DICOMDIR naming a missing file: one line
    out = gw("send", ct, "--to", RAD, str(net.tmp / "cd" / "DICOMDIR")).stdout
    assert ": 3 files" in out
    on_cd[0].unlink()
    r = gw("send", ct, "--to", RAD, str(net.tmp / "cd"), check=False)
    assert r.returncode == 1 and "which is not there" in r.stderr


def test_a_tampered_directory_document_by_mail_is_quarantined(net: Net) -> None:  # noqa: F811
    from email.message import EmailMessage

    rad = net.gateway(RAD)
    gw("receive", rad, "--once")
    doc = (net.tmp / "dir" / "directory.json").read_bytes().replace(b"rad@example.test", b"rad@example.tesu")
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "directory@example.test", RAD, "directory update"
    msg["Message-ID"] = "<push-forged@x.test>"
    msg.set_content("the signed directory\n")
    msg.add_attachment(doc, maintype="application", subtype="json", filename="directory.json")
    msg.add_attachment((net.tmp / "dir" / "directory.json.asc").read_bytes(), maintype="application",
                       subtype="pgp-signature", filename="directory.json.asc")
    net.inject(RAD, msg.as_bytes().replace(b"\n", b"\r\n"))
    r = gw("receive", rad, "--once", check=False)
    assert r.returncode == 1 and list(_quarantine(rad).values()) == ["directory-refused"]
    assert b"rad@example.tesu" not in (rad.parent / "state" / "directory.json").read_bytes()
