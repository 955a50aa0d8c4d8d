#!/usr/bin/env python3
"""PostgreSQL backend vs Maildir (issue 14): ingest and fetch of one big message, in one run.

Each backend in a fresh child process (so that its peak RSS is its own): open the store,
deliver a SIZE message through relay.store.api (add_recipient, start, write 1 MiB views,
wait_writable, commit: what the SMTP session does between DATA and 250), then read it back
through Body.read in 1 MiB steps (what IMAP FETCH / POP3 RETR do without sendfile). Prints
MB/s (10^6 bytes/s) for each, the ratio PostgreSQL / Maildir (target >= 0.3) and each
child's peak RSS (VmHWM; target <= 96 MiB). PostgreSQL is a real server started here
(tests/pgutil.py: initdb in a temp dir, fsync on, synchronous_commit on; shared_buffers
256MB, max_wal_size 8GB as docs/cluster.md advises for big messages).

    python3 bench/bench_pg.py                   # 1 GiB
    python3 bench/bench_pg.py --size 256MiB
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

STEP = 1 << 20


def parse_size(s: str) -> int:
    for u, m in {"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}.items():
        if s.endswith(u):
            return int(float(s[: -len(u)]) * m)
    return int(s)


def hwm_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def child(backend: str, data_dir: str, dsn: str, size: int) -> dict[str, float]:
    from conftest import make_config

    from relay.store.api import Envelope
    from relay.store.backends import open_store

    sections = {"quota": {"default_bytes": 2 * size + (1 << 20)}}
    if backend == "postgresql":
        sections["store"] = {"backend": "postgresql", "dsn": dsn}
    store = open_store(make_config(Path(data_dir), **sections), backend)
    await store.open()
    await store.accounts.add("r@example.org")
    block = bytearray(os.urandom(STEP))
    t = time.perf_counter()
    d = store.begin_delivery(Envelope("s@example.org"))
    assert await d.add_recipient("r@example.org", size) is None
    await d.start()
    for i in range(size // STEP):
        block[:8] = i.to_bytes(8, "big")              # no two blocks alike
        d.write(block)
        if not d.writable:
            await d.wait_writable()
    receipt = await d.commit()
    ingest = time.perf_counter() - t
    mb = store.mailbox("r@example.org")
    (info,) = await mb.messages()
    t = time.perf_counter()
    got = 0
    with await mb.body(info.uid) as body:
        while got < body.size:
            got += len(await body.read(got, STEP))
    fetch = time.perf_counter() - t
    assert got == receipt.size
    await store.close()
    return {"ingest": ingest, "fetch": fetch, "rss": hwm_mib()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=parse_size, default=1 << 30)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--dir", default="", help=argparse.SUPPRESS)
    ap.add_argument("--dsn", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        import uvloop
        print(json.dumps(uvloop.run(child(args.child, args.dir, args.dsn, args.size))))
        return
    from pgutil import PgServer

    mb = args.size / 1e6
    print(f"one {args.size / 2**20:.0f} MiB message through relay.store.api, ingest to commit, then fetch")
    # docs/cluster.md, sizing: buffers and WAL room for big messages (no checkpoint mid-message)
    with PgServer.create(shared_buffers="256MB", wal_buffers="64MB", max_wal_size="8GB",
                         checkpoint_timeout="30min") as pg, \
            tempfile.TemporaryDirectory(prefix="bench-pg-") as tmp:
        res = {}
        for backend in ("maildir", "postgresql"):
            dsn = pg.create_database(f"bench_{backend}") if backend == "postgresql" else ""
            out = subprocess.run([sys.executable, __file__, "--child", backend, "--dir", f"{tmp}/{backend}",
                                  "--dsn", dsn, "--size", str(args.size)],
                                 check=True, capture_output=True, text=True).stdout
            res[backend] = json.loads(out.strip().splitlines()[-1])
            r = res[backend]
            print(f"{backend:<11} ingest {mb / r['ingest']:7.0f} MB/s   fetch {mb / r['fetch']:7.0f} MB/s   "
                  f"peak RSS {r['rss']:5.1f} MiB")
        m, p = res["maildir"], res["postgresql"]
        print(f"ratio postgresql/maildir: ingest {m['ingest'] / p['ingest']:.2f}x, fetch {m['fetch'] / p['fetch']:.2f}x"
              f" (target >= 0.3x); node RSS {p['rss']:.1f} MiB (target <= 96)")


if __name__ == "__main__":
    main()
