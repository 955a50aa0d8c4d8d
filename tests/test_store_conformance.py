"""The store conformance suite: written against relay.store.api only, run against every
backend in tests/storeutil.py (a new backend joins with one entry there).

deliver (one and several recipients, one stored copy), list, read ranges, flags, expunge,
quota (reserve at add_recipient, extend while streaming, release on abort, settle on
commit, usage), the change feed, accounts, and crash recovery (a delivery abandoned
mid-write by a killed process leaves nothing visible and no ledger residue).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from storeutil import BACKENDS, StoreBackend

from relay.config import Config
from relay.store.api import (
    EXTEND_STEP,
    NO_FLAGS,
    AccountExists,
    AddressError,
    Body,
    Change,
    ChangeKind,
    DeliveryReceipt,
    Envelope,
    Flag,
    MessageStore,
    NoSuchAccount,
    NoSuchMessage,
    QuotaExceeded,
    Refusal,
    StoreError,
)
from relay.store.backends import open_store

KiB, MiB = 1024, 1024 * 1024
A, B, C = "alice@example.test", "bob@example.test", "carol@other.test"
MESSAGE = (b"From: ct@hospital.test\r\nSubject: CT\r\n\r\n.a line starting with a dot\r\n"
           + bytes(range(256)) * 200 + b"\r\n")
FEED_TIMEOUT = 10.0       # seconds a change may take to reach a subscriber (networked backends)


@pytest.fixture(params=BACKENDS, ids=str)
def backend(request: pytest.FixtureRequest) -> StoreBackend:
    b: StoreBackend = request.param
    reason = b.skip()
    if reason:
        pytest.skip(reason)
    return b


Scenario = Callable[[MessageStore, Config], Awaitable[None]]


def run(backend: StoreBackend, tmp_path: Path, scenario: Scenario, **sections: Any) -> Config:
    """Open a store of this backend on a fresh directory, create alice, bob and carol, run
    the scenario, close the store."""
    config = backend.config(tmp_path / "data", sections)

    async def main() -> None:
        store = open_store(config, backend.name)
        await store.open()
        try:
            for a in (A, B, C):
                await store.accounts.add(a)
            await scenario(store, config)
        finally:
            await store.close()
    asyncio.run(main())
    return config


async def deliver(store: MessageStore, rcpts: list[str], message: bytes = MESSAGE,
                  declared: int | None = None, chunk: int = 7000) -> DeliveryReceipt:
    d = store.begin_delivery(Envelope("gw@hospital.test", "sid1", "gw.hospital.test", "127.0.0.1"))
    try:
        for r in rcpts:
            assert await d.add_recipient(r, len(message) if declared is None else declared) is None
        await d.start()
        view = memoryview(message)
        for i in range(0, len(message), chunk):
            d.write(view[i:i + chunk])
            if not d.writable:
                await d.wait_writable()
        return await d.commit()
    finally:
        d.abort()


async def read_all(body: Body, step: int = 100 * KiB) -> bytes:
    out = bytearray()
    while len(out) < body.size:
        data = await body.read(len(out), step)
        assert data, "read() returned nothing before the end"
        out += data
    return bytes(out)


async def until(predicate: Callable[[], bool], timeout: float = FEED_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


# --- delivery and listing ---------------------------------------------------------------------
def test_deliver_to_one_recipient_and_read_it_back(backend: StoreBackend, tmp_path: Path) -> None:
    async def scenario(store: MessageStore, config: Config) -> None:
        receipt = await deliver(store, [A])
        assert receipt.recipients == (A,)
        assert receipt.id and receipt.id.isascii() and receipt.id.isprintable() and " " not in receipt.id
        mb = store.mailbox(A)
        [m] = await mb.messages()
        assert (m.uid, m.size, m.flags) == (1, receipt.size, NO_FLAGS)
        assert 0 < len(m.id) <= 70 and m.id.isprintable() and " " not in m.id      # RFC 1939 UIDL
        assert abs(m.internaldate - time.time()) < 60
        assert await mb.info(1) == m
        with await mb.body(1) as body:
            data = await read_all(body)
        assert body.size == receipt.size == len(data)
        assert data.startswith(b"Return-Path: <gw@hospital.test>\r\nReceived: from gw.hospital.test ([127.0.0.1])")
        assert data.endswith(MESSAGE) and f"for <{A}>".encode() in data
        assert await store.mailbox(B).messages() == []
    run(backend, tmp_path, scenario)


def test_several_recipients_get_one_stored_copy(backend: StoreBackend, tmp_path: Path) -> None:
    async def scenario(store: MessageStore, config: Config) -> None:
        d = store.begin_delivery(Envelope("gw@hospital.test"))
        for r in (A, "BOB@Example.TEST", B, C):           # a repeat (any case) is taken once
            assert await d.add_recipient(r, len(MESSAGE)) is None
        assert list(d.recipients) == [A, B, C]
        await d.start()
        await d.start()                                   # a second call does nothing
        d.write(MESSAGE)
        receipt = await d.commit()
        assert receipt.recipients == (A, B, C)
        bodies = []
        for r in (A, B, C):
            [m] = await store.mailbox(r).messages()
            assert m.size == receipt.size
            bodies.append(await store.mailbox(r).body(m.uid))
        try:
            assert len({await read_all(b) for b in bodies}) == 1
            assert len({backend.body_identity(b) for b in bodies}) == 1
        finally:
            for b in bodies:
                b.close()
        for r in (A, B, C):
            u = await store.ledger.usage(r)
            assert (u.bytes, u.messages, u.reserved_bytes, u.reserved_messages) == (receipt.size, 1, 0, 0)
        assert store.statistics().messages_stored == 3
    run(backend, tmp_path, scenario)


def test_uids_ascend_and_are_never_reused(backend: StoreBackend, tmp_path: Path) -> None:
    async def scenario(store: MessageStore, config: Config) -> None:
        mb = store.mailbox(A)
        validity = await mb.uidvalidity()
        assert await mb.uidnext() == 1
        ids = [(await deliver(store, [A], MESSAGE + bytes([i]))).id for i in range(3)]
        msgs = await mb.messages()
        assert [m.uid for m in msgs] == [1, 2, 3] and len({m.id for m in msgs}) == 3
        assert await mb.expunge([3, 2]) == [2, 3]
        await deliver(store, [A])
        assert [m.uid for m in await mb.messages()] == [1, 4]
        assert await mb.uidnext() == 5 and await mb.uidvalidity() == validity
        assert len(set(ids)) == 3
    run(backend, tmp_path, scenario)


def test_an_empty_message_and_a_commit_without_recipients(backend: StoreBackend, tmp_path: Path) -> None:
    async def scenario(store: MessageStore, config: Config) -> None:
        receipt = await deliver(store, [A], b"")
        [m] = await store.mailbox(A).messages()
        assert m.size == receipt.size > 0                 # the trace headers alone
        d = store.begin_delivery(Envelope(""))
        with pytest.raises(StoreError):                   # no recipients
            await d.start()
        d.abort()
    run(backend, tmp_path, scenario)


# --- reading -----------------------------------------------------------------------------------
def test_read_ranges(backend: StoreBackend, tmp_path: Path) -> None:
    async def scenario(store: MessageStore, config: Config) -> None:
        await deliver(store, [A])
        with await store.mailbox(A).body(1) as body:
            whole = await read_all(body, step=4099)
            n = body.size
            assert await body.read(0, 10) == whole[:10]
            assert await body.read(1000, 5000) == whole[1000:6000]
            assert await body.read(n - 3, 10) == whole[-3:]       # a range crossing the end
            assert await body.read(n, 10) == b""                  # at the end
            assert await body.read(n + 100, 10) == b""            # past it
            assert await body.read(5, 0) == b""                   # zero length
            fd = body.fileno()
            if fd is not None:                                    # sendfile's way: same bytes
                assert os.pread(fd, 100, 50) == whole[50:150]
    run(backend, tmp_path, scenario)


def test_a_body_stays_readable_after_an_expunge(backend: StoreBackend, tmp_path: Path) -> None:
    async def scenario(store: MessageStore, config: Config) -> None:
        await deliver(store, [A])
        mb = store.mailbox(A)
        body = await mb.body(1)
        try:
            before = await body.read(0, 100)
            assert await mb.expunge([1]) == [1]
            after = await read_all(body)
            assert after.startswith(before) and after.endswith(MESSAGE) and len(after) == body.size
        finally:
            body.close()
        with pytest.raises(NoSuchMessage):
            await mb.body(1)
    run(backend, tmp_path, scenario)


def test_unknown_messages_and_accounts(backend: StoreBackend, tmp_path: Path) -> None:
    async def scenario(store: MessageStore, config: Config) -> None:
        mb = store.mailbox(A)
        for call in (mb.info(7), mb.body(7), mb.set_flags(7, Flag.SEEN)):
            with pytest.raises(NoSuchMessage):
                await call
        assert await mb.expunge([7]) == []
        nobody = store.mailbox("nobody@example.test")
        with pytest.raises(NoSuchAccount):
            await nobody.messages()
        with pytest.raises(AddressError):
            store.mailbox("not an address")
    run(backend, tmp_path, scenario)


# --- flags and expunge ----------------------------------------------------------------------------
def test_flags(backend: StoreBackend, tmp_path: Path) -> None:
    async def scenario(store: MessageStore, config: Config) -> None:
        await deliver(store, [A])
        await deliver(store, [A])
        mb = store.mailbox(A)
        m = await mb.set_flags(1, Flag.SEEN | Flag.FLAGGED)
        assert (m.uid, m.flags) == (1, Flag.SEEN | Flag.FLAGGED)
        assert [x.flags for x in await mb.messages()] == [Flag.SEEN | Flag.FLAGGED, NO_FLAGS]
        every = Flag.SEEN | Flag.ANSWERED | Flag.FLAGGED | Flag.DELETED | Flag.DRAFT
        assert (await mb.set_flags(2, every)).flags == every
        assert (await mb.set_flags(1, NO_FLAGS)).flags == NO_FLAGS
        assert [x.flags for x in await mb.messages()] == [NO_FLAGS, every]
        with await mb.body(1) as body:                   # flags do not touch the bytes
            assert (await read_all(body)).endswith(MESSAGE)
    run(backend, tmp_path, scenario)


def test_expunge_settles_the_ledger(backend: StoreBackend, tmp_path: Path) -> None:
    async def scenario(store: MessageStore, config: Config) -> None:
        sizes = [(await deliver(store, [A, B], MESSAGE * (i + 1))).size for i in range(3)]
        mb = store.mailbox(A)
        assert await mb.expunge([1, 3, 3, 99]) == [1, 3]
        assert [m.uid for m in await mb.messages()] == [2]
        u = await store.ledger.usage(A)
        assert (u.bytes, u.messages) == (sizes[1], 1)
        u = await store.ledger.usage(B)                    # the other recipient's copy stays
        assert (u.bytes, u.messages) == (sum(sizes), 3)
        assert [m.uid for m in await store.mailbox(B).messages()] == [1, 2, 3]
        assert await mb.expunge([1]) == []
        stats = store.statistics()
        assert (stats.messages_deleted, stats.deleted_bytes) == (2, sizes[0] + sizes[2])
    run(backend, tmp_path, scenario)


# --- quota and the ledger -------------------------------------------------------------------------
QUOTA = {"quota": {"default_bytes": 100 * KiB, "default_messages": 3}}


def test_reserve_at_add_recipient_release_on_abort(backend: StoreBackend, tmp_path: Path) -> None:
    async def scenario(store: MessageStore, config: Config) -> None:
        d1 = store.begin_delivery(Envelope("s@x.test"))
        assert await d1.add_recipient(A, 60 * KiB) is None
        u = await store.ledger.usage(A)
        assert (u.bytes, u.reserved_bytes, u.reserved_messages, u.quota_bytes, u.quota_messages) == \
            (0, 60 * KiB, 1, 100 * KiB, 3)
        d2 = store.begin_delivery(Envelope("s@x.test"))
        assert await d2.add_recipient(A, 41 * KiB) is Refusal.OVER_QUOTA_BYTES
        assert await d2.add_recipient(A, 40 * KiB) is None             # exactly full
        assert await d2.add_recipient("nobody@example.test", 1) is Refusal.NO_SUCH_ACCOUNT
        with pytest.raises(AddressError):
            await d2.add_recipient("not an address", 1)
        d1.abort()
        d1.abort()                                                      # idempotent
        assert (await store.ledger.usage(A)).reserved_bytes == 40 * KiB
        d2.abort()
        u = await store.ledger.usage(A)
        assert (u.reserved_bytes, u.reserved_messages) == (0, 0)
        assert store.ledger.statistics().reservations == 0
    run(backend, tmp_path, scenario, **QUOTA)


def test_message_count_quota(backend: StoreBackend, tmp_path: Path) -> None:
    async def scenario(store: MessageStore, config: Config) -> None:
        await deliver(store, [A], b"x")
        await deliver(store, [A], b"y")
        d = store.begin_delivery(Envelope("s@x.test"))
        assert await d.add_recipient(A, 10) is None                    # the third message
        d2 = store.begin_delivery(Envelope("s@x.test"))
        assert await d2.add_recipient(A, 10) is Refusal.OVER_QUOTA_MESSAGES
        d.abort()
        d2.abort()
        await store.accounts.set_quota(A, quota_messages=0)            # 0 = unlimited
        for _ in range(3):
            await deliver(store, [A], b"z")
        assert (await store.ledger.usage(A)).messages == 5
    run(backend, tmp_path, scenario, **QUOTA)


def test_settle_on_commit_and_stored_mail_counts(backend: StoreBackend, tmp_path: Path) -> None:
    async def scenario(store: MessageStore, config: Config) -> None:
        receipt = await deliver(store, [A], b"x" * (70 * KiB))
        u = await store.ledger.usage(A)
        assert (u.bytes, u.messages, u.reserved_bytes, u.reserved_messages) == (receipt.size, 1, 0, 0)
        entry = store.ledger.snapshot(A)
        assert entry is not None and (entry.stored_bytes, entry.streaming_bytes) == (receipt.size, 0)
        d = store.begin_delivery(Envelope("s@x.test"))
        assert await d.add_recipient(A, 100 * KiB - receipt.size + 1) is Refusal.OVER_QUOTA_BYTES
        assert await d.add_recipient(A, 100 * KiB - receipt.size) is None
        d.abort()
        await store.mailbox(A).expunge([1])
        assert (await store.ledger.usage(A)).bytes == 0
        d = store.begin_delivery(Envelope("s@x.test"))
        assert await d.add_recipient(A, 100 * KiB) is None             # drained: room again
        d.abort()
    run(backend, tmp_path, scenario, **QUOTA)


def test_extend_while_streaming_and_streaming_bytes(backend: StoreBackend, tmp_path: Path) -> None:
    async def scenario(store: MessageStore, config: Config) -> None:
        d = store.begin_delivery(Envelope("s@x.test"))
        assert await d.add_recipient(A, 0) is None                     # no SIZE= declared
        await d.start()
        chunk = b"x" * (256 * KiB)
        written = 0
        while written < EXTEND_STEP + 2 * MiB:
            d.write(chunk)
            written += len(chunk)
            if not d.writable:
                await d.wait_writable()
        u = await store.ledger.usage(A)
        assert written - EXTEND_STEP <= u.reserved_bytes <= written + 64 * KiB
        entry = store.ledger.snapshot(A)
        assert entry is not None and entry.streaming_bytes >= written - EXTEND_STEP
        assert entry.backlog_bytes == entry.stored_bytes + entry.streaming_bytes
        other = store.begin_delivery(Envelope("s@x.test"))            # the bytes in flight count
        assert await other.add_recipient(A, 20 * MiB - u.reserved_bytes + 1) is Refusal.OVER_QUOTA_BYTES
        other.abort()
        receipt = await d.commit()
        u = await store.ledger.usage(A)
        assert (u.bytes, u.reserved_bytes) == (receipt.size, 0)
        entry = store.ledger.snapshot(A)
        assert entry is not None and (entry.stored_bytes, entry.streaming_bytes) == (receipt.size, 0)
    run(backend, tmp_path, scenario, quota={"default_bytes": 20 * MiB, "default_messages": 0})


def test_a_message_growing_past_the_quota_is_refused(backend: StoreBackend, tmp_path: Path) -> None:
    async def scenario(store: MessageStore, config: Config) -> None:
        d = store.begin_delivery(Envelope("s@x.test"))
        assert await d.add_recipient(A, 1000) is None                  # declared small, sent large
        assert await d.add_recipient(B, 1000) is None
        await d.start()
        chunk = b"y" * (256 * KiB)
        with pytest.raises(QuotaExceeded) as e:
            for _ in range(64):                                       # 16 MiB > the 6 MiB quota
                d.write(chunk)
                if not d.writable:
                    await d.wait_writable()
            await d.commit()
        assert e.value.address in (A, B)
        d.abort()
        for r in (A, B):
            u = await store.ledger.usage(r)
            assert (u.bytes, u.messages, u.reserved_bytes, u.reserved_messages) == (0, 0, 0, 0)
            assert await store.mailbox(r).messages() == []
    run(backend, tmp_path, scenario, quota={"default_bytes": 6 * MiB, "default_messages": 0})


def test_recipients_come_before_the_message(backend: StoreBackend, tmp_path: Path) -> None:
    async def scenario(store: MessageStore, config: Config) -> None:
        d = store.begin_delivery(Envelope("s@x.test"))
        assert await d.add_recipient(A, 10) is None
        await d.start()
        d.write(b"Subject: x\r\n\r\n")
        with pytest.raises(StoreError):
            await d.add_recipient(B, 10)
        d.abort()
        assert list(d.recipients) == [A]
        with pytest.raises(StoreError):
            d.write(b"more")                                          # aborted
        assert (await store.ledger.usage(A)).reserved_bytes == 0
    run(backend, tmp_path, scenario)


# --- the change feed -------------------------------------------------------------------------------
def test_change_feed(backend: StoreBackend, tmp_path: Path) -> None:
    async def scenario(store: MessageStore, config: Config) -> None:
        events: list[Change] = []
        others: list[Change] = []
        everything: list[Change] = []
        unsubscribe = store.changes.subscribe(A, events.append)
        store.changes.subscribe(B, others.append)
        store.changes.subscribe(None, everything.append)
        r1 = await deliver(store, [A])
        await until(lambda: len(events) == 1)
        assert events == [Change(A, ChangeKind.NEW, r1.size, 1)]
        r2 = await deliver(store, [A, B], MESSAGE * 2)
        await until(lambda: len(events) == 2 and len(others) == 1)
        assert events[1] == Change(A, ChangeKind.NEW, r2.size, 1)
        assert others == [Change(B, ChangeKind.NEW, r2.size, 1)]
        await store.mailbox(A).expunge([1, 2])
        await until(lambda: len(events) >= 3)
        assert events[2:] == [Change(A, ChangeKind.EXPUNGE, r1.size + r2.size, 2)] or \
            sorted(events[2:], key=lambda c: c.nbytes) == sorted(
                [Change(A, ChangeKind.EXPUNGE, r1.size, 1), Change(A, ChangeKind.EXPUNGE, r2.size, 1)],
                key=lambda c: c.nbytes)
        await until(lambda: sum(c.nmessages for c in everything) == 5)
        assert {(c.address, c.kind) for c in everything} == {
            (A, ChangeKind.NEW), (B, ChangeKind.NEW), (A, ChangeKind.EXPUNGE)}
        unsubscribe()
        seen = len(events)
        await deliver(store, [A, B])
        await until(lambda: len(others) == 2)
        await asyncio.sleep(0.05)
        assert len(events) == seen
    run(backend, tmp_path, scenario)


# --- accounts --------------------------------------------------------------------------------------
def test_accounts(backend: StoreBackend, tmp_path: Path) -> None:
    async def scenario(store: MessageStore, config: Config) -> None:
        acc = store.accounts
        new = await acc.add("Dave@Example.TEST", "pw1", quota_bytes=5000)
        assert (new.address, new.quota_bytes, new.quota_messages, new.has_password) == \
            ("dave@example.test", 5000, None, True)
        with pytest.raises(AccountExists):
            await acc.add("dave@example.test")
        assert await acc.get("DAVE@example.test") == new
        assert await acc.get("nobody@example.test") is None and await acc.get("bad") is None
        assert [a.address for a in await acc.list()] == [A, B, "dave@example.test", C]
        assert await acc.verify("dave@example.test", "pw1")
        assert not await acc.verify("dave@example.test", "pw2")
        assert not await acc.verify("nobody@example.test", "pw1")
        await acc.set_password("dave@example.test", "pw2")
        assert await acc.verify("dave@example.test", "pw2") and not await acc.verify("dave@example.test", "pw1")
        await acc.set_password("dave@example.test", None)
        assert not await acc.verify("dave@example.test", "pw2")
        assert (await acc.set_quota("dave@example.test", quota_messages=2)).quota_bytes == 5000
        u = await store.ledger.usage("dave@example.test")
        assert (u.quota_bytes, u.quota_messages) == (5000, 2)
        assert await acc.is_local_domain("EXAMPLE.test") and not await acc.is_local_domain("elsewhere.test")
        await deliver(store, ["dave@example.test"], b"x")
        await acc.delete("dave@example.test")
        assert await acc.get("dave@example.test") is None
        with pytest.raises(NoSuchAccount):
            await acc.delete("dave@example.test")
        with pytest.raises(NoSuchAccount):
            await store.ledger.usage("dave@example.test")
        await acc.add("dave@example.test")                  # re-created: empty, new UIDVALIDITY
        assert await store.mailbox("dave@example.test").messages() == []
    run(backend, tmp_path, scenario)


# --- crash recovery ---------------------------------------------------------------------------------
CRASH = r"""
import asyncio, json, os, signal, sys
sys.path.insert(0, sys.argv[1])
from storeutil import BACKENDS
from relay.store.api import Envelope
from relay.store.backends import open_store

spec = json.loads(sys.argv[2])
backend = next(b for b in BACKENDS if b.name == spec["backend"])

async def main():
    store = open_store(backend.config(__import__("pathlib").Path(spec["dir"]), spec["sections"]), backend.name)
    await store.open()
    d = store.begin_delivery(Envelope("s@x.test"))
    for r in spec["rcpts"]:
        assert await d.add_recipient(r, 500 * 1024) is None
    await d.start()
    for _ in range(8):
        d.write(b"z" * 65536)
        if not d.writable:
            await d.wait_writable()
    print("written", flush=True)
    sys.stdin.readline()            # the test kills us here: mid-write, never committed

asyncio.run(main())
"""


def test_a_delivery_abandoned_mid_write_leaves_nothing(backend: StoreBackend, tmp_path: Path) -> None:
    config = run(backend, tmp_path, lambda store, config: deliver(store, [A]))  # one message before
    spec = {"backend": backend.name, "dir": str(tmp_path / "data"), "sections": {}, "rcpts": [A, B]}
    p = subprocess.Popen([sys.executable, "-c", CRASH, str(Path(__file__).parent), json.dumps(spec)],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert p.stdout is not None and p.stdout.readline() == b"written\n", p.stderr.read() if p.stderr else b""
        assert backend.leftovers(config), "the crash scenario wrote nothing to recover from"
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait(30)

    async def main() -> None:
        store = open_store(config, backend.name)
        await store.open()                                   # the backend's recovery
        try:
            assert [m.uid for m in await store.mailbox(A).messages()] == [1]
            assert await store.mailbox(B).messages() == []
            for r in (A, B):
                u = await store.ledger.usage(r)
                assert (u.reserved_bytes, u.reserved_messages) == (0, 0)
                assert u.messages == (1 if r == A else 0)
            assert store.ledger.statistics().reserved_bytes == 0
            await deliver(store, [A, B])                     # and it works on
            assert [m.uid for m in await store.mailbox(A).messages()] == [1, 2]
        finally:
            await store.close()
    asyncio.run(main())
    assert backend.leftovers(config) == []
