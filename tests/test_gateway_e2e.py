"""Two gateways exchanging studies through a real relay on loopback.

Participants and the signed directory are made with the relay's own CLI (`relay participant
add`, `relay directory export`, `relay directory key`); gateway keys are generated at test
time with gpg --quick-gen-key (test fixtures, never committed). The gateways run as the real
`relay gateway ...` commands in subprocesses.
"""

from __future__ import annotations

import contextlib
import email
import email.policy
import io
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pytest

from relay.gateway.pgp import generate_key
from relay.gateway.synthetic import read_dataset_bytes, synthetic_study

pytestmark = pytest.mark.e2e

CT, RAD, EVE = "ct@example.test", "rad@example.test", "eve@example.test"


@dataclass
class Net:
    tmp: Path
    relay: Any
    relay_toml: Path
    keys: dict[str, tuple[str, str]]

    def gateway(self, address: str, **extra: Any) -> Path:
        """Write <tmp>/<local>/gw.toml for this participant and return its path."""
        d = self.tmp / address.split("@")[0]
        d.mkdir(exist_ok=True)
        (d / "gateway.sec.asc").write_text(self.keys[address][0])     # test fixture key
        lines = {
            "address": address, "password": "secret", "secret_key": "gateway.sec.asc",
            "smtp": f"127.0.0.1:{self.relay.smtp_port}", "imap": f"127.0.0.1:{self.relay.imap_port}",
            "inbox": "received", "quarantine": "quarantine", "state_dir": "state",
            "directory": str(self.tmp / "dir" / "directory.json"),
            "directory_key": str(self.tmp / "directory.asc"), **extra,
        }
        body = "\n".join(f"{k} = {v!r}" if isinstance(v, (int, float)) and not isinstance(v, bool)
                         else f"{k} = {str(v).lower() if isinstance(v, bool) else _toml_str(v)}"
                         for k, v in lines.items())
        (d / "gw.toml").write_text(body + "\n")
        return d / "gw.toml"

    def export_directory(self) -> None:
        relay_cli("directory", "export", str(self.tmp / "dir"), "--config", str(self.relay_toml))

    def inject(self, to: str, raw: bytes) -> None:
        """Put a message straight into a mailbox over SMTP (an attacker's or a broken sender's)."""
        from relay.clients.smtp import send_message
        send_message("127.0.0.1", self.relay.smtp_port, EVE, [to], raw)


def relay_cli(*args: str, stdin: str = "") -> str:
    """The relay's admin CLI in-process (same code as the `relay` command, no interpreter start)."""
    from relay.cli import main
    out = io.StringIO()
    saved = sys.stdin
    sys.stdin = io.StringIO(stdin)
    try:
        with contextlib.redirect_stdout(out):
            assert main(list(args)) == 0
    finally:
        sys.stdin = saved
    return out.getvalue()


def _toml_str(v: Any) -> str:
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def make_net(relay_factory: Callable[..., Any], tmp_path: Path, keys: dict[str, tuple[str, str]],
             **sections: Any) -> Net:
    """A relay with the three participants and the exported, signed directory."""
    relay = relay_factory(tmp_path / "relay", **sections)
    toml = tmp_path / "relay.toml"
    toml.write_text(f'data_dir = "{tmp_path / "relay"}"\nhostname = "relay.test"\n')
    n = Net(tmp_path, relay, toml, keys)
    for addr in (CT, RAD, EVE):
        (tmp_path / f"{addr}.pub").write_text(keys[addr][1])
        relay_cli("participant", "add", addr, "--key", str(tmp_path / f"{addr}.pub"), "--password-stdin",
                  "--config", str(toml), stdin="secret\n")
    (tmp_path / "directory.asc").write_text(relay_cli("directory", "key", "--config", str(toml)))
    n.export_directory()
    return n


@pytest.fixture
def net(relay_factory: Callable[..., Any], tmp_path: Path, keys: dict[str, tuple[str, str]]) -> Iterator[Net]:
    yield make_net(relay_factory, tmp_path, keys)
    for d in tmp_path.glob("*/state/gnupg"):
        subprocess.run(["gpgconf", "--homedir", str(d), "--kill", "gpg-agent"], capture_output=True, check=False)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, str]]:
    base = tmp_path_factory.mktemp("gwkeys")
    return {a: generate_key(base / a.split("@")[0], f"gateway <{a}>") for a in (CT, RAD, EVE)}


def gw(cmd: str, cfg: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """`relay gateway CMD --config CFG ARGS` in-process (the command's own code; the console
    script itself runs as a subprocess in the IDLE and PACS tests)."""
    from relay.cli import main
    argv = ["gateway", cmd, "--config", str(cfg), *args]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    r = subprocess.CompletedProcess(argv, rc, out.getvalue(), err.getvalue())
    if check and rc != 0:
        raise AssertionError(f"relay {' '.join(argv)} -> {rc}\n{r.stdout}\n{r.stderr}")
    return r


def left_in_mailbox(maildir: Path) -> list[Path]:
    """Messages still in a Maildir, except directory pushes (the directory sends them
    asynchronously: one may land after the receiver's last look)."""
    return [p for sub in ("new", "cur") for p in (maildir / sub).iterdir()
            if b"<directory@example.test>" not in p.read_bytes()[:4000]]


def files_by_sop(folder: Path) -> dict[str, bytes]:
    return {f"{pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID}.dcm": p.read_bytes()
            for p in folder.iterdir()}


def test_send_receive_mdn_status_over_imap(net: Net) -> None:
    ct, rad = net.gateway(CT), net.gateway(RAD)
    a = synthetic_study(net.tmp / "studyA", n=3)
    b = synthetic_study(net.tmp / "studyB", n=2)
    out = gw("send", ct, "--to", RAD, str(net.tmp / "studyA"), str(b[0]), str(b[1])).stdout
    assert out.count("sent study") == 2
    assert out.count("UNCONFIRMED") == 0
    assert gw("status", ct).stdout.count("UNCONFIRMED") == 2

    # a forged receipt (unsigned, From: rad) confirms nothing
    from relay.gateway.message import build_mdn
    first_id = out.split("message-id ")[1].split()[0]
    net.inject(CT, build_mdn(RAD, CT, first_id, "forged"))
    r = gw("receive", ct, "--once", check=False)
    assert r.returncode == 1 and "MDNs 0" in r.stdout and "quarantined 1" in r.stdout
    assert list(_quarantine(ct).values()) == ["mdn-unverified"]
    assert gw("status", ct).stdout.count("UNCONFIRMED") == 2

    r = gw("receive", rad, "--once")
    assert "imported 2 studies, quarantined 0" in r.stdout
    for files in (a, b):
        uid = str(pydicom.dcmread(files[0]).StudyInstanceUID)
        got = files_by_sop(rad.parent / "received" / uid)
        assert got == {f"{pydicom.dcmread(f).SOPInstanceUID}.dcm": f.read_bytes() for f in files}
    rel = net.relay.data_dir / "mail" / "example.test" / "rad"
    assert not left_in_mailbox(rel)        # deleted once imported

    r = gw("receive", ct, "--once")
    assert "MDNs 2" in r.stdout
    assert "all sent studies are confirmed" in gw("status", ct).stdout
    assert gw("status", ct, "--all").stdout.count("confirmed") == 2


def test_split_study_reassembled_over_pop3_in_any_order(net: Net) -> None:
    from relay.clients.smtp import send_message
    from relay.gateway import dicommime
    from relay.gateway import message as M
    from relay.gateway.pgp import Keyring

    ct = net.gateway(CT, split_size="64KiB")
    # the inbox on another file system (tmpfs): imports copy+fsync instead of renaming
    inbox = Path("/dev/shm") / f"gw-inbox-{os.getpid()}-{time.monotonic_ns()}"
    rad = net.gateway(RAD, pop3=f"127.0.0.1:{net.relay.pop3_port}", inbox=str(inbox))
    try:
        files = synthetic_study(net.tmp / "big", n=4, rows=128, cols=128)      # ~130 KB of pixels
        out = gw("send", ct, "--to", RAD, str(net.tmp / "big")).stdout
        nparts = int(out.split(" message(s)")[0].rsplit(", ", 1)[1])
        assert nparts >= 3
        maildir = net.relay.data_dir / "mail" / "example.test" / "rad" / "new"
        stored = [p for p in maildir.iterdir() if b"message/partial" in p.read_bytes()[:2000]]
        assert len(stored) == nparts
        for p in stored:
            assert p.stat().st_size <= 64 * 1024 + 1024       # + the relay's trace headers
            head = email.message_from_bytes(p.read_bytes().split(b"\r\n\r\n")[0], policy=email.policy.compat32)
            assert head.get_content_type() == "message/partial"

        # a second study whose parts arrive last-first (built with ct's key, sent part by part)
        second = synthetic_study(net.tmp / "big2", n=3, rows=128, cols=128)
        (net.tmp / "ct.sec").write_text(net.keys[CT][0])
        ring = Keyring(net.tmp / "ring-ct", net.tmp / "ct.sec")
        try:
            rad_fpr = ring.import_public(net.keys[RAD][1])[0]
            dicommime.write_study(next(iter(dicommime.group_studies(second).values())), net.tmp / "e2")
            mid = M.new_message_id("example.test")
            M.build_encrypted(net.tmp / "e2", net.tmp / "m2", ring, rad_fpr, CT, RAD, mid)
        finally:
            ring.close()
        ranges = M.plan_split(net.tmp / "m2", 64 * 1024, CT, RAD, mid, "example.test")
        assert len(ranges) >= 3
        for r in reversed(ranges):
            send_message("127.0.0.1", net.relay.smtp_port, CT, [RAD], b"".join(M.iter_range(net.tmp / "m2", r)))

        r = gw("receive", rad, "--once")
        assert "imported 2 studies" in r.stdout, r.stdout + r.stderr
        for fs in (files, second):
            uid = str(pydicom.dcmread(fs[0]).StudyInstanceUID)
            assert files_by_sop(inbox / uid) == {
                f"{pydicom.dcmread(f).SOPInstanceUID}.dcm": f.read_bytes() for f in fs}
        assert not left_in_mailbox(maildir.parent)
    finally:
        shutil.rmtree(inbox, ignore_errors=True)


def _tampered_signed(net: Net, entity: bytes) -> str:
    """An OpenPGP message for rad that decrypts fine but whose content was changed after ct
    signed it (signed, then one byte of the literal data flipped, then encrypted): GnuPG
    reports BADSIG. Made with pgpy, as no gpg command encrypts an already-signed packet stream."""
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pgpy  # type: ignore[import-untyped]
        from pgpy.constants import CompressionAlgorithm  # type: ignore[import-untyped]
        signer, _ = pgpy.PGPKey.from_blob(net.keys[CT][0])
        rad, _ = pgpy.PGPKey.from_blob(net.keys[RAD][1])
        msg = pgpy.PGPMessage.new(entity, compression=CompressionAlgorithm.Uncompressed)
        msg |= signer.sign(msg)
        raw = bytearray(bytes(msg))
        i = raw.index(b"application/dicom")
        raw[i] ^= 0x20                              # "Application/dicom": the signed bytes changed
        armored = str(rad.encrypt(pgpy.PGPMessage.from_blob(bytes(raw))))
    return armored.split("-----END")[0].replace("\n", "\r\n")


def _quarantine(rad: Path) -> dict[str, str]:
    q = rad.parent / "quarantine"
    return {d.name: (d / "reason.txt").read_text().splitlines()[0] for d in q.iterdir()}


def test_bad_messages_are_quarantined_with_reasons(net: Net) -> None:
    from relay.gateway import dicommime
    from relay.gateway import message as M
    from relay.gateway.pgp import Keyring

    rad = net.gateway(RAD)
    ct_cfg = net.gateway(CT)
    study = synthetic_study(net.tmp / "s", n=1)
    insts = dicommime.group_studies(study)
    entity = net.tmp / "entity"
    dicommime.write_study(next(iter(insts.values())), entity)
    notdicom = net.tmp / "notdicom"
    notdicom.write_bytes(b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n--b\r\n'
                         b"Content-Type: application/dicom\r\nContent-Transfer-Encoding: base64\r\n\r\n"
                         b"bm90IGRpY29tIGF0IGFsbA==\r\n--b--\r\n")
    rad_pub = net.keys[RAD][1]

    def ring(who: str, name: str) -> Keyring:
        sec = net.tmp / f"{name}.sec"
        sec.write_text(net.keys[who][0])
        r = Keyring(net.tmp / f"ring-{name}", sec)
        r.import_public(rad_pub)
        return r

    eve, ct = ring(EVE, "eve"), ring(CT, "ct")
    stranger_sec, _ = generate_key(net.tmp / "strangerkey", "stranger <x@elsewhere.test>")
    (net.tmp / "stranger.sec").write_text(stranger_sec)
    stranger = Keyring(net.tmp / "ring-stranger", net.tmp / "stranger.sec")
    stranger.import_public(rad_pub)
    rad_fpr = ct.import_public(rad_pub)[0]
    try:
        def encrypted(r: Keyring, sender: str, src: Path) -> bytes:
            out = net.tmp / f"m-{time.monotonic_ns()}"
            M.build_encrypted(src, out, r, rad_fpr, sender, RAD, M.new_message_id("example.test"))
            return out.read_bytes()

        cases = {
            "wrong-key": encrypted(eve, CT, entity),                # From: ct, signed by eve
            "unknown-key": encrypted(stranger, CT, entity),         # signer not in the directory
            "not-dicom": encrypted(ct, CT, notdicom),
            "unknown-sender": encrypted(ct, "x@elsewhere.test", entity),   # good key, no participant
        }
        # unsigned: encrypted to rad with gpg, no signature
        plain = net.tmp / "unsigned.asc"
        res = ct.gpg.encrypt_file(str(entity), recipients=[rad_fpr], always_trust=True, armor=True, output=str(plain))
        assert res.ok
        good = encrypted(ct, CT, entity).decode()
        armored_good = good[good.index("-----BEGIN PGP MESSAGE-----"):good.index("-----END PGP MESSAGE-----")]
        cases["unsigned"] = good.replace(armored_good, plain.read_text().split("-----END")[0].replace("\n", "\r\n")).encode()
        cases["bad-signature"] = good.replace(armored_good, _tampered_signed(net, entity.read_bytes())).encode()
        cases["not-encrypted"] = (f"From: {CT}\r\nTo: {RAD}\r\nSubject: DICOM\r\nMessage-ID: <plain@x>\r\n"
                                  f"MIME-Version: 1.0\r\n").encode() + entity.read_bytes()
        # undecryptable: a valid PGP/MIME message for someone else (eve)
        eve_fpr = ct.import_public(net.keys[EVE][1])[0]
        other = net.tmp / "forEve"
        M.build_encrypted(entity, other, ct, eve_fpr, CT, RAD, M.new_message_id("example.test"))
        cases["undecryptable"] = other.read_bytes()
    finally:
        for r in (eve, ct, stranger):
            r.close()
    for raw in cases.values():
        net.inject(RAD, raw)
    r = gw("receive", rad, "--once", check=False)
    assert r.returncode == 1
    assert f"quarantined {len(cases)}" in r.stdout and "imported 0" in r.stdout
    assert sorted(_quarantine(rad).values()) == sorted(cases)
    for d in (rad.parent / "quarantine").iterdir():
        assert (d / "message.eml").stat().st_size > 0
    assert not any((rad.parent / "received").iterdir())
    maildir = net.relay.data_dir / "mail" / "example.test" / "rad"
    assert not left_in_mailbox(maildir)
    # nothing was confirmed: the sender of the refused messages got no MDN
    del ct_cfg


def test_incomplete_partial_set_is_quarantined_after_timeout(net: Net) -> None:
    from relay.gateway import message as M
    rad = net.gateway(RAD, reassembly_timeout=0.0)
    mid = M.new_message_id("example.test")
    part = (f"From: {CT}\r\nTo: {RAD}\r\nSubject: DICOM\r\nMessage-ID: <p1@x>\r\nMIME-Version: 1.0\r\n"
            f'Content-Type: message/partial; id="{mid}"; number=1; total=3\r\n\r\n'
            f"From: {CT}\r\nSubject: DICOM\r\nContent-Type: text/plain\r\n\r\nstart\r\n").encode()
    net.inject(RAD, part)
    r = gw("receive", rad, "--once", check=False)
    assert r.returncode == 1 and "parts held 1" in r.stdout
    assert list(_quarantine(rad).values()) == ["incomplete"]


def test_directory_fetched_by_email(net: Net) -> None:
    rad = net.gateway(RAD)
    toml = rad.read_text().replace(f'directory = "{net.tmp / "dir" / "directory.json"}"\n', "")
    rad.write_text(toml)
    r = gw("directory", rad, "--wait", "30")
    assert "(was -1), 3 participants" in r.stdout
    doc = (rad.parent / "state" / "directory.json").read_bytes()
    assert b"ct@example.test" in doc
    r = gw("directory", rad, "--wait", "30")         # GET SINCE 3 -> "unchanged" (an answer: exit 0)
    assert "directory serial 3 (was 3)" in r.stdout
    # a tampered document is refused
    old = net.tmp / "dir" / "directory.json"
    bad = net.tmp / "bad" / "directory.json"
    bad.parent.mkdir()
    bad.write_bytes(old.read_bytes().replace(b"rad@example.test", b"rad@example.tesu"))
    (bad.parent / "directory.json.asc").write_bytes((old.parent / "directory.json.asc").read_bytes())
    r = gw("directory", rad, "--file", str(bad), check=False)
    assert r.returncode == 1 and "refused" in r.stderr
    # a newer one is adopted, and then the older one (a replay) is refused
    (net.tmp / "dir-old").mkdir()
    for name in ("directory.json", "directory.json.asc"):
        (net.tmp / "dir-old" / name).write_bytes((old.parent / name).read_bytes())
    relay_cli("participant", "update", EVE, "--name", "Eve's new name", "--config", str(net.relay_toml))
    net.export_directory()
    r = gw("directory", rad, "--file", str(old))
    assert "directory serial 4 (was 3)" in r.stdout
    r = gw("directory", rad, "--file", str(net.tmp / "dir-old" / "directory.json"), check=False)
    assert r.returncode == 1 and "older" in r.stderr
    # no answer (a suspended participant gets none): exit 1 with a hint, after --wait
    relay_cli("participant", "suspend", RAD, "--config", str(net.relay_toml))
    from tests.test_gateway_pacs import wait_for
    wait_for(lambda: net.relay.call(lambda relay: relay.directory.statistics().pushed_serial) == 5, 30)
    gw("receive", rad, "--once")                     # the pushes that came before (serial <= 4)
    r = gw("directory", rad, "--wait", "2", check=False)
    assert r.returncode == 1 and "no answer from directory@example.test within 2 s" in r.stderr


def test_storescu_to_storescp_through_two_gateways(net: Net) -> None:
    """The whole path: dcmtk storescu -> sending gateway (SCP) -> relay -> receiving gateway
    (IMAP, verify, import, C-STORE) -> dcmtk storescp; then the MDN confirms at the sender.
    Nothing here depends on timing: the receiver starts once the study's encrypted message is
    in its Maildir (a directory push may be there first), the SCP sends a study only after
    storescu's association is released, and the sender records the study before it sends, so
    the MDN always finds it."""
    from tests.test_gateway_pacs import STORESCU, free_port, start_storescp, wait_for
    pacs_port, scp_port = free_port(), free_port()
    ct = net.gateway(CT, dicom_listen=f"127.0.0.1:{scp_port}", quiet_period=0.5, send_to=RAD)
    rad = net.gateway(RAD, pacs=f"127.0.0.1:{pacs_port}", pacs_ae="PACS")
    files = synthetic_study(net.tmp / "pacs-study", n=3)
    storescp = start_storescp(net.tmp / "pacs-out", pacs_port)
    listener = subprocess.Popen([sys.executable, "-m", "relay", "gateway", "pacs-listen", "--config", str(ct)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        from tests.test_gateway_pacs import _listening
        wait_for(lambda: _listening(scp_port), 30)
        subprocess.run([STORESCU, "-aec", "RELAYGW", "127.0.0.1", str(scp_port), *map(str, files)],
                       check=True, capture_output=True, timeout=60)
        maildir = net.relay.data_dir / "mail" / "example.test" / "rad" / "new"
        wait_for(lambda: any(b"multipart/encrypted" in p.read_bytes()[:3000] for p in maildir.iterdir()), 30)
        r = gw("receive", rad, "--once")
        assert "imported 1 study" in r.stdout, (r.stdout, listener.terminate(), listener.communicate())
        wait_for(lambda: len(list((net.tmp / "pacs-out").iterdir())) == 3, 30)
    finally:
        listener.terminate()
        sent, _ = listener.communicate(timeout=30)
        storescp.terminate()
        storescp.wait(10)
    # one association -> one study -> one message (the quiet period starts at its release)
    assert sent.count("sent study") == 1 and ": 3 files" in sent, sent
    assert sorted(read_dataset_bytes(p) for p in (net.tmp / "pacs-out").iterdir()) == \
        sorted(read_dataset_bytes(f) for f in files)
    gw("receive", ct, "--once")
    assert "all sent studies are confirmed" in gw("status", ct).stdout
    assert os.path.exists(rad.parent / "received")


def test_receive_waits_with_idle_and_stops_on_sigterm(net: Net) -> None:
    ct, rad = net.gateway(CT), net.gateway(RAD)
    files = synthetic_study(net.tmp / "live", n=2)
    uid = str(pydicom.dcmread(files[0]).StudyInstanceUID)
    p = subprocess.Popen([sys.executable, "-m", "relay", "gateway", "receive", "--config", str(rad)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1.5)            # let it log in, drain the directory pushes and enter IDLE
        gw("send", ct, "--to", RAD, *map(str, files))
        from tests.test_gateway_pacs import wait_for
        wait_for(lambda: (rad.parent / "received" / uid).exists()
                 and len(list((rad.parent / "received" / uid).iterdir())) == 2, 60)
    finally:
        p.terminate()
        out, err = p.communicate(timeout=30)
    assert p.returncode == 0, err
    assert "imported 1 study" in out


def test_broken_download_resumes_from_the_size_on_disk(net: Net) -> None:
    from relay.gateway import transport
    from relay.gateway.config import load
    from relay.gateway.core import Gateway
    from relay.gateway.receive import Receiver

    ct, rad = net.gateway(CT), net.gateway(RAD)
    files = synthetic_study(net.tmp / "resume", n=2, rows=128, cols=128)
    gw("send", ct, "--to", RAD, *map(str, files))
    calls: list[int] = []
    broken: list[str] = []

    class Flaky(transport.ImapSource):
        def fetch(self, key: str, path: Path, offset: int) -> None:
            calls.append(offset)
            super().fetch(key, path, offset)
            if not broken and path.stat().st_size > 30_000:    # the study: "breaks" at 10000 bytes
                broken.append(key)
                with open(path, "r+b") as f:
                    f.truncate(10_000)
                raise transport.TransportError("connection reset")

    with Gateway(load(rad)) as g:
        src = Flaky(g.cfg)
        try:
            r = Receiver(g, src)
            r.run_once()            # directory pushes, then the study breaks off
            assert broken and r.summary.imported == []
            r.run_once()
        finally:
            src.close()
    assert calls[-1] == 10_000, calls           # the second attempt started at byte 10000
    uid = str(pydicom.dcmread(files[0]).StudyInstanceUID)
    assert len(list((rad.parent / "received" / uid).iterdir())) == 2


def test_pacs_down_keeps_the_imported_study_in_the_inbox(net: Net) -> None:
    from tests.test_gateway_pacs import free_port
    ct = net.gateway(CT)
    rad = net.gateway(RAD, pacs=f"127.0.0.1:{free_port()}", keep_after_store=False)
    files = synthetic_study(net.tmp / "nopacs", n=2)
    gw("send", ct, "--to", RAD, *map(str, files))
    r = gw("receive", rad, "--once")
    assert "imported 1 study" in r.stdout and "pacs_push_failed" in r.stderr
    uid = str(pydicom.dcmread(files[0]).StudyInstanceUID)
    assert len(list((rad.parent / "received" / uid).iterdir())) == 2      # kept for pacs-push
    r = gw("pacs-push", rad, str(rad.parent / "received" / uid), check=False)
    assert r.returncode == 1 and "association refused or not reachable" in r.stderr
    # the receipt says so: imported, but not in the PACS (RFC 8098 `processed/error`)
    assert "MDNs 1" in gw("receive", ct, "--once").stdout
    r = gw("status", ct, "--all")
    assert "confirmed" in r.stdout and "processed/error" in r.stdout and "PACS did not take it" in r.stdout


def test_receive_loop_reconnects_after_the_connection_drops(net: Net) -> None:
    import socket
    import threading

    from relay.gateway import transport
    from relay.gateway.config import load
    from relay.gateway.core import Gateway
    from relay.gateway.receive import Receiver
    from tests.test_gateway_pacs import wait_for

    ct = net.gateway(CT)
    rad = net.gateway(RAD, idle_timeout=0.5, poll_interval=0.2)
    files = synthetic_study(net.tmp / "reconnect", n=1)
    uid = str(pydicom.dcmread(files[0]).StudyInstanceUID)
    stop = threading.Event()
    with Gateway(load(rad)) as g:
        r = Receiver(g, transport.open_source(g.cfg))
        first = r.source
        t = threading.Thread(target=r.run_forever, args=(stop.is_set,), daemon=True)
        t.start()
        try:
            wait_for(lambda: r.waiting, 20)
            first.c.sock.shutdown(socket.SHUT_RDWR)          # the relay "goes away"
            wait_for(lambda: r.source is not first, 20)      # a new session
            gw("send", ct, "--to", RAD, str(files[0]))
            wait_for(lambda: (rad.parent / "received" / uid).exists(), 30)
        finally:
            stop.set()
            t.join(10)
            r.source.close()
    assert r.summary.imported == [uid]


def test_starttls_to_a_relay_that_refuses_plaintext_auth(relay_factory: Callable[..., Any], tmp_path: Path,
                                                         keys: dict[str, tuple[str, str]]) -> None:
    from tests.tlsutil import make_cert
    cert, key = make_cert(tmp_path / "tls")
    net = make_net(relay_factory, tmp_path, keys, tls={"cert": str(cert), "key": str(key)},
                   auth={"plaintext": "never"})
    try:
        plain = net.gateway(RAD)
        r = gw("receive", plain, "--once", check=False)
        assert r.returncode == 1 and "relay gateway receive: IMAP" in r.stderr   # no LOGIN in clear
        files = synthetic_study(net.tmp / "tls-study", n=1)
        ct = net.gateway(CT, starttls=True, tls_ca=str(cert))
        rad = net.gateway(RAD, starttls=True, tls_ca=str(cert))
        gw("send", ct, "--to", RAD, str(files[0]))
        assert "imported 1 study" in gw("receive", rad, "--once").stdout
        assert "MDNs 1" in gw("receive", ct, "--once").stdout
        pop = net.gateway(RAD, starttls=True, tls_ca=str(cert), pop3=f"127.0.0.1:{net.relay.pop3_port}")
        assert gw("receive", pop, "--once").returncode == 0
    finally:
        for d in tmp_path.glob("*/state/gnupg"):
            subprocess.run(["gpgconf", "--homedir", str(d), "--kill", "gpg-agent"], capture_output=True, check=False)
