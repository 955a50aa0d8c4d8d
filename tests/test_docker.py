"""Dockerfile, .dockerignore, requirements.lock and compose.yaml: linted and checked by parsing
(no Docker engine runs here); the image's entrypoint command is run directly in
tests/test_docker_entrypoint.py."""

from __future__ import annotations

import fnmatch
import re
import tomllib
from pathlib import Path

import yaml
from opsutil import CONTAINER_TOML, DOCKERFILE, ROOT, final_stage, instructions, run
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name


def container_ports() -> dict[str, int]:
    cfg = tomllib.loads(CONTAINER_TOML.read_text())
    ports = {k: int(cfg[k]["listen"][0].rsplit(":", 1)[1]) for k in ("smtp", "imap", "pop3")}
    ports["metrics"] = int(cfg["metrics"]["listen"].rsplit(":", 1)[1])
    return ports


def test_hadolint_clean() -> None:
    p = run(["hadolint", "--failure-threshold", "info", str(DOCKERFILE)])
    assert p.returncode == 0 and p.stdout.strip() == "", p.stdout + p.stderr


def test_image_shape() -> None:
    ins = final_stage()
    ops = dict(ins)
    assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+", ops["FROM"]), ops["FROM"]
    user = ops["USER"].split(":")[0]
    assert user.isdigit() and int(user) >= 1000          # non-root, numeric
    cfg = tomllib.loads(CONTAINER_TOML.read_text())
    assert f'"{cfg["data_dir"]}"' in ops["VOLUME"]
    assert {int(p) for p in ops["EXPOSE"].split()} == set(container_ports().values())
    assert f"127.0.0.1:{container_ports()['metrics']}/healthz" in ops["HEALTHCHECK"]
    assert "/etc/relay/relay.toml" in ops["CMD"]
    # the container config binds every listener on all addresses of the container
    for key in ("smtp", "imap", "pop3"):
        assert all(a.startswith("0.0.0.0:") for a in cfg[key]["listen"])
    assert cfg["metrics"]["listen"].startswith("0.0.0.0:")
    # dependencies are installed from the lock file
    assert any(op == "RUN" and "-r requirements.lock" in args for op, args in instructions())


def test_copied_files_exist_and_are_not_docker_ignored() -> None:
    patterns = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
                if ln.strip() and not ln.startswith("#")]

    def ignored(path: str) -> bool:
        result = False
        for pat in patterns:
            neg = pat.startswith("!")
            pat = pat.lstrip("!").rstrip("/")
            if fnmatch.fnmatch(path, pat) or path.startswith(pat + "/") and neg:
                result = not neg
        return result

    for op, args in instructions():
        if op == "COPY" and not args.startswith("--from"):
            for src in args.split()[:-1]:
                assert (ROOT / src).exists(), src
                assert not ignored(src), f"{src} is excluded by .dockerignore"
    assert ignored("tests/test_docker.py") and ignored(".git")


def test_build_backend_is_pinned_too() -> None:
    """`pip install .` in the image builds with pyproject's [build-system] requires, pinned by
    docker/build-constraints.txt through PIP_CONSTRAINT (which pip honours in its isolated
    build environment), not with whatever setuptools is newest that day."""
    pins = {}
    for line in (ROOT / "docker" / "build-constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, ver = line.partition("==")
            pins[canonicalize_name(name)] = ver.strip()
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    for raw in requires:
        req = Requirement(raw)
        assert canonicalize_name(req.name) in pins, f"{req.name} not pinned"
        assert pins[canonicalize_name(req.name)] in req.specifier, raw
    build_runs = [args for op, args in instructions() if op == "RUN" and "install" in args and " ." in args]
    assert build_runs and all("PIP_CONSTRAINT=/src/build-constraints.txt" in a for a in build_runs)


def test_compose_is_consistent() -> None:
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"relay", "prometheus", "grafana"}
    assert services["relay"]["build"] == "." and DOCKERFILE.exists()
    # every bind-mounted file or folder exists; named volumes are declared
    for name, svc in services.items():
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            if src.startswith("."):
                assert (ROOT / src).exists(), f"{name}: {src}"
            else:
                assert src in compose["volumes"], f"{name}: volume {src} not declared"
    # published relay ports are the container config's
    published = {int(p.rsplit(":", 1)[1]) for p in services["relay"]["ports"]}
    assert published == set(container_ports().values())
    # the relay's config file is the container config
    assert "./docker/relay.toml:/etc/relay/relay.toml:ro" in services["relay"]["volumes"]
    # no secret in the file: Grafana's admin password comes from the environment
    assert services["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"].startswith("${")
    # Prometheus scrapes the relay service on its metrics port and loads the alert rules
    prom = yaml.safe_load((ROOT / "prometheus" / "prometheus.yml").read_text())
    (job,) = [j for j in prom["scrape_configs"] if j["job_name"] == "relay"]
    assert job["static_configs"][0]["targets"] == [f"relay:{container_ports()['metrics']}"]
    mounted = {Path(v.split(":")[1]).name for v in services["prometheus"]["volumes"]}
    assert set(prom["rule_files"]) <= mounted
    p = run(["promtool", "check", "config", str(ROOT / "prometheus" / "prometheus.yml")])
    assert p.returncode == 0, p.stdout + p.stderr


def test_systemd_unit_example() -> None:
    unit = (ROOT / "docs" / "relay.service").read_text()
    assert re.search(r"^ExecStart=\S*relay serve --config \S+\.toml$", unit, re.MULTILINE)
    assert re.search(r"^User=relay$", unit, re.MULTILINE)
    assert "KillSignal=SIGTERM" in unit
    p = run(["systemd-analyze", "verify", "--man=no", str(ROOT / "docs" / "relay.service")])
    # the only complaint allowed: the binary path does not exist on this machine
    problems = [ln for ln in p.stderr.splitlines() if ln.strip()
                and "/opt/relay/bin/relay is not executable" not in ln]
    assert problems == [], p.stderr
