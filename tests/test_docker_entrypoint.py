"""The image's entrypoint command, run directly (no Docker engine here): ENTRYPOINT + CMD of the
Dockerfile with the container config adapted to a temporary data dir and free loopback ports.
It serves, its HEALTHCHECK command passes, and SIGTERM ends it with exit status 0."""

from __future__ import annotations

import json
import re
from pathlib import Path

from opsutil import CONTAINER_TOML, final_stage, run, serving

CONTAINER_CONFIG_PATH = "/etc/relay/relay.toml"


def adapted_config(tmp: Path) -> Path:
    text = CONTAINER_TOML.read_text()
    text, n_dir = re.subn(r'^data_dir = "[^"]*"', f'data_dir = "{tmp / "data"}"', text, flags=re.MULTILINE)
    text, n_listen = re.subn(r'"0\.0\.0\.0:\d+"', '"127.0.0.1:0"', text)
    assert n_dir == 1 and n_listen == 4
    path = tmp / "relay.toml"
    path.write_text(text)
    return path


def test_entrypoint_serves_passes_healthcheck_and_stops_on_sigterm(tmp_path: Path) -> None:
    ops = dict(final_stage())
    command = json.loads(ops["ENTRYPOINT"]) + json.loads(ops["CMD"])
    assert CONTAINER_CONFIG_PATH in command
    config = adapted_config(tmp_path)
    command = [str(config) if a == CONTAINER_CONFIG_PATH else a for a in command]
    with serving(command, tmp_path / "data", tmp_path / "relay.log") as bound:
        assert {"smtp", "imap", "pop3", "metrics"} <= set(bound)
        port = bound["metrics"][0][1]
        # the HEALTHCHECK's own command, pointed at the port bound here
        exec_form = re.search(r"CMD (\[.*\])$", ops["HEALTHCHECK"]).group(1)  # type: ignore[union-attr]
        check = [a.replace("127.0.0.1:9325", f"127.0.0.1:{port}") for a in json.loads(exec_form)]
        assert check != json.loads(exec_form)
        p = run(check, timeout=10)
        assert p.returncode == 0, p.stdout + p.stderr
        # and it does fail when nothing answers there
        p = run([a.replace(f":{port}/", ":1/") for a in check], timeout=10)
        assert p.returncode != 0
        # structured JSON log lines, as the container config asks
        first = (tmp_path / "relay.log").read_text().splitlines()[0]
        assert json.loads(first)["event"]
