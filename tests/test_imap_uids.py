"""Issue 3 item 2: UIDs, UIDVALIDITY, UIDNEXT and POP3 UIDLs stay the same across a restart
of the server, and flags live in the Maildir names both ways: what IMAP stores a Maildir
reader (mutt, Dovecot) sees, and what such a reader renames IMAP reports."""

from __future__ import annotations

import imaplib
import os
import poplib
import re
from pathlib import Path
from typing import Any

import pytest

from tests.test_imap_e2e import ALICE, maildir, send

pytestmark = pytest.mark.e2e


def imap_state(r: Any) -> tuple[bytes, bytes, list[bytes]]:
    m = imaplib.IMAP4("127.0.0.1", r.imap_port)
    m.login(ALICE, "secret")
    m.select()
    uv, nxt = m.response("UIDVALIDITY")[1][0], m.response("UIDNEXT")[1][0]
    _, data = m.fetch("1:*", "(UID FLAGS)")
    m.logout()
    return uv, nxt, [d for d in data if isinstance(d, bytes)]


def uidl(r: Any) -> list[bytes]:
    p = poplib.POP3("127.0.0.1", r.pop3_port, timeout=10)
    p.user(ALICE)
    p.pass_("secret")
    listing = p.uidl()[1]
    p.quit()
    return listing


def test_uids_uidvalidity_and_uidl_survive_a_restart(relay_factory: Any, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    r = relay_factory(data_dir=data_dir)
    r.add_user(ALICE, "secret")
    for i in range(4):
        send(r, b"Subject: %d\r\n\r\nbody %d\r\n" % (i, i))
    m = imaplib.IMAP4("127.0.0.1", r.imap_port)
    m.login(ALICE, "secret")
    m.select()
    m.store("2", "+FLAGS", "(\\Deleted)")
    m.expunge()                                    # UIDs 1 3 4 remain: not renumbered
    m.store("1", "+FLAGS", "(\\Seen \\Flagged)")
    m.logout()
    before = imap_state(r), uidl(r)
    assert before[0][1] == b"5"
    assert [re.search(rb"UID (\d+)", x).group(1) for x in before[0][2]] == [b"1", b"3", b"4"]  # type: ignore[union-attr]
    r.stop()
    r2 = relay_factory(data_dir=data_dir)
    assert (imap_state(r2), uidl(r2)) == before
    send(r2, b"Subject: after\r\n\r\nafter\r\n")
    uv, nxt, rows = imap_state(r2)
    assert uv == before[0][0] and nxt == b"6" and b"UID 5 " in rows[-1]


def test_flags_are_shared_with_other_maildir_readers(relay: Any) -> None:
    send(relay, b"Subject: a\r\n\r\na\r\n")
    send(relay, b"Subject: b\r\n\r\nb\r\n")
    m = imaplib.IMAP4("127.0.0.1", relay.imap_port)
    m.login(ALICE, "secret")
    m.select()
    m.store("1", "+FLAGS", "(\\Answered \\Flagged)")
    root = maildir(relay)
    [first] = [p for p in (root / "cur").iterdir()]
    assert first.name.endswith(":2,FR")                  # as mutt and Dovecot name it
    # a Maildir reader (mutt) moves message 2 from new/ to cur/ and marks it seen and trashed
    [second] = list((root / "new").iterdir())
    os.rename(second, root / "cur" / (second.name + ":2,ST"))
    assert m.noop()[0] == "OK"                            # the change is announced
    assert m.response("FETCH") == ("FETCH", [b"2 (FLAGS (\\Seen \\Deleted) UID 2)"])
    assert m.fetch("1:2", "(UID FLAGS)")[1] == [b"1 (UID 1 FLAGS (\\Flagged \\Answered))",
                                                b"2 (UID 2 FLAGS (\\Seen \\Deleted))"]
    assert m.expunge() == ("OK", [b"2"])
    assert [p.name[-5:] for p in (root / "cur").iterdir()] == [":2,FR"]
    m.logout()
