#!/usr/bin/env python3
"""Cost of a Prometheus scrape as the network grows (issue 5).

    python3 bench/bench_scrape.py [--accounts 300 3000] [--scrapes 5]

For each account count, a relay runs in-process on free loopback ports (its own uvloop in a
thread, as the tests run it) with that many accounts, per-mailbox series on and off. It
prints the number of series, the body size, the median scrape time, and the median stall of
the relay's event loop during a scrape (a 5 ms ticker on the loop measures how late it ran):
the stall is what every SMTP/IMAP/POP3 session waits while a scrape is served. The raw
reference is an HTTP request to /healthz on the same listener (no metrics work at all).
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.conftest import RunningRelay, make_config


def measure(r: RunningRelay, path: str, scrapes: int, lag: dict[str, float]) -> tuple[float, float, bytes]:
    url = f"http://127.0.0.1:{r.metrics_port}{path}"
    times, stalls, body = [], [], b""
    for _ in range(scrapes):
        lag["max"] = 0.0
        t = time.perf_counter()
        body = urllib.request.urlopen(url, timeout=60).read()
        times.append(time.perf_counter() - t)
        time.sleep(0.05)
        stalls.append(lag["max"])
    return statistics.median(times), statistics.median(stalls), body


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--accounts", type=int, nargs="+", default=[300, 3000])
    ap.add_argument("--scrapes", type=int, default=5)
    args = ap.parse_args()
    print(f"{'accounts':>8} {'per_mailbox':>11} {'series':>7} {'body':>9} {'scrape':>9} "
          f"{'loop stall':>10} {'healthz (raw)':>13}")
    for n in args.accounts:
        for per_mailbox in (True, False):
            tmp = Path(tempfile.mkdtemp(prefix="bench-scrape-"))
            r = RunningRelay(make_config(tmp / "data", metrics={"per_mailbox": per_mailbox}))
            try:
                def add(relay: object, n: int = n) -> None:
                    for i in range(n):     # receive-only accounts: no password hashing
                        relay.store.accounts.add(f"u{i}@site{i % 50}.test")  # type: ignore[attr-defined]
                r.call(add, timeout=600)
                lag = {"max": 0.0}

                async def ticker(lag: dict[str, float] = lag) -> None:
                    last = time.perf_counter()
                    while True:
                        await asyncio.sleep(0.005)
                        now = time.perf_counter()
                        lag["max"] = max(lag["max"], now - last - 0.005)
                        last = now

                ticking = asyncio.run_coroutine_threadsafe(ticker(), r.loop)
                time.sleep(0.3)
                raw, _, _ = measure(r, "/healthz", args.scrapes, lag)
                t, stall, body = measure(r, "/metrics", args.scrapes, lag)
                series = sum(1 for line in body.decode().splitlines() if line and not line.startswith("#"))
                print(f"{n:>8} {per_mailbox!s:>11} {series:>7} {len(body) / 1e3:>7.0f}kB "
                      f"{t * 1e3:>7.1f}ms {stall * 1e3:>8.1f}ms {raw * 1e3:>11.2f}ms")
                ticking.cancel()
            finally:
                r.stop()
                shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
