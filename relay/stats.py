"""Figures the components keep for their statistics(): fixed-bucket histograms and their
bucket bounds. No dependency: every floor of the house may import it (relay.metrics reads the
snapshots, it does not own them).

Components that need a histogram in their statistics use `Histogram` (or anything with the
same `bounds`, `counts`, `sum` attributes): fixed buckets, O(1) memory.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from dataclasses import dataclass

# Transfers of 1 MB .. 4 GB run from ~1 ms (loopback, small) to an hour (4 GB over a slow
# hospital uplink at ~1 MB/s): roughly x2.5 steps over that range.
TRANSFER_SECONDS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0, 150.0,
                    300.0, 600.0, 1800.0, 3600.0)
# Delivery -> first fetch / delete: receivers poll every few seconds to every few hours;
# a mailbox left for days is what the operator must see.
WAIT_SECONDS = (1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0, 43200.0,
                86400.0, 172800.0, 604800.0)
# Message sizes: 1 MB .. 4 GiB (max_message_size) in x4 steps.
SIZE_BYTES = (2.0**16, 2.0**18, 2.0**20, 2.0**22, 2.0**24, 2.0**26, 2.0**28, 2.0**30, 2.0**32)


@dataclass(frozen=True)
class HistogramSnapshot:
    bounds: tuple[float, ...]     # upper bounds, ascending, without +Inf
    counts: tuple[int, ...]       # per bucket, NOT cumulative; len(bounds) + 1 (last: +Inf)
    sum: float


class Histogram:
    """A fixed-bucket histogram for a component's statistics(): observe() is O(log buckets),
    snapshot() is what statistics() returns."""

    def __init__(self, bounds: Iterable[float]) -> None:
        self.bounds = tuple(sorted(bounds))
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def snapshot(self) -> HistogramSnapshot:
        return HistogramSnapshot(self.bounds, tuple(self.counts), self.sum)
