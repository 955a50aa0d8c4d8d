"""Prometheus metrics, collected at scrape time from every component's statistics().

No counters are scattered through the code: each component (session registry, store, SMTP /
IMAP / POP3 servers, backpressure policy) keeps its own figures and returns them as a frozen
dataclass from `statistics()`. `RelayCollector` reads those on each scrape and turns them into
metric families following the table `SPECS`. A component that is absent (None, not built yet)
or a field it does not have is skipped, never an error: the scrape always answers. Every name
in `SPECS` is listed in docs/metrics.md (a test checks it).

Each Relay has its own CollectorRegistry (tests run several relays in one process).

Components that need a histogram in their statistics use `relay.stats.Histogram` (or anything
with the same `bounds`, `counts`, `sum` attributes): fixed buckets, O(1) memory.
"""

from __future__ import annotations

import asyncio
import os
import platform
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, ProcessCollector
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

# The histograms the components keep live in relay.stats; re-exported for older imports.
from relay.stats import SIZE_BYTES as SIZE_BYTES
from relay.stats import TRANSFER_SECONDS as TRANSFER_SECONDS
from relay.stats import WAIT_SECONDS as WAIT_SECONDS
from relay.stats import Histogram as Histogram
from relay.stats import HistogramSnapshot as HistogramSnapshot

log = get_logger("metrics")

# --- what is exported -----------------------------------------------------------------------

@dataclass(frozen=True)
class Spec:
    """One exported metric. `name` of a counter is given without `_total` (the exposition adds
    it). A labelled value is a dict keyed by the label value (one label) or by a tuple of label
    values; a histogram value is a HistogramSnapshot-like object (or a dict of them).
    `source` says where it comes from (docs/metrics.md shows it)."""
    name: str
    kind: str                     # counter | gauge | histogram
    help: str
    source: str
    labels: tuple[str, ...] = ()

    @property
    def exposed(self) -> str:
        return self.name + "_total" if self.kind == "counter" else self.name


_MB = ("mailbox",)
SPECS: tuple[Spec, ...] = (
    # process and host
    Spec("relay_build_info", "gauge", "Version of the running relay; always 1.", "relay",
         ("version", "python")),
    Spec("relay_start_time_seconds", "gauge", "Unix time the relay started.", "relay"),
    Spec("relay_disk_free_bytes", "gauge",
         "Bytes available to the relay on the data_dir file system.", "statvfs"),
    Spec("relay_disk_total_bytes", "gauge", "Size of the data_dir file system.", "statvfs"),
    # sessions
    Spec("relay_sessions_current", "gauge", "Sessions open now.", "sessions", ("protocol",)),
    Spec("relay_sessions", "counter", "Sessions ended, by protocol and outcome.", "sessions",
         ("protocol", "outcome")),
    Spec("relay_sessions_refused", "counter",
         "Connections refused for session limits or shutdown.", "sessions", ("protocol",)),
    Spec("relay_sessions_stress", "gauge",
         "1 while the protocol is in stress mode (sessions above stress_threshold of the limit).",
         "sessions", ("protocol",)),
    Spec("relay_sessions_evicted", "counter",
         "Idle sessions (no transaction, no login) closed under stress to admit a new client.",
         "sessions", ("protocol",)),
    # logins (SMTP AUTH, IMAP, POP3): relay/policy/penalty.py
    Spec("relay_auth_failures", "counter",
         "Failed logins (wrong password, unknown user) by protocol, SMTP AUTH included.",
         "login penalty", ("protocol",)),
    Spec("relay_auth_refused", "counter",
         "Logins answered 'try again later' unchecked (penalty queue or password hashing full).",
         "login penalty", ("protocol",)),
    Spec("relay_auth_penalty_seconds", "counter",
         "Seconds login attempts waited for their turn after earlier failures.", "login penalty"),
    Spec("relay_disk_reserve_bytes", "gauge",
         "Bytes of the disk reserve kept for deletions (0 while released).", "disk reserve"),
    Spec("relay_disk_reserve_releases", "counter",
         "Times the disk reserve was released to let a deletion through on a full disk.",
         "disk reserve"),
    # SMTP ingest
    Spec("relay_messages_received", "counter", "Messages accepted with 250 over SMTP.", "smtp"),
    Spec("relay_received_bytes", "counter", "Bytes of messages accepted over SMTP.", "smtp"),
    Spec("relay_messages_rejected", "counter",
         "Messages whose data was received (or drained) but not accepted.", "smtp"),
    Spec("relay_rejected_bytes", "counter", "Bytes of messages not accepted.", "smtp"),
    Spec("relay_smtp_replies", "counter",
         "SMTP replies with an enhanced status code, by class, code and reason.", "smtp",
         ("class", "code", "reason")),
    Spec("relay_ingest_duration_seconds", "histogram",
         "From DATA/first BDAT to the final reply, per message.", "smtp"),
    Spec("relay_message_size_bytes", "histogram", "Size of messages accepted over SMTP.",
         "smtp"),
    # store
    Spec("relay_accounts", "gauge", "Accounts (local mailboxes).", "store"),
    Spec("relay_messages_stored", "counter",
         "Messages delivered into mailboxes (one per recipient).", "store"),
    Spec("relay_stored_bytes", "counter", "Bytes delivered into mailboxes (per recipient).",
         "store"),
    Spec("relay_messages_deleted", "counter", "Messages expunged/deleted from mailboxes.",
         "store"),
    Spec("relay_deleted_bytes", "counter", "Bytes expunged/deleted from mailboxes.", "store"),
    Spec("relay_backlog_bytes", "gauge", "Undrained bytes in all mailboxes.", "store"),
    Spec("relay_backlog_messages", "gauge", "Undrained messages in all mailboxes.", "store"),
    Spec("relay_delivery_to_fetch_seconds", "histogram",
         "From delivery to the first complete fetch of a message.", "store"),
    Spec("relay_delivery_to_delete_seconds", "histogram",
         "From delivery to the deletion of a message.", "store"),
    # per mailbox (bounded by the number of accounts; [metrics] per_mailbox = false drops them)
    Spec("relay_mailbox_backlog_bytes", "gauge", "Undrained bytes in the mailbox.", "store", _MB),
    Spec("relay_mailbox_backlog_messages", "gauge", "Undrained messages in the mailbox.",
         "store", _MB),
    Spec("relay_mailbox_oldest_message_age_seconds", "gauge",
         "Age of the oldest message in the mailbox (0 when empty).", "store", _MB),
    Spec("relay_mailbox_quota_bytes", "gauge", "Byte quota of the mailbox (0 = none).", "store",
         _MB),
    Spec("relay_mailbox_quota_messages", "gauge", "Message quota of the mailbox (0 = none).",
         "store", _MB),
    Spec("relay_mailbox_last_poll_timestamp_seconds", "gauge",
         "Unix time of the receiver's last IMAP/POP3 login (0 = never).", "store", _MB),
    Spec("relay_mailbox_drain_rate_bytes_per_second", "gauge",
         "Measured drain rate of the mailbox (EWMA) used for pacing.", "policy", _MB),
    # store backend "postgresql" (relay/store/postgresql/store.py PgStats; docs/cluster.md)
    Spec("relay_store_pool_connections", "gauge", "Database connections open in this node's pool.",
         "store backend"),
    Spec("relay_store_pool_idle_connections", "gauge", "Of those, idle.", "store backend"),
    Spec("relay_store_pool_max_connections", "gauge", "The pool's size limit.", "store backend"),
    Spec("relay_store_pool_waiting_requests", "gauge", "Requests waiting for a pooled connection.",
         "store backend"),
    Spec("relay_store_pool_requests", "counter", "Requests for a pooled connection.", "store backend"),
    Spec("relay_store_pool_request_errors", "counter",
         "Requests that got no connection in time.", "store backend"),
    Spec("relay_store_connections", "counter", "Database connections made (reconnects included).",
         "store backend"),
    Spec("relay_store_connection_errors", "counter", "Failed attempts to connect to the database.",
         "store backend"),
    Spec("relay_store_connections_lost", "counter", "Pooled connections found broken.",
         "store backend"),
    Spec("relay_store_unavailable", "counter",
         "Store operations answered 'unavailable' (4xx / NO [UNAVAILABLE]).", "store backend"),
    Spec("relay_store_change_feed_connected", "gauge",
         "1 while this node listens to the other nodes' changes.", "store backend"),
    Spec("relay_store_change_feed_reconnects", "counter", "Change feed reconnections.",
         "store backend"),
    Spec("relay_store_change_feed_received", "counter", "Changes received from other nodes.",
         "store backend"),
    Spec("relay_store_swept_nodes", "counter", "Dead nodes this node cleaned up after.",
         "store backend"),
    Spec("relay_store_swept_bodies", "counter",
         "Unsealed (dead node) or expunged message bodies this node removed.", "store backend"),
    # IMAP / POP3
    Spec("relay_messages_fetched", "counter", "Messages fetched completely, by protocol.",
         "imap, pop3", ("protocol",)),
    Spec("relay_fetched_bytes", "counter", "Message bytes sent to receivers, by protocol.",
         "imap, pop3", ("protocol",)),
    Spec("relay_fetch_duration_seconds", "histogram",
         "Time to send one whole message to a receiver, by protocol.", "imap, pop3",
         ("protocol",)),
    Spec("relay_logins", "counter", "Successful IMAP/POP3 logins, by protocol.", "imap, pop3",
         ("protocol",)),
    Spec("relay_login_failures", "counter", "Failed IMAP/POP3 logins, by protocol.",
         "imap, pop3", ("protocol",)),
    # backpressure
    Spec("relay_backpressure_paced_seconds", "counter",
         "Seconds SMTP intake was paused to pace senders to receivers' drain.", "policy"),
    Spec("relay_backpressure_deferrals", "counter",
         "Recipients or messages deferred by the policy, by reason.", "policy", ("reason",)),
    Spec("relay_backpressure_congested_mailboxes", "gauge",
         "Mailboxes above their soft backlog (intake paced).", "policy"),
    # participant directory
    Spec("relay_directory_serial", "gauge", "Serial number of the current directory document.",
         "directory"),
    Spec("relay_directory_requests", "counter", "Requests to directory@, by outcome.",
         "directory", ("outcome",)),
    Spec("relay_directory_pushes", "counter", "Directory updates pushed to participants.",
         "directory"),
)
SPEC_BY_NAME = {s.name: s for s in SPECS}

# Where each metric comes from: attribute of the Relay -> (metric, field of its statistics()).
FIELDS: dict[str, tuple[tuple[str, str], ...]] = {
    "sessions": (("relay_sessions_current", "current"), ("relay_sessions", "total"),
                 ("relay_sessions_refused", "refused"), ("relay_sessions_stress", "stressed"),
                 ("relay_sessions_evicted", "evicted")),
    "logins": (("relay_auth_failures", "failures"), ("relay_auth_refused", "refused"),
               ("relay_auth_penalty_seconds", "delayed_seconds")),
    "reserve": (("relay_disk_reserve_bytes", "reserved_bytes"),
                ("relay_disk_reserve_releases", "releases")),
    "smtp_stats": (("relay_messages_received", "messages_received"),
                   ("relay_received_bytes", "received_bytes"),
                   ("relay_messages_rejected", "messages_rejected"),
                   ("relay_rejected_bytes", "rejected_bytes"),
                   ("relay_ingest_duration_seconds", "ingest_duration"),
                   ("relay_message_size_bytes", "message_size")),
    "store": (("relay_accounts", "accounts"), ("relay_messages_stored", "messages_stored"),
              ("relay_stored_bytes", "stored_bytes"),
              ("relay_messages_deleted", "messages_deleted"),
              ("relay_deleted_bytes", "deleted_bytes"), ("relay_backlog_bytes", "backlog_bytes"),
              ("relay_backlog_messages", "backlog_messages"),
              ("relay_delivery_to_fetch_seconds", "delivery_to_fetch_seconds"),
              ("relay_delivery_to_delete_seconds", "delivery_to_delete_seconds")),
    "policy": (("relay_backpressure_paced_seconds", "paced_seconds"),
               ("relay_backpressure_deferrals", "deferrals"),
               ("relay_backpressure_congested_mailboxes", "congested_mailboxes")),
    "directory": (("relay_directory_serial", "serial"), ("relay_directory_requests", "requests"),
                  ("relay_directory_pushes", "pushes")),
}
# The store backend's own figures (Relay.store.backend_statistics(), when the backend has them).
BACKEND_FIELDS = (
    ("relay_store_pool_connections", "pool_connections"), ("relay_store_pool_idle_connections", "pool_idle"),
    ("relay_store_pool_max_connections", "pool_max"), ("relay_store_pool_waiting_requests", "pool_waiting"),
    ("relay_store_pool_requests", "pool_requests"), ("relay_store_pool_request_errors", "pool_request_errors"),
    ("relay_store_connections", "connections_made"), ("relay_store_connection_errors", "connection_errors"),
    ("relay_store_connections_lost", "connections_lost"), ("relay_store_unavailable", "unavailable_errors"),
    ("relay_store_change_feed_connected", "change_feed_connected"),
    ("relay_store_change_feed_reconnects", "change_feed_reconnects"),
    ("relay_store_change_feed_received", "change_feed_received"),
    ("relay_store_swept_nodes", "swept_nodes"), ("relay_store_swept_bodies", "swept_bodies"),
)
# IMAP and POP3 keep the same figures; they become one metric with a `protocol` label.
FETCH_SOURCES = (("imap", "imap_stats"), ("pop3", "pop3"))
FETCH_FIELDS = (("relay_messages_fetched", "messages_fetched"),
                ("relay_fetched_bytes", "fetched_bytes"),
                ("relay_fetch_duration_seconds", "fetch_duration"),
                ("relay_logins", "logins"), ("relay_login_failures", "login_failures"))
# Per-mailbox metrics: name -> field of the store's per-mailbox record (MailboxStats).
MAILBOX_FIELDS = (
    ("relay_mailbox_backlog_bytes", "backlog_bytes"),
    ("relay_mailbox_backlog_messages", "backlog_messages"),
    ("relay_mailbox_oldest_message_age_seconds", "oldest_age_seconds"),
    ("relay_mailbox_quota_bytes", "quota_bytes"),
    ("relay_mailbox_quota_messages", "quota_messages"),
    ("relay_mailbox_last_poll_timestamp_seconds", "last_poll"),
)

# The `reason` label of relay_smtp_replies_total: a word for the enhanced status code
# (RFC 3463), so that dashboards read without a code table. Unlisted codes fall back to
# their subject (RFC 3463 section 3); a fixed set either way.
_REASONS = {
    "1.1": "unknown_user", "1.3": "bad_address", "1.7": "bad_address", "2.2": "over_quota",
    "3.0": "local_error", "3.1": "storage_low", "3.2": "shutting_down", "3.4": "too_big",
    "5.1": "bad_command", "5.2": "syntax", "5.3": "too_many_recipients", "5.4": "bad_arguments",
    "6.7": "needs_smtputf8", "7.1": "relay_denied", "7.8": "auth_failed",
    "7.11": "encryption_required",
}
_SUBJECTS = {"0": "other", "1": "address", "2": "mailbox", "3": "system", "4": "network",
             "5": "protocol", "6": "content", "7": "policy"}


def reply_reason(cls: str, code: str) -> str:
    if cls.startswith("2"):
        return "ok"
    _, _, rest = code.partition(".")
    subject = rest.partition(".")[0]
    if cls.startswith("4") and rest in ("7.0", "7.1"):
        return "throttled"      # 421 4.7.0 / 451 4.7.1: too many connections or errors, paced
    return _REASONS.get(rest, _SUBJECTS.get(subject, "other"))


def _statistics(component: Any, method: str = "statistics") -> Any:
    """component.statistics(), or None when the component or its statistics do not exist
    (yet) or fail: a scrape must not fail because one component does."""
    fn = getattr(component, method, None)
    if fn is None:
        return None
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - any component bug must not break the scrape
        log.warning("statistics_failed", component=type(component).__name__, error=repr(e))
        return None


def _field(stats: Any, *names: str) -> Any:
    """The first of `names` that `stats` (dataclass or dict) has, else None."""
    if stats is None:
        return None
    for name in names:
        v = stats.get(name) if isinstance(stats, Mapping) else getattr(stats, name, None)
        if v is not None:
            return v
    return None


def _label_values(key: Any, n: int) -> list[str]:
    values = list(key) if isinstance(key, tuple) else [key]
    if len(values) != n:
        raise ValueError(f"expected {n} label values, got {key!r}")
    return [str(v) for v in values]


def _histogram_buckets(h: Any) -> tuple[list[tuple[str, float]], float]:
    buckets, acc = [], 0
    for bound, count in zip([*h.bounds, float("inf")], h.counts, strict=True):
        acc += count
        buckets.append(("+Inf" if bound == float("inf") else repr(float(bound)), acc))
    return buckets, float(h.sum)


def family(spec: Spec, value: Any) -> Metric:
    """The metric family for one spec from its value (see Spec)."""
    labels = list(spec.labels)
    items = sorted(value.items(), key=lambda kv: str(kv[0])) if labels else [((), value)]
    fam: Metric
    if spec.kind == "histogram":
        fam = HistogramMetricFamily(spec.name, spec.help, labels=labels)
        for key, h in items:
            buckets, total = _histogram_buckets(h)
            fam.add_metric(_label_values(key, len(labels)) if labels else [], buckets, total)
        return fam
    cls = CounterMetricFamily if spec.kind == "counter" else GaugeMetricFamily
    fam = cls(spec.name, spec.help, labels=labels)
    for key, v in items:
        fam.add_metric(_label_values(key, len(labels)) if labels else [], float(v))
    return fam


def _merge(into: dict[str, Any], name: str, key: str, value: Any) -> None:
    """values[name][key] = value, for metrics assembled from several components."""
    if value is not None:
        into.setdefault(name, {})[key] = value


class RelayCollector(Collector):
    def __init__(self, relay: Any) -> None:
        self.relay = relay

    def values(self) -> dict[str, Any]:
        """Metric name -> value, from each component's statistics() read once per scrape.
        Absent components and fields simply leave names out."""
        r = self.relay
        v: dict[str, Any] = {
            "relay_build_info": {(__version__, platform.python_version()): 1},
            "relay_start_time_seconds": float(getattr(r, "started_at", time.time())),
        }
        try:
            sv = os.statvfs(r.config.data_dir)
            v["relay_disk_free_bytes"] = sv.f_bavail * sv.f_frsize
            v["relay_disk_total_bytes"] = sv.f_blocks * sv.f_frsize
        except OSError:
            pass
        stats = {attr: _statistics(getattr(r, attr, None))
                 for attr in (*FIELDS, *(a for _, a in FETCH_SOURCES))}
        for attr, fields in FIELDS.items():
            for name, fld in fields:
                v[name] = _field(stats[attr], fld)
        backend = _statistics(getattr(r, "store", None), "backend_statistics")
        for name, fld in BACKEND_FIELDS:
            v[name] = _field(backend, fld)
        for proto, attr in FETCH_SOURCES:
            for name, fld in FETCH_FIELDS:
                _merge(v, name, proto, _field(stats[attr], fld))
        replies = _field(stats["smtp_stats"], "replies")
        if replies is not None:
            out: dict[tuple[str, str, str], int] = {}
            for (cls, code), n in replies.items():
                key = (cls, code, reply_reason(cls, code))
                out[key] = out.get(key, 0) + n
            v["relay_smtp_replies"] = out
        mailboxes = _field(stats["store"], "mailboxes")
        if self.per_mailbox:
            for name, fld in MAILBOX_FIELDS:
                for address, mb in (mailboxes or {}).items():
                    _merge(v, name, address, _field(mb, fld))
            v["relay_mailbox_drain_rate_bytes_per_second"] = _field(stats["policy"], "drain_rate")
        return v

    @property
    def per_mailbox(self) -> bool:
        return bool(getattr(getattr(self.relay.config, "metrics", None), "per_mailbox", True))

    def collect(self) -> Iterator[Metric]:
        yield from families(self.values())


def families(values: Mapping[str, Any]) -> Iterator[Metric]:
    """Metric families from a values() snapshot; a value that does not fit its spec is
    skipped (and logged), never an error."""
    for name, value in values.items():
        if value is None:
            continue
        try:
            yield family(SPEC_BY_NAME[name], value)
        except (TypeError, ValueError, AttributeError, KeyError) as e:
            log.warning("metric_skipped", metric=name, error=repr(e))


class _Snapshot(Collector):
    """Families from one values() snapshot (rendered off the event loop)."""

    def __init__(self, values: Mapping[str, Any]) -> None:
        self._values = values

    def collect(self) -> Iterator[Metric]:
        return families(self._values)


# relay_process_*: CPU, memory and file descriptors of this process (from /proc).
_PROCESS = ProcessCollector(namespace="relay", registry=None)


def make_registry(relay: Any) -> CollectorRegistry:
    """A registry reading `relay` live (for in-process use; the endpoint uses render())."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RelayCollector(relay))
    registry.register(_PROCESS)
    return registry


def render(values: Mapping[str, Any]) -> bytes:
    """The exposition text for a values() snapshot. Thread-safe: the snapshot holds only
    fresh dicts and frozen dataclasses, and /proc is read here."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(values))
    registry.register(_PROCESS)
    return generate_latest(registry)


async def scrape(relay: Any, collector: RelayCollector) -> tuple[int, str, bytes]:
    """GET /metrics: read the components' statistics on the loop (they are not thread-safe;
    ~4 ms at 300 accounts, ~40 ms at 3000), format in a thread (~300 ms at 3000 accounts with
    per-mailbox series, which would otherwise stall every session)."""
    values = collector.values()
    body = await asyncio.to_thread(render, values)
    return 200, CONTENT_TYPE_PLAIN_0_0_4, body


def healthz(relay: Any) -> tuple[int, str, bytes]:
    if getattr(relay, "_stopping", False):
        return 503, "text/plain; charset=utf-8", b"stopping\n"
    return 200, "text/plain; charset=utf-8", b"ok\n"


def install(relay: Any) -> None:
    """Register /metrics and /healthz in relay.http_routes (relay/server/app.py serves them on
    [metrics] listen: this module imports nothing of the server)."""
    collector = RelayCollector(relay)
    relay.metrics_registry = make_registry(relay)
    # Text format 0.0.4: what Debian's Prometheus 2.42 and promtool parse.
    relay.http_routes["/metrics"] = lambda target: scrape(relay, collector)
    relay.http_routes["/healthz"] = lambda target: healthz(relay)
