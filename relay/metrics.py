"""Prometheus metrics, collected at scrape time from every component's statistics().

No counters are scattered through the code: each component (session registry, store, SMTP /
IMAP / POP3 servers, backpressure policy) keeps its own figures and returns them as a frozen
dataclass from `statistics()`. `RelayCollector` reads those on each scrape and turns them into
metric families following the table `SPECS`. A component that is absent (None, not built yet)
or a field it does not have is skipped, never an error: the scrape always answers. Every name
in `SPECS` is listed in docs/metrics.md (a test checks it).

Each Relay has its own CollectorRegistry (tests run several relays in one process).

Components that need a histogram in their statistics use `Histogram` below (or anything with
the same `bounds`, `counts`, `sum` attributes): fixed buckets, O(1) memory.
"""

from __future__ import annotations

import bisect
import os
import platform
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.registry import Collector

from relay import __version__
from relay.log import get_logger

log = get_logger("metrics")

# --- histograms kept by the components ------------------------------------------------------

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


# --- what is exported -----------------------------------------------------------------------

@dataclass(frozen=True)
class Spec:
    """One metric: `name` (counters without `_total`, the exposition adds it), kind
    (counter | gauge | histogram), help text, the component it comes from, the field of that
    component's statistics(), and its labels. A labelled field is a dict keyed by the label
    value (one label) or by a tuple of label values."""
    name: str
    kind: str
    help: str
    source: str
    field: str
    labels: tuple[str, ...] = ()

    @property
    def exposed(self) -> str:
        return self.name + "_total" if self.kind == "counter" else self.name


SPECS: tuple[Spec, ...] = (
    # sessions (relay.server.listener.SessionRegistry)
    Spec("relay_sessions_current", "gauge", "Sessions open now.", "sessions", "current",
         ("protocol",)),
    Spec("relay_sessions", "counter", "Sessions ended, by protocol and outcome.", "sessions",
         "total", ("protocol", "outcome")),
    Spec("relay_sessions_refused", "counter",
         "Connections refused for session limits or shutdown.", "sessions", "refused",
         ("protocol",)),
)

# Per-mailbox figures: field of the store's per-mailbox record -> (name, help).
MAILBOX_SPECS: tuple[tuple[str, str, str], ...] = ()


def _statistics(component: Any) -> Any:
    """component.statistics(), or None when the component or its statistics do not exist
    (yet) or fail: a scrape must not fail because one component does."""
    fn = getattr(component, "statistics", None)
    if fn is None:
        return None
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - any component bug must not break the scrape
        log.warning("statistics_failed", component=type(component).__name__, error=repr(e))
        return None


def _field(stats: Any, name: str) -> Any:
    if isinstance(stats, Mapping):
        return stats.get(name)
    return getattr(stats, name, None)


def _label_values(key: Any, n: int) -> list[str]:
    values = list(key) if isinstance(key, tuple) else [key]
    if len(values) != n:
        raise ValueError(f"expected {n} label values, got {key!r}")
    return [str(v) for v in values]


def _histogram_buckets(h: Any) -> tuple[list[tuple[str, float]], float]:
    buckets, acc = [], 0
    for bound, count in zip(list(h.bounds) + [float("inf")], h.counts):
        acc += count
        buckets.append(("+Inf" if bound == float("inf") else repr(float(bound)), acc))
    return buckets, float(h.sum)


def family(spec: Spec, value: Any) -> Metric:
    """The metric family for one spec from the statistics field's value."""
    labels = list(spec.labels)
    if spec.kind == "histogram":
        fam: Metric = HistogramMetricFamily(spec.name, spec.help, labels=labels)
        items = value.items() if labels else [((), value)]
        for key, h in sorted(items, key=lambda kv: str(kv[0])):
            buckets, total = _histogram_buckets(h)
            fam.add_metric(_label_values(key, len(labels)) if labels else [], buckets, total)
        return fam
    cls = CounterMetricFamily if spec.kind == "counter" else GaugeMetricFamily
    fam = cls(spec.name, spec.help, labels=labels)
    if not labels:
        fam.add_metric([], float(value))
    else:
        for key, v in sorted(value.items(), key=lambda kv: str(kv[0])):
            fam.add_metric(_label_values(key, len(labels)), float(v))
    return fam


class RelayCollector(Collector):
    def __init__(self, relay: Any) -> None:
        self.relay = relay

    def sources(self) -> dict[str, Any]:
        """Each component's statistics() (None when absent), read once per scrape."""
        r = self.relay
        return {
            "sessions": _statistics(getattr(r, "sessions", None)),
        }

    def collect(self) -> Iterator[Metric]:
        stats = self.sources()
        yield from self._build_info()
        for spec in SPECS:
            src = stats.get(spec.source)
            value = None if src is None else _field(src, spec.field)
            if value is None:
                continue
            try:
                yield family(spec, value)
            except (TypeError, ValueError, AttributeError) as e:
                log.warning("metric_skipped", metric=spec.name, error=repr(e))
        yield from self._disk()

    def _build_info(self) -> Iterator[Metric]:
        info = GaugeMetricFamily("relay_build_info", "Version of the running relay; always 1.",
                                 labels=["version", "python"])
        info.add_metric([__version__, platform.python_version()], 1)
        yield info
        yield GaugeMetricFamily("relay_start_time_seconds",
                                "Unix time the relay process started its listeners.",
                                value=float(getattr(self.relay, "started_at", time.time())))

    def _disk(self) -> Iterator[Metric]:
        try:
            sv = os.statvfs(self.relay.config.data_dir)
        except OSError:
            return
        yield GaugeMetricFamily("relay_disk_free_bytes",
                                "Bytes available to the relay on the data_dir file system.",
                                value=sv.f_bavail * sv.f_frsize)
        yield GaugeMetricFamily("relay_disk_total_bytes", "Size of the data_dir file system.",
                                value=sv.f_blocks * sv.f_frsize)


def make_registry(relay: Any) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RelayCollector(relay))
    return registry


def healthz(relay: Any) -> tuple[int, str, bytes]:
    if getattr(relay, "_stopping", False):
        return 503, "text/plain; charset=utf-8", b"stopping\n"
    return 200, "text/plain; charset=utf-8", b"ok\n"


async def start(relay: Any, listen: str) -> list[Any]:
    """Register /metrics and /healthz in relay.http_routes and serve them on `listen`."""
    from relay.server import http

    registry = make_registry(relay)
    relay.metrics_registry = registry
    # Text format 0.0.4: what Debian's Prometheus 2.42 and promtool parse.
    relay.http_routes["/metrics"] = lambda target: (200, CONTENT_TYPE_PLAIN_0_0_4,
                                                    generate_latest(registry))
    relay.http_routes["/healthz"] = lambda target: healthz(relay)
    return await http.start(relay.http_routes, [listen])
