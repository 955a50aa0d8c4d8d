#!/usr/bin/env python3
"""Which PostgreSQL driver carries message bodies faster: asyncpg or psycopg 3 (async)?

One run starts a real PostgreSQL (tests/pgutil.py: initdb in a temp dir, fsync on) and, for
each driver in a fresh child process, streams a SIZE body into a table of bytea chunks
(STORAGE EXTERNAL: no pglz on incompressible data) in one transaction, one prepared INSERT per
chunk, COMMIT; then reads it back chunk by chunk (what a FETCH of the whole body does) and by
range (substring of one chunk: a partial FETCH). Prints MB/s (10^6 bytes/s) and the child's
peak RSS (VmHWM). psycopg is measured with per-chunk INSERT and with COPY ... FORMAT BINARY.

    python3 bench/bench_pg_driver.py                    # 1 GiB, 1 MiB chunks
    python3 bench/bench_pg_driver.py --size 256MiB --chunk 256KiB
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

SCHEMA = """
DROP TABLE IF EXISTS chunks;
CREATE TABLE chunks (body bigint, seq int, data bytea, PRIMARY KEY (body, seq));
ALTER TABLE chunks ALTER COLUMN data SET STORAGE EXTERNAL;
"""


def parse_size(s: str) -> int:
    units = {"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}
    for u, m in units.items():
        if s.endswith(u):
            return int(float(s[: -len(u)]) * m)
    return int(s)


def payload(chunk: int) -> list[bytes]:
    """A few incompressible chunks, rotated (no two neighbours equal)."""
    return [os.urandom(chunk) for _ in range(4)]


def hwm_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


async def run_asyncpg(dsn: str, size: int, chunk: int, _mode: str) -> dict[str, float]:
    import asyncpg

    conn = await asyncpg.connect(dsn)
    await conn.execute(SCHEMA)
    data = payload(chunk)
    n = size // chunk
    t = time.perf_counter()
    async with conn.transaction():
        ins = await conn.prepare("INSERT INTO chunks VALUES (1, $1, $2)")
        for i in range(n):
            await ins.fetchval(i, data[i % 4])
    write = time.perf_counter() - t
    t = time.perf_counter()
    sel = await conn.prepare("SELECT data FROM chunks WHERE body = 1 AND seq = $1")
    got = 0
    for i in range(n):
        got += len(await sel.fetchval(i))
    read = time.perf_counter() - t
    assert got == n * chunk
    rng = await conn.prepare("SELECT substring(data FROM $2 FOR $3) FROM chunks WHERE body = 1 AND seq = $1")
    t = time.perf_counter()
    for i in range(0, n, max(1, n // 64)):
        await rng.fetchval(i, 1001, 4096)
    ranges = (time.perf_counter() - t) / len(range(0, n, max(1, n // 64)))
    await conn.close()
    return {"write": write, "read": read, "range_ms": ranges * 1000}


async def run_psycopg(dsn: str, size: int, chunk: int, mode: str) -> dict[str, float]:
    import psycopg

    conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
    await conn.execute(SCHEMA)
    data = payload(chunk)
    n = size // chunk
    t = time.perf_counter()
    async with conn.transaction(), conn.cursor(binary=True) as cur:
        if mode == "copy":
            async with cur.copy("COPY chunks (body, seq, data) FROM STDIN (FORMAT BINARY)") as cp:
                cp.set_types(["int8", "int4", "bytea"])
                for i in range(n):
                    await cp.write_row((1, i, data[i % 4]))
        else:
            for i in range(n):
                await cur.execute("INSERT INTO chunks VALUES (1, %s, %b)", (i, data[i % 4]), prepare=True)
    write = time.perf_counter() - t
    got = 0
    t = time.perf_counter()
    async with conn.cursor(binary=True) as cur:
        for i in range(n):
            await cur.execute("SELECT data FROM chunks WHERE body = 1 AND seq = %s", (i,), prepare=True)
            row = await cur.fetchone()
            assert row is not None
            got += len(row[0])
        read = time.perf_counter() - t
        assert got == n * chunk
        t = time.perf_counter()
        for i in range(0, n, max(1, n // 64)):
            await cur.execute("SELECT substring(data FROM %s FOR %s) FROM chunks WHERE body = 1 AND seq = %s",
                              (1001, 4096, i), prepare=True)
            await cur.fetchone()
        ranges = (time.perf_counter() - t) / len(range(0, n, max(1, n // 64)))
    await conn.close()
    return {"write": write, "read": read, "range_ms": ranges * 1000}


def child(args: argparse.Namespace) -> None:
    import uvloop

    fn = run_asyncpg if args.driver == "asyncpg" else run_psycopg
    r = uvloop.run(fn(args.dsn, args.size, args.chunk, args.mode))
    r["hwm_mib"] = hwm_kib() / 1024
    print(json.dumps(r))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=parse_size, default=1 << 30)
    ap.add_argument("--chunk", type=parse_size, default=1 << 20)
    ap.add_argument("--child", dest="driver", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="insert", help=argparse.SUPPRESS)
    ap.add_argument("--dsn", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.driver:
        child(args)
        return
    from pgutil import PgServer

    import asyncpg
    import psycopg
    print(f"body {args.size / 2**20:.0f} MiB in {args.chunk / 2**10:.0f} KiB chunks, one transaction, "
          f"fsync on; asyncpg {asyncpg.__version__}, psycopg {psycopg.__version__}")
    with PgServer.create() as pg:
        dsn = pg.create_database("bench")
        print(f"{'driver':<18} {'write MB/s':>10} {'read MB/s':>10} {'range ms':>9} {'client RSS':>11}")
        for driver, mode in [("asyncpg", "insert"), ("psycopg", "insert"), ("psycopg", "copy")]:
            out = subprocess.run([sys.executable, __file__, "--child", driver, "--mode", mode, "--dsn", dsn,
                                  "--size", str(args.size), "--chunk", str(args.chunk)],
                                 check=True, capture_output=True, text=True).stdout
            r = json.loads(out)
            mb = args.size / 1e6
            print(f"{driver + ' ' + mode:<18} {mb / r['write']:>10.0f} {mb / r['read']:>10.0f} "
                  f"{r['range_ms']:>9.2f} {r['hwm_mib']:>7.0f} MiB")


if __name__ == "__main__":
    main()
