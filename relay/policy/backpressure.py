"""Backpressure: the free-disk guard at RCPT, and pacing of SMTP intake to the rate at which
each congested receiver drains its mailbox (issue 4).

The SMTP server calls (docs/architecture.md, "Policy hooks"):

    policy.check_rcpt(address, declared_size, claim) -> Reply | None   # free disk
    claim = policy.claim_disk(declared_size); claim.wrote(n); claim.release()
    pacer = policy.pacer(recipients); delay = pacer.on_data(nbytes); pacer.close()

Quotas are not the policy's: the store's ledger refuses a recipient at
`Delivery.add_recipient` and a message that grew past a quota (relay/store/api.py). The policy
reads, per recipient, the ledger's backlog (`snapshot(address).backlog_bytes`: stored and
undrained, plus the bytes streaming to it now) and the drain rate: bytes expunged per second
as an exponentially weighted rate
r(t) = sum_i n_i * lam * exp(-lam * (t - t_i)), lam = ln 2 / drain_halflife, fed by the store's
change feed (EXPUNGE). For a steady drain of D bytes/s its mean is D; with no drain it decays
to 0 with the half-life. While the policy has watched for less than a few half-lives (after a
restart) r(t) still underestimates D by the factor 1 - exp(-lam * age); the estimate is
divided by that factor, at most by 2 (so that one early deletion does not look like a fast
receiver).

A recipient whose backlog passes its soft backlog is congested (it leaves congestion below
90% of it, so that one message more or less does not flap). Bytes for a congested recipient are
scheduled on that recipient's own timeline at pace = max(pace_floor, pace_factor x drain rate):
every pacer that feeds it shares the timeline, so the sum of its senders is paced, not each of
them. A message for several recipients waits for the latest of its congested recipients'
timelines: the most congested one sets its pace. Idle time of up to BURST_SECONDS on a
timeline (round trips and the commit between two messages) is credited, so that the average
rate over many messages is the pace rather than the pace minus the protocol's gaps.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from relay.config import Config
from relay.log import get_logger
from relay.protocol.smtp import Reply
from relay.store.api import Change, ChangeKind, LedgerEntry, MessageStore, normalize_address

log = get_logger("policy")

# The two deferrals of the contract (../shared/CONTRACT.md, "SMTP replies"), defined once.
R_OVER_QUOTA = Reply(452, "4.2.2", "Mailbox full, try again later")
R_DISK_LOW = Reply(452, "4.3.1", "Insufficient system storage, try again later")

LEAVE_FRACTION = 0.9       # hysteresis: congestion ends below 90% of the soft backlog
WARMUP_MIN = 0.5           # warm-up correction of the drain estimate: at most x2
BURST_SECONDS = 1.0        # idle time on a recipient's timeline that a sender may make up


@dataclass(frozen=True)
class RecipientStats:
    backlog_bytes: int             # stored and undrained, plus bytes streaming to it now
    backlog_messages: int
    oldest_age_seconds: float      # 0 when empty
    soft_backlog_bytes: int        # 0 = no soft limit (unlimited quota with a percentage)
    drain_rate: float              # bytes/s, EWMA
    pace: float                    # bytes/s the intake is paced to while congested
    congested: bool


@dataclass(frozen=True)
class BackpressureStats:
    recipients: dict[str, RecipientStats]
    drain_rate: dict[str, float]   # mailbox -> bytes/s (relay_mailbox_drain_rate_bytes_per_second)
    paced_seconds: float           # total pause handed to SMTP (relay_backpressure_paced_seconds_total)
    deferrals: dict[str, int]      # reason -> count: quota, quota_end_of_data, disk
    congested_mailboxes: int


class _Recipient:
    """What the policy knows of one mailbox beyond the ledger: its drain rate and pacing."""

    def __init__(self, address: str, since: float) -> None:
        self.address = address
        self.rate = 0.0                # EWMA state at rate_t
        self.rate_t = since
        self.since = since             # when the policy began to watch it
        self.congested = False
        self.next_free = 0.0           # its pacing timeline (clock seconds)


class Pacer:
    """One per message. on_data(nbytes) -> seconds to pause reading before the next read.
    The bytes themselves are in the ledger (the delivery wrote them before on_data)."""

    def __init__(self, policy: Backpressure, recipients: list[_Recipient]) -> None:
        self.policy = policy
        self.recipients = recipients
        self.nbytes = 0
        self.paced = 0.0
        self._closed = False

    def on_data(self, nbytes: int) -> float:
        if self._closed or nbytes <= 0:
            return 0.0
        p = self.policy
        now = p.clock()
        self.nbytes += nbytes
        delay = 0.0
        for r in self.recipients:
            p._update_congestion(r, now)
            if r.congested:
                # gaps shorter than BURST_SECONDS (round trips, the commit's fsync between two
                # messages) are made up, so the average rate is the pace, not less
                r.next_free = max(r.next_free, now - BURST_SECONDS) + nbytes / p.pace(r, now)
                delay = max(delay, r.next_free - now)
        self.paced += delay
        p._paced_seconds += delay
        return delay

    def close(self) -> None:
        """On every terminal outcome (idempotent): the backlog changed (committed or gone)."""
        if self._closed:
            return
        self._closed = True
        now = self.policy.clock()
        for r in self.recipients:
            self.policy._update_congestion(r, now)


class DiskClaim:
    """The part of a message's declared SIZE not yet written (issue 12): free disk space that
    is already promised. One per message (its file is stored once, however many recipients);
    `wrote(n)` as bytes reach the disk, `release()` on every terminal outcome."""

    def __init__(self, policy: Backpressure, declared: int) -> None:
        self.policy = policy
        self.remaining = declared
        policy._claimed += declared

    def wrote(self, nbytes: int) -> None:
        n = min(nbytes, self.remaining)
        self.remaining -= n
        self.policy._claimed -= n

    def release(self) -> None:
        self.policy._claimed -= self.remaining
        self.remaining = 0


def statvfs_free(path: str | os.PathLike[str]) -> Callable[[], int]:
    def probe() -> int:
        st = os.statvfs(path)
        return st.f_bavail * st.f_frsize
    return probe


class Backpressure:
    def __init__(self, config: Config, store: MessageStore, clock: Callable[[], float] = time.monotonic,
                 free_disk: Callable[[], int] | None = None) -> None:
        self.config = config
        self.store = store
        self.clock = clock
        self.free_disk = free_disk or statvfs_free(config.data_dir)
        bp = config.backpressure
        self.lam = math.log(2) / bp.drain_halflife if bp.drain_halflife > 0 else math.inf
        self._recipients: dict[str, _Recipient] = {}
        self._started = clock()        # the change feed covers every mailbox from here
        self._paced_seconds = 0.0
        self._claimed = 0                             # declared bytes of open messages not yet written
        self._deferrals = {"quota": 0, "quota_end_of_data": 0, "disk": 0}
        self._unsubscribe: Callable[[], None] | None = store.changes.subscribe(None, self._on_change)

    # --- per-recipient state -------------------------------------------------------------
    def _recipient(self, address: str) -> _Recipient:
        r = self._recipients.get(address)
        if r is None:
            r = self._recipients[address] = _Recipient(address, self._started)
        return r

    def _entry(self, r: _Recipient) -> LedgerEntry | None:
        return self.store.ledger.snapshot(r.address)

    def _on_change(self, change: Change) -> None:
        now = self.clock()
        r = self._recipient(change.address)
        if change.kind is ChangeKind.EXPUNGE:
            r.rate = r.rate * math.exp(-self.lam * max(0.0, now - r.rate_t)) + change.nbytes * self.lam
            r.rate_t = now
        self._update_congestion(r, now)

    def soft_backlog(self, entry: LedgerEntry | None) -> int:
        sb = self.config.backpressure.soft_backlog
        if sb.percent is not None:
            return sb.resolve(entry.quota_bytes) if entry is not None and entry.quota_bytes else 0
        return sb.resolve(0)

    def _update_congestion(self, r: _Recipient, now: float) -> None:
        entry = self._entry(r)
        soft = self.soft_backlog(entry)
        backlog = entry.backlog_bytes if entry is not None else 0
        if not soft:
            congested = False
        elif r.congested:
            congested = backlog >= soft * LEAVE_FRACTION
        else:
            congested = backlog > soft
        if congested != r.congested:
            r.congested = congested
            r.next_free = now
            log.info("congested" if congested else "decongested", mailbox=r.address, backlog=backlog,
                     soft_backlog=soft, drain_rate=round(self.drain_rate(r, now)),
                     pace=round(self.pace(r, now)))

    def drain_rate(self, r: _Recipient, now: float) -> float:
        """Bytes/s drained by this receiver, smoothed with the configured half-life."""
        if math.isinf(self.lam):
            return 0.0
        warmed = max(WARMUP_MIN, 1.0 - math.exp(-self.lam * max(0.0, now - r.since)))
        return r.rate * math.exp(-self.lam * max(0.0, now - r.rate_t)) / warmed

    def pace(self, r: _Recipient, now: float) -> float:
        bp = self.config.backpressure
        return max(float(bp.pace_floor), bp.pace_factor * self.drain_rate(r, now), 1.0)

    # --- the hooks -------------------------------------------------------------------------

    def check_rcpt(self, address: str, declared_size: int | None,
                   claim: DiskClaim | None = None) -> Reply | None:
        """None = accept. 452 4.3.1 when free disk, less what messages in progress declared
        and have not written yet, would fall below min_free_disk. `claim`: this message's own
        claim (a second recipient of the same message is not counted twice). (Quotas: the
        store's ledger, at Delivery.add_recipient.)"""
        size = declared_size or 0
        try:
            free = self.free_disk()
        except OSError as e:
            log.warning("statvfs-failed", error=e.strerror)
            free = None
        promised = self._claimed - (claim.remaining if claim is not None else 0)
        if free is not None and free - promised - (0 if claim is not None else size) < self.config.min_free_disk:
            self.deferred("disk", address, free=free, size=size, promised=promised)
            return R_DISK_LOW
        return None

    def claim_disk(self, declared: int) -> DiskClaim:
        """Count a message's declared SIZE as promised disk space until it is written."""
        return DiskClaim(self, declared)

    def pacer(self, recipients: list[str]) -> Pacer:
        return Pacer(self, [self._recipient(normalize_address(a)) for a in dict.fromkeys(recipients)])

    def deferred(self, reason: str, mailbox: str, **fields: object) -> None:
        """Count and log one deferral (reason: quota, quota_end_of_data, disk). The SMTP
        server calls it when the ledger refuses a recipient (quota) or a message that grew
        past a quota (quota_end_of_data), and when the disk filled up (disk)."""
        self._deferrals[reason] = self._deferrals.get(reason, 0) + 1
        log.info("deferred", reason=reason, mailbox=mailbox, **fields)

    # --- statistics ------------------------------------------------------------------------

    def statistics(self) -> BackpressureStats:
        now = self.clock()
        ledger = self.store.ledger.statistics().mailboxes
        recips = {}
        for a, m in self.store.statistics().mailboxes.items():     # every account
            entry = ledger.get(a)
            if entry is None:                                      # deleted meanwhile
                continue
            r = self._recipient(a)
            recips[a] = RecipientStats(entry.backlog_bytes, entry.stored_messages, m.oldest_age_seconds,
                                       self.soft_backlog(entry), self.drain_rate(r, now), self.pace(r, now),
                                       r.congested)
        return BackpressureStats(recips, {a: s.drain_rate for a, s in recips.items()}, self._paced_seconds,
                                 dict(self._deferrals), sum(1 for s in recips.values() if s.congested))

    def close(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
