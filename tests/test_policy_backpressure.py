"""Backpressure policy: the free-disk reply at RCPT, pacing rules, statistics. Deterministic: a
fake clock, an injected free-disk probe, a real store (the policy reads its ledger and change
feed through relay.store.api; the tests fill mailboxes through the Maildir engine)."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

import pytest

from relay import config as configmod
from relay.config import Config
from relay.policy.backpressure import Backpressure
from relay.protocol.smtp import Reply
from relay.store import Store
from relay.store.api import Envelope, Refusal
from relay.store.maildir.backend import MaildirStore

KiB = 1024
MiB = 1024 * 1024


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def make(tmp_path: Path, **bp: object) -> tuple[Store, Backpressure, Clock, list[int]]:
    raw = {"data_dir": str(tmp_path / "data"),
           "quota": {"default_bytes": 1 * MiB, "default_messages": 10},
           "backpressure": {"soft_backlog": "25%", "pace_factor": 2.0, "pace_floor": 64 * KiB,
                            "min_free_disk": 10 * MiB, "drain_halflife": 30.0, **bp}}
    cfg: Config = configmod.from_dict(raw)
    api = MaildirStore(cfg)
    store = api.engine
    store.accounts.add("slow@example.test")
    store.accounts.add("fast@example.test")
    free = [100 * MiB]
    clock = Clock()
    return store, Backpressure(cfg, api, clock=clock, free_disk=lambda: free[0]), clock, free


def deliver(store: Store, rcpts: list[str], nbytes: int) -> None:
    d = store.begin_delivery("s@x.test", rcpts)
    d.write(b"x" * max(0, nbytes - d.size))
    asyncio.run(d.commit())


def test_check_rcpt_leaves_quotas_to_the_ledger(tmp_path: Path) -> None:
    """Quotas are the store ledger's (Delivery.add_recipient), not checked a second time."""
    store, bp, _, _ = make(tmp_path)
    deliver(store, ["slow@example.test"], 600 * KiB)
    assert bp.check_rcpt("slow@example.test", 900 * KiB) is None

    async def rcpt() -> Refusal | None:
        d = bp.store.begin_delivery(Envelope("s@x.test"))
        try:
            return await d.add_recipient("slow@example.test", 900 * KiB)
        finally:
            d.abort()
    assert asyncio.run(rcpt()) is Refusal.OVER_QUOTA_BYTES
    assert bp.statistics().deferrals == {"quota": 0, "quota_end_of_data": 0, "disk": 0}


def test_check_rcpt_disk_low(tmp_path: Path) -> None:
    _, bp, _, free = make(tmp_path)
    free[0] = 10 * MiB + 1000
    assert bp.check_rcpt("fast@example.test", 1000) is None
    assert bp.check_rcpt("fast@example.test", 1001) == Reply(452, "4.3.1",
                                                             "Insufficient system storage, try again later")
    free[0] = 5 * MiB
    assert bp.check_rcpt("fast@example.test", None).enhanced == "4.3.1"   # type: ignore[union-attr]
    assert bp.statistics().deferrals["disk"] == 2


def test_min_free_disk_auto_is_twice_max_message_size(tmp_path: Path) -> None:
    cfg = configmod.from_dict({"data_dir": str(tmp_path), "smtp": {"max_message_size": "3MiB"}})
    api = MaildirStore(cfg)
    api.engine.accounts.add("a@example.test")
    bp = Backpressure(cfg, api, free_disk=lambda: 6 * MiB)
    assert bp.check_rcpt("a@example.test", None) is None
    assert bp.check_rcpt("a@example.test", 1).enhanced == "4.3.1"         # type: ignore[union-attr]
    st = os.statvfs(tmp_path)                                               # the real probe
    assert Backpressure(cfg, api).free_disk() == pytest.approx(st.f_bavail * st.f_frsize, rel=0.01)


def test_uncongested_recipient_is_not_paced(tmp_path: Path) -> None:
    _, bp, _, _ = make(tmp_path)
    p = bp.pacer(["fast@example.test"])
    assert all(p.on_data(64 * KiB) == 0 for _ in range(3))                # 192 KiB < soft 256 KiB
    p.close()
    assert bp.statistics().paced_seconds == 0


def test_floor_when_the_receiver_does_not_drain(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="relay")
    store, bp, clock, _ = make(tmp_path)
    deliver(store, ["slow@example.test"], 300 * KiB)                        # above soft (256 KiB)
    p = bp.pacer(["slow@example.test"])
    start, sent = clock.t, 0
    for _ in range(50):
        clock.t += p.on_data(16 * KiB)
        sent += 16 * KiB
    assert sent / (clock.t - start) == pytest.approx(64 * KiB, rel=0.03)   # pace_floor, never below
    st = bp.statistics()
    assert st.congested_mailboxes == 1 and st.recipients["slow@example.test"].congested
    assert st.paced_seconds == pytest.approx(clock.t - start, rel=0.03)
    assert any("congested" in r.getMessage() and getattr(r, "fields", {}).get("mailbox") == "slow@example.test"
               for r in caplog.records)
    p.close()


def test_several_pacers_share_a_recipients_pace(tmp_path: Path) -> None:
    store, bp, clock, _ = make(tmp_path)
    deliver(store, ["slow@example.test"], 300 * KiB)
    p1, p2 = bp.pacer(["slow@example.test"]), bp.pacer(["slow@example.test"])
    start = clock.t
    for _ in range(20):                    # two sessions, interleaved, each waits its own delay
        d1 = p1.on_data(16 * KiB)
        d2 = p2.on_data(16 * KiB)
        clock.t += max(d1, d2)
    assert 40 * 16 * KiB / (clock.t - start) == pytest.approx(64 * KiB, rel=0.05)


def test_message_for_several_recipients_paced_by_the_most_congested(tmp_path: Path) -> None:
    store, bp, _, _ = make(tmp_path)
    deliver(store, ["slow@example.test"], 300 * KiB)
    p = bp.pacer(["fast@example.test", "slow@example.test"])
    d = p.on_data(64 * KiB)
    assert d == pytest.approx(1.0)                                        # 64 KiB at the 64 KiB/s floor
    p.close()
    q = bp.pacer(["fast@example.test"])
    assert q.on_data(64 * KiB) == 0


def test_pace_follows_the_drain_rate_while_streaming(tmp_path: Path) -> None:
    store, bp, clock, _ = make(tmp_path, pace_floor=1024)
    deliver(store, ["slow@example.test"], 300 * KiB)
    deliver(store, ["slow@example.test"], 100 * KiB)
    p = bp.pacer(["slow@example.test"])
    slow_delay = p.on_data(8 * KiB)
    assert slow_delay == pytest.approx(8.0)                               # 1 KiB/s floor, no drain yet
    clock.t += slow_delay
    store.mailbox("slow@example.test").expunge([2])                       # the receiver drains ~100 KiB
    rate = bp.statistics().drain_rate["slow@example.test"]
    # one event, 8 s after the policy started: n * lam, warm-up corrected by the maximum x2
    assert rate == pytest.approx(2 * 100 * KiB * bp.lam, rel=0.02)
    fast_delay = p.on_data(8 * KiB)
    assert fast_delay == pytest.approx(8 * KiB / (2 * rate), rel=0.02)
    p.close()


def test_leaving_congestion(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="relay")
    store, bp, _, _ = make(tmp_path)
    deliver(store, ["slow@example.test"], 200 * KiB)
    deliver(store, ["slow@example.test"], 100 * KiB)
    p = bp.pacer(["slow@example.test"])
    assert p.on_data(KiB) > 0
    p.close()
    store.mailbox("slow@example.test").expunge([2])         # 200 KiB left: < 90% of 256 KiB
    assert not bp.statistics().recipients["slow@example.test"].congested
    assert [r.getMessage() for r in caplog.records if r.getMessage().endswith("congested")] == [
        "congested", "decongested"]
    assert bp.pacer(["slow@example.test"]).on_data(16 * KiB) == 0


def test_unlimited_quota_with_a_percentage_never_congests(tmp_path: Path) -> None:
    store, bp, clock, _ = make(tmp_path)
    store.accounts.set_quota("slow@example.test", quota_bytes=0)   # e.g. by the CLI: seen at once
    deliver(store, ["slow@example.test"], 2 * MiB)
    assert bp.pacer(["slow@example.test"]).on_data(MiB) == 0
    assert bp.check_rcpt("slow@example.test", 10 * MiB) is None


def test_soft_backlog_as_a_size(tmp_path: Path) -> None:
    store, bp, _, _ = make(tmp_path, soft_backlog="100KiB")
    deliver(store, ["slow@example.test"], 101 * KiB)
    assert bp.pacer(["slow@example.test"]).on_data(KiB) > 0
    assert bp.statistics().recipients["slow@example.test"].soft_backlog_bytes == 100 * KiB


def test_committed_bytes_are_not_counted_twice(tmp_path: Path) -> None:
    """The backlog is the ledger's: bytes streaming to a recipient count while they are written,
    move to stored at the commit (in one step: not counted twice, not lost in between), and
    leave with an aborted message."""
    store, bp, _, _ = make(tmp_path)
    slow = "slow@example.test"

    def backlog() -> int:
        return bp.statistics().recipients[slow].backlog_bytes

    async def scenario() -> None:
        d = bp.store.begin_delivery(Envelope("s@x.test"))
        assert await d.add_recipient(slow, 0) is None
        await d.start()
        p = bp.pacer([slow])
        d.write(b"x" * (200 * KiB))
        assert p.on_data(200 * KiB) == 0                                   # 200 KiB < soft 256 KiB
        assert backlog() == 200 * KiB
        receipt = await d.commit()                                         # notifies NEW
        stats = bp.statistics().recipients[slow]
        assert stats.backlog_bytes == receipt.size and not stats.congested
        p.close()
        assert backlog() == receipt.size
        q = bp.store.begin_delivery(Envelope("s@x.test"))                  # an aborted message
        assert await q.add_recipient(slow, 0) is None
        await q.start()
        q.write(b"y" * (10 * KiB))
        qp = bp.pacer([slow])
        qp.on_data(10 * KiB)
        assert backlog() == receipt.size + 10 * KiB
        q.abort()
        qp.close()
        assert backlog() == receipt.size
    asyncio.run(scenario())


def test_drain_estimate_of_a_steady_receiver(tmp_path: Path) -> None:
    """One 10 KiB message every 2 s: the estimate is near 5 KiB/s after one half-life (the
    warm-up correction) and stays there; it halves every half-life once draining stops."""
    store, bp, clock, _ = make(tmp_path, drain_halflife=30.0)
    store.accounts.set_quota("slow@example.test", quota_messages=0)
    for _ in range(60):
        deliver(store, ["slow@example.test"], 10 * KiB)
    mb = store.mailbox("slow@example.test")
    size = mb.info(1).size
    estimates = {}
    for uid in range(1, 61):
        clock.t += 2.0
        mb.expunge([uid])
        estimates[uid * 2] = bp.statistics().drain_rate["slow@example.test"]
    true_rate = size / 2.0
    for t in (40, 60, 90, 120):
        assert estimates[t] == pytest.approx(true_rate, rel=0.2), (t, estimates[t])
    clock.t += 30.0
    assert bp.statistics().drain_rate["slow@example.test"] == pytest.approx(estimates[120] / 2, rel=0.05)


def test_short_gaps_between_messages_are_made_up(tmp_path: Path) -> None:
    """Round trips and the commit between two messages (here 0.3 s) do not lower the average
    rate below the pace; longer idle times are not saved up beyond one second."""
    store, bp, clock, _ = make(tmp_path)
    deliver(store, ["slow@example.test"], 300 * KiB)
    start, sent = clock.t, 0
    for _ in range(10):
        p = bp.pacer(["slow@example.test"])
        for _ in range(8):
            clock.t += p.on_data(16 * KiB)
            sent += 16 * KiB
        p.close()
        clock.t += 0.3
    assert sent / (clock.t - start) == pytest.approx(64 * KiB, rel=0.05)
    clock.t += 100.0                                       # a long pause: at most 1 s of credit
    p = bp.pacer(["slow@example.test"])
    assert p.on_data(64 * KiB) == 0 and p.on_data(64 * KiB) == pytest.approx(1.0)
