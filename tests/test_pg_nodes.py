"""Two `relay serve` processes on one PostgreSQL (issue 14): SMTP to one node, IMAP (IDLE) and
POP3 on the other, byte-exact; a node that loses the database answers 4xx and recovers."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import imaplib
import json
import os
import poplib
import re
import smtplib
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import psycopg
import pytest
from conftest import make_config
from opsutil import RELAY, loopback_config, serving
from pgutil import PgServer, cluster_dsn, pg_dsn, pg_pair, pg_server  # noqa: F401  (fixtures)

from relay.store.postgresql.store import PgStore

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

ALICE, PASSWORD = "alice@example.org", "secret-alice"


def add_account(dsn: str, tmp: Path, address: str, password: str) -> None:
    async def main() -> None:
        store = PgStore(make_config(tmp), dsn)
        await store.open()
        await store.accounts.add(address, password)
        await store.close()
    asyncio.run(main())


def study(n: int) -> bytes:
    """A DICOM e-mail-like message: headers, then base64 lines (CRLF), some starting with '.'."""
    b64 = base64.encodebytes(os.urandom(n)).replace(b"\n", b"\r\n")
    return (b"From: gw@hospital.test\r\nTo: " + ALICE.encode() + b"\r\nSubject: CT\r\n\r\n"
            + b".dot line\r\n" + b64)


def node(tmp: Path, name: str, dsn: str) -> tuple[list[str], Path, Path]:
    d = tmp / name
    d.mkdir()
    cfg = loopback_config(d, store={"backend": "postgresql", "dsn": dsn})
    return [*RELAY, "serve", "--config", str(cfg)], d / "data", d / "relay.log"


def test_smtp_to_one_node_imap_idle_and_pop3_on_the_other(pg_dsn: str, tmp_path: Path) -> None:
    add_account(pg_dsn, tmp_path, ALICE, PASSWORD)
    message = study(3 << 20)
    cmd1, data1, log1 = node(tmp_path, "node1", pg_dsn)
    cmd2, data2, log2 = node(tmp_path, "node2", pg_dsn)
    with serving(cmd1, data1, log1) as n1, serving(cmd2, data2, log2) as n2:
        imap = imaplib.IMAP4(*n2["imap"][0])
        imap.login(ALICE, PASSWORD)
        assert imap.select("INBOX")[1] == [b"0"]
        tag = imap._new_tag()
        imap.send(tag + b" IDLE\r\n")
        assert imap.readline().startswith(b"+")
        with smtplib.SMTP(*n1["smtp"][0]) as smtp:           # the other node
            smtp.ehlo("gw.hospital.test")
            refused = smtp.sendmail("gw@hospital.test", [ALICE], message)
            assert refused == {}
        imap.sock.settimeout(20)
        assert imap.readline() == b"* 1 EXISTS\r\n"             # node 2 learnt it from node 1
        imap.send(b"DONE\r\n")
        while not (line := imap.readline()).startswith(tag):
            pass
        assert b"OK" in line
        typ, data = imap.uid("FETCH", "1", "(BODY.PEEK[])")
        assert typ == "OK"
        stored = data[0][1]
        assert stored.startswith(b"Return-Path: <gw@hospital.test>\r\nReceived: from gw.hospital.test")
        assert stored.endswith(message) and len(stored) < len(message) + 1024
        typ, data = imap.uid("FETCH", "1", "(BODY.PEEK[]<100000.5000>)")   # a range, across nothing special
        assert data[0][1] == stored[100000:105000]
        imap.logout()

        pop = poplib.POP3(*n2["pop3"][0])
        pop.user(ALICE)
        pop.pass_(PASSWORD)
        _, lines, _ = pop.retr(1)
        assert b"\r\n".join(lines) + b"\r\n" == stored                   # dot-unstuffed, byte-exact
        pop.quit()

        host, port = n2["metrics"][0]                                     # the cluster's figures, per node
        text = urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10).read().decode()
        metrics = {m.group(1): float(m.group(2)) for m in re.finditer(r"^(relay_store_\w+) (\S+)$", text, re.M)}
        assert metrics["relay_store_change_feed_connected"] == 1
        assert metrics["relay_store_change_feed_received_total"] >= 1      # node 1's delivery
        assert metrics["relay_store_pool_connections"] >= 1
        assert metrics["relay_store_pool_max_connections"] == 20
        assert metrics["relay_store_unavailable_total"] == 0


def test_a_node_without_its_database_answers_4xx_and_recovers(tmp_path: Path) -> None:
    with PgServer.create() as pg:
        dsn = pg.create_database("relay")
        add_account(dsn, tmp_path, ALICE, PASSWORD)
        cmd, data, log = node(tmp_path, "node", dsn)
        with serving(cmd, data, log) as n:
            pg.stop("immediate")
            with smtplib.SMTP(*n["smtp"][0]) as smtp:
                smtp.ehlo("gw.hospital.test")
                smtp.mail("gw@hospital.test")
                code, _ = smtp.rcpt(ALICE)
                assert 400 <= code < 500                               # never 5xx: the sender retries
            imap = imaplib.IMAP4(*n["imap"][0])
            with pytest.raises(imaplib.IMAP4.error, match="UNAVAILABLE"):
                imap.login(ALICE, PASSWORD)
            imap.shutdown()
            pg.start()
            deadline = time.monotonic() + 30
            while True:                                                # the node recovers by itself
                with smtplib.SMTP(*n["smtp"][0]) as smtp:
                    smtp.ehlo("gw.hospital.test")
                    try:
                        smtp.sendmail("gw@hospital.test", [ALICE], study(1000))
                        break
                    except smtplib.SMTPRecipientsRefused as e:
                        assert 400 <= e.recipients[ALICE][0] < 500
                assert time.monotonic() < deadline, "the node did not recover"
                time.sleep(0.5)
            imap = imaplib.IMAP4(*n["imap"][0])
            imap.login(ALICE, PASSWORD)
            assert imap.select("INBOX")[1] == [b"1"]
            imap.logout()


def test_kill_9_of_a_node_mid_burst_the_other_node_has_every_acknowledged_message(
        pg_dsn: str, tmp_path: Path) -> None:
    add_account(pg_dsn, tmp_path, ALICE, PASSWORD)
    cmd1, data1, log1 = node(tmp_path, "node1", pg_dsn)
    cmd2, data2, log2 = node(tmp_path, "node2", pg_dsn)
    victim = subprocess.Popen(cmd1, stdout=log1.open("wb"), stderr=subprocess.STDOUT)
    try:
        listeners = data1 / "run" / "listeners.json"
        deadline = time.monotonic() + 30
        while not listeners.exists():
            assert victim.poll() is None and time.monotonic() < deadline, log1.read_text()
            time.sleep(0.1)
        time.sleep(0.1)
        smtp1 = json.loads(listeners.read_text())["smtp"][0]
        with serving(cmd2, data2, log2) as n2:
            acked: list[int] = []
            sent: list[bytes] = []

            def burst() -> None:
                with contextlib.suppress(OSError, smtplib.SMTPException):
                    for i in range(200):
                        msg = b"X-Seq: %d\r\n" % i + study(1 << 20)
                        sent.append(msg)
                        with smtplib.SMTP(*smtp1, timeout=30) as smtp:
                            smtp.sendmail("gw@hospital.test", [ALICE], msg)
                        acked.append(i)
            t = threading.Thread(target=burst)
            t.start()
            deadline = time.monotonic() + 60
            while len(acked) < 5 and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(0.05)                                          # into the next message
            victim.kill()                                             # kill -9
            victim.wait(10)
            t.join(60)
            assert len(acked) >= 5
            imap = imaplib.IMAP4(*n2["imap"][0])
            imap.login(ALICE, PASSWORD)
            imap.select("INBOX")
            typ, data = imap.uid("FETCH", "1:*", "(BODY.PEEK[])")
            stored = {}
            for item in data:
                if isinstance(item, tuple):
                    body = item[1]
                    seq = int(body.split(b"X-Seq: ", 1)[1].split(b"\r\n", 1)[0])
                    assert seq not in stored
                    stored[seq] = body
            imap.logout()
            assert set(acked) <= set(stored)                          # nothing acknowledged lost
            assert len(stored) - len(acked) <= 1                      # at most the interrupted commit
            for seq, body in stored.items():
                assert body.endswith(sent[seq]), f"message {seq} corrupted"
            # the survivor removes what the dead node half-wrote (its session is gone)
            host, port = n2["metrics"][0]
            deadline = time.monotonic() + 30
            while True:
                text = urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10).read().decode()
                if re.search(r"^relay_store_swept_nodes_total 1", text, re.M):
                    break
                assert time.monotonic() < deadline, "the dead node was not swept"
                time.sleep(0.5)
            with psycopg.connect(pg_dsn) as conn:
                assert conn.execute("SELECT (SELECT count(*) FROM reservations),"
                                    " (SELECT count(*) FROM bodies WHERE NOT complete)").fetchone() == (0, 0)
    finally:
        if victim.poll() is None:
            victim.kill()


def test_failover_the_nodes_carry_on_with_nothing_acknowledged_lost(
        pg_pair: tuple[PgServer, PgServer], tmp_path: Path) -> None:
    primary, standby = pg_pair
    primary.create_database("relay")
    dsn = cluster_dsn([primary, standby], "relay")
    add_account(dsn, tmp_path, ALICE, PASSWORD)
    cmd1, data1, log1 = node(tmp_path, "node1", dsn)
    cmd2, data2, log2 = node(tmp_path, "node2", dsn)
    with serving(cmd1, data1, log1) as n1, serving(cmd2, data2, log2) as n2:
        acked: list[int] = []
        sent: dict[int, bytes] = {}
        deferred: list[str] = []

        def send(i: int) -> None:
            """An MTA's view: try again until the message is acknowledged."""
            msg = sent[i] = b"X-Seq: %d\r\n" % i + study(300_000)
            deadline = time.monotonic() + 90
            while True:
                try:
                    with smtplib.SMTP(*n1["smtp"][0], timeout=30) as smtp:
                        smtp.sendmail("gw@hospital.test", [ALICE], msg)
                    acked.append(i)
                    return
                except (smtplib.SMTPResponseException, smtplib.SMTPRecipientsRefused) as e:
                    code = e.smtp_code if isinstance(e, smtplib.SMTPResponseException) \
                        else e.recipients[ALICE][0]
                    assert 400 <= code < 500, e                      # never a permanent failure
                    deferred.append(str(code))
                assert time.monotonic() < deadline, "no 250 within 90 s of a failover"
                time.sleep(0.2)

        for i in range(5):
            send(i)
        primary.kill()                                               # the primary's machine dies
        standby.promote()                                            # by hand, as Patroni would
        for i in range(5, 12):
            send(i)
        assert acked == list(range(12))
        deadline = time.monotonic() + 30                             # the other node, on the new primary:
        while True:                                                  # a client retries NO [UNAVAILABLE]
            imap = imaplib.IMAP4(*n2["imap"][0])
            try:
                imap.login(ALICE, PASSWORD)
                break
            except imaplib.IMAP4.error as e:
                assert "UNAVAILABLE" in str(e) and time.monotonic() < deadline, e
                imap.logout()
                time.sleep(0.5)
        imap.select("INBOX")
        typ, data = imap.uid("FETCH", "1:*", "(BODY.PEEK[])")
        stored: dict[int, bytes] = {}
        for item in data:
            if isinstance(item, tuple):
                seq = int(item[1].split(b"X-Seq: ", 1)[1].split(b"\r\n", 1)[0])
                stored.setdefault(seq, item[1])
        imap.logout()
        assert set(acked) <= set(stored)                             # committed on two machines
        for seq in acked:
            assert stored[seq].endswith(sent[seq]), f"message {seq} corrupted"
