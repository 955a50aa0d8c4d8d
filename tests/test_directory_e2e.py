"""End to end, as an operator and gateways see it: `relay participant add` (the real command, in
another process) while the server runs -> every other participant finds the new signed
directory in its mailbox over IMAP (imaplib); GET by SMTP (smtplib) is answered; strangers and
automatic mail get nothing; the documents and WKD over HTTP (curl)."""

from __future__ import annotations

import email
import email.policy
import imaplib
import smtplib
import subprocess
import sys
import time
from collections.abc import Callable
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from test_directory_keys import gpg, write_key

from relay.cli import main
from relay.directory import verify_document
from relay.directory.wkd import wkd_hash

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[1]


def cli(cfg: Path, *argv: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "relay", *argv, "--config", str(cfg)], input=stdin,
                          capture_output=True, text=True, timeout=60, check=False, cwd=ROOT)


def wait_for(cond: Callable[[], Any], timeout: float = 15.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def inbox(port: int, user: str) -> list[EmailMessage]:
    """Every message in user's INBOX, read over IMAP with imaplib."""
    with imaplib.IMAP4("127.0.0.1", port) as imap:
        imap.login(user, "secret")
        imap.select("INBOX", readonly=True)
        _, data = imap.uid("SEARCH", "ALL")
        out = []
        for uid in data[0].split():
            _, parts = imap.uid("FETCH", uid, "(BODY.PEEK[])")
            raw = next(p[1] for p in parts if isinstance(p, tuple))
            out.append(email.message_from_bytes(raw, policy=email.policy.default))
        return out


def attachments(m: EmailMessage) -> dict[str, bytes]:
    return {p.get_filename(): p.get_payload(decode=True) for p in m.iter_attachments()}


def send(port: int, sender: str, subject: str, **headers: str) -> None:
    m = EmailMessage()
    m["From"], m["To"], m["Subject"] = sender, "directory@hospital.test", subject
    m["Message-ID"] = f"<{subject.replace(' ', '.')}.{time.monotonic_ns()}@gw>"
    for k, v in headers.items():
        m[k.replace("_", "-")] = v
    m.set_content("sent by a gateway\n")
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        s.send_message(m)


def test_operator_adds_a_participant_and_everyone_hears_of_it(relay_factory: Callable[..., Any],
                                                              tmp_path: Path) -> None:
    r = relay_factory()
    cfg = tmp_path / "relay.toml"
    cfg.write_text(f'data_dir = "{r.data_dir}"\nhostname = "relay.test"\n')
    for name in ("ct", "mr"):
        key, _ = write_key(tmp_path / f"{name}.asc", f"{name}@hospital.test")
        p = cli(cfg, "participant", "add", f"{name}@hospital.test", "--key", str(key),
                "--password-stdin", stdin="secret\n")
        assert p.returncode == 0, p.stderr
    # the running server sees the CLI's changes and pushes them (one push, or one per change
    # when the second command came later than the server's settling tick)
    wait_for(lambda: any(m["Subject"] == "Directory update: serial 2"
                         for m in inbox(r.imap_port, "ct@hospital.test")), what="the first push")

    key, _ = write_key(tmp_path / "new.asc", "us@hospital.test")
    p = cli(cfg, "participant", "add", "us@hospital.test", "--key", str(key), "--role", "practice",
            "--password-stdin", stdin="secret\n")
    assert p.returncode == 0, p.stderr
    pub = cli(cfg, "directory", "key").stdout
    for user in ("ct@hospital.test", "mr@hospital.test", "us@hospital.test"):
        msgs = wait_for(lambda u=user: [m for m in inbox(r.imap_port, u)
                                        if m["Subject"] == "Directory update: serial 3"],
                        what=f"serial 3 at {user}")
        att = attachments(msgs[0])
        doc = verify_document(att["directory.json"], att["directory.json.asc"], pub)
        assert [q["address"] for q in doc["participants"]] == \
            ["ct@hospital.test", "mr@hospital.test", "us@hospital.test"]
    # stock gpg agrees
    (tmp_path / "d.json").write_bytes(att["directory.json"])
    (tmp_path / "d.json.asc").write_bytes(att["directory.json.asc"])
    assert gpg(tmp_path / "gnupg", "--import", input=pub.encode()).returncode == 0
    assert gpg(tmp_path / "gnupg", "--verify", str(tmp_path / "d.json.asc"), str(tmp_path / "d.json")).returncode == 0


def test_get_by_smtp_is_answered_only_for_participants_and_people(relay_factory: Callable[..., Any],
                                                                  tmp_path: Path) -> None:
    r = relay_factory()
    cfg = tmp_path / "relay.toml"
    cfg.write_text(f'data_dir = "{r.data_dir}"\nhostname = "relay.test"\n')
    key, _ = write_key(tmp_path / "ct.asc", "ct@hospital.test")
    # in this process this time (the command opens its own store, as another process would)
    assert main(["participant", "add", "ct@hospital.test", "--key", str(key), "--no-push",
                 "--config", str(cfg)]) == 0
    r.call(lambda relay: relay.store.accounts.set_password("ct@hospital.test", "secret"))
    pub = r.call(lambda relay: relay.directory.directory.key.public_armored())
    r.add_user("stranger@hospital.test", "secret")

    def handled() -> int:
        return sum(r.call(lambda relay: relay.directory.statistics().requests).values())

    wait_for(lambda: r.call(lambda relay: relay.directory._subscribed), what="the directory account")
    send(r.smtp_port, "stranger@hospital.test", "GET")
    send(r.smtp_port, "ct@hospital.test", "GET", Auto_Submitted="auto-replied")
    send(r.smtp_port, "ct@hospital.test", "GET")
    wait_for(lambda: handled() == 3, what="three requests handled")
    assert r.call(lambda relay: relay.directory.statistics().requests) == \
        {"ignored-stranger": 1, "ignored-auto": 1, "answered": 1}
    [answer] = inbox(r.imap_port, "ct@hospital.test")
    assert answer["Subject"] == "Re: GET" and answer["Auto-Submitted"] == "auto-replied"
    assert answer["In-Reply-To"].startswith("<GET.")
    att = attachments(answer)
    doc = verify_document(att["directory.json"], att["directory.json.asc"], pub)
    assert doc["serial"] == 1
    assert inbox(r.imap_port, "stranger@hospital.test") == []
    assert r.call(lambda relay: relay.store.mailbox("directory@hospital.test").messages()) == []

    # the same document over HTTP, and the participant's key by WKD (curl)
    base = f"http://127.0.0.1:{r.metrics_port}"

    def curl(path: str) -> bytes:
        return subprocess.run(["curl", "-sfS", "--max-time", "10", base + path], capture_output=True,
                              check=True, timeout=30).stdout
    body, sig, served = (curl(f"/directory/{n}") for n in ("directory.json", "directory.json.asc", "key.asc"))
    assert served.decode() == pub and verify_document(body, sig, pub)["serial"] == 1
    binary = curl(f"/.well-known/openpgpkey/hospital.test/hu/{wkd_hash('ct@hospital.test')}?l=ct")
    assert gpg(tmp_path / "g2", "--import", input=binary).returncode == 0
    listed = gpg(tmp_path / "g2", "--with-colons", "--list-keys", "ct@hospital.test").stdout
    assert doc["participants"][0]["fingerprint"].encode() in listed


def test_directory_http_on_a_listener_of_its_own(relay_factory: Callable[..., Any]) -> None:
    """[directory] http_listen: the documents and WKD only, nothing else (no /metrics)."""
    r = relay_factory(directory={"http_listen": "127.0.0.1:0", "address": "directory@x.test"})
    port = r.relay.bound["directory_http"][0][1]

    def get(path: str, *opts: str) -> tuple[str, bytes]:
        p = subprocess.run(["curl", "-s", "-o", "-", "-w", "\n%{http_code}", "--max-time", "10", *opts,
                            f"http://127.0.0.1:{port}{path}"], capture_output=True, check=True, timeout=30)
        body, _, code = p.stdout.rpartition(b"\n")
        return code.decode(), body
    code, key = get("/directory/key.asc")
    assert code == "200" and key.decode() == r.call(lambda relay: relay.directory.directory.key.public_armored())
    assert get("/.well-known/openpgpkey/policy")[0] == "200"
    assert get("/metrics")[0] == "404"
    # read-only: no method but GET/HEAD, on the documents and on WKD alike
    for path in ("/directory/directory.json", "/.well-known/openpgpkey/hu/x"):
        for method in ("POST", "PUT", "DELETE"):
            assert get(path, "-X", method, "--data", "x")[0] == "405"
    assert get("/directory/key.asc")[1] == key
