"""grafana/: the dashboard has the rows the operator needs, its queries parse and use only
documented metrics, it is what make_dashboard.py writes, and provisioning points at it."""

from __future__ import annotations

import importlib.util
import itertools
import json
import re
from pathlib import Path

import yaml
from opsutil import (
    DASHBOARD,
    ROOT,
    base_name,
    dashboard_exprs,
    documented_metrics,
    promql_metric_names,
    run,
)

from relay.metrics import SPECS

ROWS = ["Traffic", "Receivers and backlog", "Quotas", "Rejections and deferrals", "Latency",
        "Store on PostgreSQL (nodes of a cluster; empty with the Maildir store)", "Host and disk"]


def test_dashboard_rows_and_panels() -> None:
    d = json.loads(DASHBOARD.read_text())
    rows = [p["title"] for p in d["panels"] if p["type"] == "row"]
    assert rows == ROWS
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    # every row has panels under it, and every panel has at least one query
    kinds = [p["type"] for p in d["panels"]] + ["row"]
    assert all(not (a == "row" and b == "row") for a, b in itertools.pairwise(kinds))
    for p in d["panels"]:
        if p["type"] != "row":
            assert p["targets"] and all(t["expr"] for t in p["targets"]), p["title"]
            assert p["datasource"]["uid"] == "prometheus"
            g = p["gridPos"]
            assert g["x"] + g["w"] <= 24


def test_every_query_follows_the_relay_selector() -> None:
    d = json.loads(DASHBOARD.read_text())
    (var,) = d["templating"]["list"]
    assert var["name"] == "instance"
    for p in d["panels"]:
        for t in p.get("targets", []):
            for selector in re.findall(r"\b(?:relay_[a-z0-9_]+|up)\{([^}]*)\}", t["expr"]):
                assert 'instance=~"$instance"' in selector, (p["title"], t["expr"])
            assert not re.search(r"\brelay_[a-z0-9_]+\b(?!\{)", t["expr"]), (p["title"], t["expr"])


def test_dashboard_uses_only_documented_metrics() -> None:
    documented = documented_metrics()
    exported = {s.exposed for s in SPECS}
    used_all: set[str] = set()
    for title, expr in dashboard_exprs():
        used = {base_name(n, documented) for n in promql_metric_names(expr)}
        assert used, f"{title}: no metric in {expr}"
        assert used <= set(documented) | {"up"}, f"{title}: undocumented {used - set(documented)}"
        used_all |= used
    # every relay_* name used is one the collector can export (SPECS) or the process collector's
    for name in used_all - {"up"}:
        assert name in exported or name.startswith("relay_process_"), name
    # and the dashboard shows most of what is exported
    assert len(used_all & exported) >= len(exported) - 3, sorted(exported - used_all)


def test_dashboard_queries_parse(tmp_path: Path) -> None:
    """promtool parses every query, as a recording rule each."""
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{i}", "expr": expr} for i, (_, expr) in enumerate(dashboard_exprs())
    ]}]}
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump(rules))
    p = run(["promtool", "check", "rules", str(path)])
    assert p.returncode == 0, p.stdout + p.stderr


def test_dashboard_json_is_generated() -> None:
    spec = importlib.util.spec_from_file_location("make_dashboard", ROOT / "grafana" / "make_dashboard.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert DASHBOARD.read_text() == mod.render(), "run python3 grafana/make_dashboard.py"


def test_provisioning_points_at_the_dashboard() -> None:
    ds = yaml.safe_load((ROOT / "grafana/provisioning/datasources/prometheus.yml").read_text())
    (source,) = ds["datasources"]
    assert source["type"] == "prometheus" and source["uid"] == "prometheus"
    prov = yaml.safe_load((ROOT / "grafana/provisioning/dashboards/relay.yml").read_text())
    (provider,) = prov["providers"]
    assert provider["type"] == "file"
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    volumes = compose["services"]["grafana"]["volumes"]
    assert any(v.startswith("./grafana/dashboards:") and v.split(":")[1] == provider["options"]["path"]
               for v in volumes), volumes
