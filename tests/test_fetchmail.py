"""fetchmail (Debian package) drains a mailbox over POP3: every message delivered to an MDA,
then deleted on the server."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import RunningRelay
from tests.test_pop3_server import ALICE, DOTTY, deliver, stored

pytestmark = pytest.mark.e2e


def test_fetchmail_downloads_everything_and_empties_the_mailbox(relay: RunningRelay,
                                                                 tmp_path: Path) -> None:
    big = b"Subject: big\r\n\r\n" + b"".join(
        (b"." if i % 5 == 0 else b"") + f"{i:08d}".encode() * 9 + b"\r\n" for i in range(60000))
    bodies = [DOTTY, b"Subject: small\r\n\r\nsmall\r\n", big]
    for body in bodies:
        deliver(relay, body)
    originals = [path.read_bytes() for _, path, _ in stored(relay)]
    out = tmp_path / "out"
    out.mkdir()
    rc = tmp_path / "fetchmailrc"
    # one file per message: the MDA runs once per message through sh -c
    rc.write_text(
        "set no bouncemail\n"
        f"poll 127.0.0.1 protocol POP3 port {relay.pop3_port} auth password timeout 30\n"
        f'  user "{ALICE}" there with password "secret" is "relaytest" here\n'
        f'  no keep fetchall sslproto "" mda "cat > {out}/msg.$$"\n')
    rc.chmod(0o600)
    env = dict(os.environ, HOME=str(tmp_path), FETCHMAILHOME=str(tmp_path))
    p = subprocess.run(["fetchmail", "--nosyslog", "-f", str(rc), "--pidfile", str(tmp_path / "pid")],
                       capture_output=True, text=True, env=env, timeout=90, check=False)
    assert p.returncode == 0, p.stdout + p.stderr      # 0: mail was retrieved
    got = sorted((f.read_bytes() for f in out.iterdir()), key=len)
    assert len(got) == 3
    for fetched, original in zip(got, sorted(originals, key=len), strict=True):
        # fetchmail delivers with LF line ends and puts its own Received: after Return-Path
        lf = original.replace(b"\r\n", b"\n")
        first, rest = lf.split(b"\n", 1)
        assert fetched.startswith(first + b"\nReceived: from 127.0.0.1")
        assert fetched.endswith(rest)
    assert stored(relay) == []
    assert relay.call(lambda r: r.store.ledger.usage(ALICE)).messages == 0
