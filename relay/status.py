"""`relay status`: a human summary of the running server, from its metrics endpoint.

It reads the same figures Prometheus does, over HTTP, so it works from any process on the
machine (and from another machine when the metrics listener is reachable): the address is the
one the server actually bound (`<data_dir>/run/listeners.json`, written by `relay serve`), or
else `[metrics] listen` of the config.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from relay.config import Config, format_size, parse_hostport

TIMEOUT = 10.0


class StatusError(Exception):
    """The server cannot be reached or does not answer like a relay."""


@dataclass
class Snapshot:
    url: str
    scalars: dict[str, float] = field(default_factory=dict)              # unlabelled series
    labelled: dict[str, list[tuple[dict[str, str], float]]] = field(default_factory=dict)
    mailboxes: dict[str, dict[str, float]] = field(default_factory=dict)  # address -> metric -> v

    def by(self, name: str, label: str) -> dict[str, float]:
        out: dict[str, float] = defaultdict(float)
        for labels, v in self.labelled.get(name, []):
            out[labels.get(label, "")] += v
        return dict(out)


def metrics_url(config: Config) -> str:
    """Where the server named by `config` serves /metrics."""
    host, port = "", 0
    runfile = Path(config.data_dir) / "run" / "listeners.json"
    try:
        bound = json.loads(runfile.read_text()).get("metrics") or []
        if bound:
            host, port = bound[0][0], int(bound[0][1])
    except (OSError, ValueError):
        pass
    if not port:
        if not config.metrics.listen:
            raise StatusError("[metrics] listen is empty: the server has no metrics endpoint")
        host, port = parse_hostport(config.metrics.listen, "metrics.listen")
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}/metrics"


def fetch(url: str) -> Snapshot:
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT) as resp:
            text = resp.read().decode("utf-8")
    except (OSError, urllib.error.URLError) as e:
        reason = getattr(e, "reason", e)
        raise StatusError(f"cannot reach the relay's metrics at {url}: {reason} "
                          "(is `relay serve` running with this config?)") from None
    snap = Snapshot(url)
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name.endswith(("_bucket", "_created")):
                continue
            if "mailbox" in s.labels and len(s.labels) == 1:
                snap.mailboxes.setdefault(s.labels["mailbox"], {})[s.name] = s.value
            elif s.labels:
                snap.labelled.setdefault(s.name, []).append((dict(s.labels), s.value))
            else:
                snap.scalars[s.name] = s.value
    if "relay_start_time_seconds" not in snap.scalars:
        raise StatusError(f"{url} does not look like a relay's metrics endpoint")
    return snap


def _age(seconds: float) -> str:
    if seconds < 0:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s"


def _replies(snap: Snapshot, cls: str) -> dict[str, float]:
    out: dict[str, float] = defaultdict(float)
    for labels, v in snap.labelled.get("relay_smtp_replies_total", []):
        if labels.get("class") == cls:
            out[labels.get("reason", "")] += v
    return dict(out)


def summary(snap: Snapshot, now: float | None = None) -> dict[str, Any]:
    """The status as plain data (also what --json prints)."""
    now = time.time() if now is None else now
    s = snap.scalars
    mailboxes = []
    for address, m in sorted(snap.mailboxes.items()):
        last = m.get("relay_mailbox_last_poll_timestamp_seconds", 0.0)
        quota = m.get("relay_mailbox_quota_bytes", 0.0)
        backlog = m.get("relay_mailbox_backlog_bytes", 0.0)
        mailboxes.append({
            "mailbox": address,
            "backlog_messages": int(m.get("relay_mailbox_backlog_messages", 0)),
            "backlog_bytes": int(backlog),
            "quota_bytes": int(quota),
            "quota_used": backlog / quota if quota else None,
            "oldest_age_seconds": m.get("relay_mailbox_oldest_message_age_seconds", 0.0),
            "last_poll_age_seconds": now - last if last else None,
            "drain_rate_bytes_per_second": m.get("relay_mailbox_drain_rate_bytes_per_second"),
        })
    return {
        "url": snap.url,
        "version": next((lb.get("version") for lb, _ in snap.labelled.get("relay_build_info", [])), None),
        "uptime_seconds": now - s["relay_start_time_seconds"],
        "disk_free_bytes": s.get("relay_disk_free_bytes"),
        "disk_total_bytes": s.get("relay_disk_total_bytes"),
        "sessions_open": snap.by("relay_sessions_current", "protocol"),
        "accounts": s.get("relay_accounts"),
        "backlog_messages": s.get("relay_backlog_messages"),
        "backlog_bytes": s.get("relay_backlog_bytes"),
        "received_messages": s.get("relay_messages_received_total"),
        "received_bytes": s.get("relay_received_bytes_total"),
        "fetched_messages": snap.by("relay_messages_fetched_total", "protocol"),
        "deleted_messages": s.get("relay_messages_deleted_total"),
        "deferred_replies": _replies(snap, "4xx"),
        "refused_replies": _replies(snap, "5xx"),
        "paced_seconds": s.get("relay_backpressure_paced_seconds_total"),
        "congested_mailboxes": s.get("relay_backpressure_congested_mailboxes"),
        "mailboxes": mailboxes,
    }


def _n(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}"


def _size(v: float | None) -> str:
    return "-" if v is None else format_size(v)


def render(data: dict[str, Any]) -> Any:
    """A rich renderable: the overview, then one row per mailbox."""
    from rich.console import Group
    from rich.table import Table

    over = Table.grid(padding=(0, 2))
    over.add_column(style="bold")
    over.add_column()
    disk = (f"{_size(data['disk_free_bytes'])} free of {_size(data['disk_total_bytes'])}"
            if data["disk_total_bytes"] else "-")
    sessions = ", ".join(f"{p} {n:.0f}" for p, n in sorted(data["sessions_open"].items())) or "none"
    fetched = ", ".join(f"{p} {n:.0f}" for p, n in sorted(data["fetched_messages"].items())) or "-"
    for label, value in (
        ("relay", f"{data['version'] or '?'} at {data['url']}, up {_age(data['uptime_seconds'])}"),
        ("disk", disk),
        ("sessions open", sessions),
        ("accounts", _n(data["accounts"])),
        ("backlog", f"{_n(data['backlog_messages'])} messages, {_size(data['backlog_bytes'])}"),
        ("received", f"{_n(data['received_messages'])} messages, {_size(data['received_bytes'])}"),
        ("fetched", fetched),
        ("deleted", _n(data["deleted_messages"])),
        ("deferred (4xx)", ", ".join(f"{r} {n:.0f}" for r, n in sorted(data["deferred_replies"].items())) or "none"),
        ("refused (5xx)", ", ".join(f"{r} {n:.0f}" for r, n in sorted(data["refused_replies"].items())) or "none"),
        ("paced", f"{data['paced_seconds']:.1f} s, {_n(data['congested_mailboxes'])} mailboxes congested"
         if data["paced_seconds"] is not None else "-"),
    ):
        over.add_row(label, value)
    parts: list[Any] = [over]
    if data["mailboxes"]:
        t = Table(title="mailboxes", title_justify="left")
        for col, just in (("mailbox", "left"), ("waiting", "right"), ("bytes", "right"),
                          ("quota used", "right"), ("oldest", "right"), ("last poll", "right"),
                          ("drain rate", "right")):
            t.add_column(col, justify=just)  # type: ignore[arg-type]
        for m in data["mailboxes"]:
            used = m["quota_used"]
            used_text = "-" if used is None else f"{used:.0%} of {format_size(m['quota_bytes'])}"
            if used is not None and used >= 0.9:
                used_text = f"[bold red]{used_text}[/]"
            rate = m["drain_rate_bytes_per_second"]
            t.add_row(m["mailbox"], str(m["backlog_messages"]), format_size(m["backlog_bytes"]),
                      used_text, _age(m["oldest_age_seconds"]) if m["backlog_messages"] else "-",
                      "never" if m["last_poll_age_seconds"] is None else _age(m["last_poll_age_seconds"]) + " ago",
                      "-" if rate is None else f"{format_size(rate)}/s")
        parts.append(t)
    else:
        parts.append("no per-mailbox figures ([metrics] per_mailbox = false, or no accounts)")
    return Group(*parts)
