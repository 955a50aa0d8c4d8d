#!/usr/bin/env python3
"""SMTP ingest benchmark (not a test). One run measures, side by side on this machine:

  (a) raw limit: a minimal uvloop BufferedProtocol server receiving the same bytes over
      loopback, os.write + fsync, then answering (no SMTP);
  (b) the relay (`relay serve` subprocess) ingesting one message by DATA and by BDAT, from
      the first byte to the 250 (which the relay sends only after fsync + link);
  (c) N concurrent messages (default 20 x 50 MB), aggregate;
  (d) the relay's peak RSS (/proc/PID/status VmHWM) during 8 concurrent sessions of the big
      message (a fresh relay process, so the peak is this scenario's);
  (e) stock aiosmtpd (subprocess, data_size_limit raised, handler writing the message to a
      file and fsyncing it) on the same message by DATA.
Each figure is printed with its ratio to (a). Targets: (b) >= 0.5 x (a); (d) <= 64 MiB.

    python3 bench/bench_smtp.py                    # 1 GiB, median of 3 where cheap
    python3 bench/bench_smtp.py --size 64MiB --concurrent-size 8MiB --repeat 1   # quick

All files (messages, data dirs) live in a temporary directory that is removed at the end.
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _common import start_relay, stop_relay  # bench/ is the script directory

from relay.clients.smtp import send_message
from relay.config import format_size, parse_size

MB = 1e6
RCPT = "bench@example.test"

RAW_SERVER = textwrap.dedent("""
    import asyncio, os, sys, uvloop
    path, port_file = sys.argv[1], sys.argv[2]
    class P(asyncio.BufferedProtocol):
        def connection_made(self, t):
            self.t, self.buf, self.fd, self.n = t, bytearray(1 << 20), None, None
            self.view, self.head = memoryview(self.buf), b""
        def get_buffer(self, hint):
            return self.view
        def buffer_updated(self, n):
            data = self.view[:n]
            if self.n is None:                       # first 8 bytes: the length
                self.head += bytes(data)
                if len(self.head) < 8:
                    return
                self.n = int.from_bytes(self.head[:8], "big")
                self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                data = memoryview(self.head[8:])
            os.write(self.fd, data)
            self.n -= len(data)
            if self.n == 0:
                self.t.pause_reading()
                asyncio.get_running_loop().create_task(self.done())
        async def done(self):
            await asyncio.to_thread(os.fsync, self.fd)
            os.close(self.fd)
            os.unlink(path)
            self.t.write(b"ok")
            self.t.close()
    async def main():
        srv = await asyncio.get_running_loop().create_server(P, "127.0.0.1", 0)
        with open(port_file, "w") as f:
            f.write(str(srv.sockets[0].getsockname()[1]))
        await asyncio.Event().wait()
    uvloop.run(main())
""")

AIOSMTPD_SERVER = textwrap.dedent("""
    import os, socket, sys, time
    from aiosmtpd.controller import Controller
    out, limit, port_file = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    class Handler:
        async def handle_DATA(self, server, session, envelope):
            fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            data = envelope.content
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
            os.close(fd)
            os.unlink(out)
            return "250 2.0.0 OK"
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    c = Controller(Handler(), hostname="127.0.0.1", port=port, data_size_limit=limit,
                   decode_data=False, server_kwargs={"timeout": 3600})
    c.start()
    with open(port_file, "w") as f:
        f.write(str(port))
    while True:
        time.sleep(3600)
""")


def make_message(path: Path, size: int) -> None:
    """Headers + base64-looking 76-character CRLF lines (no '.' at all, like DICOM bodies)."""
    head = (b"From: ct@hospital.test\r\nTo: " + RCPT.encode() + b"\r\nSubject: bench\r\n"
            b"MIME-Version: 1.0\r\nContent-Type: application/dicom\r\n"
            b"Content-Transfer-Encoding: base64\r\n\r\n")
    line = (b"QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVphYmNkZWZnaGlqa2xtbm9wcXJzdHV2d3h5ejAxMjM0" + b"\r\n")
    block = line * (4 * 1024 * 1024 // len(line))
    with open(path, "wb") as f:
        f.write(head)
        left = size - len(head)
        while left > 0:
            piece = block[:left]
            f.write(piece)
            left -= len(piece)


def start_script(code: str, *args: str, cwd: Path) -> tuple[subprocess.Popen[bytes], int]:
    port_file = cwd / f"port-{time.monotonic_ns()}"
    p = subprocess.Popen([sys.executable, "-c", code, *args, str(port_file)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return p, wait_port(p, port_file)


def wait_port(p: subprocess.Popen[bytes], port_file: Path, timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if port_file.exists() and port_file.read_text().strip():
            return int(port_file.read_text())
        if p.poll() is not None:
            raise RuntimeError(f"server exited: {p.stderr.read().decode() if p.stderr else ''}")
        time.sleep(0.05)
    raise RuntimeError("server did not start")


def raw_send(port: int, path: Path) -> float:
    size = path.stat().st_size
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as s, open(path, "rb") as f:
        s.sendall(size.to_bytes(8, "big"))
        s.sendfile(f)
        assert s.recv(2) == b"ok"
    return time.perf_counter() - t0


class RelayProcess:
    def __init__(self, work: Path, name: str, max_size: int) -> None:
        self.data = work / name
        cfg = work / f"{name}.toml"
        cfg.write_text(textwrap.dedent(f"""
            data_dir = "{self.data}"
            hostname = "relay.bench"
            [smtp]
            listen = ["127.0.0.1:0"]
            max_message_size = {max_size}
            max_sessions_per_client = 0
            [imap]
            listen = []
            [pop3]
            listen = []
            [metrics]
            listen = ""
            [quota]
            default_bytes = "1TiB"
            [backpressure]
            min_free_disk = "512MiB"
            [log]
            level = "WARNING"
        """))
        self.proc, bound = start_relay(cfg, self.data, [RCPT])
        self.port = int(bound["smtp"][0][1])  # type: ignore[call-overload]

    def clean(self) -> None:
        """Drop delivered files so that the disk does not fill (the bench quota is 1 TiB)."""
        for p in (self.data / "mail").rglob("new/*"):
            p.unlink()

    def status(self, key: str) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
        raise KeyError(key)

    def stop(self) -> None:
        stop_relay(self.proc)


def send(port: int, path: Path, bdat: bool) -> float:
    t0 = time.perf_counter()
    res = send_message("127.0.0.1", port, "ct@hospital.test", [RCPT], path, bdat=bdat)
    assert res.final is not None and res.final.code == 250, res.final
    return time.perf_counter() - t0


def concurrent(n: int, fn: Callable[[], object]) -> float:
    errors: list[BaseException] = []

    def run() -> None:
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)
    threads = [threading.Thread(target=run) for _ in range(n)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return time.perf_counter() - t0


def median(fn: Callable[[], float], repeat: int, after: Callable[[], None] = lambda: None) -> float:
    times = []
    for _ in range(repeat):
        times.append(fn())
        after()
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1GiB", help="the big message (default 1GiB)")
    ap.add_argument("--concurrent-size", default="50MB", help="(c) message size (default 50MB)")
    ap.add_argument("--concurrent", type=int, default=20, help="(c) parallel messages (default 20)")
    ap.add_argument("--rss-sessions", type=int, default=8, help="(d) parallel big messages (default 8)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per figure for the median (a-c)")
    ap.add_argument("--no-aiosmtpd", action="store_true", help="skip (e)")
    ap.add_argument("--dir", default=None, help="work directory (default: a temp dir under /tmp)")
    args = ap.parse_args()
    if not args.no_aiosmtpd and importlib.util.find_spec("aiosmtpd") is None:
        sys.exit("bench_smtp: (e) needs aiosmtpd: pip install -e '.[bench]', or pass --no-aiosmtpd")
    size, csize = parse_size(args.size), parse_size(args.concurrent_size)
    need = size * (args.rss_sessions + 2) + csize * args.concurrent
    work = Path(tempfile.mkdtemp(prefix="bench-smtp-", dir=args.dir))
    if shutil.disk_usage(work).free < need * 1.2:
        print(f"not enough free disk in {work}: need ~{format_size(need)}", file=sys.stderr)
        shutil.rmtree(work)
        return 2
    rows: list[tuple[str, str, float | None]] = []

    def rate(nbytes: float, seconds: float) -> float:
        return nbytes / seconds / MB

    try:
        big, small = work / "big.eml", work / "small.eml"
        make_message(big, size)
        make_message(small, csize)
        print(f"message {format_size(size)}, concurrent {args.concurrent} x {format_size(csize)}, "
              f"median of {args.repeat}", flush=True)

        p, port = start_script(RAW_SERVER, str(work / "raw.out"), cwd=work)
        try:
            raw = rate(size, median(lambda: raw_send(port, big), args.repeat))
            rows.append(("(a) raw: uvloop BufferedProtocol + os.write + fsync", f"{raw:.0f} MB/s", 1.0))
        finally:
            stop_relay(p)

        relay = RelayProcess(work, "relay", max(size, csize) * 2)
        try:
            for label, bdat in (("DATA", False), ("BDAT", True)):
                r = rate(size, median(lambda b=bdat: send(relay.port, big, b), args.repeat, relay.clean))  # type: ignore[misc]
                rows.append((f"(b) relay, 1 message by {label}, to the 250", f"{r:.0f} MB/s", r / raw))
            t = median(lambda: concurrent(args.concurrent, lambda: send(relay.port, small, True)),
                       args.repeat, relay.clean)
            r = rate(csize * args.concurrent, t)
            rows.append((f"(c) relay, {args.concurrent} concurrent x {format_size(csize)} (BDAT), aggregate",
                         f"{r:.0f} MB/s", r / raw))
        finally:
            relay.stop()
        shutil.rmtree(relay.data)

        relay = RelayProcess(work, "relay-rss", size * 2)
        try:
            base = relay.status("VmRSS")
            t = concurrent(args.rss_sessions, lambda: send(relay.port, big, True))
            peak = relay.status("VmHWM")
            r = rate(size * args.rss_sessions, t)
            rows.append(((f"(d) relay peak RSS, {args.rss_sessions} concurrent x {format_size(size)} "
                         f"(idle {format_size(base)}; {r:.0f} MB/s aggregate)"),
                         format_size(peak), None))
        finally:
            relay.stop()
        shutil.rmtree(relay.data)

        if not args.no_aiosmtpd:
            p, port = start_script(AIOSMTPD_SERVER, str(work / "aiosmtpd.out"), str(size * 2),
                                   cwd=work)
            try:
                t = send(port, big, False)
                peak = int(next(ln for ln in Path(f"/proc/{p.pid}/status").read_text().splitlines()
                            if ln.startswith("VmHWM:")).split()[1]) * 1024
                r = rate(size, t)
                rows.append((f"(e) stock aiosmtpd, 1 message by DATA (peak RSS {format_size(peak)})",
                             f"{r:.0f} MB/s", r / raw))
            finally:
                stop_relay(p)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    width = max(len(r[0]) for r in rows)
    for label, figure, ratio in rows:
        print(f"{label:<{width}}  {figure:>12}  {'' if ratio is None else f'{ratio:5.2f} x (a)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
