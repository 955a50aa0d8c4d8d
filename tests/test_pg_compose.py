"""compose.cluster.yaml: two relay nodes on PostgreSQL with Prometheus and Grafana, checked by
parsing (and promtool), like tests/test_docker.py does for compose.yaml."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from relay import config as configmod

ROOT = Path(__file__).resolve().parent.parent


def test_cluster_compose_is_consistent() -> None:
    compose = yaml.safe_load((ROOT / "compose.cluster.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"postgres", "relay1", "relay2", "prometheus", "grafana"}
    for name, svc in services.items():
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            if src.startswith("."):
                assert (ROOT / src).exists(), f"{name}: {src}"
            else:
                assert src in compose["volumes"], f"{name}: volume {src} not declared"
    # both nodes run the image with the cluster config, which selects PostgreSQL
    cfg = configmod.load(ROOT / "docker" / "relay-cluster.toml")
    assert cfg.store.backend == "postgresql" and "@postgres:5432/relay" in cfg.store.dsn
    published = []
    for node in ("relay1", "relay2"):
        svc = services[node]
        assert svc["build"] == "." and "./docker/relay-cluster.toml:/etc/relay/relay.toml:ro" in svc["volumes"]
        assert svc["environment"]["PGPASSWORD"].startswith("${")            # no secret in the file
        assert svc["depends_on"]["postgres"]["condition"] == "service_healthy"
        published += [p.rsplit(":", 2)[-2] for p in svc["ports"]]
    assert len(published) == len(set(published)), "two nodes publish the same host port"
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD"].startswith("${")
    assert services["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"].startswith("${")
    prom_file = ROOT / "prometheus" / "prometheus-cluster.yml"
    prom = yaml.safe_load(prom_file.read_text())
    (job,) = [j for j in prom["scrape_configs"] if j["job_name"] == "relay"]
    port = cfg.metrics.listen.rsplit(":", 1)[1]
    assert job["static_configs"][0]["targets"] == [f"relay1:{port}", f"relay2:{port}"]
    p = subprocess.run(["promtool", "check", "config", str(prom_file)], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
