#!/usr/bin/env python3
"""The full-volume ruhr-pilot month against the relay, verified, beside the machine's raw limit.

    python3 bench/loadgen_month.py [--profile ruhr-pilot] [--speedup X] [--scale 1.0]

Goal (issue 6): the whole 60 GB month, every message downloaded and verified, in <= 10 minutes
on the 2-core reference machine. Measures, in the same run:
  raw   sequential disk write of 2 GiB with fsync (dd conv=fsync): what the relay's store
        cannot beat, since every accepted byte is written and fsync'd once;
  run   `loadgen run` (its own relay on a temporary data dir, removed afterwards).
Prints wall time, MB/s, the integrity figures and run/raw as a ratio; exits with loadgen's code.
Needs ~2 GiB of scratch space for dd plus the peak backlog (a few GB) for the relay.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def raw_disk_mb_s(scratch: Path) -> float:
    target = scratch / "dd.bin"
    t = time.monotonic()
    subprocess.run(["dd", "if=/dev/zero", f"of={target}", "bs=4M", "count=512", "conv=fsync"],
                   check=True, capture_output=True)
    dt = time.monotonic() - t
    target.unlink()
    return 2 * 1024**3 / dt / 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="ruhr-pilot")
    ap.add_argument("--period", default="month")
    ap.add_argument("--speedup", default=None,
                    help="default: loadgen's (the period in 9.5 minutes, x4547 for a month)")
    ap.add_argument("--scale", default="1.0")
    ap.add_argument("--keep-report", default=None, metavar="DIR", help="keep the report here")
    args = ap.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="loadgen-bench-"))
    try:
        raw = raw_disk_mb_s(scratch)
        report = Path(args.keep_report) if args.keep_report else scratch / "report"
        cmd = ["loadgen", "run", "--profile", args.profile, "--period", args.period,
               "--scale", args.scale, "--report", str(report), "--no-progress"]
        if args.speedup:
            cmd += ["--speedup", args.speedup]
        print("$", " ".join(cmd), flush=True)
        t = time.monotonic()
        rc = subprocess.run(cmd, check=False).returncode
        total = time.monotonic() - t
        rep = json.loads((report / "report.json").read_text())
        mbs = rep["bytes_sent"] / rep["wall_seconds"] / 1e6
        print(f"\n{'what':<44} {'figure':>14}")
        rows = [
            ("raw disk write 2 GiB + fsync (MB/s)", f"{raw:.0f}"),
            ("bytes accepted and verified (GB)", f"{rep['bytes_sent'] / 1e9:.1f}"),
            ("run wall time, senders start..drained (s)", f"{rep['wall_seconds']:.0f}"),
            ("whole command incl. setup and report (s)", f"{total:.0f}"),
            ("mean MB/s (accepted bytes / run wall time)", f"{mbs:.0f}"),
            ("peak MB/s accepted", f"{rep['peak_mb_per_s']:.0f}"),
            ("ratio mean / raw disk", f"{mbs / raw:.2f}"),
            ("planned / delivered", f"{rep['planned']} / {rep['delivered']}"),
            ("lost / duplicated / corrupted", f"{rep['lost']} / {rep['duplicated']} / {rep['corrupted']}"),
            ("deferred / refused", f"{rep['deferred']} / {rep['refused']}"),
            ("goal: <= 600 s for the month", "met" if rep["wall_seconds"] <= 600 and rc == 0 else "NOT met"),
        ]
        for k, v in rows:
            print(f"{k:<44} {v:>14}")
        return rc
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
