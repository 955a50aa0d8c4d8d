"""A fast sender and a slow receiver in simulated time: the policy against a real store.

Fake clock, fake drain (the receiver expunges one message every MSG/DRAIN seconds), real
deliveries and expunges. Sizes are scaled down so that the test writes only a few MB."""

from __future__ import annotations

import asyncio
from pathlib import Path

from relay import config as configmod
from relay.policy.backpressure import R_OVER_QUOTA, Backpressure
from relay.store.api import Envelope, QuotaExceeded
from relay.store.maildir.backend import MaildirStore

KiB = 1024
MSG = 64 * KiB                 # message size
QUOTA = 2048 * KiB             # soft backlog 25% = 512 KiB
DRAIN = 8 * KiB                # receiver drains 8 KiB/s: one message per 8 s
FACTOR = 2.0
FLOOR = 2 * KiB
RAW = 1024 * KiB               # what the sender could do unpaced
CHUNK = 8 * KiB
RETRY = 30.0                   # the sending MTA's retry after a 452
RCPT = "practice@example.test"


class Sim:
    def __init__(self, tmp_path: Path, factor: float = FACTOR) -> None:
        cfg = configmod.from_dict({
            "data_dir": str(tmp_path / "data"),
            "quota": {"default_bytes": QUOTA},
            "backpressure": {"soft_backlog": "25%", "pace_factor": factor, "pace_floor": FLOOR,
                             "min_free_disk": 0, "drain_halflife": 20.0}})
        self.api = MaildirStore(cfg)           # what the SMTP server and the policy use
        self.store = self.api.engine           # the receiver reads the Maildir directly
        self.store.accounts.add(RCPT)
        self.t = 0.0
        self.policy = Backpressure(cfg, self.api, clock=lambda: self.t, free_disk=lambda: 1 << 40)
        self.seq = 0
        self.sent: list[int] = []            # committed sequence numbers
        self.received: list[int] = []
        self.deferred: list[tuple[float, str]] = []
        self.trace: list[tuple[float, int]] = []   # (time, bytes streamed so far)
        self.streamed = 0
        self.max_backlog = 0
        self.msg: dict | None = None          # type: ignore[type-arg]

    # the sending MTA: one message at a time, retry after a deferral; in between, what the
    # SMTP server does (policy at RCPT, the delivery reserves in the ledger, commit)
    def sender_step(self) -> float:
        if self.msg is None:
            reply = self.policy.check_rcpt(RCPT, MSG)
            d = self.api.begin_delivery(Envelope("ct@hospital.test"))
            if reply is None and asyncio.run(d.add_recipient(RCPT, MSG)) is not None:
                reply = R_OVER_QUOTA
                self.policy.deferred("quota", RCPT)
            if reply is not None:
                d.abort()
                self.deferred.append((self.t, f"{reply.code} {reply.enhanced}"))
                return self.t + RETRY
            self.seq += 1
            asyncio.run(d.start())
            d.write(b"Seq: %08d\r\n\r\n" % self.seq)
            self.msg = {"seq": self.seq, "delivery": d, "left": MSG, "pacer": self.policy.pacer([RCPT])}
            return self.t
        m = self.msg
        n = min(CHUNK, m["left"])
        m["delivery"].write(b"x" * n)
        m["left"] -= n
        self.streamed += n
        self.trace.append((self.t, self.streamed))
        delay = m["pacer"].on_data(n)
        if m["left"]:
            return self.t + n / RAW + delay
        reply = None
        try:
            asyncio.run(m["delivery"].commit())
            self.sent.append(m["seq"])
        except QuotaExceeded:
            reply = R_OVER_QUOTA
            self.policy.deferred("quota_end_of_data", RCPT)
            m["delivery"].abort()
            self.deferred.append((self.t, f"{reply.code} {reply.enhanced}"))
        m["pacer"].close()
        self.msg = None
        return self.t + n / RAW + delay + (0 if reply is None else RETRY)

    # the slow receiver: fetch the oldest message, check it, delete it
    def receiver_step(self) -> float:
        mb = self.store.mailbox(RCPT)
        msgs = mb.messages()
        if not msgs:
            return self.t + 1.0
        data = mb.path(msgs[0].uid).read_bytes()
        self.received.append(int(data.split(b"Seq: ", 1)[1][:8]))
        mb.expunge([msgs[0].uid])
        return self.t + msgs[0].size / DRAIN

    def hang_up(self) -> None:
        """The sender goes away mid-message: the SMTP server aborts it."""
        if self.msg is not None:
            self.msg["delivery"].abort()
            self.msg["pacer"].close()
            self.msg = None

    def run(self, until: float, sending: bool = True) -> None:
        s_next, r_next = self.t, self.t
        while self.t < until:
            if sending and s_next <= r_next:
                self.t = s_next
                s_next = self.sender_step()
            else:
                self.t = r_next
                r_next = self.receiver_step()
            self.max_backlog = max(self.max_backlog, self.store.usage(RCPT).bytes)
            if not sending and not self.store.mailbox(RCPT).messages():
                break

    def rate(self, t0: float, t1: float) -> float:
        pts = [(t, b) for t, b in self.trace if t0 <= t <= t1]
        return (pts[-1][1] - pts[0][1]) / (pts[-1][0] - pts[0][0])


def test_slow_receiver_paces_then_defers_and_loses_nothing(tmp_path: Path) -> None:
    sim = Sim(tmp_path)
    sim.run(until=600.0)
    st = sim.policy.statistics()
    # the quota is the hard limit: the backlog never passes it, the sender was deferred
    assert sim.max_backlog <= QUOTA
    assert sim.max_backlog > 0.9 * QUOTA
    assert sim.deferred and {r for _, r in sim.deferred} == {"452 4.2.2"}
    first_deferral = sim.deferred[0][0]
    # after the drain estimate has settled (3 half-lives) and before the quota is reached,
    # the sender streams at pace_factor x the drain rate
    rate = sim.rate(80.0, first_deferral)
    assert abs(rate - FACTOR * DRAIN) <= 0.2 * FACTOR * DRAIN, rate
    assert st.recipients[RCPT].congested and st.paced_seconds > 100
    assert st.deferrals["quota"] + st.deferrals["quota_end_of_data"] == len(sim.deferred)
    # the sender stops; the receiver catches up: every message exactly once, in order
    sim.hang_up()
    sim.run(until=10_000.0, sending=False)
    assert sim.received == sim.sent and len(set(sim.sent)) == len(sim.sent) > 50
    st = sim.policy.statistics()
    assert not st.recipients[RCPT].congested and st.congested_mailboxes == 0
    assert st.recipients[RCPT].backlog_bytes == 0
    assert sim.policy.pacer([RCPT]).on_data(MSG) == 0            # intake is no longer paced


def test_receiver_faster_than_the_floor_keeps_backlog_near_soft(tmp_path: Path) -> None:
    """With pace_factor 1 the sender matches the drain: the backlog stays bounded near the
    soft backlog, far from the quota, and nothing is deferred."""
    sim = Sim(tmp_path, factor=1.0)
    sim.run(until=600.0)
    assert not sim.deferred
    assert sim.max_backlog < 0.3 * QUOTA                         # soft is 25%: held there
    rate = sim.rate(100.0, 600.0)
    assert abs(rate - DRAIN) <= 0.2 * DRAIN, rate
