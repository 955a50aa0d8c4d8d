"""Store phase 1: addresses, accounts, passwords, delivery into Maildirs, recovery."""

from __future__ import annotations

import asyncio
import os
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from relay.config import Config, QuotaConfig
from relay.store import (
    AccountExists,
    AddressError,
    NoSuchAccount,
    Store,
    StoreError,
    normalize_address,
)
from relay.store.maildir import admin
from relay.store.trace import trace_headers


def cfg(tmp_path: Path, **kw: object) -> Config:
    return Config(data_dir=tmp_path / "data", hostname="relay.test").replace(**kw)


@pytest.fixture
def store(tmp_path: Path):  # type: ignore[no-untyped-def]
    s = Store.open(cfg(tmp_path))
    yield s
    s.close()


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


# --- addresses ---------------------------------------------------------------------------

@pytest.mark.parametrize("raw, norm", [
    ("alice@example.org", "alice@example.org"),
    ("Alice@EXAMPLE.Org", "alice@example.org"),
    ("<bob@example.org>", "bob@example.org"),
    (" ct.scanner+1@hospital-a.example ", "ct.scanner+1@hospital-a.example"),
    ("x@localhost", "x@localhost"),
    ("x@example.org.", "x@example.org"),
])
def test_normalize_accepts(raw: str, norm: str) -> None:
    assert normalize_address(raw) == norm


@pytest.mark.parametrize("raw", [
    "", "alice", "@example.org", "alice@", "a b@example.org", "../etc@example.org",
    ".alice@example.org", "al..ice@example.org", "alice.@example.org", "a/b@example.org",
    "alice@exa_mple.org", "alice@-example.org", "alice@example..org", "alice@[127.0.0.1]",
    "x" * 65 + "@example.org", "alice@" + "a" * 64 + ".org", "äli@example.org",
    "alice@example.org\r\nRCPT", "a\x00@example.org",
])
def test_normalize_rejects(raw: str) -> None:
    with pytest.raises(AddressError) as e:
        normalize_address(raw)
    assert str(e.value)          # a message an operator can read


# --- accounts ----------------------------------------------------------------------------

def test_open_creates_layout(tmp_path: Path) -> None:
    s = Store.open(cfg(tmp_path))
    s.close()
    data = tmp_path / "data"
    assert (data / "relay.db").is_file() and (data / "mail").is_dir()
    con = sqlite3.connect(data / "relay.db")
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_add_get_list_delete(store: Store) -> None:
    a = store.accounts.add("Alice@Example.Test", "pw", quota_bytes=1000, quota_messages=5)
    assert a.address == "alice@example.test" and a.quota_bytes == 1000 and a.quota_messages == 5
    md = store.data_dir / "mail" / "example.test" / "alice"
    assert all((md / d).is_dir() for d in ("tmp", "new", "cur"))
    assert store.accounts.get("ALICE@example.test") == a
    assert store.accounts.get("nobody@example.test") is None
    assert store.accounts.get("not an address") is None
    store.accounts.add("bob@example.test")
    assert [x.address for x in store.accounts.list()] == ["alice@example.test", "bob@example.test"]
    with pytest.raises(AccountExists):
        store.accounts.add("alice@EXAMPLE.test", "other")
    store.accounts.delete("alice@example.test")
    assert not md.exists()
    assert store.accounts.get("alice@example.test") is None
    with pytest.raises(NoSuchAccount):
        store.accounts.delete("alice@example.test")
    with pytest.raises(AddressError):
        store.accounts.add("bad address")


def test_is_local_domain(store: Store) -> None:
    assert not store.is_local_domain("example.test")
    store.accounts.add("a@Example.Test")
    assert store.is_local_domain("EXAMPLE.test")
    assert not store.is_local_domain("other.test")
    assert not store.is_local_domain("bad domain")


def test_passwords_are_argon2id_only(store: Store) -> None:
    store.accounts.add("alice@example.test", "correct horse")
    stored = store.db.one("SELECT password FROM accounts")["password"]  # type: ignore[index]
    assert stored.startswith("$argon2id$v=19$")
    db_bytes = b"".join(p.read_bytes() for p in store.data_dir.glob("relay.db*"))
    assert b"correct horse" not in db_bytes
    assert store.accounts.verify("alice@example.test", "correct horse")
    assert store.accounts.verify("ALICE@example.test", "correct horse")
    assert not store.accounts.verify("alice@example.test", "wrong")
    assert not store.accounts.verify("alice@example.test", "")
    assert not store.accounts.verify("nobody@example.test", "correct horse")


def test_weak_kdf_only_when_the_test_variable_is_set(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """conftest sets RELAY_TEST_WEAK_KDF; without it new hashes use the production profile,
    and hashes of either kind verify."""
    monkeypatch.delenv("RELAY_TEST_WEAK_KDF", raising=False)
    store.accounts.add("prod@example.test", "pw1")
    monkeypatch.setenv("RELAY_TEST_WEAK_KDF", "1")
    store.accounts.add("test@example.test", "pw2")
    hashes = {r["address"]: r["password"] for r in store.db.query("SELECT address, password FROM accounts")}
    assert hashes["prod@example.test"].startswith("$argon2id$v=19$m=65536,t=3,p=4$")
    assert hashes["test@example.test"].startswith("$argon2id$v=19$m=8,t=1,p=1$")
    assert store.accounts.verify("prod@example.test", "pw1") and store.accounts.verify("test@example.test", "pw2")
    assert not store.accounts.verify("prod@example.test", "pw2")
    assert not store.accounts.verify("test@example.test", "pw1")


def test_account_without_password_cannot_log_in(store: Store) -> None:
    a = store.accounts.add("scanner@example.test")
    assert not a.has_password
    assert not store.accounts.verify("scanner@example.test", "")
    assert not store.accounts.verify("scanner@example.test", "anything")
    store.accounts.set_password("scanner@example.test", "pw")
    assert store.accounts.verify("scanner@example.test", "pw")
    store.accounts.set_password("scanner@example.test", None)
    assert not store.accounts.verify("scanner@example.test", "pw")
    with pytest.raises(NoSuchAccount):
        store.accounts.set_password("nobody@example.test", "pw")


def test_credential_cache_hits_and_follows_changes_from_another_process(tmp_path: Path) -> None:
    server = Store.open(cfg(tmp_path))
    server.accounts.add("alice@example.test", "old")
    cache = server.accounts.cache
    assert server.accounts.verify("alice@example.test", "old")
    misses = cache.misses
    for _ in range(3):
        assert run(server.accounts.verify_async("alice@example.test", "old"))
    assert cache.misses == misses and cache.hits >= 3
    # the admin CLI (another process) changes the password: takes effect at once
    subprocess.run([sys.executable, "-c",
                    ("import sys; from relay.config import Config; from relay.store import Store;"
                     "s = Store.open(Config(data_dir=sys.argv[1])); s.accounts.set_password('alice@example.test', 'new')"),
                    str(tmp_path / "data")], check=True)
    assert not server.accounts.verify("alice@example.test", "old")
    assert run(server.accounts.verify_async("alice@example.test", "new"))
    assert not server.accounts.verify("alice@example.test", "wrong")
    server.close()


def test_credential_cache_bounded_and_expires() -> None:
    from relay.store.passwords import CredentialCache

    now = [0.0]
    c = CredentialCache(size=2, ttl=10, clock=lambda: now[0])
    c.add("a", "h", "p1")
    c.add("a", "h", "p2")
    c.add("a", "h", "p3")
    assert not c.check("a", "h", "p1") and c.check("a", "h", "p3")
    assert not c.check("a", "h2", "p3")            # another stored hash: miss
    now[0] = 11
    assert not c.check("a", "h", "p3")


def test_set_quota_and_usage_defaults(tmp_path: Path) -> None:
    s = Store.open(cfg(tmp_path).replace(quota=Config().quota.__class__(default_bytes=5000, default_messages=7)))
    s.accounts.add("a@example.test")
    u = s.usage("a@example.test")
    assert (u.bytes, u.messages, u.quota_bytes, u.quota_messages) == (0, 0, 5000, 7)
    s.accounts.set_quota("a@example.test", quota_bytes=100)
    assert s.usage("a@example.test").quota_bytes == 100 and s.usage("a@example.test").quota_messages == 7
    s.accounts.set_quota("a@example.test", quota_messages=0)
    assert s.usage("a@example.test").quota_messages == 0
    with pytest.raises(StoreError):
        s.accounts.set_quota("a@example.test", quota_bytes=-1)
    with pytest.raises(NoSuchAccount):
        s.accounts.set_quota("b@example.test", quota_bytes=1)
    s.close()


# --- delivery ----------------------------------------------------------------------------

BODY = b"Subject: CT\r\n\r\n.line starting with a dot\r\n" + bytes(range(256)) * 64 + b"\r\n"


def _deliver(store: Store, rcpts: list[str], body: bytes = BODY, **kw: str) -> str:
    d = store.begin_delivery("gw@hospital.test", rcpts, session_id="sid42", helo="gw.hospital.test",
                             peer="127.0.0.1", protocol="ESMTPS", **kw)
    mv = memoryview(body)
    for i in range(0, len(body), 1000):
        d.write(mv[i:i + 1000] if i % 2000 else bytes(mv[i:i + 1000]))
    receipt = run(d.commit())
    assert d.name is not None and receipt.id == d.name.split(",")[0]
    return d.name


def test_delivery_links_once_into_every_new(store: Store) -> None:
    for a in ("alice@example.test", "bob@example.test", "carol@other.test"):
        store.accounts.add(a)
    events: list[tuple[str, int, int]] = []
    store.subscribe("bob@example.test", lambda *e: events.append(e))
    name = _deliver(store, ["alice@example.test", "BOB@example.test", "bob@example.test", "carol@other.test"])
    assert re.fullmatch(r"\d+\.M\d+P\d+Q\d+\.relay\.test,S=\d+", name)
    paths = [store.data_dir / "mail" / d / "new" / name for d in
             ("example.test/alice", "example.test/bob", "other.test/carol")]
    stats = [p.stat() for p in paths]
    assert len({s.st_ino for s in stats}) == 1 and stats[0].st_nlink == 3
    data = paths[0].read_bytes()
    assert int(name.rsplit("=", 1)[1]) == len(data)
    head, _, rest = data.partition(b"\r\nSubject: CT")
    assert b"Subject: CT" + rest == BODY                                  # body byte-identical
    assert head.startswith(b"Return-Path: <gw@hospital.test>\r\nReceived: from gw.hospital.test ([127.0.0.1])\r\n"
                           b"\tby relay.test (relay) with ESMTPS id sid42;\r\n\t")
    for d in ("example.test/alice", "example.test/bob", "other.test/carol"):
        assert os.listdir(store.data_dir / "mail" / d / "tmp") == []
    rows = store.db.query("SELECT address, uid, name, size FROM messages ORDER BY address")
    assert [(r["address"], r["uid"], r["name"], r["size"]) for r in rows] == [
        (a, 1, name, len(data)) for a in ("alice@example.test", "bob@example.test", "carol@other.test")]
    assert store.usage("bob@example.test").bytes == len(data)
    assert store.usage("bob@example.test").messages == 1
    assert events == [("new", len(data), 1)]
    name2 = _deliver(store, ["bob@example.test"])
    assert store.db.one("SELECT uid FROM messages WHERE name=?", (name2,))["uid"] == 2  # type: ignore[index]
    assert store.usage("bob@example.test").messages == 2 and len(events) == 2


def test_trace_headers_single_recipient_and_sanitised() -> None:
    h = trace_headers("a@b.test", ["x@y.test"], "relay.test", "s1", "evil\r\nX-Injected: 1", "::1", "SMTP",
                      when=0)
    assert h == (b"Return-Path: <a@b.test>\r\nReceived: from evil??X-Injected: 1 ([IPv6:::1])\r\n"
                 b"\tby relay.test (relay) with SMTP id s1\r\n\tfor <x@y.test>; Thu, 01 Jan 1970 00:00:00 +0000\r\n")
    assert trace_headers("", ["x@y.test"], "r", "s", "", None, "SMTP").startswith(
        b"Return-Path: <>\r\nReceived: from unknown (unknown)")


def test_abort_removes_tmp_and_is_idempotent(store: Store) -> None:
    store.accounts.add("alice@example.test")
    md = store.data_dir / "mail" / "example.test" / "alice"
    d = store.begin_delivery("s@x.test", ["alice@example.test"], session_id="s")
    d.write(b"partial")
    assert len(os.listdir(md / "tmp")) == 1
    d.abort()
    d.abort()
    assert os.listdir(md / "tmp") == [] and os.listdir(md / "new") == []
    with pytest.raises(StoreError):
        d.write(b"more")
    with pytest.raises(StoreError):
        run(d.commit())
    assert store.usage("alice@example.test").messages == 0
    name = _deliver(store, ["alice@example.test"])
    d2 = store.begin_delivery("s@x.test", ["alice@example.test"])
    run(d2.commit())
    d2.abort()                                      # after commit: nothing happens
    assert {name, d2.name} == set(os.listdir(md / "new"))


def test_begin_delivery_unknown_or_malformed_recipient(store: Store) -> None:
    store.accounts.add("alice@example.test")
    with pytest.raises(NoSuchAccount):
        store.begin_delivery("s@x.test", ["alice@example.test", "nobody@example.test"])
    with pytest.raises(AddressError):
        store.begin_delivery("s@x.test", ["no address"])
    assert os.listdir(store.data_dir / "mail" / "example.test" / "alice" / "tmp") == []


def test_write_error_raises_store_error(store: Store) -> None:
    store.accounts.add("alice@example.test")
    d = store.begin_delivery("s@x.test", ["alice@example.test"])
    os.dup2(os.open("/dev/full", os.O_WRONLY), d._fd)  # the disk is full from now on
    with pytest.raises(StoreError, match="write failed"):
        d.write(b"x" * 100000)
    d.abort()
    assert os.listdir(store.data_dir / "mail" / "example.test" / "alice" / "tmp") == []


def test_commit_failure_delivers_to_nobody(store: Store) -> None:
    store.accounts.add("alice@example.test")
    store.accounts.add("bob@example.test")
    bob = store.data_dir / "mail" / "example.test" / "bob"
    d = store.begin_delivery("s@x.test", ["alice@example.test", "bob@example.test"])
    d.write(BODY)
    (bob / "new").rmdir()                           # bob's Maildir is broken
    with pytest.raises(StoreError, match="cannot commit"):
        run(d.commit())
    d.abort()
    alice = store.data_dir / "mail" / "example.test" / "alice"
    assert os.listdir(alice / "new") == [] and os.listdir(alice / "tmp") == []
    assert store.usage("alice@example.test").messages == 0
    assert store.db.query("SELECT * FROM messages") == []


def test_recover_removes_crash_leftovers_only(store: Store) -> None:
    store.accounts.add("alice@example.test")
    tmp = store.data_dir / "mail" / "example.test" / "alice" / "tmp"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    (tmp / f"1700000000.M1P{dead}Q1.relay.test").write_bytes(b"half a message")
    (tmp / f"1700000000.M2P{os.getpid()}Q999999.relay.test").write_bytes(b"ours, not live")
    (tmp / "garbage").write_bytes(b"?")
    live = store.begin_delivery("s@x.test", ["alice@example.test"])
    live.write(b"in progress")
    admin.recover(store)
    assert os.listdir(tmp) == [live.tmp_path.name]
    run(live.commit())
    assert os.listdir(tmp) == []


def test_crash_mid_delivery_leaves_nothing_visible(tmp_path: Path) -> None:
    """A process that dies while writing a message (os._exit, no cleanup): nothing in new/,
    and the next server start removes its tmp file."""
    s = Store.open(cfg(tmp_path))
    s.accounts.add("alice@example.test")
    code = ("import os, sys; from relay.config import Config; from relay.store import Store;"
            "s = Store.open(Config(data_dir=sys.argv[1], hostname='relay.test'));"
            "d = s.begin_delivery('a@b.test', ['alice@example.test']); d.write(b'x' * 100000);"
            "os._exit(9)")
    rc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "data")], check=False).returncode
    assert rc == 9
    md = s.data_dir / "mail" / "example.test" / "alice"
    assert len(os.listdir(md / "tmp")) == 1 and os.listdir(md / "new") == []
    admin.recover(s)
    assert os.listdir(md / "tmp") == [] and s.mailbox("alice@example.test").messages() == []
    assert s.usage("alice@example.test").bytes == 0
    s.close()


def test_begin_delivery_fails_cleanly_when_tmp_is_unusable(store: Store) -> None:
    store.accounts.add("alice@example.test")
    tmp = store.data_dir / "mail" / "example.test" / "alice" / "tmp"
    tmp.rmdir()
    with pytest.raises(StoreError, match="cannot create"):
        store.begin_delivery("s@x.test", ["alice@example.test"])
    admin.recover(store)                                   # start-up re-creates the Maildir parts
    d = store.begin_delivery("s@x.test", ["alice@example.test"])
    d.abort()
    assert os.listdir(tmp) == []


def test_server_start_cleans_tmp_and_rebuilds_the_ledger(relay_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Relay.start() runs recover(): a crashed process's tmp file goes, and a ledger that
    disagrees with the Maildir is rebuilt before the first RCPT is checked against it."""
    data = tmp_path / "crashed"
    s = Store.open(cfg(tmp_path, data_dir=data, quota=QuotaConfig(default_bytes=1000)))
    s.accounts.add("alice@example.test")
    md = data / "mail" / "example.test" / "alice"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    (md / "tmp" / f"1700000000.M1P{dead}Q1.relay.test").write_bytes(b"half a message")
    with s.db.transaction() as c:                     # a ledger that says "full"
        c.execute("UPDATE accounts SET usage_bytes=1000, usage_messages=7")
    s.close()
    r = relay_factory(data_dir=data, quota={"default_bytes": 1000})
    assert os.listdir(md / "tmp") == []
    u = r.call(lambda relay: relay.store.ledger.usage("alice@example.test"))
    assert (u.bytes, u.messages) == (0, 0)
    import smtplib
    with smtplib.SMTP("127.0.0.1", r.smtp_port, timeout=30) as c:
        assert c.sendmail("s@remote.test", ["alice@example.test"], b"Subject: x\r\n\r\nhi\r\n") == {}
