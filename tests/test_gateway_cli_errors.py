"""Every failure of issue 15 through the real `relay` command (a subprocess, as the
administrator runs it): one line on stderr that says what to do, a non-zero exit code, and
never a traceback. Log lines (the gateway logs to stderr) are not the error line."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from relay.gateway.pgp import generate_key, generate_key_expiring
from relay.gateway.synthetic import synthetic_study
from tests.test_gateway_e2e import CT, RAD, Net, keys, make_net  # noqa: F401

_LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\dT[\d:.]+Z (debug|info|warning|error|critical) ")


def relay(*argv: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "relay", *argv], capture_output=True, text=True,
                          input=stdin, timeout=120, check=False)


def one_line_error(r: subprocess.CompletedProcess[str], *fragments: str, code: int = 1) -> str:
    """The one error line of a failed command (asserts everything the issue asks of it)."""
    assert "Traceback" not in r.stderr, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and not _LOG_LINE.match(ln)]
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    assert len(lines) == 1, r.stderr
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


@pytest.fixture
def net(relay_factory: Callable[..., Any], tmp_path: Path,
        keys: dict[str, tuple[str, str]]) -> Net:  # noqa: F811
    return make_net(relay_factory, tmp_path, keys)


def test_gateway_failures_are_one_line(net: Net, tmp_path: Path) -> None:
    ct = net.gateway(CT)
    cfg = ["--config", str(ct)]
    study = synthetic_study(tmp_path / "study", n=1)
    (tmp_path / "notes.txt").write_text("not DICOM\n")

    # the gateway's own key has expired (python-gnupg used to die with BrokenPipeError)
    sec, _ = generate_key_expiring(tmp_path / "expiring", f"gateway <{CT}>", "seconds=1")
    (tmp_path / "expired.sec.asc").write_text(sec)
    time.sleep(1.5)
    old = net.gateway(CT, secret_key=str(tmp_path / "expired.sec.asc"), state_dir="state-old")
    one_line_error(relay("gateway", "send", "--config", str(old), "--to", RAD, str(study[0])),
                   "relay gateway send:", "own key", "expired", "relay participant update --key")

    # `starttls = true` (as the docs' example has it) against a relay without TLS
    tls = net.gateway(CT, starttls=True)
    one_line_error(relay("gateway", "directory", "--config", str(tls), "--wait", "1"),
                   "relay gateway directory:", "STARTTLS")
    one_line_error(relay("gateway", "receive", "--config", str(tls), "--once"), "relay gateway receive:")
    one_line_error(relay("gateway", "send", "--config", str(tls), "--to", RAD, str(study[0])),
                   "relay gateway send:", "SMTP")
    # no directory at that address: an unknown local recipient, a domain the relay does not serve
    for address in ("nobody@example.test", "directory@elsewhere.test"):
        nodir = net.gateway(CT, directory_address=address)
        one_line_error(relay("gateway", "directory", "--config", str(nodir), "--wait", "1"),
                       "relay gateway directory:", "550", "directory_address")
    ct = net.gateway(CT)
    # the relay is down / the password is wrong
    down = net.gateway(CT, smtp="127.0.0.1:9", imap="127.0.0.1:9")
    one_line_error(relay("gateway", "receive", "--config", str(down), "--once"), "relay gateway receive:")
    one_line_error(relay("gateway", "directory", "--config", str(down), "--wait", "1"), "relay gateway directory:")
    wrong = net.gateway(CT, password="wrong")
    one_line_error(relay("gateway", "receive", "--config", str(wrong), "--once"), "relay gateway receive:", "IMAP")
    ct = net.gateway(CT)
    # bad input
    one_line_error(relay("gateway", "send", *cfg, "--to", "nobody@example.test", str(study[0])),
                   "not an active participant", "relay gateway directory")
    one_line_error(relay("gateway", "send", *cfg, "--to", RAD, str(tmp_path / "notes.txt")), "relay gateway send:")
    one_line_error(relay("gateway", "send", *cfg, "--to", RAD, str(tmp_path / "missing")), "relay gateway send:")
    one_line_error(relay("gateway", "pacs-push", *cfg, str(tmp_path / "missing")), "relay gateway pacs-push:")
    one_line_error(relay("gateway", "directory", *cfg, "--file", str(tmp_path / "missing.json")),
                   "relay gateway directory:", "missing.json")
    # configuration errors: exit 2, one line
    one_line_error(relay("gateway", "status", "--config", str(tmp_path / "nope.toml")), "relay:", code=2)
    (tmp_path / "bad.toml").write_text("address = \n")
    one_line_error(relay("gateway", "status", "--config", str(tmp_path / "bad.toml")), "relay:", code=2)
    notakey = net.gateway(CT, secret_key=str(tmp_path / "notes.txt"), state_dir="state-nokey")
    one_line_error(relay("gateway", "status", "--config", str(notakey)), "secret_key", code=2)


def test_participant_and_directory_failures_are_one_line(net: Net, tmp_path: Path) -> None:
    cfg = ["--config", str(net.relay_toml)]
    (tmp_path / "junk.asc").write_text("-----BEGIN PGP PUBLIC KEY BLOCK-----\n\nnonsense\n")
    pub = tmp_path / f"{CT}.pub"
    one_line_error(relay("participant", "add", "x@example.test", "--key", str(tmp_path / "missing.asc"), *cfg),
                   "missing.asc")
    one_line_error(relay("participant", "add", "x@example.test", "--key", str(tmp_path / "junk.asc"), *cfg),
                   "junk.asc")
    one_line_error(relay("participant", "add", CT, "--key", str(pub), "--password-stdin", *cfg, stdin="pw\n"),
                   CT)
    one_line_error(relay("participant", "add", "y@example.test", "--key", str(pub), "--password-stdin", *cfg),
                   "empty password")
    one_line_error(relay("participant", "show", "nobody@example.test", *cfg), "not a participant")
    one_line_error(relay("participant", "update", "nobody@example.test", "--name", "x", *cfg), "nobody@example.test")
    one_line_error(relay("participant", "suspend", "nobody@example.test", *cfg), "nobody@example.test")
    one_line_error(relay("participant", "remove", "nobody@example.test", *cfg), "nobody@example.test")
    (tmp_path / "afile").write_text("")
    one_line_error(relay("directory", "export", str(tmp_path / "afile" / "sub"), *cfg), "afile")
    one_line_error(relay("directory", "key", "--config", str(tmp_path / "nope.toml")), "relay:", code=2)


def test_participant_add_without_password_warns(net: Net, tmp_path: Path) -> None:
    _, pub = generate_key(tmp_path / "newkey", "gateway <new@example.test>")
    (tmp_path / "new.pub").write_text(pub)
    r = relay("participant", "add", "new@example.test", "--key", str(tmp_path / "new.pub"),
              "--config", str(net.relay_toml))
    assert r.returncode == 0 and "added new@example.test" in r.stdout
    assert "cannot log in" in r.stderr and "relay user passwd new@example.test" in r.stderr


def test_directory_key_prints_the_fingerprint_for_the_phone_check(net: Net) -> None:
    r = relay("directory", "key", "--config", str(net.relay_toml))
    assert r.returncode == 0 and r.stdout.startswith("-----BEGIN PGP PUBLIC KEY BLOCK-----")
    fpr = relay("directory", "key", "--fingerprint", "--config", str(net.relay_toml)).stdout.strip()
    assert re.fullmatch(r"([0-9A-F]{4} ){4}[0-9A-F]{4}  ([0-9A-F]{4} ){4}[0-9A-F]{4}", fpr)
    assert f"fingerprint: {fpr}" in r.stderr
    # the same as gpg's own view of the key written to directory.asc
    shown = subprocess.run(["gpg", "--with-colons", "--show-keys"], input=r.stdout, capture_output=True,
                           text=True, check=True).stdout
    assert fpr.replace(" ", "") in shown
