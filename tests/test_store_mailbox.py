"""Store phase 2: the mailbox index, flags, expunge, reconciliation with the Maildir,
statistics, crash recovery."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from relay.config import Config
from relay.store import MessageInfo, NoSuchAccount, NoSuchMessage, Store
from relay.store.maildir import admin


@pytest.fixture
def store(tmp_path: Path):  # type: ignore[no-untyped-def]
    s = Store.open(Config(data_dir=tmp_path / "data", hostname="relay.test"))
    s.accounts.add("alice@example.test")
    s.accounts.add("bob@example.test")
    yield s
    s.close()


def deliver(store: Store, rcpts: list[str], body: bytes = b"Subject: x\r\n\r\nbody\r\n") -> str:
    d = store.begin_delivery("gw@h.test", rcpts, session_id="s1", helo="h", peer="127.0.0.1")
    d.write(body)
    asyncio.run(d.commit())
    assert d.name is not None
    return d.name


def md(store: Store, addr: str) -> Path:
    return store.accounts.maildir(addr)


def test_messages_from_index_in_uid_order(store: Store) -> None:
    mb = store.mailbox("alice@example.test")
    assert mb.messages() == [] and mb.uidnext == 1
    names = [deliver(store, ["alice@example.test"], b"m%d\r\n" % i) for i in range(3)]
    msgs = mb.messages()
    assert [m.uid for m in msgs] == [1, 2, 3] and [m.name for m in msgs] == names
    assert all(m.flags == "" and m.size == mb.path(m.uid).stat().st_size for m in msgs)
    assert abs(msgs[0].internaldate - time.time()) < 60
    assert mb.uidnext == 4
    assert not mb.refresh()                         # our own deliveries need no rescan
    with pytest.raises(NoSuchMessage):
        mb.path(99)
    with pytest.raises(NoSuchAccount):
        store.mailbox("nobody@example.test")


def test_uidvalidity_is_new_for_a_recreated_account(store: Store) -> None:
    v1 = store.mailbox("alice@example.test").uidvalidity
    assert v1 == store.mailbox("alice@example.test").uidvalidity
    store.accounts.delete("alice@example.test")
    store.accounts.add("alice@example.test")
    assert store.mailbox("alice@example.test").uidvalidity > v1


def test_set_flags_moves_to_cur_sorted(store: Store) -> None:
    name = deliver(store, ["alice@example.test"])
    mb = store.mailbox("alice@example.test")
    info = mb.set_flags(1, "SF")
    assert info == MessageInfo(1, name, info.size, info.internaldate, "FS")
    assert mb.path(1) == md(store, "alice@example.test") / "cur" / f"{name}:2,FS"
    assert os.listdir(md(store, "alice@example.test") / "new") == []
    assert mb.set_flags(1, "").flags == ""
    assert mb.path(1).name == f"{name}:2,"
    assert mb.set_flags(1, "TSS").flags == "ST"
    assert mb.messages()[0].flags == "ST"
    assert not mb.refresh()


def test_external_changes_are_picked_up(store: Store) -> None:
    """mutt moves a message to cur/ with flags, deletes another, an MDA drops a third in."""
    n1 = deliver(store, ["alice@example.test"])
    n2 = deliver(store, ["alice@example.test"], b"second message\r\n")
    mb = store.mailbox("alice@example.test")
    events: list[tuple[str, int, int]] = []
    store.subscribe("alice@example.test", lambda *e: events.append(e))
    root = md(store, "alice@example.test")
    size2 = (root / "new" / n2).stat().st_size
    before = store.usage("alice@example.test")
    time.sleep(0.01)
    os.rename(root / "new" / n1, root / "cur" / f"{n1}:2,RS")
    os.unlink(root / "new" / n2)
    (root / "new" / "1700000000.M1P1Q1.elsewhere").write_bytes(b"dropped in\r\n")
    msgs = mb.messages()
    assert [(m.uid, m.name, m.flags) for m in msgs] == [(1, n1, "RS"), (3, "1700000000.M1P1Q1.elsewhere", "")]
    assert msgs[1].size == 12
    assert mb.path(1).name == f"{n1}:2,RS"
    after = store.usage("alice@example.test")
    assert after.bytes == before.bytes - size2 + 12 and after.messages == 2
    assert ("expunge", size2, 1) in events and ("new", 12, 1) in events
    assert not mb.refresh()


def test_path_follows_a_move_between_refreshes(store: Store) -> None:
    name = deliver(store, ["alice@example.test"])
    mb = store.mailbox("alice@example.test")
    root = md(store, "alice@example.test")
    os.rename(root / "new" / name, root / "cur" / f"{name}:2,S")
    assert mb.path(1) == root / "cur" / f"{name}:2,S"


def test_expunge_one_recipient_of_a_shared_message(store: Store) -> None:
    name = deliver(store, ["alice@example.test", "bob@example.test"])
    size = (md(store, "bob@example.test") / "new" / name).stat().st_size
    events: list[tuple[str, int, int]] = []
    store.subscribe("alice@example.test", lambda *e: events.append(e))
    mb = store.mailbox("alice@example.test")
    mb.set_flags(1, "ST")
    assert mb.expunge([1, 7]) == [1]
    assert mb.messages() == [] and os.listdir(md(store, "alice@example.test") / "cur") == []
    assert (md(store, "bob@example.test") / "new" / name).read_bytes()    # bob's copy stays
    assert store.usage("alice@example.test").bytes == 0
    assert store.usage("bob@example.test").bytes == size
    assert events == [("expunge", size, 1)]
    assert mb.expunge([1]) == []
    assert not mb.refresh()
    deliver(store, ["alice@example.test"])
    assert [m.uid for m in mb.messages()] == [2]                       # UIDs are never reused


def test_statistics(store: Store) -> None:
    deliver(store, ["alice@example.test", "bob@example.test"])
    deliver(store, ["alice@example.test"])
    mb = store.mailbox("alice@example.test")
    mb.note_fetched(1)
    mb.note_fetched(1)                             # only the first fetch counts
    store.note_poll("Alice@example.test")
    mb.expunge([2])
    size = mb.info(1).size                         # shared by alice and bob (no "for" clause)
    st = store.statistics()
    assert st.accounts == 2 and st.messages_stored == 3 and st.messages_deleted == 1
    assert st.stored_bytes == 2 * size + st.deleted_bytes and st.deleted_bytes > size     # "for <alice>"
    assert st.backlog_messages == 2 and st.backlog_bytes == 2 * size
    a = st.mailboxes["alice@example.test"]
    assert (a.backlog_bytes, a.backlog_messages, a.quota_bytes, a.quota_messages) == (size, 1, 20 * 1024**3, 0)
    assert 0 <= a.oldest_age_seconds < 60 and abs(a.last_poll - time.time()) < 60
    assert st.mailboxes["bob@example.test"].last_poll == 0
    assert sum(st.delivery_to_fetch_seconds.counts) == 1
    assert sum(st.delivery_to_delete_seconds.counts) == 1
    assert st.delivery_to_fetch_seconds.bounds[0] == 1.0 and st.delivery_to_fetch_seconds.counts[0] == 1


def test_select_on_10000_messages_touches_no_file(store: Store) -> None:
    """The index alone answers: rows for files that do not exist come back unchanged (a scan
    or a stat per file would have dropped them)."""
    now = time.time()
    rows = [("alice@example.test", uid, f"{int(now)}.M{uid}P1Q{uid}.x,S=100", 100, now)
            for uid in range(1, 10001)]
    with store.db.transaction() as c:
        c.executemany("INSERT INTO messages(address, uid, name, size, internaldate) VALUES (?,?,?,?,?)", rows)
        c.execute("UPDATE accounts SET uidnext=10001 WHERE address='alice@example.test'")
    msgs = store.mailbox("alice@example.test").messages()
    assert len(msgs) == 10000 and msgs[-1].uid == 10000


def test_recover_indexes_unindexed_messages_and_rebuilds_the_ledger(tmp_path: Path, store: Store) -> None:
    name = deliver(store, ["alice@example.test"])
    root = md(store, "alice@example.test")
    size = (root / "new" / name).stat().st_size
    # a crash between link and index: the file is in new/, the index does not know it
    (root / "new" / "1700000000.M5P5Q5.relay.test,S=3").write_bytes(b"abc")
    # and a ledger that disagrees with the index
    with store.db.transaction() as c:
        c.execute("UPDATE accounts SET usage_bytes=999999, usage_messages=42 WHERE address='bob@example.test'")
    admin.recover(store)
    mb = store.mailbox("alice@example.test")
    assert [(m.uid, m.name) for m in mb.messages()] == [(1, name), (2, "1700000000.M5P5Q5.relay.test,S=3")]
    assert store.usage("alice@example.test").bytes == size + 3
    assert store.usage("bob@example.test").bytes == 0 and store.usage("bob@example.test").messages == 0


def test_messages_kept_between_changes_and_fresh_after_any(store: Store) -> None:
    import subprocess
    import sys

    for _ in range(3):
        deliver(store, ["alice@example.test"])
    mb = store.mailbox("alice@example.test")
    first = mb.messages()
    assert mb.messages() == first and mb.messages() is not mb.messages()     # copies
    mb.set_flags(2, "S")                                                     # our own change
    assert [m.flags for m in mb.messages()] == ["", "S", ""]
    deliver(store, ["bob@example.test"])                                     # another mailbox
    assert len(mb.messages()) == 3
    # another process (the admin CLI) commits a change the Maildir does not show
    subprocess.run([sys.executable, "-c",
                    ("import sys; from relay.config import Config; from relay.store import Store\n"
                    "s = Store.open(Config(data_dir=sys.argv[1]))\n"
                    "with s.db.transaction() as c: c.execute(\"UPDATE messages SET flags='F' WHERE uid=3\")"),
                    str(store.data_dir)], check=True)
    assert [m.flags for m in mb.messages()] == ["", "S", "F"]


def test_a_poll_keeps_the_message_list(store: Store) -> None:
    """Login bookkeeping (last poll, first fetch) does not invalidate the kept list."""
    deliver(store, ["alice@example.test"])
    mb = store.mailbox("alice@example.test")
    mb.messages()
    generation = store.db.generation
    store.note_poll("alice@example.test")
    mb.note_fetched(1)
    assert store.db.generation == generation
    mb.set_flags(1, "S")
    assert store.db.generation > generation and mb.messages()[0].flags == "S"
