"""Writes grafana/dashboards/relay.json: the relay dashboard, one row per question the operator
asks (traffic, receivers and backlog, quotas, rejections and deferrals, latency, host and disk).

    python3 grafana/make_dashboard.py        # rewrite the JSON after editing this file

Every expression uses only metrics listed in docs/metrics.md (tests/test_grafana.py checks it,
and that the JSON is what this script writes).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent / "dashboards" / "relay.json"
DS = {"type": "prometheus", "uid": "prometheus"}
SEL = 'instance=~"$instance"'
W = 24


class Layout:
    def __init__(self) -> None:
        self.panels: list[dict[str, Any]] = []
        self.y = 0
        self.x = 0
        self.row_h = 0
        self.next_id = 1

    def _id(self) -> int:
        self.next_id += 1
        return self.next_id - 1

    def row(self, title: str) -> None:
        self._newline()
        self.panels.append({"type": "row", "id": self._id(), "title": title, "collapsed": False,
                            "gridPos": {"h": 1, "w": W, "x": 0, "y": self.y}, "panels": []})
        self.y += 1

    def _newline(self) -> None:
        if self.x:
            self.y += self.row_h
            self.x = 0
            self.row_h = 0

    def panel(self, title: str, targets: list[tuple[str, str]], unit: str = "short",
              kind: str = "timeseries", w: int = 8, h: int = 8, desc: str = "",
              **options: Any) -> None:
        if self.x + w > W:
            self._newline()
        p: dict[str, Any] = {
            "type": kind, "id": self._id(), "title": title, "description": desc,
            "datasource": DS,
            "gridPos": {"h": h, "w": w, "x": self.x, "y": self.y},
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "options": options,
            "targets": [{"datasource": DS, "expr": expr, "legendFormat": legend,
                         "refId": chr(ord("A") + i)} for i, (expr, legend) in enumerate(targets)],
        }
        if kind in ("table", "bargauge"):
            for t in p["targets"]:
                t["instant"] = True
                t["format"] = "table" if kind == "table" else "time_series"
        self.panels.append(p)
        self.x += w
        self.row_h = max(self.row_h, h)


def build() -> dict[str, Any]:
    L = Layout()
    r5 = "[$__rate_interval]"

    L.row("Traffic")
    L.panel("Messages per second", [
        (f"sum(rate(relay_messages_received_total{{{SEL}}}{r5}))", "received (SMTP 250)"),
        (f"sum(rate(relay_messages_stored_total{{{SEL}}}{r5}))", "stored (per recipient)"),
        (f"sum by (protocol) (rate(relay_messages_fetched_total{{{SEL}}}{r5}))", "fetched {{protocol}}"),
        (f"sum(rate(relay_messages_deleted_total{{{SEL}}}{r5}))", "deleted"),
    ], unit="ops")
    L.panel("Bytes per second", [
        (f"sum(rate(relay_received_bytes_total{{{SEL}}}{r5}))", "received"),
        (f"sum by (protocol) (rate(relay_fetched_bytes_total{{{SEL}}}{r5}))", "fetched {{protocol}}"),
        (f"sum(rate(relay_deleted_bytes_total{{{SEL}}}{r5}))", "deleted"),
    ], unit="Bps")
    L.panel("Sessions open", [
        (f"sum by (protocol) (relay_sessions_current{{{SEL}}})", "{{protocol}}"),
    ])
    L.panel("Sessions ended per second, by outcome", [
        (f"sum by (protocol, outcome) (rate(relay_sessions_total{{{SEL}}}{r5}))",
         "{{protocol}} {{outcome}}"),
    ], unit="ops", w=12)
    L.panel("Participant directory", [
        (f"max(relay_directory_serial{{{SEL}}})", "serial"),
        (f"sum(increase(relay_directory_requests_total{{{SEL}}}[24h]))", "requests (24 h)"),
        (f"sum(increase(relay_directory_pushes_total{{{SEL}}}[24h]))", "pushes (24 h)"),
    ], kind="stat", w=6)
    L.panel("Messages received (24 h)", [
        (f"sum(increase(relay_messages_received_total{{{SEL}}}[24h]))", "messages"),
        (f"sum(increase(relay_received_bytes_total{{{SEL}}}[24h]))", "bytes"),
    ], kind="stat", w=6)

    L.row("Receivers and backlog")
    L.panel("Backlog (all mailboxes)", [
        (f"sum(relay_backlog_bytes{{{SEL}}})", "bytes"),
    ], unit="bytes")
    L.panel("Backlog messages (all mailboxes)", [
        (f"sum(relay_backlog_messages{{{SEL}}})", "messages"),
    ])
    L.panel("Largest backlogs", [
        (f"topk(10, relay_mailbox_backlog_bytes{{{SEL}}})", "{{mailbox}}"),
    ], unit="bytes")
    L.panel("Time since last poll (mailboxes with mail waiting)", [
        ((f"sort_desc(time() - relay_mailbox_last_poll_timestamp_seconds{{{SEL}}} "
         f"and on (instance, mailbox) relay_mailbox_backlog_messages{{{SEL}}} > 0)"), "{{mailbox}}"),
    ], unit="s", kind="bargauge", w=8,
        desc="A receiver that never polled shows the time since 1970.")
    L.panel("Oldest message waiting", [
        (f"topk(10, relay_mailbox_oldest_message_age_seconds{{{SEL}}})", "{{mailbox}}"),
    ], unit="s")
    L.panel("Drain rate per receiver", [
        (f"topk(10, relay_mailbox_drain_rate_bytes_per_second{{{SEL}}})", "{{mailbox}}"),
    ], unit="Bps")

    L.row("Quotas")
    L.panel("Byte quota used", [
        (f"sort_desc(relay_mailbox_backlog_bytes{{{SEL}}} / (relay_mailbox_quota_bytes{{{SEL}}} > 0))",
         "{{mailbox}}"),
    ], unit="percentunit", kind="bargauge", w=12,
        desc="Above 90% the RelayMailboxNearQuota alert fires; at 100% senders get 452 4.2.2.")
    L.panel("Message quota used", [
        (f"sort_desc(relay_mailbox_backlog_messages{{{SEL}}} / (relay_mailbox_quota_messages{{{SEL}}} > 0))",
         "{{mailbox}}"),
    ], unit="percentunit", kind="bargauge", w=12)
    L.panel("Mailboxes", [
        (f"sum(relay_accounts{{{SEL}}})", "accounts"),
        (f"count((relay_mailbox_backlog_bytes{{{SEL}}} / (relay_mailbox_quota_bytes{{{SEL}}} > 0)) > 0.9)",
         "above 90% of quota"),
    ], kind="stat", w=24, h=4)

    L.row("Rejections and deferrals")
    L.panel("SMTP refusals per second, by reason", [
        (f'sum by (class, reason) (rate(relay_smtp_replies_total{{{SEL}, class!="2xx"}}{r5}))',
         "{{class}} {{reason}}"),
    ], unit="ops", w=12, desc="4xx: deferred, the sender retries. 5xx: refused for good.")
    L.panel("Policy deferrals per second, by reason", [
        (f"sum by (reason) (rate(relay_backpressure_deferrals_total{{{SEL}}}{r5}))", "{{reason}}"),
    ], unit="ops", w=12)
    L.panel("Pacing", [
        (f"sum(rate(relay_backpressure_paced_seconds_total{{{SEL}}}{r5}))", "paced seconds per second"),
        (f"sum(relay_backpressure_congested_mailboxes{{{SEL}}})", "congested mailboxes"),
    ], w=12, desc="Seconds per second that SMTP intake waited so senders match receivers' drain.")
    L.panel("Connections refused per second", [
        (f"sum by (protocol) (rate(relay_sessions_refused_total{{{SEL}}}{r5}))", "{{protocol}}"),
    ], unit="ops", w=8)
    L.panel("Messages not accepted after their data", [
        (f"sum(rate(relay_messages_rejected_total{{{SEL}}}{r5}))", "messages/s"),
        (f"sum(rate(relay_rejected_bytes_total{{{SEL}}}{r5}))", "bytes/s"),
    ], w=8, desc="Data received (or drained) and then refused: too big, quota crossed while streaming, storage error.")
    L.panel("Receiver logins per second", [
        (f"sum by (protocol) (rate(relay_logins_total{{{SEL}}}{r5}))", "ok {{protocol}}"),
        (f"sum by (protocol) (rate(relay_login_failures_total{{{SEL}}}{r5}))", "failed {{protocol}}"),
    ], unit="ops", w=8, desc="Failed logins in numbers: a misconfigured gateway or password guessing.")

    L.panel("Stress mode and evictions", [
        (f"max by (protocol) (relay_sessions_stress{{{SEL}}})", "stress {{protocol}}"),
        (f"sum by (protocol) (rate(relay_sessions_evicted_total{{{SEL}}}{r5}))", "evicted/s {{protocol}}"),
    ], w=8, desc="Stress: sessions above stress_threshold of max_sessions; timeouts shrink and idle "
       "sessions make room for new clients (docs/operations.md).")
    L.panel("Failed and refused logins per second", [
        (f"sum by (protocol) (rate(relay_auth_failures_total{{{SEL}}}{r5}))", "failed {{protocol}}"),
        (f"sum by (protocol) (rate(relay_auth_refused_total{{{SEL}}}{r5}))", "refused {{protocol}}"),
        (f"sum(rate(relay_auth_penalty_seconds_total{{{SEL}}}{r5}))", "penalty s/s"),
    ], w=8, desc="SMTP AUTH, IMAP and POP3: failures delay the next attempt per client and account.")
    L.panel("Disk reserve for deletions", [
        (f"relay_disk_reserve_bytes{{{SEL}}}", "reserve {{instance}}"),
        (f"increase(relay_disk_reserve_releases_total{{{SEL}}}[1h])", "released in 1 h"),
    ], unit="bytes", w=8, desc="Released when the disk is full so that receivers can still delete.")

    L.row("Latency")
    for title, metric, unit in (
        ("SMTP ingest duration", "relay_ingest_duration_seconds", "s"),
        ("Delivery to first fetch", "relay_delivery_to_fetch_seconds", "s"),
        ("Delivery to deletion", "relay_delivery_to_delete_seconds", "s"),
        ("Message size", "relay_message_size_bytes", "bytes"),
    ):
        L.panel(title, [
            (f"histogram_quantile({q}, sum by (le) (rate({metric}_bucket{{{SEL}}}{r5})))", f"p{int(q * 100)}")
            for q in (0.5, 0.95)
        ] + [(f"sum(rate({metric}_sum{{{SEL}}}{r5})) / sum(rate({metric}_count{{{SEL}}}{r5}))", "mean")],
            unit=unit, w=6)
    L.panel("Fetch duration p95, by protocol", [
        (f"histogram_quantile(0.95, sum by (le, protocol) (rate(relay_fetch_duration_seconds_bucket{{{SEL}}}{r5})))",
         "{{protocol}}"),
    ], unit="s", w=24)

    L.row("Store on PostgreSQL (nodes of a cluster; empty with the Maildir store)")
    L.panel("Database connections per node", [
        (f"relay_store_pool_connections{{{SEL}}}", "open {{instance}}"),
        (f"relay_store_pool_idle_connections{{{SEL}}}", "idle {{instance}}"),
        (f"relay_store_pool_max_connections{{{SEL}}}", "limit {{instance}}"),
        (f"relay_store_pool_waiting_requests{{{SEL}}}", "waiting {{instance}}"),
    ])
    L.panel("Pool requests per second", [
        (f"rate(relay_store_pool_requests_total{{{SEL}}}{r5})", "requests {{instance}}"),
        (f"rate(relay_store_pool_request_errors_total{{{SEL}}}{r5})", "no connection in time {{instance}}"),
    ])
    L.panel("Database trouble per second", [
        (f"rate(relay_store_unavailable_total{{{SEL}}}{r5})", "answered unavailable {{instance}}"),
        (f"rate(relay_store_connection_errors_total{{{SEL}}}{r5})", "connect failed {{instance}}"),
        (f"rate(relay_store_connections_lost_total{{{SEL}}}{r5})", "connection lost {{instance}}"),
        (f"rate(relay_store_connections_total{{{SEL}}}{r5})", "connections made {{instance}}"),
    ])
    L.panel("Change feed", [
        (f"relay_store_change_feed_connected{{{SEL}}}", "listening {{instance}}"),
        (f"increase(relay_store_change_feed_reconnects_total{{{SEL}}}[1h])", "reconnects/h {{instance}}"),
        (f"rate(relay_store_change_feed_received_total{{{SEL}}}{r5})", "changes from other nodes/s {{instance}}"),
    ])
    L.panel("Dead nodes cleaned up after", [
        (f"increase(relay_store_swept_nodes_total{{{SEL}}}[1h])", "nodes/h {{instance}}"),
        (f"increase(relay_store_swept_bodies_total{{{SEL}}}[1h])", "bodies/h {{instance}}"),
    ], w=16)

    L.row("Host and disk")
    L.panel("Data disk", [
        (f"relay_disk_free_bytes{{{SEL}}}", "free {{instance}}"),
        (f"relay_disk_total_bytes{{{SEL}}}", "total {{instance}}"),
        (f"predict_linear(relay_disk_free_bytes{{{SEL}}}[6h], 24 * 3600)", "free in 24 h (trend)"),
    ], unit="bytes")
    L.panel("Disk used", [
        (f"1 - relay_disk_free_bytes{{{SEL}}} / relay_disk_total_bytes{{{SEL}}}", "{{instance}}"),
    ], unit="percentunit", kind="gauge", w=4)
    L.panel("Up", [
        (f'up{{job="relay", {SEL}}}', "{{instance}}"),
    ], kind="stat", w=4)
    L.panel("Relay version", [
        (f"relay_build_info{{{SEL}}}", "{{version}} (Python {{python}})"),
    ], kind="table", w=8)
    L.panel("Memory", [
        (f"relay_process_resident_memory_bytes{{{SEL}}}", "resident {{instance}}"),
    ], unit="bytes")
    L.panel("CPU", [
        (f"rate(relay_process_cpu_seconds_total{{{SEL}}}{r5})", "cores {{instance}}"),
    ], unit="short")
    L.panel("Open files", [
        (f"relay_process_open_fds{{{SEL}}}", "open {{instance}}"),
        (f"relay_process_max_fds{{{SEL}}}", "limit {{instance}}"),
    ])
    L.panel("Uptime", [
        (f"time() - relay_start_time_seconds{{{SEL}}}", "{{instance}}"),
    ], unit="s", kind="stat", w=24, h=4)

    return {
        "uid": "relay-overview",
        "title": "Relay",
        "tags": ["relay", "mail", "dicom"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-24h", "to": "now"},
        "editable": True,
        "templating": {"list": [{
            "name": "instance", "label": "Relay", "type": "query", "datasource": DS,
            "query": {"query": "label_values(relay_build_info, instance)", "refId": "instance"},
            "definition": "label_values(relay_build_info, instance)",
            "includeAll": True, "multi": True, "allValue": ".*", "refresh": 2,
            "current": {"selected": True, "text": "All", "value": "$__all"},
        }]},
        "annotations": {"list": []},
        "panels": L.panels,
    }


def render() -> str:
    return json.dumps(build(), indent=2) + "\n"


if __name__ == "__main__":
    OUT.write_text(render())
    print(f"wrote {OUT}")
