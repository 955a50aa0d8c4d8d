"""prometheus/alerts.yml: promtool accepts it, every alert has a firing unit test, and every
metric it uses is documented."""

from __future__ import annotations

import yaml
from opsutil import ROOT, base_name, documented_metrics, promql_metric_names, run

ALERTS = ROOT / "prometheus" / "alerts.yml"
ALERTS_TEST = ROOT / "prometheus" / "alerts_test.yml"
REQUIRED = {"RelayDown", "RelayDiskFullSoon", "RelayReceiverNotPolling", "RelayMailboxNearQuota",
            "RelayDeferralsSpike"}


def _rules() -> list[dict]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [r for g in doc["groups"] for r in g["rules"]]


def test_promtool_check_rules() -> None:
    p = run(["promtool", "check", "rules", str(ALERTS)])
    assert p.returncode == 0, p.stdout + p.stderr
    assert f"SUCCESS: {len(_rules())} rules found" in p.stdout + p.stderr


def test_promtool_unit_tests_pass() -> None:
    p = run(["promtool", "test", "rules", ALERTS_TEST.name], cwd=ALERTS_TEST.parent)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "SUCCESS" in p.stdout + p.stderr


def test_every_alert_has_a_firing_and_the_issue_asks_for_them() -> None:
    names = {r["alert"] for r in _rules()}
    assert REQUIRED <= names
    tests = yaml.safe_load(ALERTS_TEST.read_text())["tests"]
    firing = {c["alertname"] for t in tests for c in t["alert_rule_test"] if c.get("exp_alerts")}
    quiet = {c["alertname"] for t in tests for c in t["alert_rule_test"] if not c.get("exp_alerts")}
    assert names <= firing, f"alerts without a firing test: {names - firing}"
    assert REQUIRED <= quiet, f"alerts without a quiet case: {REQUIRED - quiet}"


def test_alerts_use_only_documented_metrics() -> None:
    documented = documented_metrics()
    for rule in _rules():
        used = {base_name(n, documented) for n in promql_metric_names(rule["expr"])}
        assert used, rule["alert"]
        assert used <= set(documented) | {"up"}, f"{rule['alert']}: {used - set(documented)}"
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_operations_guide_explains_every_alert() -> None:
    guide = (ROOT / "docs" / "operations.md").read_text()
    for rule in _rules():
        assert f"| {rule['alert']} (" in guide, f"{rule['alert']} is not explained in docs/operations.md"
