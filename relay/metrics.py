"""Prometheus metrics, collected at scrape time from every component's statistics().

No counters are scattered through the code: each component (session registry, store, SMTP /
IMAP / POP3 servers, backpressure policy) keeps its own figures and returns them as a frozen
dataclass from `statistics()`. `RelayCollector` reads those on each scrape and turns them into
metric families. A component that is absent (None, not built yet) or a field it does not have
is skipped, never an error: the scrape always answers. Every name is listed in docs/metrics.md.

Each Relay has its own CollectorRegistry (tests run several relays in one process).
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.registry import Collector

from relay import __version__
from relay.log import get_logger

log = get_logger("metrics")


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


class RelayCollector(Collector):
    def __init__(self, relay: Any) -> None:
        self.relay = relay

    def collect(self) -> Iterator[Metric]:
        yield from self._build_info()
        yield from self._sessions()
        yield from self._disk()

    def _build_info(self) -> Iterator[Metric]:
        info = GaugeMetricFamily("relay_build_info", "Version of the running relay; always 1.",
                                 labels=["version", "python"])
        info.add_metric([__version__, platform.python_version()], 1)
        yield info
        yield GaugeMetricFamily("relay_start_time_seconds",
                                "Unix time the relay process started its listeners.",
                                value=float(getattr(self.relay, "started_at", time.time())))

    def _sessions(self) -> Iterator[Metric]:
        st = _statistics(getattr(self.relay, "sessions", None))
        if st is None:
            return
        cur = GaugeMetricFamily("relay_sessions_current", "Sessions open now.", labels=["protocol"])
        for proto, n in sorted(getattr(st, "current", {}).items()):
            cur.add_metric([proto], n)
        yield cur
        tot = CounterMetricFamily("relay_sessions", "Sessions ended, by protocol and outcome.",
                                  labels=["protocol", "outcome"])
        for (proto, outcome), n in sorted(getattr(st, "total", {}).items()):
            tot.add_metric([proto, outcome], n)
        yield tot
        ref = CounterMetricFamily("relay_sessions_refused",
                                  "Connections refused for session limits or shutdown.",
                                  labels=["protocol"])
        for proto, n in sorted(getattr(st, "refused", {}).items()):
            ref.add_metric([proto], n)
        yield ref

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
    relay.http_routes["/metrics"] = lambda target: (200, CONTENT_TYPE_PLAIN_0_0_4, generate_latest(registry))
    relay.http_routes["/healthz"] = lambda target: healthz(relay)
    return await http.start(relay.http_routes, [listen])
