#!/usr/bin/env python3
"""Connection flood and login flood against `relay serve` (issue 12; not a test).

  (1) connection flood: 1000 idle SMTP connections (banner read, EHLO sent, then silence) from
      20 loopback addresses 127.0.0.11-30, 50 each, the relay's default limits. Printed: the
      relay's RSS before, during and after (VmRSS of the process), KiB per idle connection,
      and the time until a real sender from another address (127.0.0.99) has delivered a
      message (connect to 250).
  (2) login flood: 48 connections from one address (127.0.0.50) guessing the password of a
      real account over IMAP (reconnecting when closed), with real argon2 hashes. Printed:
      delivery latency to a local mailbox (SMTP from 127.0.0.1, connect to 250, 20 messages)
      without and with the flood, RSS peak during it, and the guesses the relay checked.

Targets (issue 12): real sender through within 30 s, <= 64 KiB per idle connection, memory back
within 32 MiB after the idle connections close, delivery slowed by <= 0.5 s under the login
flood.

    python3 bench/bench_flood.py                      # this checkout
    python3 bench/bench_flood.py --src /work/main     # the same run against another checkout

`ulimit -n` is raised inside the script (the relay inherits it). Everything lives in a
temporary directory removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import smtplib
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RCPT = "bench@example.test"
VICTIM = "victim@example.test"
IDLE = 1000
ADDRESSES = 20
GUESSERS = 48
IMAP_IDLE = 400            # below imap.max_sessions (500), as the SMTP flood fills smtp's 1000
KiB, MiB = 1024, 1024 * 1024


def raise_nofile(want: int = 8192) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    new = min(max(soft, want), hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    return new


def start(src: Path, tmp: Path) -> tuple[subprocess.Popen[bytes], dict[str, int]]:
    data = tmp / "data"
    cfg = tmp / "relay.toml"
    cfg.write_text(f'data_dir = "{data}"\nhostname = "relay.bench"\n'
                   '[smtp]\nlisten = ["127.0.0.1:0"]\n[imap]\nlisten = ["127.0.0.1:0"]\n'
                   '[pop3]\nlisten = ["127.0.0.1:0"]\n[metrics]\nlisten = "127.0.0.1:0"\n'
                   '[log]\nlevel = "WARNING"\n')
    env = {k: v for k, v in os.environ.items() if k != "RELAY_TEST_WEAK_KDF"}   # real argon2
    env["PYTHONPATH"] = str(src)
    for addr, pw in ((RCPT, None), (VICTIM, "correct horse battery staple")):
        extra = ["--password-stdin"] if pw else []
        subprocess.run([sys.executable, "-m", "relay", "user", "add", addr, *extra, "--config", str(cfg)],
                       input=(pw + "\n").encode() if pw else None, check=True, env=env,
                       capture_output=True, cwd=src)
    proc = subprocess.Popen([sys.executable, "-m", "relay", "serve", "--config", str(cfg)], env=env,
                            cwd=src, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    listeners = data / "run" / "listeners.json"
    deadline = time.monotonic() + 60
    while not listeners.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("relay did not start")
        time.sleep(0.05)
    bound = json.loads(listeners.read_text())
    return proc, {k: v[0][1] for k, v in bound.items()}


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * KiB
    raise RuntimeError("no VmRSS")


def deliver(port: int, source: str = "127.0.0.1", timeout: float = 60) -> float:
    t0 = time.monotonic()
    with smtplib.SMTP("127.0.0.1", port, timeout=timeout, source_address=(source, 0)) as s:
        s.sendmail("sender@far.test", [RCPT], b"Subject: bench\r\n\r\n" + b"x" * 2000 + b"\r\n")
    return time.monotonic() - t0


def open_idle(port: int, n: int = IDLE, hello: bytes = b"EHLO flood.test\r\n") -> list[socket.socket]:
    conns = []
    for i in range(n):
        src = f"127.0.0.{11 + i % ADDRESSES}"
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(src, 0))
        except OSError as e:
            print(f"  connection {i}: {e}")
            continue
        conns.append(s)
    for s in conns:
        try:
            s.recv(512)
            s.sendall(hello)
        except OSError:
            pass
    time.sleep(1.0)
    for s in conns:
        s.setblocking(False)
        try:
            s.recv(4096)
        except OSError:
            pass
    return conns


def latency(port: int, n: int = 20) -> list[float]:
    out = []
    for _ in range(n):
        out.append(deliver(port))
        time.sleep(0.2)
    return out


def guesser(port: int, stop: threading.Event, checked: list[int]) -> None:
    n = 0
    while not stop.is_set():
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=60, source_address=("127.0.0.50", 0))
            f = s.makefile("rb")
            f.readline()
            while not stop.is_set():
                n += 1
                s.sendall(b"a LOGIN %s wrong-%d\r\n" % (VICTIM.encode(), n))
                line = f.readline()
                if not line or line.startswith(b"* BYE"):
                    break
                checked.append(1)
            s.close()
        except OSError:
            time.sleep(0.1)


def fmt(xs: list[float]) -> str:
    return (f"median {statistics.median(xs) * 1000:.0f} ms, max {max(xs) * 1000:.0f} ms "
            f"({len(xs)} messages)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", type=Path, default=ROOT, help="checkout whose relay to run (default: this one)")
    ap.add_argument("--flood-seconds", type=float, default=20.0, help="length of the login flood")
    args = ap.parse_args()
    nofile = raise_nofile()
    print(f"relay from {args.src}; ulimit -n {nofile}")
    with tempfile.TemporaryDirectory(prefix="bench-flood-") as d:
        proc, ports = start(args.src.resolve(), Path(d))
        try:
            for _ in range(5):
                deliver(ports["smtp"])                       # warm up
            time.sleep(1.0)
            before = rss(proc.pid)
            # (1) connection flood
            t0 = time.monotonic()
            conns = open_idle(ports["smtp"])
            opened = time.monotonic() - t0
            during = rss(proc.pid)
            per = (during - before) / max(1, len(conns))
            t1 = time.monotonic()
            try:
                real = deliver(ports["smtp"], "127.0.0.99")
                real_s = f"{time.monotonic() - t1:.2f} s (its own transaction {real * 1000:.0f} ms)"
            except (OSError, smtplib.SMTPException) as e:
                real_s = f"FAILED: {e!r}"
            for s in conns:
                s.close()
            time.sleep(5.0)
            after = rss(proc.pid)
            print(f"(1) {len(conns)} idle connections from {ADDRESSES} addresses, opened in {opened:.1f} s")
            print(f"    RSS before / during / after: {before / MiB:.1f} / {during / MiB:.1f} / {after / MiB:.1f} MiB")
            print(f"    per idle connection: {per / KiB:.1f} KiB            (target <= 64 KiB)")
            print(f"    after close, above before: {(after - before) / MiB:.1f} MiB     (target <= 32 MiB)")
            print(f"    real sender from 127.0.0.99 delivered after: {real_s}   (target <= 30 s)")
            base = rss(proc.pid)
            imap = open_idle(ports["imap"], IMAP_IDLE, b"a CAPABILITY\r\n")
            imap_per = (rss(proc.pid) - base) / max(1, len(imap))
            for s in imap:
                s.close()
            print(f"    IMAP: {len(imap)} idle connections before login: {imap_per / KiB:.1f} KiB each")
            # (2) login flood
            quiet = latency(ports["smtp"])
            stop = threading.Event()
            checked: list[int] = []
            threads = [threading.Thread(target=guesser, args=(ports["imap"], stop, checked), daemon=True)
                       for _ in range(GUESSERS)]
            for t in threads:
                t.start()
            peak = rss(proc.pid)
            t0 = time.monotonic()
            loud: list[float] = []
            while time.monotonic() - t0 < args.flood_seconds:
                try:
                    loud.append(deliver(ports["smtp"]))
                except (OSError, smtplib.SMTPException):
                    loud.append(60.0)                    # counted as the client's timeout
                peak = max(peak, rss(proc.pid))
                time.sleep(0.2)
            stop.set()
            answered = len(checked)
            try:
                m = urllib.request.urlopen(f"http://127.0.0.1:{ports['metrics']}/metrics", timeout=30).read().decode()
            except OSError as e:
                m = f"# metrics: {e!r}"
            counts = {ln.split("{")[0] + ln.split("}")[0].split("=")[-1]: float(ln.split()[-1])
                      for ln in m.splitlines() if ln.startswith(("relay_auth_failures_total", "relay_auth_refused_total"))}
            print(f"(2) login flood: {GUESSERS} guessing IMAP connections from 127.0.0.50 for {args.flood_seconds:.0f} s")
            print(f"    delivery latency without: {fmt(quiet)}")
            print(f"    delivery latency with:    {fmt(loud)}")
            print(f"    slowed by (median / max): {(statistics.median(loud) - statistics.median(quiet)) * 1000:.0f} ms"
                  f" / {(max(loud) - max(quiet)) * 1000:.0f} ms   (target <= 500 ms)")
            print(f"    RSS peak during the flood: {peak / MiB:.1f} MiB; answers to the guessers: {answered}"
                  f" ({counts or 'no relay_auth_* metrics'})")
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
