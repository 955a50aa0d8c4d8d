"""curl (pop3:// and STLS) against the POP3 server: listing and retrieving."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import RunningRelay
from tests.test_pop3_server import ALICE, DOTTY, deliver, stored
from tests.tlsutil import make_cert

pytestmark = pytest.mark.e2e


def curl(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["curl", "-sS", "--max-time", "20", "-u", f"{ALICE}:secret", *args],
                          capture_output=True, timeout=30, check=False)


def test_curl_lists_and_retrieves(relay: RunningRelay) -> None:
    deliver(relay, DOTTY)
    deliver(relay, b"Subject: two\r\n\r\nsecond\r\n")
    msgs = stored(relay)
    url = f"pop3://127.0.0.1:{relay.pop3_port}/"
    p = curl(url)
    assert p.returncode == 0, p.stderr
    assert p.stdout.decode().splitlines() == [f"{n} {size}" for n, (_, _, size) in enumerate(msgs, 1)]
    p = curl(url + "1")
    assert p.returncode == 0, p.stderr
    assert p.stdout == msgs[0][1].read_bytes()              # exact bytes, dots unstuffed
    p = curl(url + "3")
    assert p.returncode == 8 and p.stdout == b""            # curl's answer to -ERR
    assert len(stored(relay)) == 2                          # curl does not delete


def test_curl_over_stls_when_plaintext_is_refused(relay_factory: Callable[..., RunningRelay],
                                                  tmp_path: Path) -> None:
    cert, key = make_cert(tmp_path / "tls")
    r = relay_factory(tls={"cert": str(cert), "key": str(key)}, auth={"plaintext": "never"})
    r.add_user(ALICE, "secret")
    deliver(r, DOTTY)
    url = f"pop3://127.0.0.1:{r.pop3_port}/1"
    p = curl(url)                                           # no TLS: login refused
    assert p.returncode != 0 and p.stdout == b""
    p = curl("--ssl-reqd", "--cacert", str(cert), url)
    assert p.returncode == 0, p.stderr
    assert p.stdout.endswith(DOTTY)
