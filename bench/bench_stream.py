#!/usr/bin/env python3
"""Body streamer benchmark (issue 13, item 4): a message whose lines start with "." (so POP3 must
dot-stuff it) fetched by IMAP and POP3, side by side with the raw sendfile limit in one run.

One run, on one stored message (default 100 MiB, every line starting with "." or ".."):
  raw        a sendfile server on a plain loopback socket -> a client reading 1 MiB at a time
             into a file (bench_fetch.py's ceiling)
  IMAP       UID FETCH BODY.PEEK[]<...> by relay/clients/imap.py (no stuffing: literals)
  POP3 wire  RETR read by a client that only receives into a file and looks for the ".CRLF"
             terminator at the end, as `raw` does: the server's rate (relay/server/stream.py)
  POP3 client  RETR by relay/clients/pop3.py, which also undoes the stuffing (the receiver's
             rate; its DotUnstuffer takes the slow path on every dotted line)

Every download is compared byte for byte with the stored message (POP3 wire: with the stored
message stuffed by a reference implementation). Not a test; run it by hand:

    python3 bench/bench_stream.py                  # 100 MiB, median of 3
    python3 bench/bench_stream.py --size 256MiB --runs 5

The methods take turns run after run (the machine's cores are shared: a load that comes and
goes falls on all of them); "relay CPU" is the relay process's user+system seconds per 100 MB
sent, a figure the load disturbs much less than MB/s.
"""

from __future__ import annotations

import argparse
import base64
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import stop_relay  # noqa: E402
from bench_fetch import BIG, MB, PASSWORD, raw_fetch, same_bytes, start_relay, timed  # noqa: E402

from relay.clients.imap import ImapClient  # noqa: E402
from relay.clients.pop3 import Pop3Client  # noqa: E402
from relay.clients.smtp import send_message  # noqa: E402
from relay.config import format_size, parse_size  # noqa: E402

TARGET_POP3 = 0.5                      # issue 13: POP3 RETR of the dotted message >= 0.5 x raw
RECV = 1024 * 1024


def make_dotted(path: Path, size: int) -> int:
    """Headers, then text lines of about 78 bytes with CRLF, nearly all starting with "." (every
    7th with "..", every 11th without), up to about `size` bytes, ending with a CRLF (POP3
    cannot tell an added final CRLF from one in the message). A 3 MiB block is repeated."""
    raw = os.urandom(57 * 1024 * 54)
    lines = base64.encodebytes(raw).splitlines()
    block = b"".join((b"." if i % 11 else b"") + (b"." if i % 7 == 0 else b"") + ln[:75] + b"\r\n"
                     for i, ln in enumerate(lines))
    head = (b"From: ct@hospital.test\r\nTo: " + BIG.encode() + b"\r\nSubject: dotted\r\n"
            b"MIME-Version: 1.0\r\nContent-Type: text/plain\r\n\r\n")
    with open(path, "wb") as f:
        f.write(head)
        left = size - len(head)
        while left > 0:
            part = block if left >= len(block) else block[:block.rfind(b"\r\n", 0, left) + 2]
            if len(part) < 2:
                break
            f.write(part)
            left -= len(part)
    return path.stat().st_size


def stuffed_copy(src: Path, dst: Path) -> None:
    """The RFC 1939 3 reply body the server must send for `src` (reference: per line)."""
    with open(src, "rb") as f, open(dst, "wb") as out:
        last = b"\r\n"
        for line in f:
            out.write(b"." + line if line.startswith(b".") else line)
            last = line
        out.write(b".\r\n" if last.endswith(b"\r\n") else b"\r\n.\r\n")


class Pop3Wire:
    """A POP3 session that reads RETR's multi-line reply as it comes, into a file (no
    unstuffing; the end is the ".CRLF" after a CRLF, which stuffing keeps out of the body)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.file = self.sock.makefile("rb")
        self.file.readline()
        for cmd in (f"USER {BIG}", f"PASS {PASSWORD}"):
            self.sock.sendall(cmd.encode() + b"\r\n")
            reply = self.file.readline()
            assert reply.startswith(b"+OK"), reply

    def retr(self, dst: Path) -> int:
        """RETR 1 into `dst`; returns the bytes of the reply after its first line."""
        self.sock.sendall(b"RETR 1\r\n")
        assert self.file.readline().startswith(b"+OK")
        buf = bytearray(RECV)
        view = memoryview(buf)
        fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            pending = self.file.read1(RECV)          # what the line reader already holds
            os.write(fd, pending)
            total, tail = len(pending), pending[-5:]
            while not tail.endswith(b"\r\n.\r\n"):
                n = self.sock.recv_into(buf)
                if not n:
                    raise ConnectionError("server closed the connection in RETR")
                os.write(fd, view[:n])
                total += n
                tail = (tail + bytes(view[max(0, n - 5):n]))[-5:]
        finally:
            os.close(fd)
        return total

    def quit(self) -> None:
        self.sock.sendall(b"QUIT\r\n")
        self.file.readline()
        self.file.close()
        self.sock.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="100MiB", help="message size (default 100MiB)")
    ap.add_argument("--runs", type=int, default=3, help="fetches per method; the median counts")
    ap.add_argument("--dir", default=None, help="where the temporary directory goes")
    args = ap.parse_args(argv)
    size = parse_size(args.size, "--size")
    work = Path(tempfile.mkdtemp(prefix="bench_stream-", dir=args.dir))
    proc = None
    try:
        msg = work / "message.eml"
        make_dotted(msg, size)
        proc, bound, _ = start_relay(work)
        smtp, imap_port, pop3_port = (bound[k][0][1] for k in ("smtp", "imap", "pop3"))
        t, _ = timed(lambda: send_message("127.0.0.1", smtp, "ct@hospital.test", [BIG], msg))
        stored = next((work / "data" / "mail" / "bench.test" / "big" / "new").iterdir())
        stored_size = stored.stat().st_size
        print(f"delivered {format_size(stored_size)} (every line starting with '.') in {t:.1f} s")
        expect = work / "stuffed.eml"
        stuffed_copy(stored, expect)
        out = work / "out.eml"

        def cpu() -> float:
            """CPU seconds (user + system) the relay process has used so far."""
            fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

        def measure(fetch: Any, what: str, ref: Path, size: int, check: bool) -> tuple[float, float]:
            """(MB/s, relay CPU seconds per 100 MB) of one download into `out`."""
            c0 = cpu()
            t, n = timed(fetch)
            used = cpu() - c0
            assert n == size, (what, n, size)
            if check:
                assert same_bytes(out, ref), f"{what} download differs from the stored file"
            out.unlink()
            return n / t / MB, used / (n / 100e6)

        # the methods take turns, run after run, so that the machine's load (shared cores)
        # falls on all of them alike; the median of each counts
        rates: dict[str, list[float]] = {k: [] for k in ("raw", "imap", "wire", "client")}
        cpus: dict[str, list[float]] = {k: [] for k in rates}
        with ImapClient("127.0.0.1", imap_port) as c:
            c.login(BIG, PASSWORD)
            c.select()
            [uid] = c.uid_search("ALL")
            for i in range(args.runs):
                rates["raw"].append(raw_fetch(stored, out))
                out.unlink()
                for key in ("imap", "wire", "client"):
                    # POP3 logins (one at a time: the maildrop lock) are not timed
                    p: Any = None
                    if key == "imap":
                        fetch, ref = (lambda: c.fetch_to_file(uid, out)), stored
                    elif key == "wire":
                        p = Pop3Wire(pop3_port)
                        fetch, ref = (lambda: p.retr(out)), expect
                    else:
                        p = Pop3Client("127.0.0.1", pop3_port)
                        p.login(BIG, PASSWORD)
                        fetch, ref = (lambda: p.retr_to_file(1, out)), stored
                    rate, used = measure(fetch, key, ref, ref.stat().st_size, i == 0)
                    if p is not None:
                        p.quit()
                    rates[key].append(rate)
                    cpus[key].append(used)
            c.logout()
        raw = statistics.median(rates["raw"])
        imap, wire, client = (statistics.median(rates[k]) for k in ("imap", "wire", "client"))
        cpu_of = {k: statistics.median(v) for k, v in cpus.items() if v}
        print(f"\nfetch of one {format_size(stored_size)} dotted message, median of {args.runs} "
              f"(MB = 10^6 bytes; POP3 wire counts the stuffed bytes)")
        print(f"  raw loopback sendfile -> file   {raw:8.0f} MB/s   1.00 x raw")
        for key, name, rate, target in (
                ("imap", "IMAP BODY.PEEK[] (relay client)", imap, None),
                ("wire", "POP3 RETR, wire reader", wire, TARGET_POP3),
                ("client", "POP3 RETR, relay client", client, None)):
            ok = "" if target is None else ("ok" if rate >= target * raw else f"BELOW TARGET {target}")
            print(f"  {name:<32} {rate:8.0f} MB/s   {rate / raw:4.2f} x raw  "
                  f"relay CPU {cpu_of[key]:.2f} s/100 MB  {ok}")
        return 0
    finally:
        if proc is not None:
            stop_relay(proc)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
