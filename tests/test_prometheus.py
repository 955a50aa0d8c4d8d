"""A real Prometheus (Debian's binary) scrapes a running relay on loopback; its HTTP API then
answers queries for the relay's metrics, every dashboard query, and the alert rules load."""

from __future__ import annotations

import json
import math
import poplib
import shutil
import smtplib
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import RunningRelay
from opsutil import ROOT, dashboard_exprs

WAIT = 30.0     # seconds: Prometheus start + a couple of 1 s scrapes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def api(base: str, path: str, **params: str) -> Any:
    url = f"{base}{path}?{urllib.parse.urlencode(params)}" if params else f"{base}{path}"
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.loads(resp.read())


@pytest.fixture
def prometheus(relay: RunningRelay, tmp_path: Path) -> Iterator[str]:
    assert shutil.which("prometheus"), "Debian package prometheus is required (see .ci/run)"
    shutil.copy(ROOT / "prometheus" / "alerts.yml", tmp_path / "alerts.yml")
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": ["alerts.yml"],
        "scrape_configs": [{"job_name": "relay", "static_configs": [
            {"targets": [f"127.0.0.1:{relay.metrics_port}"]}]}],
    }))
    port = free_port()
    proc = subprocess.Popen(
        ["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}",
         f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
         "--log.level=warn"],
        stdout=subprocess.DEVNULL, stderr=(tmp_path / "prometheus.log").open("wb"))
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + WAIT
        while True:
            try:
                with urllib.request.urlopen(f"{base}/-/ready", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None, (tmp_path / "prometheus.log").read_text()
            assert time.monotonic() < deadline, "prometheus not ready"
            time.sleep(0.2)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def wait_for(base: str, query: str, predicate: Any) -> list[dict[str, Any]]:
    """Poll an instant query until predicate(result) holds (bounded by WAIT)."""
    deadline = time.monotonic() + WAIT
    while True:
        result = api(base, "/api/v1/query", query=query)["data"]["result"]
        if predicate(result):
            return result
        assert time.monotonic() < deadline, f"{query}: {result}"
        time.sleep(0.5)


def latency_row() -> list[tuple[str, str]]:
    """(panel title, PromQL) of the dashboard's "Latency" row."""
    out, inside = [], False
    for p in json.loads((ROOT / "grafana" / "dashboards" / "relay.json").read_text())["panels"]:
        if p["type"] == "row":
            inside = p["title"] == "Latency"
            continue
        if inside:
            out += [(p["title"], t["expr"].replace("$__rate_interval", "1m").replace("$instance", ".*"))
                    for t in p["targets"]]
    return out


def test_prometheus_scrapes_the_relay(relay: RunningRelay, prometheus: str) -> None:
    # a first scrape of the idle relay, so that the traffic below is an increase (rate > 0)
    wait_for(prometheus, "relay_messages_received_total", lambda r: bool(r))
    with smtplib.SMTP("127.0.0.1", relay.smtp_port, timeout=30) as s:
        s.sendmail("ct@hospital.test", ["alice@example.test", "bob@example.test"],
                   b"Subject: x\r\n\r\nstudy\r\n")
    p3 = poplib.POP3("127.0.0.1", relay.pop3_port, timeout=30)     # bob fetches and deletes
    p3.user("bob@example.test")
    p3.pass_("secret")
    p3.retr(1)
    p3.dele(1)
    p3.quit()
    result = wait_for(prometheus, "relay_messages_received_total",
                      lambda r: r and float(r[0]["value"][1]) == 1)
    assert result[0]["metric"]["job"] == "relay"
    up = wait_for(prometheus, 'up{job="relay"}', lambda r: bool(r))
    assert up[0]["value"][1] == "1"

    # the dashboard's latency row shows figures for that message: every query of it answers a
    # number (not NaN, not empty) once Prometheus has scraped the increase
    row = latency_row()
    assert {t for t, _ in row} >= {"SMTP ingest duration", "Delivery to first fetch",
                                   "Delivery to deletion", "Fetch duration p95, by protocol"}
    for title, expr in row:
        got = wait_for(prometheus, expr, lambda r: any(not math.isnan(float(x["value"][1])) for x in r))
        values = [float(x["value"][1]) for x in got if not math.isnan(float(x["value"][1]))]
        assert all(v >= 0 for v in values), (title, expr, got)
    backlog = wait_for(prometheus, 'relay_mailbox_backlog_messages{mailbox="alice@example.test"}',
                       lambda r: bool(r))
    assert backlog[0]["value"][1] == "1"
    drained = wait_for(prometheus, 'relay_mailbox_backlog_messages{mailbox="bob@example.test"}',
                       lambda r: bool(r) and r[0]["value"][1] == "0")
    assert drained
    # the target is healthy and the scrape had no errors
    targets = api(prometheus, "/api/v1/targets")["data"]["activeTargets"]
    assert [(t["labels"]["job"], t["health"], t["lastError"]) for t in targets] == [("relay", "up", "")]

    # every dashboard query is accepted by the real query engine
    for title, expr in dashboard_exprs():
        answer = api(prometheus, "/api/v1/query", query=expr)
        assert answer["status"] == "success", (title, expr, answer)

    # the alert rules load and evaluate without error; a healthy relay fires none
    expected = sum(len(g["rules"]) for g in
                   yaml.safe_load((ROOT / "prometheus" / "alerts.yml").read_text())["groups"])
    deadline = time.monotonic() + WAIT
    while True:
        rules = [r for g in api(prometheus, "/api/v1/rules")["data"]["groups"] for r in g["rules"]]
        if len(rules) == expected and all(r["health"] == "ok" for r in rules):
            break
        assert time.monotonic() < deadline, [(r["name"], r["health"], r.get("lastError")) for r in rules]
        time.sleep(0.5)
    firing = [a for a in api(prometheus, "/api/v1/alerts")["data"]["alerts"] if a["state"] == "firing"]
    assert firing == []
