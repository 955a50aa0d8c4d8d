"""What bench_smtp.py and bench_backpressure.py share: a `relay serve` subprocess on a config
file of their own, with accounts added through the CLI, as an operator runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def start_relay(cfg: Path, data: Path, users: list[str], password: str | None = None,
                ) -> tuple[subprocess.Popen[bytes], dict[str, list[list[object]]]]:
    """Add `users` (with `password`, or none), start `relay serve --config cfg` and wait until
    it wrote <data>/run/listeners.json. Returns the process and what it bound."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for addr in users:
        extra = ["--password-stdin"] if password is not None else []
        subprocess.run([sys.executable, "-m", "relay", "user", "add", addr, *extra, "--config", str(cfg)],
                       input=(password + "\n").encode() if password is not None else None,
                       check=True, env=env, capture_output=True)
    proc = subprocess.Popen([sys.executable, "-m", "relay", "serve", "--config", str(cfg)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    listeners = data / "run" / "listeners.json"
    deadline = time.monotonic() + 60
    while not listeners.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_relay(proc)
            raise RuntimeError(f"relay did not start: {proc.stderr.read().decode()}")  # type: ignore[union-attr]
        time.sleep(0.05)
    return proc, json.loads(listeners.read_text())


def stop_relay(proc: subprocess.Popen[bytes]) -> str:
    """SIGTERM (the relay lets sessions finish), SIGKILL after 30 s; returns its stderr."""
    if proc.poll() is None:
        proc.terminate()
    try:
        _, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    return (err or b"").decode("utf-8", "replace")
