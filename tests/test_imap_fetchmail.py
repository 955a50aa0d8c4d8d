"""fetchmail (Debian package) drains a mailbox over IMAP: every message handed to an MDA,
then flagged \\Deleted and expunged on the server, which removes the files."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.test_imap_e2e import ALICE, multipart, send, stored

pytestmark = pytest.mark.e2e


def test_fetchmail_imap_downloads_everything_and_empties_the_mailbox(relay: Any, tmp_path: Path) -> None:
    big = b"Subject: big\r\n\r\n" + b"".join(f"{i:08d}".encode() * 9 + b"\r\n" for i in range(60000))
    for body in (multipart(), b"Subject: small\r\n\r\nsmall\r\n", big):
        send(relay, body)
    originals = sorted((p.read_bytes() for p in stored(relay)), key=len)
    out = tmp_path / "out"
    out.mkdir()
    rc = tmp_path / "fetchmailrc"
    rc.write_text(
        "set no bouncemail\n"
        f"poll 127.0.0.1 protocol IMAP port {relay.imap_port} auth password timeout 30\n"
        f'  user "{ALICE}" there with password "secret" is "relaytest" here\n'
        f'  no keep fetchall sslproto "" mda "cat > {out}/msg.$$"\n')
    rc.chmod(0o600)
    env = dict(os.environ, HOME=str(tmp_path), FETCHMAILHOME=str(tmp_path))
    p = subprocess.run(["fetchmail", "-v", "--nosyslog", "-f", str(rc), "--pidfile", str(tmp_path / "pid")],
                       capture_output=True, text=True, env=env, timeout=90, check=False)
    assert p.returncode == 0, p.stdout + p.stderr
    transcript = p.stdout + p.stderr
    assert "IMAP> " in transcript and not re.search(r"IMAP< A\d+ (NO|BAD)", transcript), transcript
    got = sorted((f.read_bytes() for f in out.iterdir()), key=len)
    assert len(got) == 3
    for fetched, original in zip(got, originals, strict=True):
        lf = original.replace(b"\r\n", b"\n")              # fetchmail hands LF lines to the MDA
        first, rest = lf.split(b"\n", 1)
        assert fetched.startswith(first + b"\nReceived: from 127.0.0.1")
        assert fetched.endswith(rest)
    assert stored(relay) == []
    assert relay.call(lambda r: r.store.ledger.usage(ALICE)).messages == 0
