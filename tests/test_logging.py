"""Logs of a real `relay serve`: one structured line per session and per message, the SMTP
session id in both and in the stored message's Received header; `[log] format = "json"` gives
one JSON object per line, the default one `key=value` line per event."""

from __future__ import annotations

import imaplib
import json
import poplib
import re
import shlex
import smtplib
from pathlib import Path

import pytest
from opsutil import RELAY, add_user, loopback_config, serving

BODY = b"Subject: study\r\n\r\n" + b"QUJD" * 19 + b"\r\n"


def parse_text(line: str) -> dict[str, str]:
    """`2026-01-01T00:00:00.000Z info relay.smtp message sid=... size=...` -> fields."""
    ts, level, logger, event, *rest = shlex.split(line)
    fields = dict(kv.split("=", 1) for kv in rest)
    return {"ts": ts, "level": level, "logger": logger, "event": event, **fields}


def traffic(bound: dict[str, list[list[object]]]) -> None:
    """One SMTP session: a message accepted, one too big, refused after its data (the client
    does not declare SIZE); then a POP3 session."""
    with smtplib.SMTP("127.0.0.1", int(bound["smtp"][0][1]), timeout=30) as s:
        s.sendmail("gw@hospital.test", ["ct@a.test"], BODY)
        s.esmtp_features.pop("size")
        with pytest.raises(smtplib.SMTPResponseException) as e:
            s.sendmail("gw@hospital.test", ["ct@a.test"], BODY + b"X" * 20000 + b"\r\n")
        assert e.value.smtp_code == 552
    p = poplib.POP3("127.0.0.1", int(bound["pop3"][0][1]), timeout=30)
    p.user("ct@a.test")
    p.pass_("secret")
    p.quit()
    m = imaplib.IMAP4("127.0.0.1", int(bound["imap"][0][1]), timeout=30)
    m.login("ct@a.test", "secret")
    m.logout()


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_one_line_per_session_and_message_with_the_received_id(tmp_path: Path, fmt: str) -> None:
    cfg = loopback_config(tmp_path, smtp={"max_message_size": "10KiB"}, log={"format": fmt})
    add_user(cfg, "ct@a.test")
    log_path = tmp_path / "serve.log"
    with serving([*RELAY, "serve", "--config", str(cfg)], tmp_path / "data", log_path) as bound:
        traffic(bound)
    lines = [ln for ln in log_path.read_text().splitlines() if ln.strip()]
    records = [json.loads(ln) for ln in lines] if fmt == "json" else [parse_text(ln) for ln in lines]
    for r in records:
        assert {"ts", "level", "logger", "event"} <= set(r)
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", r["ts"])

    smtp_sessions = [r for r in records if r["logger"] == "relay.smtp" and r["event"] == "session"]
    assert len(smtp_sessions) == 1
    sid = smtp_sessions[0]["sid"]
    assert str(smtp_sessions[0]["messages"]) == "1"
    messages = [r for r in records if r["event"] == "message"]
    assert [m["sid"] for m in messages] == [sid, sid]
    assert [str(m["reply"]) for m in messages] == ["250 2.0.0", "552 5.3.4"]
    assert messages[0]["sender"] == "gw@hospital.test" and str(messages[0]["rcpts"]) == "1"
    pop_sessions = [r for r in records if r["logger"] == "relay.pop3" and r["event"] == "session"]
    assert len(pop_sessions) == 1 and pop_sessions[0]["sid"] != sid
    assert pop_sessions[0]["user"] == "ct@a.test"
    imap_sessions = [r for r in records if r["logger"] == "relay.imap" and r["event"] == "session"]
    assert len(imap_sessions) == 1 and imap_sessions[0]["sid"] not in (sid, pop_sessions[0]["sid"])
    assert imap_sessions[0]["user"] == "ct@a.test" and imap_sessions[0]["outcome"]

    (stored,) = (tmp_path / "data" / "mail" / "a.test" / "ct" / "new").iterdir()
    head = stored.read_bytes().split(b"\r\n\r\n", 1)[0].decode()
    assert re.search(rf"\bid {re.escape(sid)}\b", head), head
