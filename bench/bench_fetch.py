#!/usr/bin/env python3
"""Fetch benchmark (issue 3, item 9): how fast receivers drain the relay, side by side with the
machine's raw limit measured in the same run.

One run:
  raw      a sendfile server on a plain loopback socket -> a client reading 1 MiB at a time
           into a file: the ceiling for any "socket into a file" download on this machine
  IMAP     the same stored message by UID FETCH BODY.PEEK[]<...> (relay/clients/imap.py)
  POP3     RETR with dot-stuffing / unstuffing (relay/clients/pop3.py)
  RSS      peak resident memory of the `relay serve` process during the fetches (VmHWM,
           reset through /proc/PID/clear_refs before them)
  poll     one receiver poll on a mailbox of 1,000 messages, median of N:
           IMAP connect + LOGIN + SELECT + UID SEARCH ALL + LOGOUT,
           POP3 connect + AUTH PLAIN + STAT + UIDL (pipelined) + QUIT,
           next to the raw floor: connect + greeting + two round trips to a trivial server.

Targets (issue 3): fetch >= 0.4 x raw, poll <= 10 ms. Not a test; run it by hand:

    python3 bench/bench_fetch.py                 # 1 GiB, 1,000-message mailbox, 50 polls
    python3 bench/bench_fetch.py --size 256MiB --polls 20

Everything lives in a temporary directory (default: under the system temp dir) that is removed
at the end, with the `relay serve` process it started.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from relay.clients.imap import ImapClient
from relay.clients.pop3 import Pop3Client
from relay.clients.smtp import SmtpClient, send_message
from relay.config import format_size, parse_size

BIG, POLL = "big@bench.test", "poll@bench.test"
PASSWORD = "bench-password"            # benchmark fixture only
MB = 1e6


# --- the message ------------------------------------------------------------------------------

def make_message(path: Path, size: int) -> int:
    """A DICOM-like e-mail: headers, then base64 lines (76 + CRLF) up to about `size` bytes.
    Written in blocks; a 3 MiB random block is repeated (loopback does not compress)."""
    raw = os.urandom(57 * 1024 * 54)                 # 3 MiB of base64 after encoding
    b64 = base64.encodebytes(raw).replace(b"\n", b"\r\n")
    head = (b"From: ct@hospital.test\r\nTo: " + BIG.encode() + b"\r\nSubject: study\r\n"
            b"MIME-Version: 1.0\r\nContent-Type: application/dicom\r\n"
            b"Content-Transfer-Encoding: base64\r\n\r\n")
    with open(path, "wb") as f:
        f.write(head)
        left = size - len(head)
        while left > 0:
            block = b64 if left >= len(b64) else b64[:left - left % 78]
            if not block:
                break
            f.write(block)
            left -= len(block)
    return path.stat().st_size


# --- the server -------------------------------------------------------------------------------

def relay_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "relay", *args]


def start_relay(work: Path) -> tuple[subprocess.Popen[bytes], dict[str, Any], Path]:
    cfg = work / "relay.toml"
    cfg.write_text(
        f'data_dir = "{work / "data"}"\nhostname = "relay.bench"\n'
        '[smtp]\nlisten = ["127.0.0.1:0"]\nmax_message_size = "8GiB"\n'
        '[imap]\nlisten = ["127.0.0.1:0"]\n[pop3]\nlisten = ["127.0.0.1:0"]\n'
        '[metrics]\nlisten = "127.0.0.1:0"\n[quota]\ndefault_bytes = "64GiB"\n'
        '[log]\nlevel = "WARNING"\n')
    for addr in (BIG, POLL):
        subprocess.run(relay_cmd("user", "add", addr, "--password-stdin", "--config", str(cfg)),
                       input=PASSWORD.encode(), check=True, capture_output=True)
    log = open(work / "relay.log", "wb")  # noqa: SIM115 - lives as long as the server
    proc = subprocess.Popen(relay_cmd("serve", "--config", str(cfg)), stdout=log, stderr=log)
    listeners = work / "data" / "run" / "listeners.json"
    deadline = time.monotonic() + 60
    while not listeners.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"relay serve did not start; see {work / 'relay.log'}")
        time.sleep(0.1)
    time.sleep(0.2)
    return proc, json.loads(listeners.read_text()), cfg


def vm_hwm(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def reset_hwm(pid: int) -> bool:
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")   # Linux: reset the peak RSS
        return True
    except OSError:
        return False


# --- the raw limits ---------------------------------------------------------------------------

_RAW_SERVER = """
import socket, sys
srv = socket.create_server(("127.0.0.1", 0))
print(srv.getsockname()[1], flush=True)
conn, _ = srv.accept()
with conn, open(sys.argv[1], "rb") as f:
    conn.sendfile(f)
"""


def raw_fetch(src: Path, dst: Path) -> float:
    """sendfile the file over loopback, from a process of its own (like the relay), to a
    client that reads it into `dst`; MB/s."""
    server = subprocess.Popen([sys.executable, "-c", _RAW_SERVER, str(src)], stdout=subprocess.PIPE)
    assert server.stdout is not None
    port = int(server.stdout.readline())
    buf = bytearray(1024 * 1024)
    view = memoryview(buf)
    total = 0
    start = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as s:
        fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            while n := s.recv_into(buf):
                os.write(fd, view[:n])
                total += n
        finally:
            os.close(fd)
    elapsed = time.perf_counter() - start
    server.wait(30)
    return total / elapsed / MB


def raw_poll_server() -> tuple[socket.socket, threading.Thread]:
    """A trivial line server: a greeting, then one reply line per line received."""
    srv = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            with conn:
                conn.sendall(b"+OK ready\r\n")
                f = conn.makefile("rb")
                while f.readline():
                    conn.sendall(b"+OK\r\n")

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return srv, t


def raw_poll(port: int) -> float:
    start = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as s:
        f = s.makefile("rb")
        f.readline()
        for _ in range(2):
            s.sendall(b"NOOP\r\n")
            f.readline()
    return time.perf_counter() - start


# --- the relay's clients ----------------------------------------------------------------------

def same_bytes(a: Path, b: Path) -> bool:
    if a.stat().st_size != b.stat().st_size:
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(8 << 20), fb.read(8 << 20)
            if x != y:
                return False
            if not x:
                return True


def timed(fn: Any) -> tuple[float, Any]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def imap_poll(port: int) -> float:
    start = time.perf_counter()
    with ImapClient("127.0.0.1", port) as c:
        c.login(POLL, PASSWORD)
        c.select()
        c.uid_search("ALL")
        c.logout()
    return time.perf_counter() - start


def pop3_poll(port: int) -> float:
    start = time.perf_counter()
    with Pop3Client("127.0.0.1", port) as c:
        c.login(POLL, PASSWORD, method="plain")
        c.poll()                                  # STAT + UIDL, pipelined
        c.quit()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="1GiB", help="message size (default 1GiB)")
    ap.add_argument("--runs", type=int, default=3, help="fetches per method; the median counts")
    ap.add_argument("--mailbox", type=int, default=1000, help="messages in the polled mailbox")
    ap.add_argument("--polls", type=int, default=50, help="polls per protocol (median)")
    ap.add_argument("--dir", default=None, help="where the temporary directory goes")
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    args = ap.parse_args(argv)
    size = parse_size(args.size, "--size")
    work = Path(tempfile.mkdtemp(prefix="bench_fetch-", dir=args.dir))
    proc = None
    res: dict[str, Any] = {"size": size}
    try:
        msg = work / "message.eml"
        make_message(msg, size)
        proc, bound, _ = start_relay(work)
        smtp = bound["smtp"][0][1]
        imap_port, pop3_port = bound["imap"][0][1], bound["pop3"][0][1]
        t, _ = timed(lambda: send_message("127.0.0.1", smtp, "ct@hospital.test", [BIG], msg))
        print(f"delivered {format_size(msg.stat().st_size)} over SMTP in {t:.1f} s")
        body = b"Subject: poll\r\n\r\n" + b"x" * 2000 + b"\r\n"
        with SmtpClient("127.0.0.1", smtp) as c:
            for _ in range(args.mailbox):
                c.send("ct@hospital.test", [POLL], body)
        print(f"delivered {args.mailbox} small messages to {POLL}")

        stored = next((work / "data" / "mail" / "bench.test" / "big" / "new").iterdir())
        stored_size = stored.stat().st_size
        res["stored_size"] = stored_size
        out = work / "out.eml"

        raws = [raw_fetch(stored, out) for _ in range(args.runs)]
        out.unlink()
        res["raw_mb_s"] = statistics.median(raws)
        with ImapClient("127.0.0.1", imap_port) as c:   # the first login's argon2 check
            c.login(BIG, PASSWORD)                      # costs 64 MiB once: not the fetch's
            c.logout()
        hwm_reset = reset_hwm(proc.pid)
        res["rss_before_fetch"] = vm_hwm(proc.pid)

        def median_rate(fetch: Any, what: str) -> float:
            """Median MB/s of args.runs downloads into `out`; the first is compared byte for byte."""
            rates = []
            for i in range(args.runs):
                t, n = timed(fetch)
                assert n == stored_size, (n, stored_size)
                if i == 0:
                    assert same_bytes(out, stored), f"{what} download differs from the stored file"
                out.unlink()
                rates.append(n / t / MB)
            return statistics.median(rates)

        with ImapClient("127.0.0.1", imap_port) as c:
            c.login(BIG, PASSWORD)
            c.select()
            [uid] = c.uid_search("ALL")
            res["imap_mb_s"] = median_rate(lambda: c.fetch_to_file(uid, out), "IMAP")
            c.logout()
        res["rss_peak_imap"] = vm_hwm(proc.pid)
        reset_hwm(proc.pid)

        with Pop3Client("127.0.0.1", pop3_port) as p:
            p.login(BIG, PASSWORD)
            res["pop3_mb_s"] = median_rate(lambda: p.retr_to_file(1, out), "POP3")
            p.quit()
        res["rss_peak_pop3"] = vm_hwm(proc.pid)
        res["rss_peak"] = max(res["rss_peak_imap"], res["rss_peak_pop3"])
        res["rss_peak_is_fetch_only"] = hwm_reset

        srv, _ = raw_poll_server()
        raw_polls = [raw_poll(srv.getsockname()[1]) for _ in range(args.polls)]
        srv.close()
        imap_poll(imap_port)                      # warm the credential cache
        pop3_poll(pop3_port)
        imap_polls = [imap_poll(imap_port) for _ in range(args.polls)]
        pop3_polls = [pop3_poll(pop3_port) for _ in range(args.polls)]
        res["raw_poll_ms"] = statistics.median(raw_polls) * 1000
        res["imap_poll_ms"] = statistics.median(imap_polls) * 1000
        res["pop3_poll_ms"] = statistics.median(pop3_polls) * 1000
        res["mailbox"] = args.mailbox

        raw = res["raw_mb_s"]
        print(f"\nfetch of one {format_size(stored_size)} message, median of {args.runs} "
              f"(MB = 10^6 bytes)")
        print(f"  raw loopback sendfile -> file   {raw:8.0f} MB/s   1.00 x raw")
        for key, name in (("imap_mb_s", "IMAP BODY.PEEK[] streaming"),
                          ("pop3_mb_s", "POP3 RETR streaming")):
            ok = "ok" if res[key] >= 0.4 * raw else "BELOW TARGET 0.4"
            print(f"  {name:<32} {res[key]:8.0f} MB/s   {res[key] / raw:4.2f} x raw  {ok}")
        scope = "during the fetches" if hwm_reset else "since start (incl. SMTP ingest)"
        print(f"  relay serve RSS before the fetches {format_size(res['rss_before_fetch'])}; "
              f"peak {scope}: IMAP {format_size(res['rss_peak_imap'])}, "
              f"POP3 {format_size(res['rss_peak_pop3'])} "
              f"({res['rss_peak'] / stored_size:.3f} x the message)")
        print(f"\npoll of a {args.mailbox}-message mailbox, median of {args.polls}")
        print(f"  raw: connect + greeting + 2 round trips {res['raw_poll_ms']:6.2f} ms   1.0 x raw")
        for key, name in (("imap_poll_ms", "IMAP login+select+UID SEARCH"),
                          ("pop3_poll_ms", "POP3 AUTH+STAT+UIDL+QUIT")):
            ok = "ok" if res[key] <= 10 else "ABOVE TARGET 10 ms"
            print(f"  {name:<40} {res[key]:6.2f} ms {res[key] / res['raw_poll_ms']:5.1f} x raw  {ok}")
        if args.json:
            Path(args.json).write_text(json.dumps(res, indent=2))
        return 0
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
