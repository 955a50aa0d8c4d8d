"""Helpers for the operations tests: documented metric names, names used in PromQL."""

from __future__ import annotations

import contextlib
import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
METRICS_MD = ROOT / "docs" / "metrics.md"

_HIST_SUFFIXES = ("_bucket", "_sum", "_count")


def documented_metrics() -> dict[str, str]:
    """name -> type, from the table rows of docs/metrics.md."""
    out = {}
    for m in re.finditer(r"^\| `([a-z_:][a-z0-9_:]*)` \| (counter|gauge|histogram) \|",
                         METRICS_MD.read_text(), re.MULTILINE):
        out[m.group(1)] = m.group(2)
    return out


def base_name(series: str, documented: dict[str, str]) -> str:
    """relay_x_bucket -> relay_x when relay_x is a documented histogram."""
    for suffix in _HIST_SUFFIXES:
        if series.endswith(suffix) and documented.get(series[: -len(suffix)]) == "histogram":
            return series[: -len(suffix)]
    return series


def promql_metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: relay_* identifiers and Prometheus' own `up`.
    (Label names inside {} and by()/on() never start with relay_ here.)"""
    expr = re.sub(r'"[^"]*"', '""', expr)          # label values and strings
    names = set(re.findall(r"\brelay_[a-z0-9_]+", expr))
    if re.search(r"(?<![a-z_])up\s*[{\[]", expr) or re.search(r"(?<![a-z_])up\s*$", expr):
        names.add("up")
    return names


def run(cmd: list[str], timeout: float = 60, **kw: object) -> subprocess.CompletedProcess[str]:
    """Run a tool, capture its text output; the caller asserts on returncode and output."""
    return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout,
                          **kw)  # type: ignore[call-overload]


DASHBOARD = ROOT / "grafana" / "dashboards" / "relay.json"


def dashboard_exprs() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every target in the dashboard, Grafana variables replaced by
    what Grafana sends to Prometheus."""
    out = []
    for p in json.loads(DASHBOARD.read_text())["panels"]:
        for t in p.get("targets", []):
            expr = t["expr"].replace("$__rate_interval", "1m").replace("$instance", ".*")
            out.append((p["title"], expr))
    return out


DOCKERFILE = ROOT / "Dockerfile"
CONTAINER_TOML = ROOT / "docker" / "relay.toml"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def final_stage() -> list[tuple[str, str]]:
    ins = instructions()
    last_from = max(i for i, (op, _) in enumerate(ins) if op == "FROM")
    return ins[last_from:]


@contextlib.contextmanager
def serving(command: list[str], data_dir: Path, log_path: Path) -> Iterator[dict[str, Any]]:
    """Run a `relay serve` command as a subprocess until it has written listeners.json; yield
    what it bound. At exit: SIGTERM, and the exit status must be 0."""
    with log_path.open("wb") as log:
        proc = subprocess.Popen(command, cwd=log_path.parent, stdout=log, stderr=subprocess.STDOUT)
        try:
            listeners = data_dir / "run" / "listeners.json"
            deadline = time.monotonic() + 30
            while not listeners.exists():
                assert proc.poll() is None, log_path.read_text()
                assert time.monotonic() < deadline, "no listeners.json after 30 s"
                time.sleep(0.1)
            time.sleep(0.1)          # written in one go; let the writer finish
            yield json.loads(listeners.read_text())
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                rc = proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                raise
    assert rc == 0, log_path.read_text()


RELAY = [sys.executable, "-m", "relay"]


def loopback_config(tmp: Path, **sections: dict[str, Any]) -> Path:
    """tmp/relay.toml: data in tmp/data, every listener on a free loopback port, plus
    `sections` ({"log": {"format": "json"}}; values written as JSON, which TOML accepts for
    strings, numbers and booleans)."""
    tables: dict[str, dict[str, Any]] = {k: {"listen": ["127.0.0.1:0"]} for k in ("smtp", "imap", "pop3")}
    tables["metrics"] = {"listen": "127.0.0.1:0"}
    for name, keys in sections.items():
        tables.setdefault(name, {}).update(keys)
    text = 'data_dir = "data"\nhostname = "relay.test"\n'
    for name, keys in tables.items():
        text += f"[{name}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in keys.items())
    cfg = tmp / "relay.toml"
    cfg.write_text(text)
    return cfg


def add_user(cfg: Path, address: str, password: str = "secret") -> None:
    """`relay user add` through the command line (works while the server runs)."""
    p = run([*RELAY, "user", "add", address, "--password-stdin", "--config", str(cfg)],
            input=password + "\n")
    assert p.returncode == 0, p.stdout + p.stderr


@contextlib.contextmanager
def tmpfs(mnt: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` ("4m") mounted at `mnt` (root only: the test is skipped otherwise),
    unmounted at the end. Enter it before starting a relay on it."""
    import pytest

    mnt.mkdir(parents=True, exist_ok=True)
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)],
                       capture_output=True, check=False)
    if p.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {p.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
