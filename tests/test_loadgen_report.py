"""The report: figures computed from what a run recorded, JSON + Markdown + valid PNG plots."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from loadgen.report import PLOTS, Event, Record, RunData, write


def _run() -> RunData:
    d = RunData(meta={"profile": "tiny", "period": "day", "speedup": 100.0, "scale": 0.5,
                      "seed": 1, "participants": 3, "server": "test", "sim_start": 0.0})
    a = Record("r.1.1", "h@x.test", "c@x.test", 1000, due=0.0, attempts=1, accepted=0.5,
               delivered=2.0, deliveries=1)
    b = Record("r.2.1", "h@x.test", "p@x.test", 3000, due=1.0, attempts=3, accepted=3.0,
               delivered=9.0, deliveries=2)
    c = Record("r.3.1", "h@x.test", "c@x.test", 500, due=2.0, attempts=1, accepted=2.5)   # lost
    e = Record("r.4.1", "h@x.test", "c@x.test", 700, due=2.0, attempts=1, refused="550 5.1.1")
    d.records = [a, b, c, e]
    d.events = [Event(0.5, "accepted", 1000, "c@x.test"), Event(1.2, "deferred", 0, "p@x.test"),
                Event(2.0, "delivered", 1000, "c@x.test"), Event(2.0, "deferred", 0, "p@x.test"),
                Event(2.1, "refused", 0, "c@x.test"), Event(2.5, "accepted", 500, "c@x.test"),
                Event(3.0, "accepted", 3000, "p@x.test"), Event(9.0, "delivered", 3000, "p@x.test"),
                Event(9.5, "corrupted", 0, "p@x.test", "digest")]
    d.wall_seconds = 10.0
    return d


def test_figures_count_every_outcome(tmp_path: Path) -> None:
    fig = write(_run(), tmp_path)
    assert (fig["planned"], fig["sent"], fig["accepted"], fig["delivered"]) == (4, 4, 3, 2)
    assert (fig["deferred"], fig["retried"], fig["refused"]) == (2, 2, 1)
    assert (fig["lost"], fig["duplicated"], fig["corrupted"]) == (1, 1, 1)
    assert fig["bytes_sent"] == 4500 and not fig["complete"]
    assert fig["peak_backlog_bytes"] == 3500                  # 500 lost + 3000 waiting for p@
    assert fig["peak_backlog_full_scale_bytes"] == 7000       # scale 0.5
    assert fig["disk_needed_bytes"] == (3500 + 3000) * 2
    assert fig["slowest_receiver"]["address"] == "p@x.test"
    assert fig["per_receiver"]["p@x.test"]["latency_max_seconds"] == 800.0   # (9 - 1) x 100


def test_report_files_render(tmp_path: Path) -> None:
    write(_run(), tmp_path)
    doc = json.loads((tmp_path / "report.json").read_text())
    for key in ("sent", "delivered", "lost", "duplicated", "corrupted", "bytes_sent", "wall_seconds",
                "accepted", "deferred", "retried", "refused", "peak_mb_per_s", "peak_backlog_bytes",
                "disk_needed_bytes", "slowest_receiver"):
        assert key in doc
    assert len(doc["raw"]["records"]) == 4
    md = (tmp_path / "report.md").read_text()
    assert "FAIL" in md and "| 4 | 4 | 3 | 2 | 2 | 1 | 2 | 1 | 1 | 1 |" in md
    for name in PLOTS:
        png = (tmp_path / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and png[12:16] == b"IHDR"
        w, h = struct.unpack(">II", png[16:24])
        assert w >= 400 and h >= 200 and len(png) > 5000
        assert f"]({name})" in md


def test_a_duplicate_counts_once_as_the_run_records_it(tmp_path: Path) -> None:
    """The run's ledger marks a second verified download both on the record and as an event;
    the report counts it once."""
    from loadgen.message import Verdict
    from loadgen.run import Ledger

    rec = Record("r.1.1", "h@x.test", "c@x.test", 1000, due=0.0, attempts=1)
    ledger = Ledger({rec.id: rec}, t0=0.0)
    ledger.accepted(rec.id)
    v = Verdict(rec.id, True, 900)
    assert [ledger.delivered("c@x.test", v) for _ in range(3)] == ["delivered", "duplicated", "duplicated"]
    d = RunData(meta={"profile": "t", "period": "day", "speedup": 10.0, "scale": 1.0},
                records=[rec], events=ledger.events, wall_seconds=5.0)
    fig = write(d, tmp_path)
    assert (fig["delivered"], fig["duplicated"], fig["lost"]) == (1, 2, 0)


def test_a_message_of_an_earlier_run_is_stale_not_corrupted(tmp_path: Path) -> None:
    """An interrupted run can leave messages in an external server's mailboxes; the next run
    downloads and deletes them: intact and of another run = stale; damaged, unknown ids of this
    run, or the wrong mailbox = corrupted."""
    from loadgen.message import Verdict
    from loadgen.run import Ledger

    rec = Record("lg1.1.1", "h@x.test", "c@x.test", 1000, due=0.0, attempts=1)
    ledger = Ledger({rec.id: rec}, t0=0.0)
    ledger.accepted(rec.id)
    assert ledger.delivered("c@x.test", Verdict("lg0.4.1", True, 500)) == "stale"
    assert ledger.delivered("c@x.test", Verdict("lg0.5.1", False, 500, "digest")) == "corrupted"
    assert ledger.delivered("c@x.test", Verdict("lg1.9.1", True, 500)) == "corrupted"
    assert ledger.delivered("p@x.test", Verdict("lg1.1.1", True, 900)) == "corrupted"
    assert ledger.delivered("c@x.test", Verdict("lg1.1.1", True, 900)) == "delivered"
    d = RunData(meta={"profile": "t", "period": "day", "speedup": 10.0, "scale": 1.0},
                records=[rec], events=ledger.events, wall_seconds=5.0)
    fig = write(d, tmp_path)
    assert (fig["stale"], fig["corrupted"], fig["delivered"], fig["lost"]) == (1, 3, 1, 0)
    assert "1 intact messages of an earlier run" in (tmp_path / "report.md").read_text()


def test_peak_rate_spreads_each_transfer_over_its_span(tmp_path: Path) -> None:
    """A 100 MB message streamed for 10 s is 10 MB/s, not 100 MB in the 0.25 s bin of its 250
    reply; a download of it over 2 s is 50 MB/s."""
    d = RunData(meta={"profile": "t", "period": "day", "speedup": 10.0, "scale": 0.5,
                      "participants": 2, "seed": 1, "server": "test",
                      "downlink_as_run": {"c@x.test": 80e6}}, wall_seconds=20.0)
    d.records = [Record("r.1.1", "h@x.test", "c@x.test", 100_000_000, due=0.0, attempts=1,
                        accepted=10.0, delivered=14.0, deliveries=1)]
    d.events = [Event(10.0, "accepted", 100_000_000, "c@x.test", t0=0.0),
                Event(10.5, "deferred", 0, "c@x.test", "452 4.2.2"),
                Event(14.0, "delivered", 100_000_000, "c@x.test", t0=12.0)]
    fig = write(d, tmp_path)
    assert 9.5 < fig["peak_mb_per_s"] < 10.5
    assert 49 < fig["peak_download_mb_per_s"] < 51
    assert fig["mean_mb_per_s"] == 5.0
    rcv = fig["per_receiver"]["c@x.test"]
    assert (rcv["download_mb_per_s"], rcv["paced_to_mb_per_s"], rcv["deferrals"]) == (50.0, 80.0, 1)
    # the capacity summary: peak MB/s, peak backlog, disk needed, the slowest receiver's cost
    md = (tmp_path / "report.md").read_text()
    summary = md.split("## Capacity summary", 1)[1].split("##", 1)[0]
    assert "10.0 MB/s accepted, 50.0 MB/s downloaded" in summary
    assert "peak backlog on the server (full scale): 200.0 MB" in summary
    assert "disk needed (peak backlog + the largest message): 400.0 MB" in summary
    assert "| c@x.test | 1 | 2.3 min | 2.3 min | 2.3 min | 200.0 MB | 50.0 | 80.0 |" in md
    assert ("slowest receiver: c@x.test (95% latency 2.3 min); it costs the server 200.0 MB of "
            "backlog at its peak, and its senders 1 deferrals (4xx)") in summary
    # an event recorded without a start (older report.json) still counts, in its own bin
    d.events = [Event(10.0, "accepted", 100_000_000, "c@x.test")]
    assert write(d, tmp_path)["peak_mb_per_s"] > 100
