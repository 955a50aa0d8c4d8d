"""Concurrent-session caps on IMAP and POP3 (SMTP's are in test_smtp_e2e.py)."""

from __future__ import annotations

import socket


def _greeting(port: int) -> bytes:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.settimeout(10)
    data = s.recv(4096)
    return data, s  # type: ignore[return-value]


def test_imap_and_pop3_session_caps(relay_factory) -> None:  # type: ignore[no-untyped-def]
    r = relay_factory(imap={"max_sessions": 2, "max_sessions_per_client": 1},
                      pop3={"max_sessions": 1})
    first, s1 = _greeting(r.imap_port)
    assert first.startswith(b"* OK")
    second, s2 = _greeting(r.imap_port)          # same client address: per-client cap of 1
    assert second.startswith(b"* BYE [UNAVAILABLE]")
    assert s2.recv(100) == b""                    # and the connection is closed
    s1.close()
    s2.close()
    p1, t1 = _greeting(r.pop3_port)
    assert p1.startswith(b"+OK")
    p2, t2 = _greeting(r.pop3_port)
    assert p2.startswith(b"-ERR [SYS/TEMP]")
    t1.sendall(b"QUIT\r\n")
    assert t1.recv(100).startswith(b"+OK")
    t1.close()
    t2.close()
    # Once the first session is gone, a new one is served again.
    import time
    deadline = time.monotonic() + 5
    while True:
        p3, t3 = _greeting(r.pop3_port)
        t3.close()
        if p3.startswith(b"+OK") or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert p3.startswith(b"+OK")


def test_default_autologout_timers_meet_the_rfc_minimums(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Issue 3 item 7: IMAP autologout at least 30 minutes (RFC 9051 5.4, also in IDLE, RFC
    2177), POP3 at least 10 minutes (RFC 1939 3), on the embedded defaults."""
    from relay import config as configmod

    cfg = configmod.from_dict({"data_dir": str(tmp_path)}, tmp_path)
    assert cfg.imap.idle_timeout >= 30 * 60
    assert cfg.pop3.idle_timeout >= 10 * 60
