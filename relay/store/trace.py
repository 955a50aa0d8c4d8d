"""Trace header fields every backend writes before a delivered message (RFC 5321 4.4)."""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime
from email.utils import format_datetime

_UNSAFE = re.compile(r"[\x00-\x1f\x7f]")


def _clean(value: str) -> str:
    """Trace header fields come from the client: no CR, LF or other controls."""
    return _UNSAFE.sub("?", value)


def _peer_literal(peer: str | None) -> str:
    if not peer:
        return "unknown"
    if ":" in peer:
        return f"[IPv6:{_clean(peer)}]"
    return f"[{_clean(peer)}]"


def trace_headers(sender: str, recipients: list[str], hostname: str, session_id: str,
                  helo: str, peer: str | None, protocol: str, when: float | None = None) -> bytes:
    """Return-Path and Received (RFC 5321 4.4), CRLF line ends, folded."""
    date = format_datetime(datetime.fromtimestamp(time.time() if when is None else when, UTC))
    lines = [f"Return-Path: <{_clean(sender)}>",
             f"Received: from {_clean(helo) or 'unknown'} ({_peer_literal(peer)})",
             f"\tby {hostname} (relay) with {_clean(protocol)} id {_clean(session_id)}"]
    if len(recipients) == 1:
        lines.append(f"\tfor <{recipients[0]}>; {date}")
    else:
        lines[-1] += ";"
        lines.append(f"\t{date}")
    return ("\r\n".join(lines) + "\r\n").encode("utf-8", "replace")
