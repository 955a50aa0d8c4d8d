"""loadgen's receivers against a relay whose POP3 logs idle clients out after 1 s: a download
paced to a very slow downlink keeps its session alive (NOOPs), and a session cut before QUIT
costs no false duplicate. Real loadgen (in-process), real relay, real POP3."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.e2e


def _report(tmp: Path) -> dict[str, Any]:
    return json.loads((tmp / "report" / "report.json").read_text())


# one hospital sends small studies to a practice on a very slow line: each download is paced
# for longer than the POP3 server's autologout timer
SLOW = """
name = "slow"
domain = "slow.test"
volume_per_month = "300MB"
seed = 3

[schedule]
weekdays = [1, 1, 1, 1, 1, 1, 1]
hours = [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]

[modality.CR]
share = 1.0
median = "5MB"
sigma = 0.1

[[participants]]
group = "hospital"
role = "hospital"
uplink = "1Gbit"
downlink = "1Gbit"
sends_to = ["practice"]

[[participants]]
group = "practice"
kind = "mail-client"
role = "practice"
uplink = "1Gbit"
downlink = 100
receive = "pop3"
poll_interval = "1m"
sends = 0
"""


def _slow_run(tmp_path: Path, relay_factory: Any, monkeypatch: pytest.MonkeyPatch,
              keepalive: float) -> tuple[int, dict[str, Any], Any]:
    """The SLOW profile against a relay whose POP3 logs out after 1 s of silence."""
    from loadgen import cli
    from loadgen import run as runmod

    monkeypatch.setattr(runmod, "KEEPALIVE", keepalive)
    relay = relay_factory(pop3={"idle_timeout": 1.0})
    for who in ("hospital", "practice"):
        relay.add_user(f"{who}@slow.test", "pw-slow")
    (tmp_path / "slow.toml").write_text(SLOW)
    rc = cli.main(["run", "--profile", str(tmp_path / "slow.toml"), "--period", "day",
                   "--scale", "0.005", "--speedup", "43200", "--report", str(tmp_path / "report"),
                   "--no-progress", "--smtp", f"127.0.0.1:{relay.smtp_port}",
                   "--pop3", f"127.0.0.1:{relay.pop3_port}", "--password", "pw-slow",
                   "--drain-timeout", "30"])
    rep = _report(tmp_path)
    assert rep["duplicated"] == rep["lost"] == rep["corrupted"] == 0, rep["raw"]["events"]
    assert rc == 0 and rep["delivered"] == rep["planned"] >= 2
    assert not [f for f in (relay.data_dir / "mail").rglob("*") if f.is_file() and f.parent.name in ("new", "cur")]
    return rc, rep, relay


def test_a_slow_receiver_keeps_its_session_alive_while_paced(
        tmp_path: Path, relay_factory: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Pacing a 16 kB/s download holds the POP3 session idle for longer than the server's
    autologout (1 s here, 10 min by RFC 1939 and a real run at a low speed-up): the receiver
    sends NOOPs meanwhile, so its DELEs reach QUIT and nothing is downloaded twice."""
    _, rep, _ = _slow_run(tmp_path, relay_factory, monkeypatch, keepalive=0.3)
    assert rep["errors"] == 0, [e for e in rep["raw"]["events"] if e["kind"] == "error"]
    assert rep["per_receiver"]["practice@slow.test"]["paced_to_mb_per_s"] < 0.03


def test_a_receiver_cut_off_before_quit_does_not_count_duplicates(
        tmp_path: Path, relay_factory: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same slow receiver without keep-alives: the server logs it out during every paced
    download, before QUIT, so its DELEs never take effect. Each new session deletes what was
    already verified (it knows the UIDLs) and goes on with the next message: no duplicates,
    nothing lost, the mailbox ends empty, and the broken sessions show as errors."""
    _, rep, _ = _slow_run(tmp_path, relay_factory, monkeypatch, keepalive=60.0)
    assert rep["errors"] >= rep["planned"] - 1          # a broken session per paced download


def test_a_broken_download_leaves_no_file_and_no_record(tmp_path: Path) -> None:
    import threading

    from loadgen.run import Ledger, Run

    run = Run.__new__(Run)                    # only what a receiver's _take uses
    run.unconfirmed, run.ledger, run.stop_all = {}, Ledger({}, 0.0), threading.Event()
    path = tmp_path / "m.eml"

    def download(p: Path) -> int:
        p.write_bytes(b"X-Loadgen-Id: half\r\n")
        raise ConnectionError("cut")

    with pytest.raises(ConnectionError):
        run._take("a@x.test", "1:7", path, download, 1e9, lambda: None)
    assert not path.exists() and not run.unconfirmed["a@x.test"] and not run.ledger.events


def test_a_deletion_whose_reply_was_lost_does_not_hold_the_receiver() -> None:
    """A receiver stops only when nothing it verified still waits for its deletion; a message
    the server no longer lists was deleted after all (only the reply was lost)."""
    import threading

    from loadgen.run import Ledger, Run

    run = Run.__new__(Run)
    run.unconfirmed, run.ledger = {"a@x.test": {"1:5", "1:6"}}, Ledger({}, 0.0)
    run.stop_all, run.senders_done, run.drain_deadline = threading.Event(), threading.Event(), float("inf")
    run.senders_done.set()
    assert not run._finished("a@x.test")
    run._forget_gone("a@x.test", {"1:6", "1:7"})             # 5 is gone, 6 still listed
    assert run.unconfirmed["a@x.test"] == {"1:6"} and not run._finished("a@x.test")
    run._forget_gone("a@x.test", set())
    assert run._finished("a@x.test")
