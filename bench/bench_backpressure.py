#!/usr/bin/env python3
"""Backpressure benchmark (not a test): a fast sender and a slow IMAP receiver (issue 4).

`relay serve` runs as a subprocess. In one run:
  (a) unpaced ingest: the same messages to a mailbox that is not congested (the sender's
      and relay's limit in this run);
  (b) the scenario: one sender streams MSG-sized messages to practice@ as fast as the relay
      lets it (retrying 452 after --retry seconds, as an MTA would, with the same message);
      the receiver fetches each message through IMAP (streaming UID FETCH into a file),
      verifies it and deletes it (UID EXPUNGE), throttled to --drain bytes/s;
  (c) the sender stops; the receiver drains the mailbox; every message must arrive exactly
      once, intact.
Printed: sender rate while paced and its ratio to the drain rate (target: pace_factor) and to
(a); the drain rate; peak backlog against the soft backlog and the quota; deferrals; lost and
duplicated (must be 0).

    python3 bench/bench_backpressure.py                       # 50 MB messages, 1 GiB quota
    python3 bench/bench_backpressure.py --msg 20MB --quota 400MiB --seconds 60   # quicker

Everything lives in a temporary directory that is removed at the end.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _common import start_relay, stop_relay  # bench/ is the script directory

from relay import config as configmod
from relay.clients.imap import ImapClient
from relay.clients.smtp import SmtpClient, SmtpError
from relay.config import parse_size
from relay.store import Store

RCPT = "practice@clinic.test"
FAST = "fast@clinic.test"
PASSWORD = "bench-only-password"
MB = 1_000_000


def make_body(size: int) -> bytes:
    """base64-like 76-character lines, like a DICOM attachment (no '.' at line starts)."""
    line = (hashlib.sha256(b"seed").hexdigest() * 3)[:76].encode() + b"\r\n"
    return line * (size // len(line))


class Relay:
    def __init__(self, root: Path, args: argparse.Namespace) -> None:
        self.data = root / "data"
        self.cfg = root / "relay.toml"
        self.cfg.write_text(f"""
data_dir = "{self.data}"
hostname = "relay.bench"
[smtp]
listen = ["127.0.0.1:0"]
max_message_size = "{args.max_message}"
[imap]
listen = ["127.0.0.1:0"]
[pop3]
listen = []
[metrics]
listen = "127.0.0.1:0"
[quota]
default_bytes = "{args.quota}"
[backpressure]
soft_backlog = "{args.soft}"
pace_factor = {args.pace_factor}
pace_floor = "{args.pace_floor}"
drain_halflife = {args.halflife}
""")
        self.proc, bound = start_relay(self.cfg, self.data, [RCPT, FAST], PASSWORD)
        self.smtp, self.imap = int(bound["smtp"][0][1]), int(bound["imap"][0][1])  # type: ignore[call-overload]
        self.store = Store.open(configmod.load(self.cfg))      # read-only observer (WAL)

    def stop(self) -> str:
        self.store.close()
        return stop_relay(self.proc)


def message(seq: int, body: bytes) -> list[bytes]:
    head = (f"From: ct@hospital.test\r\nTo: {RCPT}\r\nSubject: study {seq}\r\n"
            f"X-Seq: {seq}\r\n\r\n").encode()
    return [head] + [body[i:i + (1 << 20)] for i in range(0, len(body), 1 << 20)]


def msg_size(seq: int, body: bytes) -> int:
    return sum(map(len, message(seq, body)))


def unpaced_rate(relay: Relay, body: bytes, n: int) -> float:
    with SmtpClient("127.0.0.1", relay.smtp) as c:
        t0 = time.monotonic()
        total = 0
        for i in range(n):
            size = msg_size(-1 - i, body)
            c.send("ct@hospital.test", [FAST], message(-1 - i, body), size=size)
            total += size
        return total / (time.monotonic() - t0)


class Sender(threading.Thread):
    def __init__(self, relay: Relay, body: bytes, retry: float) -> None:
        super().__init__(daemon=True)
        self.relay, self.body, self.retry = relay, body, retry
        self.stop = threading.Event()
        self.accepted: list[tuple[int, float, float, int]] = []    # seq, start, end, size
        self.deferred: list[tuple[float, str]] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        seq = 0
        try:
            with SmtpClient("127.0.0.1", self.relay.smtp) as c:
                while not self.stop.is_set():
                    seq += 1
                    while not self.stop.is_set():
                        size = msg_size(seq, self.body)
                        t0 = time.monotonic()
                        try:
                            c.send("ct@hospital.test", [RCPT], message(seq, self.body), size=size)
                        except SmtpError as e:
                            if not e.temporary:
                                raise
                            self.deferred.append((time.monotonic(), str(e)))
                            self.stop.wait(self.retry)
                            continue
                        self.accepted.append((seq, t0, time.monotonic(), size))
                        break
        except BaseException as e:  # noqa: BLE001 (reported by main)
            self.error = e


class Receiver(threading.Thread):
    def __init__(self, relay: Relay, body: bytes, drain: float, tmp: Path) -> None:
        super().__init__(daemon=True)
        self.relay, self.drain, self.tmp = relay, drain, tmp
        self.body_hash = hashlib.sha256(body).hexdigest()
        self.stop = threading.Event()          # stop once the mailbox is empty
        self.received: list[int] = []
        self.corrupted = 0
        self.bytes = 0
        self.busy = 0.0                        # seconds spent draining (fetching or throttling)
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with ImapClient("127.0.0.1", self.relay.imap, timeout=120) as c:
                c.login(RCPT, PASSWORD)
                while True:
                    c.select()
                    uids = c.uid_search("ALL")
                    if not uids:
                        if self.stop.is_set():
                            return
                        time.sleep(0.2)
                        continue
                    for uid in uids[:1]:
                        t0 = time.monotonic()
                        path = self.tmp / "fetched.eml"
                        n = c.fetch_to_file(uid, path)
                        self.check(path)
                        c.delete([uid])
                        self.bytes += n
                        # a slow line: this message takes n / drain seconds in all
                        time.sleep(max(0.0, n / self.drain - (time.monotonic() - t0)))
                        self.busy += time.monotonic() - t0
        except BaseException as e:  # noqa: BLE001 (reported by main)
            self.error = e

    def check(self, path: Path) -> None:
        data = path.read_bytes()
        head, sep, body = data.partition(b"\r\n\r\n")
        seq = [int(line[7:]) for line in head.split(b"\r\n") if line.startswith(b"X-Seq: ")]
        if not sep or len(seq) != 1 or hashlib.sha256(body).hexdigest() != self.body_hash:
            self.corrupted += 1
            return
        self.received.append(seq[0])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--msg", default="50MB", help="message size (default 50MB)")
    ap.add_argument("--quota", default="1GiB")
    ap.add_argument("--soft", default="25%")
    ap.add_argument("--pace-factor", type=float, default=2.0)
    ap.add_argument("--pace-floor", default="5MiB")
    ap.add_argument("--halflife", type=float, default=20.0)
    ap.add_argument("--drain", default="10MB", help="receiver drain rate per second (default 10MB)")
    ap.add_argument("--seconds", type=float, default=150.0, help="how long the sender sends")
    ap.add_argument("--retry", type=float, default=5.0, help="sender's retry delay after a 452")
    ap.add_argument("--max-message", default="256MiB", help="[smtp] max_message_size (min_free_disk = 2x)")
    ap.add_argument("--dir", default=None, help="where the temporary directory goes")
    args = ap.parse_args()
    size, quota, drain = parse_size(args.msg), parse_size(args.quota), parse_size(args.drain)
    soft = configmod.parse_size_or_percent(args.soft, "--soft").resolve(quota)
    body = make_body(size)
    root = Path(tempfile.mkdtemp(prefix="bench-bp-", dir=args.dir))
    relay = Relay(root, args)
    try:
        raw = unpaced_rate(relay, body, 3)
        sender = Sender(relay, body, args.retry)
        receiver = Receiver(relay, body, drain, root)
        peak, samples = 0, []
        t_start = time.monotonic()
        sender.start()
        receiver.start()
        while time.monotonic() - t_start < args.seconds and sender.error is None and receiver.error is None:
            backlog = relay.store.usage(RCPT).bytes
            samples.append((time.monotonic(), backlog))
            peak = max(peak, backlog)
            time.sleep(0.1)
        sender.stop.set()
        sender.join(600)
        receiver.stop.set()
        deadline = time.monotonic() + 3600
        while receiver.is_alive() and time.monotonic() < deadline:
            peak = max(peak, relay.store.usage(RCPT).bytes)
            receiver.join(0.5)
        for who in (sender, receiver):
            if who.error is not None:
                raise who.error
        # the paced window: from 3 drain half-lives after the backlog first crossed the soft
        # backlog (the drain estimate has settled to within ~12%) to the first deferral
        crossed = next((t for t, b in samples if b > soft), None)
        first_deferral = sender.deferred[0][0] if sender.deferred else t_start + args.seconds
        settled = None if crossed is None else crossed + 3 * args.halflife
        window = [(s, e, n) for _, s, e, n in sender.accepted
                  if settled is not None and s >= settled and e <= first_deferral]
        paced = (sum(n for _, _, n in window) / (window[-1][1] - window[0][0])) if len(window) >= 2 else float("nan")
        drained = receiver.bytes / receiver.busy if receiver.busy else float("nan")
        sent = [seq for seq, *_ in sender.accepted]
        lost = len(set(sent) - set(receiver.received))
        dup = len(receiver.received) - len(set(receiver.received))
        print(f"message {size / MB:.0f} MB, quota {quota / MB:.0f} MB, soft backlog {soft / MB:.0f} MB, "
              f"pace_factor {args.pace_factor}, pace_floor {parse_size(args.pace_floor) / MB:.1f} MB/s, "
              f"receiver drain target {drain / MB:.1f} MB/s, {args.seconds:.0f} s of sending")
        print(f"(a) unpaced ingest, same messages      {raw / MB:8.1f} MB/s")
        print(f"    drain rate (IMAP fetch + expunge)  {drained / MB:8.1f} MB/s")
        print(f"    sender rate while paced            {paced / MB:8.1f} MB/s   = {paced / drained:.2f} x drain "
              f"(target {args.pace_factor:.2f}), {paced / raw:.3f} x (a)   [{len(window)} messages]")
        print(f"    peak backlog                       {peak / MB:8.1f} MB    = {peak / soft:.2f} x soft, "
              f"{peak / quota:.2f} x quota")
        print(f"    accepted {len(sent)}, deferred (452) {len(sender.deferred)}, received {len(receiver.received)}, "
              f"lost {lost}, duplicated {dup}, corrupted {receiver.corrupted}")
        return 0 if lost == 0 and dup == 0 and receiver.corrupted == 0 and peak <= quota else 1
    finally:
        err = relay.stop()
        lines = [ln for ln in err.splitlines() if " congested " in ln or "decongested" in ln]
        for ln in lines[:6]:
            print("    log:", ln[:160])
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
