"""Quota ledger: usage, reservations, defaults and overrides; `relay user show/quota`,
`relay quota recalc` while a store is open."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from relay import config as configmod
from relay.config import Config, QuotaConfig
from relay.store import NoSuchAccount, QuotaExceeded, Store


@pytest.fixture
def store(tmp_path: Path):  # type: ignore[no-untyped-def]
    s = Store.open(Config(data_dir=tmp_path / "data", quota=QuotaConfig(default_bytes=1000, default_messages=3)))
    s.accounts.add("a@example.test")
    yield s
    s.close()


def deliver(store: Store, addr: str, nbytes: int) -> int:
    d = store.begin_delivery("s@x.test", [addr])
    d.write(b"x" * (nbytes - d.size))
    asyncio.run(d.commit())
    return d.size


def test_reserve_release_and_usage(store: Store) -> None:
    r1 = store.ledger.reserve("A@example.test", 600)
    assert store.usage("a@example.test").reserved_bytes == 600
    with pytest.raises(QuotaExceeded) as e:
        store.ledger.reserve("a@example.test", 401)
    assert e.value.reason == "bytes" and e.value.address == "a@example.test"
    r2 = store.ledger.reserve("a@example.test", 400)              # exactly full
    r1.release()
    r1.release()                                                 # idempotent
    assert store.usage("a@example.test").reserved_bytes == 400
    r2.release()
    assert store.usage("a@example.test").reserved_bytes == 0
    with pytest.raises(NoSuchAccount):
        store.ledger.reserve("nobody@example.test", 1)


def test_extend_a_reservation_while_streaming(store: Store) -> None:
    r = store.ledger.reserve("a@example.test", 0)                 # no SIZE= declared
    other = store.ledger.reserve("a@example.test", 300)
    store.ledger.extend(r, 500)
    assert (r.nbytes, store.usage("a@example.test").reserved_bytes) == (500, 800)
    with pytest.raises(QuotaExceeded):
        store.ledger.extend(r, 201)                               # 300 + 701 > 1000
    assert (r.nbytes, store.usage("a@example.test").reserved_bytes) == (500, 800)
    store.ledger.extend(r, 200)                                   # exactly full
    r.release()
    store.ledger.extend(r, 100)                                   # released: holds nothing
    assert store.ledger.reserved("a@example.test") == (300, 1)
    other.release()
    assert store.ledger.reserved("a@example.test") == (0, 0)


def test_committed_mail_counts_against_the_quota(store: Store) -> None:
    size = deliver(store, "a@example.test", 700)
    u = store.usage("a@example.test")
    assert (u.bytes, u.messages, u.quota_bytes, u.quota_messages) == (size, 1, 1000, 3)
    with pytest.raises(QuotaExceeded):
        store.ledger.reserve("a@example.test", 301)
    store.ledger.reserve("a@example.test", 300).release()
    store.mailbox("a@example.test").expunge([1])
    store.ledger.reserve("a@example.test", 1000).release()        # drained: room again


def test_message_count_quota(store: Store) -> None:
    deliver(store, "a@example.test", 200)
    deliver(store, "a@example.test", 200)
    r = store.ledger.reserve("a@example.test", 10)                # the third message
    with pytest.raises(QuotaExceeded) as e:
        store.ledger.reserve("a@example.test", 10)
    assert e.value.reason == "messages"
    r.release()
    store.accounts.set_quota("a@example.test", quota_messages=0)  # 0 = unlimited
    for _ in range(5):
        store.ledger.reserve("a@example.test", 10)


def test_override_beats_default_and_zero_bytes_is_unlimited(store: Store) -> None:
    with pytest.raises(QuotaExceeded):                 # the default (1000 bytes) holds ...
        store.ledger.reserve("a@example.test", 1001)
    store.accounts.add("big@example.test", quota_bytes=10**12)
    store.ledger.reserve("big@example.test", 10**11)   # ... an override beats it
    assert store.usage("big@example.test").reserved_bytes == 10**11
    store.accounts.set_quota("a@example.test", quota_bytes=0)
    store.ledger.reserve("a@example.test", 10**15)     # 0 bytes = unlimited
    assert store.usage("a@example.test").reserved_bytes == 10**15


# --- CLI -----------------------------------------------------------------------------------

@pytest.fixture
def conf(tmp_path: Path) -> Path:
    f = tmp_path / "relay.toml"
    f.write_text('data_dir = "data"\n[quota]\ndefault_bytes = "10MiB"\ndefault_messages = 100\n')
    return f


def relay(conf: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "relay", *args, "--config", str(conf)],
                          capture_output=True, text=True, timeout=60, check=False)


def test_user_show_and_quota(conf: Path) -> None:
    s = Store.open(configmod.load(conf))
    s.accounts.add("a@example.test")
    deliver(s, "a@example.test", 1024 * 1024)
    r = relay(conf, "user", "show", "a@example.test")
    assert r.returncode == 0, r.stderr
    assert "quota:     10.0 MiB, 100 messages\n" in r.stdout
    assert "usage:     1.0 MiB (10%), 1 messages (1%)" in r.stdout
    assert re.search(r"backlog:   1 messages waiting, 1 never fetched, oldest \d+ s\n", r.stdout)
    assert "last poll: never" in r.stdout
    r = relay(conf, "user", "quota", "a@example.test", "--quota-bytes", "2MiB", "--quota-messages", "0")
    assert r.returncode == 0, r.stderr
    u = s.usage("a@example.test")
    assert (u.quota_bytes, u.quota_messages) == (2 * 1024 * 1024, 0)
    r = relay(conf, "user", "show", "a@example.test")
    assert "quota:     2.0 MiB, unlimited messages  (account override)" in r.stdout
    assert relay(conf, "user", "quota", "a@example.test").returncode == 1
    r = relay(conf, "user", "show", "nobody@example.test")
    assert r.returncode == 1 and "no such account" in r.stderr
    s.close()


def test_quota_recalc_while_the_server_runs(conf: Path) -> None:
    server = Store.open(configmod.load(conf))                 # as the running server holds it
    server.accounts.add("a@example.test")
    server.accounts.add("b@example.test")
    size = deliver(server, "a@example.test", 5000)
    deliver(server, "a@example.test", 7000)
    mb = server.mailbox("a@example.test")
    os.unlink(mb.path(2))                                     # removed behind the store's back
    r = relay(conf, "quota", "recalc")
    assert r.returncode == 0, r.stderr
    assert "a@example.test:" in r.stdout and "-> 4.9 KiB, 1 messages" in r.stdout
    assert "b@example.test" not in r.stdout
    assert (server.usage("a@example.test").bytes, server.usage("a@example.test").messages) == (size, 1)
    assert [m.uid for m in mb.messages()] == [1]
    r = relay(conf, "quota", "recalc", "a@example.test")
    assert r.returncode == 0 and "ledger matches" in r.stdout
    deliver(server, "a@example.test", 100)                    # the server goes on delivering
    assert [m.uid for m in mb.messages()] == [1, 3]
    server.close()
