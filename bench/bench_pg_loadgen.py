#!/usr/bin/env python3
"""`loadgen run` against two relay nodes on one PostgreSQL (issue 14): senders to node 1,
receivers (IMAP and POP3) on node 2. Prints loadgen's integrity figures (target: 0 lost,
duplicated, corrupted), the wall time and each node's peak RSS (target <= 96 MiB).

    python3 bench/bench_pg_loadgen.py                                  # ruhr-early month at 1/10 size
    python3 bench/bench_pg_loadgen.py --profile ruhr-pilot --scale 1   # the full pilot month

PostgreSQL is a real server started here (tests/pgutil.py, fsync on), the nodes are
`relay serve` processes; everything lives in a temporary directory removed at the end.
"""

from __future__ import annotations

import argparse
import json
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))


def hwm_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="ruhr-early")
    ap.add_argument("--period", default="month")
    ap.add_argument("--scale", default="0.1")
    ap.add_argument("--speedup", default="1000000", help="default: as fast as the relay takes it")
    ap.add_argument("--maildir", action="store_true",
                    help="the peer for comparison: one node on the Maildir store (senders and receivers)")
    args = ap.parse_args()

    from _common import start_relay, stop_relay
    from bench_pg import add_accounts, node_config
    from pgutil import PgServer

    from loadgen import model as modelmod
    from loadgen.profile import load_profile

    m = modelmod.build(load_profile(args.profile, None), None)
    password = secrets.token_urlsafe(12)
    with PgServer.create(shared_buffers="256MB", wal_buffers="64MB", max_wal_size="8GB",
                         checkpoint_timeout="30min") as pg, \
            tempfile.TemporaryDirectory(prefix="bench-pg-loadgen-") as tmp:
        dsn = "" if args.maildir else pg.create_database("relay")
        cfgs = [node_config(Path(tmp) / f"node{i}", dsn) for i in ((1,) if args.maildir else (1, 2))]

        add_accounts(cfgs[0], [p.address for p in m.participants], password)
        nodes = [start_relay(c, c.parent / "data", []) for c in cfgs]
        nodes = nodes * (3 - len(nodes))                  # Maildir: the one node plays both
        try:
            (p1, l1), (p2, l2) = nodes
            hp = lambda lst: f"{lst[0][0]}:{lst[0][1]}"  # noqa: E731
            t = time.monotonic()
            rc = subprocess.run(["loadgen", "run", "--profile", args.profile, "--period", args.period,
                                 "--scale", args.scale, "--speedup", args.speedup, "--no-progress",
                                 "--smtp", hp(l1["smtp"]), "--imap", hp(l2["imap"]), "--pop3", hp(l2["pop3"]),
                                 "--password", password, "--report", f"{tmp}/report"]).returncode
            wall = time.monotonic() - t
            rep = json.loads(Path(f"{tmp}/report/report.json").read_text())
            where = "one node on Maildir" if args.maildir else "node 1 and node 2 on one PostgreSQL"
            print(f"\n{args.profile} {args.period} x{args.scale}: senders -> node 1, receivers <- node 2, "
                  f"{where}; {wall:.0f} s")
            print("sent {sent}  delivered {delivered}  lost {lost}  duplicated {duplicated}  corrupted {corrupted}"
                  .format(**{k: rep.get(k) for k in ("sent", "delivered", "lost", "duplicated", "corrupted")}))
            print(f"peak RSS: node 1 {hwm_mib(p1.pid):.1f} MiB, node 2 {hwm_mib(p2.pid):.1f} MiB (target <= 96)")
        finally:
            logs = [stop_relay(p) for p, _ in nodes[:len(cfgs)]]
            if rc:                                          # what the nodes said about it
                print("\n".join(line for log in logs for line in log.splitlines()
                                if " warning " in line or " error " in line)[-4000:])
    return rc


if __name__ == "__main__":
    sys.exit(main())
