"""/metrics of a real relay after real traffic (smtplib, poplib, imaplib): the figures match
what happened, every name is documented, promtool accepts the exposition."""

from __future__ import annotations

import asyncio
import imaplib
import itertools
import platform
import poplib
import smtplib
import time
import types
import urllib.request
from collections.abc import Callable
from typing import Any

import pytest
from conftest import RunningRelay
from opsutil import documented_metrics, run
from prometheus_client.parser import text_string_to_metric_families

from relay import __version__
from relay.config import Config
from relay.metrics import SPECS, RelayCollector, reply_reason

# ~20 kB of base64 lines, as a small DICOM attachment would be
BODY = b"Subject: study\r\nContent-Type: application/dicom\r\n\r\n" + (b"QUJD" * 19 + b"\r\n") * 260


def scrape(r: RunningRelay) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{r.metrics_port}/metrics", timeout=10) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return resp.read().decode()


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(ss: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return ss[(name, frozenset(labels.items()))]


def pop3_drain_first(r: RunningRelay, who: str) -> None:
    """RETR and DELE the first message of `who` (password 'secret'), then QUIT."""
    p = poplib.POP3("127.0.0.1", r.pop3_port, timeout=30)
    p.user(who)
    p.pass_("secret")
    p.retr(1)
    p.dele(1)
    p.quit()


def traffic(r: RunningRelay) -> None:
    """One message to alice and bob, one refused recipient; alice drains by POP3 (RETR, DELE),
    bob reads by IMAP and keeps the message."""
    with smtplib.SMTP("127.0.0.1", r.smtp_port, timeout=30) as s:
        s.ehlo("gw.test")
        refused = s.sendmail("ct@hospital.test", ["alice@example.test", "bob@example.test",
                                                  "nobody@example.test"], BODY)
        assert set(refused) == {"nobody@example.test"}
    pop3_drain_first(r, "alice@example.test")
    m = imaplib.IMAP4("127.0.0.1", r.imap_port, timeout=30)
    m.login("bob@example.test", "secret")
    m.select("INBOX")
    typ, data = m.fetch("1", "(BODY.PEEK[])")
    assert typ == "OK" and BODY in data[0][1]
    m.logout()


def wait_sessions_closed(r: RunningRelay) -> None:
    deadline = time.monotonic() + 10
    while r.call(lambda rl: len(rl.sessions.live())) and time.monotonic() < deadline:
        time.sleep(0.05)


def test_figures_follow_the_traffic(relay: RunningRelay) -> None:
    traffic(relay)
    wait_sessions_closed(relay)
    ss = samples(scrape(relay))
    assert value(ss, "relay_messages_received_total") == 1
    assert value(ss, "relay_received_bytes_total") >= len(BODY)
    assert value(ss, "relay_messages_stored_total") == 2
    assert value(ss, "relay_messages_deleted_total") == 1
    assert value(ss, "relay_accounts") == 2
    assert value(ss, "relay_smtp_replies_total", **{"class": "5xx", "code": "5.1.1",
                                                     "reason": "unknown_user"}) == 1
    assert value(ss, "relay_messages_fetched_total", protocol="pop3") == 1
    assert value(ss, "relay_messages_fetched_total", protocol="imap") == 1
    assert value(ss, "relay_fetched_bytes_total", protocol="imap") >= len(BODY)
    assert value(ss, "relay_logins_total", protocol="imap") == 1
    assert all(v == 0 for (n, _), v in ss.items() if n == "relay_sessions_current")
    for proto in ("smtp", "pop3", "imap"):
        assert sum(v for (n, lb), v in ss.items()
                   if n == "relay_sessions_total" and ("protocol", proto) in lb) == 1
    # histograms: one ingest, two first fetches, one delete
    assert value(ss, "relay_ingest_duration_seconds_count") == 1
    assert value(ss, "relay_message_size_bytes_count") == 1
    assert value(ss, "relay_message_size_bytes_bucket", le="65536.0") == 1   # ~20 kB
    assert value(ss, "relay_delivery_to_fetch_seconds_count") == 2
    assert value(ss, "relay_delivery_to_delete_seconds_count") == 1
    # per mailbox: alice drained, bob still holds the message
    assert value(ss, "relay_mailbox_backlog_messages", mailbox="alice@example.test") == 0
    assert value(ss, "relay_mailbox_backlog_messages", mailbox="bob@example.test") == 1
    assert value(ss, "relay_backlog_messages") == 1
    assert value(ss, "relay_mailbox_backlog_bytes", mailbox="bob@example.test") == value(ss, "relay_backlog_bytes")
    now = time.time()
    for who in ("alice@example.test", "bob@example.test"):
        assert now - 60 < value(ss, "relay_mailbox_last_poll_timestamp_seconds", mailbox=who) <= now
        assert value(ss, "relay_mailbox_quota_bytes", mailbox=who) == 20 * 1024**3
    assert value(ss, "relay_disk_free_bytes") <= value(ss, "relay_disk_total_bytes")
    assert value(ss, "relay_build_info", version=__version__, python=platform.python_version()) == 1


def test_every_name_is_documented_and_promtool_accepts_the_scrape(relay: RunningRelay) -> None:
    traffic(relay)
    text = scrape(relay)
    documented = documented_metrics()
    families = {f.name: f.type for f in text_string_to_metric_families(text)}
    for name, kind in families.items():
        exposed = name + "_total" if kind == "counter" else name
        assert exposed in documented, f"{exposed} is not in docs/metrics.md"
        assert documented[exposed] == kind, exposed
    # everything the collector can export shows up after this traffic (the store backend's
    # own figures with a backend that has them: tests/test_pg_nodes.py)
    expected = {s.exposed for s in SPECS if s.source != "store backend"}
    assert expected <= {n + "_total" if k == "counter" else n for n, k in families.items()}
    p = run(["promtool", "check", "metrics"], input=text)
    assert p.returncode == 0 and not p.stdout.strip() and not p.stderr.strip(), p.stdout + p.stderr


def test_per_mailbox_series_can_be_turned_off(relay_factory: Callable[..., RunningRelay]) -> None:
    r = relay_factory(metrics={"per_mailbox": False})
    r.add_user("alice@example.test", "secret")
    with smtplib.SMTP("127.0.0.1", r.smtp_port, timeout=30) as s:
        s.sendmail("ct@hospital.test", ["alice@example.test"], BODY)
    text = scrape(r)
    assert "relay_mailbox_" not in text
    ss = samples(text)
    assert value(ss, "relay_backlog_messages") == 1


def test_healthz_and_head(relay: RunningRelay) -> None:
    url = f"http://127.0.0.1:{relay.metrics_port}"
    p = run(["curl", "-sS", "-i", f"{url}/healthz"])
    assert p.stdout.startswith("HTTP/1.1 200 OK") and p.stdout.endswith("\n\nok\n")
    p = run(["curl", "-sS", "-I", f"{url}/metrics"])
    assert p.stdout.startswith("HTTP/1.1 200 OK") and "Content-Length: " in p.stdout
    # while shutting down (a session still finishing), /healthz says 503
    with smtplib.SMTP("127.0.0.1", relay.smtp_port, timeout=30) as s:
        s.ehlo("gw.test")
        s.mail("ct@hospital.test")            # a transaction in progress: not closed at once
        # stop with a long grace: the open session keeps the relay in its shutdown phase
        stopping = asyncio.run_coroutine_threadsafe(relay.relay.stop(grace=30), relay.loop)
        codes = []
        deadline = time.monotonic() + 10
        while "503" not in codes and time.monotonic() < deadline:
            codes.append(run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                              f"{url}/healthz"]).stdout)
        assert "503" in codes, codes
        s.quit()
    stopping.result(30)


def test_two_relays_in_one_process_have_their_own_figures(relay_factory: Callable[..., RunningRelay]) -> None:
    a, b = relay_factory(), relay_factory()
    a.add_user("alice@example.test", "secret")
    with smtplib.SMTP("127.0.0.1", a.smtp_port, timeout=30) as s:
        s.sendmail("ct@hospital.test", ["alice@example.test"], BODY)
    assert value(samples(scrape(a)), "relay_messages_received_total") == 1
    assert value(samples(scrape(b)), "relay_messages_received_total") == 0


class _Broken:
    def statistics(self) -> Any:
        raise RuntimeError("component bug")


def test_collector_tolerates_absent_failing_and_partial_components(tmp_path: Any) -> None:
    """A relay under construction: no SMTP figures, a store whose statistics() fails, IMAP
    figures with fields missing. The scrape still answers with what there is."""
    fake = types.SimpleNamespace(
        config=Config(data_dir=tmp_path), started_at=123.0, store=_Broken(),
        imap_stats=types.SimpleNamespace(statistics=lambda: {"logins": 3}))
    names = {m.name: m for m in RelayCollector(fake).collect()}
    assert {"relay_build_info", "relay_disk_free_bytes", "relay_logins"} <= set(names)
    assert "relay_accounts" not in names and "relay_messages_received" not in names
    assert [s.value for s in names["relay_logins"].samples] == [3]


@pytest.mark.parametrize(("cls", "code", "reason"), [
    ("2xx", "2.0.0", "ok"), ("4xx", "4.2.2", "over_quota"), ("4xx", "4.3.1", "storage_low"),
    ("5xx", "5.3.4", "too_big"), ("4xx", "4.7.1", "throttled"), ("5xx", "5.7.1", "relay_denied"),
    ("5xx", "5.5.2", "syntax"), ("5xx", "5.6.9", "content"), ("4xx", "4.9.9", "other"),
    ("4xx", "4.7.0", "throttled"), ("5xx", "5.7.0", "policy"), ("5xx", "5.7.11", "encryption_required"),
])
def test_reply_reasons(cls: str, code: str, reason: str) -> None:
    assert reply_reason(cls, code) == reason


def test_every_spec_has_a_source_and_every_source_a_spec() -> None:
    from relay import metrics as m

    wired = {n for fields in m.FIELDS.values() for n, _ in fields}
    wired |= {n for n, _ in m.FETCH_FIELDS} | {n for n, _ in m.MAILBOX_FIELDS} | {n for n, _ in m.BACKEND_FIELDS}
    wired |= {"relay_build_info", "relay_start_time_seconds", "relay_disk_free_bytes",
              "relay_disk_total_bytes", "relay_smtp_replies",
              "relay_mailbox_drain_rate_bytes_per_second"}
    assert wired == {s.name for s in SPECS}
    assert set(documented_metrics()) >= {s.exposed for s in SPECS}


def test_metrics_doc_lists_every_metric_in_one_table() -> None:
    """A blank line inside a Markdown table ends it: the rows after it would render as text."""
    from opsutil import METRICS_MD

    section = METRICS_MD.read_text().split("## Every metric", 1)[1]
    lines = section.strip().splitlines()
    table = list(itertools.takewhile(lambda ln: ln.startswith("|"), lines))
    rows = {ln.split("`")[1] for ln in table[2:]}
    assert rows == set(documented_metrics()), set(documented_metrics()) - rows


def test_deferrals_drain_rate_and_pacing_figures(relay_factory: Callable[..., RunningRelay]) -> None:
    """A recipient over its quota: the 452 4.2.2 shows as a reply by reason and as a policy
    deferral; draining the mailbox by POP3 gives it a drain rate; paced seconds are a counter."""
    r = relay_factory(quota={"default_bytes": "30KiB"})
    r.add_user("alice@example.test", "secret")
    with smtplib.SMTP("127.0.0.1", r.smtp_port, timeout=30) as s:
        s.sendmail("ct@hospital.test", ["alice@example.test"], BODY)          # ~20 kB: fits
        with pytest.raises(smtplib.SMTPRecipientsRefused) as e:                # would exceed
            s.sendmail("ct@hospital.test", ["alice@example.test"], BODY)
        assert e.value.recipients["alice@example.test"][0] == 452
    pop3_drain_first(r, "alice@example.test")
    wait_sessions_closed(r)
    ss = samples(scrape(r))
    assert value(ss, "relay_smtp_replies_total", **{"class": "4xx", "code": "4.2.2",
                                                     "reason": "over_quota"}) == 1
    assert value(ss, "relay_backpressure_deferrals_total", reason="quota") == 1
    assert value(ss, "relay_mailbox_drain_rate_bytes_per_second", mailbox="alice@example.test") > 0
    assert value(ss, "relay_backpressure_paced_seconds_total") >= 0
    assert value(ss, "relay_mailbox_backlog_bytes", mailbox="alice@example.test") == 0


def test_every_metric_source_is_a_service_of_the_relay(tmp_path: Any) -> None:
    """relay/metrics.py finds the services by attribute name: a rename in Relay.__init__ that
    metrics does not follow would drop their metrics silently. Every source is there, and has
    statistics()."""
    from conftest import make_config

    from relay.metrics import FETCH_SOURCES, FIELDS
    from relay.server.app import Relay

    relay = Relay(make_config(tmp_path / "data"))
    try:
        for attr in (*FIELDS, *(a for _, a in FETCH_SOURCES)):
            if attr == "directory":            # made in start() (it starts with the relay)
                assert hasattr(relay, attr)
                continue
            assert callable(getattr(getattr(relay, attr), "statistics", None)), attr
    finally:
        asyncio.run(relay.store.close())
