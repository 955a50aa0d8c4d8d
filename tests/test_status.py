"""`relay status` from another process: a real `relay serve`, accounts added with the CLI while
it runs, real SMTP and POP3 traffic, then the summary (table and --json)."""

from __future__ import annotations

import json
import os
import poplib
import smtplib
from pathlib import Path

from opsutil import RELAY, add_user, loopback_config, run, serving


def test_status_summarises_the_running_server(tmp_path: Path) -> None:
    cfg = loopback_config(tmp_path, quota={"default_bytes": "100KiB"})
    with serving([*RELAY, "serve", "--config", str(cfg)], tmp_path / "data",
                 tmp_path / "serve.log") as bound:
        add_user(cfg, "ct@a.test")
        add_user(cfg, "mr@b.test")
        body = b"Subject: study\r\n\r\n" + b"QUJD" * 19 * 1000 + b"\r\n"   # ~76 kB of 100 KiB
        with smtplib.SMTP("127.0.0.1", bound["smtp"][0][1], timeout=30) as s:
            s.sendmail("gw@hospital.test", ["ct@a.test"], body)
        p3 = poplib.POP3("127.0.0.1", bound["pop3"][0][1], timeout=30)
        p3.user("mr@b.test")
        p3.pass_("secret")
        p3.quit()

        p = run([*RELAY, "status", "--json", "--config", str(cfg)])
        assert p.returncode == 0, p.stderr
        data = json.loads(p.stdout)
        assert data["url"] == f"http://127.0.0.1:{bound['metrics'][0][1]}/metrics"
        assert data["accounts"] == 2 and data["received_messages"] == 1
        assert data["backlog_messages"] == 1
        boxes = {m["mailbox"]: m for m in data["mailboxes"]}
        assert boxes["ct@a.test"]["backlog_messages"] == 1
        assert 0.7 < boxes["ct@a.test"]["quota_used"] < 1
        assert boxes["ct@a.test"]["last_poll_age_seconds"] is None      # never polled
        assert 0 <= boxes["mr@b.test"]["last_poll_age_seconds"] < 60
        assert boxes["mr@b.test"]["backlog_messages"] == 0

        env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
        p = run([*RELAY, "status", "--config", str(cfg)], env=env)     # piped: full width
        assert p.returncode == 0, p.stderr
        out = p.stdout
        row = next(line for line in out.splitlines() if "ct@a.test" in line)
        assert "never" in row and "of 100.0 KiB" in row
        assert "%" in row
        row = next(line for line in out.splitlines() if "mr@b.test" in line)
        assert " ago" in row
        assert "sessions open" in out and "backlog" in out and "1 messages" in out


def test_status_says_clearly_when_no_server_runs(tmp_path: Path) -> None:
    cfg = loopback_config(tmp_path, quota={"default_bytes": "100KiB"})
    (tmp_path / "data").mkdir()
    p = run([*RELAY, "status", "--config", str(cfg)])
    assert p.returncode == 1
    assert p.stdout == ""
    assert p.stderr.startswith("relay status: cannot reach the relay's metrics at http://127.0.0.1:0/")
    assert "is `relay serve` running with this config?" in p.stderr
