"""`relay user ...` and `relay quota recalc` against the PostgreSQL backend (the same commands
and output as on Maildir: tests/test_cli_user.py)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from opsutil import RELAY, loopback_config, run
from pgutil import pg_dsn, pg_server  # noqa: F401  (fixtures)

pytestmark = pytest.mark.timeout(300)


def relay(cfg: Path, *args: str, stdin: str | None = None) -> tuple[int, str, str]:
    p = run([*RELAY, *args, "--config", str(cfg)], input=stdin)
    return p.returncode, p.stdout, p.stderr


def test_user_commands_on_postgresql(pg_dsn: str, tmp_path: Path) -> None:
    cfg = loopback_config(tmp_path, store={"backend": "postgresql", "dsn": pg_dsn})
    rc, out, err = relay(cfg, "user", "add", "Alice@Example.org", "--quota-bytes", "1MiB", "--password-stdin",
                         stdin="pw1\n")
    assert rc == 0 and out.startswith("added alice@example.org quota 1.0 MiB, unlimited messages"), err
    rc, out, err = relay(cfg, "user", "add", "bob@example.org")
    assert rc == 0 and "no password" in out
    rc, _, err = relay(cfg, "user", "add", "bob@example.org")
    assert rc == 1 and "exists" in err and "Traceback" not in err
    rc, out, _ = relay(cfg, "user", "list")
    assert out.splitlines() == ["alice@example.org  0 B / 1.0 MiB  0 / unlimited messages",
                                "bob@example.org  0 B / 20.0 GiB  0 / unlimited messages  (no password)"]
    rc, out, _ = relay(cfg, "user", "quota", "alice@example.org", "--quota-messages", "3")
    assert rc == 0 and out.strip() == "alice@example.org quota 1.0 MiB, 3 messages"
    rc, out, _ = relay(cfg, "user", "passwd", "alice@example.org", "--password-stdin", stdin="pw2\n")
    assert rc == 0 and "password changed for alice@example.org" in out
    rc, out, _ = relay(cfg, "user", "show", "alice@example.org")
    assert re.search(r"backlog:   0 messages waiting, 0 never fetched, oldest -\n", out)
    assert "last poll: never" in out and "(account override)" in out
    rc, out, _ = relay(cfg, "quota", "recalc")
    assert rc == 0 and out.strip() == "ledger matches the stored messages"
    rc, out, _ = relay(cfg, "user", "del", "bob@example.org")
    assert rc == 0 and out.strip() == "deleted bob@example.org"
    rc, _, err = relay(cfg, "user", "show", "bob@example.org")
    assert rc == 1 and "no such account" in err


def test_an_unreachable_database_is_one_line(tmp_path: Path) -> None:
    cfg = loopback_config(tmp_path, store={"backend": "postgresql",
                                           "dsn": "postgresql://relay@127.0.0.1:1/relay?connect_timeout=2"})
    rc, out, err = relay(cfg, "user", "list")
    assert rc == 1 and err.startswith("relay: PostgreSQL") and "Traceback" not in err
