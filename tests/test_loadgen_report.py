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
