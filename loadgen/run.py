"""`loadgen run`: replay a period of the model against SMTP + IMAP/POP3 and verify every message.

Threads, not asyncio: the project's clients (relay.clients.smtp/imap/pop3) are blocking and
stream in big reads, the fastest receive path in Python; one thread per sending participant and
one per receiving participant, so a slow receiver slows only itself. Time: a study the model
places at simulated time t is due at wall time (t - period start) / speedup. Bytes: every
message is `scale` x its modelled size; bandwidths are paced at bandwidth x speedup x scale so
transfers take their simulated share of time at any scale.

Senders behave like an MTA queue: a 4xx reply (or a broken connection) defers the message,
which is retried after the profile's retry_after (simulated) while the sender goes on with its
next message; a 5xx refuses it. Receivers download to disk, verify the message against its own
digest header, delete it on the server, and pace themselves to their downlink.

Ctrl-C once: senders stop after the message in hand, receivers drain what was accepted, the
report is written. Twice: receivers stop too (what was not drained counts as lost).
"""

from __future__ import annotations

import argparse
import functools
import heapq
import itertools
import json
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

from loadgen import model as modelmod
from loadgen import report
from loadgen.message import Message, PgpPool, Pool, Verdict, build_study, verify_file
from loadgen.profile import Profile, ProfileError, load_profile

MIN_WAIT = 0.5             # seconds: the shortest wall-clock poll interval / retry delay
IDLE_SLICE = 0.5           # seconds: IMAP IDLE is re-issued this often to check for the end
# seconds: the longest silence on a receiver's session while its download is paced; a NOOP
# follows each (servers log out idle clients: RFC 1939 3 after >= 10 min, RFC 9051 5.4 after
# >= 30 min, and a POP3 session that is cut before QUIT loses its DELEs).
KEEPALIVE = 60.0


# --- the ledger ----------------------------------------------------------------------------

class Ledger:
    """Every message's fate, shared by all threads (one lock)."""

    def __init__(self, records: dict[str, report.Record], t0: float) -> None:
        self.records = records
        self.events: list[report.Event] = []
        self.t0 = t0
        self.lock = threading.Lock()
        self.outstanding: dict[str, int] = {}        # recipient -> accepted, not yet delivered
        # ids are "<run id>.<study>.<piece>": a message of another run (left in a mailbox of an
        # external server by an interrupted run) is recognised as such, not as corruption
        self.run_ids = {mid.partition(".")[0] for mid in records}

    def now(self) -> float:
        return time.monotonic() - self.t0

    def _event(self, kind: str, nbytes: int = 0, who: str = "", detail: str = "",
               t0: float | None = None) -> None:
        self.events.append(report.Event(self.now(), kind, nbytes, who, detail, t0))

    def _accept(self, r: report.Record, t0: float | None = None) -> None:
        if r.accepted is None:
            r.accepted = self.now()
            self._event("accepted", r.size, r.recipient, t0=t0)
            self.outstanding[r.recipient] = self.outstanding.get(r.recipient, 0) + 1

    def attempt(self, mid: str) -> None:
        with self.lock:
            self.records[mid].attempts += 1

    def accepted(self, mid: str, t0: float | None = None) -> None:
        """The 250 for `mid`; `t0` (ledger time) is when its SMTP session began."""
        with self.lock:
            self._accept(self.records[mid], t0)

    def deferred(self, mid: str, reply: str) -> None:
        with self.lock:
            self._event("deferred", 0, self.records[mid].recipient, reply)

    def refused(self, mid: str, reply: str) -> None:
        with self.lock:
            r = self.records[mid]
            r.refused = reply
            self._event("refused", 0, r.recipient, reply)

    def error(self, who: str, detail: str) -> None:
        with self.lock:
            self._event("error", 0, who, detail)

    def delivered(self, who: str, v: Verdict, t0: float | None = None) -> str:
        """A download verified against its digest header (begun at ledger time `t0`);
        returns the outcome."""
        with self.lock:
            r = self.records.get(v.id or "")
            if r is None and v.ok and v.id and v.id.partition(".")[0] not in self.run_ids:
                self._event("stale", v.size, who, f"{v.id}: left by an earlier run")
                return "stale"
            if not v.ok or r is None or r.recipient != who:
                why = v.reason or ("unknown message id" if r is None else f"for {r.recipient}")
                self._event("corrupted", v.size, who, f"{v.id}: {why}")
                return "corrupted"
            self._accept(r)                # the 250 may still be on its way to the sender
            r.deliveries += 1
            if r.deliveries > 1:
                self._event("duplicated", r.size, who, r.id)
                return "duplicated"
            r.delivered = self.now()
            self.outstanding[who] -= 1
            self._event("delivered", r.size, who, t0=t0)
            return "delivered"

    def waiting_for(self, who: str) -> int:
        with self.lock:
            return self.outstanding.get(who, 0)

    def totals(self) -> dict[str, int]:
        with self.lock:
            c: dict[str, int] = {"accepted_bytes": 0, "delivered_bytes": 0}
            for e in self.events:
                c[e.kind] = c.get(e.kind, 0) + 1
                if e.kind in ("accepted", "delivered"):
                    c[f"{e.kind}_bytes"] += e.nbytes
            c["backlog"] = sum(self.outstanding.values())
            return c


# --- servers -------------------------------------------------------------------------------

@dataclass
class Endpoints:
    smtp: tuple[str, int]
    imap: tuple[str, int] | None
    pop3: tuple[str, int] | None
    passwords: dict[str, str]
    tls: bool = False
    description: str = ""


class StartError(RuntimeError):
    """The relay loadgen starts for itself did not come up."""


class OwnRelay:
    """`relay serve` as a subprocess on a temporary data dir, ports chosen by the kernel. The
    participants' accounts are added with the store API while it runs (as `relay user add`
    would), so our password hashing overlaps the relay's first-login verifications."""

    def __init__(self, data_dir: Path, quota: int | None = None) -> None:
        from relay import config as configmod

        self.data_dir = data_dir
        self.password = secrets.token_urlsafe(12)
        data_dir.mkdir(parents=True, exist_ok=True)
        cfg_path = data_dir.parent / "relay.toml"
        cfg_path.write_text(
            f'data_dir = "{data_dir}"\nhostname = "relay.loadgen.test"\ngrace_period = 10\n'
            '[smtp]\nlisten = ["127.0.0.1:0"]\n[imap]\nlisten = ["127.0.0.1:0"]\n'
            '[pop3]\nlisten = ["127.0.0.1:0"]\n[metrics]\nlisten = "127.0.0.1:0"\n'
            + (f"[quota]\ndefault_bytes = {quota}\n" if quota is not None else ""))
        self.config = configmod.load(cfg_path)
        self.log = open(data_dir.parent / "relay.log", "wb")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen([sys.executable, "-m", "relay", "serve", "--config", str(cfg_path)],
                                     stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)    # Ctrl-C is ours to handle
        listeners = data_dir / "run" / "listeners.json"
        deadline = time.monotonic() + 60
        while not listeners.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                # the log goes with the temporary work dir: say what it says
                tail = Path(self.log.name).read_bytes()[-2000:].decode("utf-8", "replace").strip()
                raise StartError(f"relay serve did not start (exit status {self.proc.returncode}); "
                                 f"its log ends:\n{tail or '(empty)'}")
            time.sleep(0.05)
        bound = json.loads(listeners.read_text())
        self.endpoints = Endpoints((bound["smtp"][0][0], bound["smtp"][0][1]),
                                   (bound["imap"][0][0], bound["imap"][0][1]),
                                   (bound["pop3"][0][0], bound["pop3"][0][1]), {},
                                   description=f"own relay (pid {self.proc.pid}, {data_dir})")

    def add_account(self, address: str) -> None:
        from relay.store import Store

        if not hasattr(self, "store"):
            self.store = Store.open(self.config)
        self.store.accounts.add(address, self.password)
        self.endpoints.passwords[address] = self.password

    def stop(self) -> None:
        if hasattr(self, "store"):
            self.store.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()


def external_endpoints(args: argparse.Namespace, addresses: list[str]) -> Endpoints:
    if not (args.imap or args.pop3):
        raise ProfileError("--smtp needs --imap and/or --pop3 for the receivers")
    passwords: dict[str, str] = {}
    if args.credentials:
        for n, line in enumerate(Path(args.credentials).read_text().splitlines(), 1):
            if line.strip() and not line.lstrip().startswith("#"):
                parts = line.split(None, 1)
                if len(parts) != 2:
                    raise ProfileError(f"{args.credentials}:{n}: expected 'address password'")
                passwords[parts[0]] = parts[1].strip()
    missing = [a for a in addresses if a not in passwords and args.password is None]
    if missing:
        raise ProfileError(f"no password for {', '.join(missing[:5])}"
                           f"{' ...' if len(missing) > 5 else ''} (--password or --credentials)")
    for a in addresses:
        passwords.setdefault(a, args.password)
    desc = f"smtp {args.smtp[0]}:{args.smtp[1]}" + (f", imap {args.imap[0]}:{args.imap[1]}" if args.imap else "") \
        + (f", pop3 {args.pop3[0]}:{args.pop3[1]}" if args.pop3 else "")
    return Endpoints(args.smtp, args.imap, args.pop3, passwords, args.tls, desc)


# --- the run -----------------------------------------------------------------------------

@dataclass
class Plan:
    profile: Profile
    model: modelmod.Model
    period: str
    sim_start: float
    sim_length: float
    speedup: float
    scale: float
    messages: list[tuple[float, Message]] = field(default_factory=list)   # (due wall s, message)


def make_plan(profile: Profile, m: modelmod.Model, period: str, speedup: float | None,
              scale: float, pool_dir: Path, run_id: str) -> tuple[Plan, Pool]:
    start, length, studies = m.studies_in(period)
    speedup = speedup or length / 570.0           # the period in 9.5 min, 30 s left to drain
    largest = max((int(s.email_bytes * scale / s.pieces) for s in studies), default=4096)
    pool = Pool.build(pool_dir, largest, m.profile.seed)
    largest_pgp = max((int(s.email_bytes * scale) for s in studies if s.pgp), default=0)
    pgp = PgpPool.build(pool_dir / "pgp", largest_pgp, m.profile.seed) if largest_pgp else None
    plan = Plan(profile, m, period, start, length, speedup, scale)
    for s in studies:
        due = (s.t - start) / speedup
        for msg in build_study(run_id, s.n, s.sender, s.recipient, s.modality,
                               max(1, int(s.email_bytes * scale)), s.pieces, pool, s.t,
                               pgp if s.pgp else None):
            plan.messages.append((due, msg))
    plan.messages.sort(key=lambda x: x[0])
    return plan, pool


def _paced(chunks: Iterator[bytes], rate: float, stop: threading.Event) -> Iterator[bytes]:
    """Yield chunks no faster than `rate` bytes per second on average, cut to about a second's
    worth each (at least 64 KiB): a slow uplink streams, rather than sending 8 MiB and then
    falling silent for longer than the server's data timeout (RFC 5321 4.5.3.2.6: 3 min)."""
    t0 = time.monotonic()
    sent = 0
    piece = max(64 * 1024, int(rate))
    for chunk in chunks:
        for i in range(0, len(chunk), piece) if len(chunk) > piece else (0,):
            part = chunk[i:i + piece] if len(chunk) > piece else chunk
            yield part
            sent += len(part)
            ahead = t0 + sent / rate - time.monotonic()
            if ahead > 0:
                stop.wait(ahead)


class Run:
    def __init__(self, plan: Plan, ep: Endpoints, work: Path, drain_timeout: float) -> None:
        self.plan, self.ep, self.work = plan, ep, work
        self.drain_timeout = drain_timeout
        self.stop_senders = threading.Event()
        self.stop_all = threading.Event()
        self.senders_done = threading.Event()
        self.drain_deadline = float("inf")
        records = {msg.id: report.Record(msg.id, msg.sender, msg.recipient, msg.size, due)
                   for due, msg in plan.messages}
        self.t0 = time.monotonic()
        self.ledger = Ledger(records, self.t0)
        self.downloads = work / "downloads"
        self.downloads.mkdir(parents=True, exist_ok=True)
        # receiver -> server ids (POP3 UIDL, IMAP "UIDVALIDITY:UID") of messages verified whose
        # deletion the server has not confirmed yet: after a broken session a real client knows
        # them (fetchmail's UIDL list) and only deletes them; downloaded again, they would count
        # as duplicated although the server kept them only because our delete never arrived
        self.unconfirmed: dict[str, set[str]] = {}

    # senders --------------------------------------------------------------------------------
    def _send_one(self, msg: Message) -> str:
        from relay.clients.smtp import SmtpClient, SmtpError

        g = self.plan.model.by_address[msg.sender].group
        rate = g.uplink * self.plan.speedup * self.plan.scale
        self.ledger.attempt(msg.id)
        t0 = self.ledger.now()
        try:
            with SmtpClient(*self.ep.smtp, timeout=600) as c:
                c.ehlo()
                if self.ep.tls:
                    c.starttls()
                c.login(msg.sender, self.ep.passwords[msg.sender])
                c.send(msg.sender, [msg.recipient], _paced(msg.chunks(8 * 1024 * 1024), rate,
                                                           self.stop_all), size=msg.size)
        except SmtpError as e:
            reply = str(e.reply)
            if e.temporary or e.reply.code == 0:
                self.ledger.deferred(msg.id, reply)
                return "deferred"
            self.ledger.refused(msg.id, reply)
            return "refused"
        except OSError as e:
            self.ledger.error(msg.sender, f"{msg.id}: {e!r}")
            return "deferred"
        self.ledger.accepted(msg.id, t0)
        return "accepted"

    def _sender(self, queue: list[tuple[float, int, Message]]) -> None:
        retry_wall = max(MIN_WAIT, self.plan.profile.retry_after / self.plan.speedup)
        lifetime_wall = self.plan.profile.queue_lifetime / self.plan.speedup
        first_due = {msg.id: due for due, _, msg in queue}
        heapq.heapify(queue)
        seq = itertools.count(len(queue))
        while queue and not self.stop_senders.is_set():
            due, _, msg = queue[0]
            wait = due - (time.monotonic() - self.t0)
            if wait > 0:
                self.stop_senders.wait(wait)
                continue
            heapq.heappop(queue)
            if self._send_one(msg) != "deferred":
                continue
            now = time.monotonic() - self.t0
            if now + retry_wall - first_due[msg.id] > lifetime_wall:     # an MTA bounces it
                self.ledger.refused(msg.id, f"expired after {self.plan.profile.queue_lifetime:g} s "
                                            "(simulated) in the queue")
            else:
                heapq.heappush(queue, (now + retry_wall, next(seq), msg))

    # receivers ------------------------------------------------------------------------------
    def _finished(self, who: str) -> bool:
        if self.stop_all.is_set():
            return True
        if not self.senders_done.is_set():
            return False
        done = self.ledger.waiting_for(who) == 0 and not self.unconfirmed.get(who)
        return done or time.monotonic() > self.drain_deadline

    def _take(self, who: str, key: str, path: Path, download: Callable[[Path], int], rate: float,
              keepalive: Callable[[], object]) -> None:
        """Download the message the server knows as `key` into `path`, verify and record it
        (once per key until its deletion is confirmed), then hold the session until the
        receiver's downlink would have carried it, with a `keepalive()` (NOOP) every
        KEEPALIVE seconds."""
        unconfirmed = self.unconfirmed.setdefault(who, set())
        if key in unconfirmed:
            return
        t_start = time.monotonic()
        try:
            nbytes = download(path)
            verdict = verify_file(path)
        finally:
            path.unlink(missing_ok=True)        # also what a broken download left
        self.ledger.delivered(who, verdict, t_start - self.ledger.t0)
        unconfirmed.add(key)
        end = t_start + nbytes / rate
        while (ahead := end - time.monotonic()) > 0:
            if self.stop_all.wait(min(ahead, KEEPALIVE)):
                return
            if end - time.monotonic() > 0:
                keepalive()

    def _receiver(self, who: str) -> None:
        g = self.plan.model.by_address[who].group
        rate = g.downlink * self.plan.speedup * self.plan.scale
        interval = max(MIN_WAIT, g.poll_interval / self.plan.speedup)
        mode = g.receive
        if mode == "pop3" and self.ep.pop3 is None:
            mode = "imap-poll"
        elif mode.startswith("imap") and self.ep.imap is None:
            mode = "pop3"
        folder = self.downloads / who
        folder.mkdir(exist_ok=True)
        while not self._finished(who):
            try:
                if mode == "pop3":
                    self._pop3_round(who, folder, rate)
                    self.stop_all.wait(interval)
                else:
                    self._imap_session(who, folder, rate, idle=mode == "imap-idle", interval=interval)
            except Exception as e:  # noqa: BLE001 (a receiver reconnects on any failure)
                self.ledger.error(who, repr(e))
                self.stop_all.wait(max(interval, 0.2))

    def _forget_gone(self, who: str, listed: set[str]) -> None:
        """Verified messages the server no longer lists were deleted after all (the reply to
        our QUIT or EXPUNGE was what got lost)."""
        if who in self.unconfirmed:
            self.unconfirmed[who] &= listed

    def _pop3_round(self, who: str, folder: Path, rate: float) -> None:
        from relay.clients.pop3 import Pop3Client

        with Pop3Client(*self.ep.pop3, timeout=600, starttls=self.ep.tls) as c:  # type: ignore[misc]
            c.login(who, self.ep.passwords[who])
            listing = c.uidl()
            self._forget_gone(who, set(listing.values()))
            for n, uidl in listing.items():
                self._take(who, uidl, folder / f"{uidl}.eml",
                           functools.partial(c.retr_to_file, n), rate, c.noop)
                c.dele(n)
                if self.stop_all.is_set():
                    break
            c.quit()                            # the DELEs take effect here (RFC 1939 6)
            self.unconfirmed.pop(who, None)

    def _imap_session(self, who: str, folder: Path, rate: float, idle: bool, interval: float) -> None:
        import ssl

        from relay.clients.imap import ImapClient

        ctx = ssl.create_default_context() if self.ep.tls else None
        with ImapClient(*self.ep.imap, timeout=600, ssl_context=ctx, starttls=self.ep.tls) as c:  # type: ignore[misc]
            c.login(who, self.ep.passwords[who])
            c.select()
            while not self._finished(who):
                uids = c.uid_search("ALL")      # with any we flagged \Deleted but could not expunge
                self._forget_gone(who, {f"{c.uidvalidity}:{uid}" for uid in uids})
                for uid in uids:
                    key = f"{c.uidvalidity}:{uid}"
                    self._take(who, key, folder / f"{uid}.eml",
                               functools.partial(c.fetch_to_file, uid), rate, c.noop)
                    c.delete([uid])
                    self.unconfirmed[who].discard(key)
                    if self.stop_all.is_set():
                        break
                if not idle:
                    break                       # imap-poll: one session per poll
                if not uids:
                    c.wait_exists(timeout=IDLE_SLICE)
            c.logout()
        if not idle:
            self.stop_all.wait(interval)

    # the whole run --------------------------------------------------------------------------
    def warm_up(self, addresses: list[str], create: Callable[[str], None] | None = None) -> None:
        """Log every participant in once before the clock starts: a server's first login per
        account costs a password-hash verification (argon2 on the relay, ~0.1-0.5 s of CPU),
        which at a month's speed-up would be simulated hours; in a real network these logins
        are long done. `create(address)` first makes the account (our own relay)."""
        from concurrent.futures import ThreadPoolExecutor

        from relay.clients.imap import ImapClient
        from relay.clients.pop3 import Pop3Client

        def login(who: str) -> None:
            if self.ep.pop3 is not None:
                with Pop3Client(*self.ep.pop3, timeout=120, starttls=self.ep.tls) as c:
                    c.login(who, self.ep.passwords[who])
                    c.quit()
            else:
                import ssl

                ctx = ssl.create_default_context() if self.ep.tls else None
                with ImapClient(*self.ep.imap, timeout=120, ssl_context=ctx, starttls=self.ep.tls) as c:  # type: ignore[misc]
                    c.login(who, self.ep.passwords[who])
                    c.logout()

        with ThreadPoolExecutor(4) as ex:
            futures = []
            for a in addresses:
                if create is not None:
                    create(a)
                futures.append(ex.submit(login, a))
            for f in futures:
                f.result()

    def execute(self, progress: bool) -> report.RunData:
        per_sender: dict[str, list[tuple[float, int, Message]]] = {}
        for i, (due, msg) in enumerate(self.plan.messages):
            per_sender.setdefault(msg.sender, []).append((due, i, msg))
        receivers = sorted({msg.recipient for _, msg in self.plan.messages})
        self.t0 = self.ledger.t0 = time.monotonic()
        senders = [threading.Thread(target=self._sender, args=(q,), name=f"send {a}", daemon=True)
                   for a, q in per_sender.items()]
        recv = [threading.Thread(target=self._receiver, args=(a,), name=f"recv {a}", daemon=True)
                for a in receivers]
        for t in senders + recv:
            t.start()
        interrupted = False
        with _Progress(self, progress) as show:
            while any(t.is_alive() for t in recv):
                try:
                    if not self.senders_done.is_set() and not any(t.is_alive() for t in senders):
                        self.drain_deadline = time.monotonic() + self.drain_timeout
                        self.senders_done.set()
                    show.update(interrupted)
                    time.sleep(0.25)
                except KeyboardInterrupt:
                    if interrupted:
                        self.stop_all.set()
                    interrupted = True
                    self.stop_senders.set()
        for t in senders + recv:
            t.join(5)
        wall = time.monotonic() - self.t0
        return report.RunData(meta={}, records=list(self.ledger.records.values()),
                              events=sorted(self.ledger.events, key=lambda e: e.t),
                              wall_seconds=wall, interrupted=interrupted)


class _Progress:
    """A live line with rich when stdout is a terminal; nothing otherwise."""

    def __init__(self, run: Run, enabled: bool) -> None:
        self.run = run
        self.enabled = enabled and sys.stdout.isatty()
        self.live: Any = None
        self.last = (time.monotonic(), 0)

    def __enter__(self) -> Self:
        if self.enabled:
            from rich.live import Live

            self.live = Live(refresh_per_second=4, transient=False)
            self.live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live is not None:
            self.live.__exit__(None, None, None)

    def update(self, interrupted: bool) -> None:
        if self.live is None:
            return
        from rich.text import Text

        r, p = self.run, self.run.plan
        c = r.ledger.totals()
        now = time.monotonic()
        t_last, b_last = self.last
        mbs = (c["accepted_bytes"] - b_last) / max(1e-6, now - t_last) / 1e6
        self.last = (now, c["accepted_bytes"])
        sim = p.sim_start + (now - r.t0) * p.speedup
        day, rest = divmod(int(sim), 86400)
        backlog = c["accepted_bytes"] - c["delivered_bytes"]
        line = Text()
        line.append(f"day {day + 1} {rest // 3600:02d}:{rest % 3600 // 60:02d}", style="bold")
        line.append(f"  accepted {c.get('accepted', 0)}/{len(p.messages)}  delivered {c.get('delivered', 0)}"
                    f"  {mbs:.0f} MB/s  backlog {c['backlog']} ({report.fmt_bytes(backlog)})")
        trouble = c.get("deferred", 0) + c.get("refused", 0) + c.get("error", 0)
        line.append(f"  deferred {c.get('deferred', 0)}  refused {c.get('refused', 0)}  errors {c.get('error', 0)}",
                    style="yellow" if trouble else "")
        if c.get("corrupted", 0) or c.get("duplicated", 0):
            line.append(f"  corrupted {c.get('corrupted', 0)}  duplicated {c.get('duplicated', 0)}", style="bold red")
        if interrupted:
            line.append("\ninterrupted: senders stopped, draining what was accepted (Ctrl-C again to stop)",
                        style="yellow")
        self.live.update(line)


def main(args: argparse.Namespace) -> int:
    profile = load_profile(args.profile, args.pgp_share).scaled(args.participants_scale)
    m = modelmod.build(profile, args.seed)
    _, length, studies = m.studies_in(args.period)
    involved = sorted({a for s in studies for a in (s.sender, s.recipient)})
    if args.smtp is None and (args.imap or args.pop3):
        raise ProfileError("--imap/--pop3 need --smtp (without any: a relay of our own)")
    if args.smtp is not None and args.quota is not None:
        raise ProfileError("--quota is for the relay loadgen starts; set quotas on your own server")
    ep = external_endpoints(args, involved) if args.smtp else None
    report_dir = Path(args.report or f"loadgen-report-{profile.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    keep_work = args.work_dir is not None
    work = Path(args.work_dir) if keep_work else Path(tempfile.mkdtemp(prefix="loadgen-"))
    work.mkdir(parents=True, exist_ok=True)
    run_id = f"lg{uuid.uuid4().hex[:8]}"
    own: OwnRelay | None = None
    try:
        t = time.monotonic()
        plan, pool = make_plan(profile, m, args.period, args.speedup, args.scale, work / "pool", run_id)
        print(f"loadgen: {profile.name}, {args.period} ({len(studies)} studies, {len(plan.messages)} "
              f"messages, {report.fmt_bytes(sum(x.size for _, x in plan.messages))}), x{plan.speedup:g}, "
              f"scale {args.scale:g}; pool {report.fmt_bytes(pool.bytes)} in {time.monotonic() - t:.1f} s",
              flush=True)
        if ep is None:
            own = OwnRelay(work / "relay" / "data", args.quota)
            ep = own.endpoints
        run = Run(plan, ep, work, args.drain_timeout)
        t = time.monotonic()
        run.warm_up(involved, own.add_account if own else None)
        print(f"loadgen: {len(involved)} participants {'created and ' if own else ''}logged in "
              f"({time.monotonic() - t:.1f} s); running against {ep.description}", flush=True)
        data = run.execute(not args.no_progress)
    finally:
        if own is not None:
            own.stop()
        if not keep_work:
            shutil.rmtree(work, ignore_errors=True)
    data.meta = {"profile": profile.name, "period": args.period, "speedup": plan.speedup,
                 "scale": args.scale, "seed": profile.seed if args.seed is None else args.seed,
                 "participants": len(m.participants), "server": ep.description, "run_id": run_id,
                 "sim_start": plan.sim_start, "sim_length": length,
                 "participants_scale": args.participants_scale,
                 "pgp_messages": sum(1 for s in studies if s.pgp),
                 "downlink_as_run": {a: m.by_address[a].group.downlink * plan.speedup * args.scale
                                     for a in involved}}
    fig = report.write(data, report_dir)
    ok = fig["lost"] == fig["duplicated"] == fig["corrupted"] == 0 and fig["complete"]
    print(f"loadgen: {'PASS' if ok else 'FAIL'}: {fig['delivered']}/{fig['planned']} delivered, "
          f"lost {fig['lost']}, duplicated {fig['duplicated']}, corrupted {fig['corrupted']}, "
          f"deferred {fig['deferred']}, refused {fig['refused']}; "
          f"{report.fmt_bytes(fig['bytes_sent'])} in {fig['wall_seconds']:.1f} s "
          f"({fig['mean_mb_per_s']:.0f} MB/s, peak {fig['peak_mb_per_s']:.0f}); report in {report_dir}/")
    return 0 if ok else 1

