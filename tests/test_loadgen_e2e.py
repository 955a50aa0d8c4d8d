"""`loadgen run` end to end over loopback: the real command against a relay of its own (with a
small quota, so that messages are deferred and retried, and some PGP/MIME), and against a relay
given by address; Ctrl-C still writes a report. Scaled down to seconds."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from loadgen.report import PLOTS

pytestmark = pytest.mark.e2e

# four participants, every way of receiving; studies above 300 MB go as message/partial
PROFILE = """
name = "e2e"
domain = "e2e.test"
volume_per_month = "40GB"
seed = 5

[schedule]
weekdays = [1, 1, 1, 1, 1, 0.3, 0.3]
hours = [0.2, 0.2, 0.2, 0.2, 0.2, 0.3, 0.6, 1.5, 3, 3, 2, 1.6, 1.5, 1.5, 1.5, 1.4, 1.2, 1, 0.8, 0.6, 0.4, 0.3, 0.2, 0.2]

[messages]
partial_above = "300MB"
partial_size = "150MB"
retry_after = "2m"

[modality.CR]
share = 0.5
median = "8MB"
max = "40MB"

[modality.CT]
share = 0.5
median = "220MB"
sigma = 0.6
max = "1GB"

[[participants]]
group = "hospital"
count = 2
role = "hospital"
uplink = "100Mbit"
downlink = "100Mbit"
receive = "imap-idle"
sends_to = ["centre", "practice"]

[[participants]]
group = "centre"
role = "teleradiology-centre"
uplink = "200Mbit"
downlink = "500Mbit"
receive = "imap-poll"
poll_interval = "1m"
sends = 0.5
sends_to = ["hospital"]
receives = 3

[[participants]]
group = "practice"
kind = "mail-client"
role = "practice"
uplink = "10Mbit"
downlink = "16Mbit"
receive = "pop3"
poll_interval = "5m"
sends = 0.3
sends_to = ["hospital"]
"""
SCALE = "0.002"


def _loadgen(tmp: Path, *extra: str) -> list[str]:
    prof = tmp / "e2e.toml"
    prof.write_text(PROFILE)
    return [sys.executable, "-m", "loadgen.cli", "run", "--profile", str(prof), "--period", "day",
            "--scale", SCALE, "--report", str(tmp / "report"), "--no-progress", *extra]


def _report(tmp: Path) -> dict[str, Any]:
    return json.loads((tmp / "report" / "report.json").read_text())


def test_small_run_against_its_own_relay(tmp_path: Path) -> None:
    r = subprocess.run(_loadgen(tmp_path, "--speedup", "21600", "--pgp-share", "0.5", "--quota", "600kB"),
                       capture_output=True, text=True, timeout=100, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    rep = _report(tmp_path)
    assert rep["lost"] == rep["duplicated"] == rep["corrupted"] == 0
    assert rep["delivered"] == rep["planned"] == rep["accepted"] >= 8
    assert rep["bytes_sent"] > 500_000 and rep["wall_seconds"] < 20
    assert any(rec["id"].endswith(".2") for rec in rep["raw"]["records"])     # message/partial pieces
    assert rep["meta"]["pgp_messages"] >= 2                                    # PGP/MIME ones too
    assert rep["deferred"] > 0 and rep["retried"] > 0          # 452 4.2.2 over quota, then drained
    receivers = set(rep["per_receiver"])
    assert {"centre@e2e.test", "practice@e2e.test"} <= receivers and len(receivers) >= 3
    # per receiver: its measured download rate, and the rate it is paced to (16 Mbit x 21600 x 0.002)
    practice = rep["per_receiver"]["practice@e2e.test"]
    assert practice["download_mb_per_s"] > 0
    assert practice["paced_to_mb_per_s"] == pytest.approx(2e6 * 21600 * 0.002 / 1e6)
    md = (tmp_path / "report" / "report.md").read_text()
    assert "PASS" in md
    for name in PLOTS:
        assert (tmp_path / "report" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"({name})" in md
    # the relay it started is gone, and so is its temporary data dir
    m = re.search(r"own relay \(pid (\d+), (\S+)\)", r.stdout)
    assert m and "PASS" in r.stdout
    assert not Path(m.group(2)).exists()
    with pytest.raises(ProcessLookupError):
        os.kill(int(m.group(1)), 0)


def test_ctrl_c_stops_senders_drains_and_reports(tmp_path: Path) -> None:
    p = subprocess.Popen(_loadgen(tmp_path, "--speedup", "2400"), stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    assert p.stdout is not None
    lines = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = p.stdout.readline()
        lines.append(line)
        if "running against" in line or not line:
            break
    time.sleep(6)                   # the day's first study is due at 2.5 s, the second at 10.8 s
    p.send_signal(signal.SIGINT)
    out, _ = p.communicate(timeout=90)
    assert p.returncode == 1, "".join(lines) + out
    rep = _report(tmp_path)
    assert rep["interrupted"] and not rep["complete"]
    assert 0 < rep["sent"] < rep["planned"] and rep["not_sent"] > 0
    assert rep["lost"] == rep["duplicated"] == rep["corrupted"] == 0
    assert rep["delivered"] == rep["accepted"]


def test_against_given_servers(tmp_path: Path, relay_factory: Any) -> None:
    relay = relay_factory()
    for who in ("hospital1", "hospital2", "centre", "practice"):
        relay.add_user(f"{who}@e2e.test".replace("hospital", "hospital0"), "pw-e2e")
    cmd = _loadgen(tmp_path, "--speedup", "21600",
                   "--smtp", f"127.0.0.1:{relay.smtp_port}", "--imap", f"127.0.0.1:{relay.imap_port}",
                   "--pop3", f"127.0.0.1:{relay.pop3_port}", "--password", "pw-e2e")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=100, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    rep = _report(tmp_path)
    assert rep["lost"] == rep["duplicated"] == rep["corrupted"] == 0
    assert rep["delivered"] == rep["planned"]
    assert "smtp 127.0.0.1:" in rep["server"]
    # every mailbox was emptied by the receivers
    assert not [f for f in (relay.data_dir / "mail").rglob("*") if f.is_file() and f.parent.name in ("new", "cur")]


def test_a_message_that_never_fits_expires_and_the_run_fails(tmp_path: Path) -> None:
    prof = PROFILE.replace('retry_after = "2m"', 'retry_after = "2m"\nqueue_lifetime = "1h"')
    (tmp_path / "exp.toml").write_text(prof)
    cmd = _loadgen(tmp_path, "--speedup", "21600", "--quota", "100kB")
    cmd[cmd.index("--profile") + 1] = str(tmp_path / "exp.toml")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=100, check=False)
    assert r.returncode == 1 and "FAIL" in r.stdout
    rep = _report(tmp_path)
    assert rep["refused"] > 0 and rep["deferred"] >= rep["refused"]
    assert any("expired" in (rec["refused"] or "") for rec in rep["raw"]["records"])
    assert rep["lost"] == rep["duplicated"] == rep["corrupted"] == 0
    assert rep["delivered"] + rep["refused"] == rep["planned"]


def test_a_relay_that_does_not_start_is_reported_with_its_log(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Its log is in the temporary work dir, removed on the way out: the error shows its end."""
    import types

    from loadgen import cli
    from loadgen import run as runmod

    fake = tmp_path / "python"                 # what runs as `python -m relay serve ...`
    fake.write_text("#!/bin/sh\necho \"relay: cannot bind 127.0.0.1:0 ($*)\" >&2\nexit 3\n")
    fake.chmod(0o755)
    monkeypatch.setattr(runmod, "sys", types.SimpleNamespace(executable=str(fake), stdout=sys.stdout))
    (tmp_path / "e2e.toml").write_text(PROFILE)
    rc = cli.main(["run", "--profile", str(tmp_path / "e2e.toml"), "--period", "hour", "--scale", "0.001",
                   "--report", str(tmp_path / "report"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith("loadgen: relay serve did not start (exit status 3)")
    assert "relay: cannot bind 127.0.0.1:0 (-m relay serve --config " in err.split("its log ends:", 1)[1]
    assert not (tmp_path / "report").exists()


def test_live_display_on_a_terminal(tmp_path: Path) -> None:
    """On a terminal the run shows a live line: simulated time, counts, MB/s, backlog, errors."""
    import pty

    primary, secondary = pty.openpty()
    p = subprocess.Popen([a for a in _loadgen(tmp_path, "--speedup", "21600") if a != "--no-progress"],
                         stdin=secondary, stdout=secondary, stderr=secondary, close_fds=True)
    os.close(secondary)
    out = b""
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            chunk = os.read(primary, 65536)
        except OSError:                       # the terminal closed with the process
            break
        if not chunk:
            break
        out += chunk
    os.close(primary)
    assert p.wait(30) == 0, out[-2000:]
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out.decode("utf-8", "replace"))   # colours, cursor
    text = re.sub(r"\s+", " ", text)                                               # wrapped at 80
    assert re.search(r"day \d+ \d\d:\d\d accepted \d+/\d+ delivered \d+ \d+ MB/s backlog \d+ \(", text), text[-2000:]
    assert "deferred 0 refused 0 errors 0" in text
