"""The directory service on a real store (no listeners): requests in the directory mailbox are
answered into the asker's mailbox, CLI-style changes are pushed, automatic mail and strangers
get nothing, floods are rate limited. End-to-end over SMTP/IMAP: test_directory_e2e.py."""

from __future__ import annotations

import asyncio
import email
import email.policy
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from conftest import make_config
from test_directory_keys import make_key, public

from relay.directory import verify_document
from relay.directory.core import Directory
from relay.directory.keys import check_public_key
from relay.directory.service import RATE_LIMIT, DirectoryService, RateLimiter
from relay.directory.wkd import wkd_hash
from relay.store.maildir.backend import MaildirStore


class Harness:
    """A store, the directory (as the CLI uses it) and the service (as the server runs it)."""

    def __init__(self, tmp: Path) -> None:
        self.config = make_config(tmp / "data")
        self.api = MaildirStore(self.config)               # the service sees relay.store.api
        self.store = self.api.engine                       # the CLI and the checks: the engine
        self.relay = SimpleNamespace(config=self.config, store=self.api, http_routes={})
        self.cli = Directory(self.config, self.store)
        self.service = DirectoryService(self.relay)

    def add(self, address: str, **kw: Any) -> None:
        self.cli.add(address, check_public_key(public(make_key(address))), **kw)

    def mailbox(self, address: str) -> list[email.message.EmailMessage]:
        mb = self.store.mailbox(address)
        return [email.message_from_bytes(mb.path(i.uid).read_bytes(), policy=email.policy.default)
                for i in mb.messages()]

    def clear(self, address: str) -> None:
        mb = self.store.mailbox(address)
        mb.expunge([i.uid for i in mb.messages()])

    async def send(self, sender: str, subject: str, extra: str = "", to: str = "directory@x.test") -> None:
        d = self.store.begin_delivery(sender, [to], session_id="t", helo="gw", peer="127.0.0.1")
        d.write(f"From: <{sender}>\r\nTo: <{to}>\r\nSubject: {subject}\r\n"
                f"Message-ID: <{subject.replace(' ', '.')}@gw>\r\n{extra}\r\nbody\r\n".encode())
        await d.commit()

    async def settle(self) -> None:
        """Two ticks: the first sees the serial, the second (serial unchanged) pushes."""
        await self.service.tick()
        await self.service.tick()

    def close(self) -> None:
        asyncio.run(self.service.stop())
        self.cli.close()
        self.store.close()


@pytest.fixture
def h(tmp_path: Path) -> Iterator[Harness]:
    harness = Harness(tmp_path)
    yield harness
    harness.close()


def attachments(m: email.message.EmailMessage) -> dict[str, bytes]:
    return {p.get_filename(): p.get_payload(decode=True) for p in m.iter_attachments()}


def test_changes_are_pushed_signed_to_every_active_participant(h: Harness) -> None:
    async def go() -> None:
        h.add("a@x.test")
        h.add("b@x.test")
        h.add("quiet@x.test", push=False)
        await h.settle()
        [m] = h.mailbox("a@x.test")
        assert m["Subject"] == "Directory update: serial 3" and m["Auto-Submitted"] == "auto-generated"
        assert m["Return-Path"] == "<>"                  # null envelope sender: nothing bounces back
        att = attachments(m)
        doc = verify_document(att["directory.json"], att["directory.json.asc"],
                              h.cli.key.public_armored())
        assert [p["address"] for p in doc["participants"]] == ["a@x.test", "b@x.test", "quiet@x.test"]
        assert doc["directory_address"] == "directory@x.test"
        assert len(h.mailbox("b@x.test")) == 1 and h.mailbox("quiet@x.test") == []
        # stored once, hard-linked into each mailbox
        pa = h.store.mailbox("a@x.test")
        pb = h.store.mailbox("b@x.test")
        assert pa.path(pa.messages()[0].uid).stat().st_ino == pb.path(pb.messages()[0].uid).stat().st_ino
        await h.settle()                                 # nothing changed: no second push
        assert len(h.mailbox("a@x.test")) == 1
        # a change from "another process" (a second connection, as the CLI has)
        other = Directory(h.config, h.store)
        other.update("b@x.test", status="suspended")
        other.close()
        await h.settle()
        assert [m["Subject"] for m in h.mailbox("a@x.test")][-1] == "Directory update: serial 4"
        assert len(h.mailbox("b@x.test")) == 1           # suspended: no more pushes
        assert h.service.statistics().pushed_serial == 4
    asyncio.run(go())


def test_quick_changes_are_pushed_once(h: Harness) -> None:
    async def go() -> None:
        h.add("a@x.test")
        await h.service.tick()
        for name in ("one", "two", "three"):
            h.cli.update("a@x.test", name=name)
            await h.service.tick()                       # serial moved since the last tick: wait
        await h.service.tick()
        assert [m["Subject"] for m in h.mailbox("a@x.test")] == ["Directory update: serial 4"]
    asyncio.run(go())


def test_get_get_since_and_key_are_answered(h: Harness) -> None:
    async def go() -> None:
        h.add("a@x.test", push=False)
        h.add("b@x.test", push=False)
        await h.settle()
        await h.send("a@x.test", "GET")
        await h.send("a@x.test", "get since 2")
        await h.send("a@x.test", "GET SINCE 1")
        await h.send("a@x.test", "KEY B@x.test")
        await h.send("a@x.test", "KEY nobody@x.test")
        await h.send("a@x.test", "hello")
        await h.service.tick()
        replies = h.mailbox("a@x.test")
        assert [m["Subject"] for m in replies] == ["Re: GET", "Re: GET SINCE 2", "Re: GET SINCE 1",
                                                   "Re: KEY B@x.test", "Re: KEY nobody@x.test",
                                                   "Re: hello"]
        for m in replies:
            assert m["Auto-Submitted"] == "auto-replied" and m["From"].addresses[0].addr_spec == "directory@x.test"
            assert m["X-Relay-Directory-Serial"] == "2"             # docs: on every reply
        assert replies[0]["In-Reply-To"] == "<GET@gw>"
        doc = verify_document(*attachments(replies[0]).values(), h.cli.key.public_armored())
        assert doc["serial"] == 2
        assert attachments(replies[1]) == {} and "unchanged: serial 2" in replies[1].get_content()
        assert set(attachments(replies[2])) == {"directory.json", "directory.json.asc"}
        key = attachments(replies[3])["b@x.test.asc"]
        assert check_public_key(key).fingerprint == h.cli.registry.get("b@x.test").fingerprint  # type: ignore[union-attr]
        assert "no such participant" in replies[4].get_content()
        assert "GET SINCE <serial>" in replies[5].get_content()
        assert h.store.mailbox("directory@x.test").messages() == []      # requests expunged
    asyncio.run(go())


def test_strangers_automatic_mail_and_suspended_get_nothing(h: Harness) -> None:
    async def go() -> None:
        h.add("a@x.test", push=False)
        h.add("s@x.test", push=False)
        h.cli.update("s@x.test", status="suspended")
        h.store.accounts.add("stranger@x.test")
        await h.settle()
        await h.send("stranger@x.test", "GET")
        await h.send("s@x.test", "GET")
        await h.send("a@x.test", "GET", "Auto-Submitted: auto-replied\r\n")
        await h.send("a@x.test", "GET", "Precedence: bulk\r\n")
        await h.send("a@x.test", "GET", "List-Id: <x.x.test>\r\n")
        await h.send("", "GET")
        await h.service.tick()
        assert h.mailbox("stranger@x.test") == h.mailbox("s@x.test") == h.mailbox("a@x.test") == []
        assert h.store.mailbox("directory@x.test").messages() == []
        assert h.service.statistics().requests == {"ignored-stranger": 1, "ignored-inactive": 1,
                                                   "ignored-auto": 4}
    asyncio.run(go())


def test_a_reply_loop_dies_out(h: Harness) -> None:
    """A participant whose gateway auto-replies to everything: our replies are auto-replied,
    its answers carry Auto-Submitted, we never answer those - one exchange, then silence."""
    async def go() -> None:
        h.add("a@x.test", push=False)
        await h.settle()
        await h.send("a@x.test", "GET")
        for _ in range(5):
            await h.service.tick()
            for m in h.mailbox("a@x.test"):
                # the misbehaving gateway answers every message, marking its answers (RFC 3834)
                await h.send("a@x.test", f"Re: {m['Subject']}", "Auto-Submitted: auto-replied\r\n")
            h.clear("a@x.test")
        assert h.service.statistics().requests == {"answered": 1, "ignored-auto": 1}
    asyncio.run(go())


def test_flood_from_one_participant_is_rate_limited(h: Harness) -> None:
    async def go() -> None:
        h.add("a@x.test", push=False)
        h.add("b@x.test", push=False)
        await h.settle()
        for i in range(RATE_LIMIT + 5):
            await h.send("a@x.test", f"GET SINCE {1000 + i}")
        await h.send("b@x.test", "GET SINCE 1000")
        await h.service.tick()
        assert len(h.mailbox("a@x.test")) == RATE_LIMIT
        assert len(h.mailbox("b@x.test")) == 1
        assert h.service.statistics().requests["rate-limited"] == 5
    asyncio.run(go())


def test_rate_limiter_window_and_bounded_keys() -> None:
    now = [0.0]
    rl = RateLimiter(limit=2, window=10, clock=lambda: now[0], max_keys=3)
    assert [rl.allow("a") for _ in range(3)] == [True, True, False]
    now[0] = 10.5
    assert rl.allow("a")
    for k in "bcdefg":
        rl.allow(k)
    assert len(rl._events) <= 3


def test_over_quota_participant_is_skipped_not_blocking_others(h: Harness) -> None:
    async def go() -> None:
        h.add("a@x.test")
        h.add("full@x.test", quota_bytes=100)
        await h.settle()
        assert len(h.mailbox("a@x.test")) == 1 and h.mailbox("full@x.test") == []
    asyncio.run(go())


def test_http_documents_and_wkd(h: Harness) -> None:
    h.add("ct@x.test")
    routes = h.relay.http_routes
    status, ctype, body = routes["/directory/"]("/directory/directory.json")
    _, _, sig = routes["/directory/"]("/directory/directory.json.asc")
    _, kctype, key = routes["/directory/"]("/directory/key.asc")
    assert (status, ctype, kctype) == (200, "application/json", "application/pgp-keys")
    assert verify_document(body, sig, key)["participants"][0]["address"] == "ct@x.test"
    assert routes["/directory/"]("/directory/other")[0] == 404
    wkd = routes["/.well-known/openpgpkey/"]
    fpr = h.cli.registry.get("ct@x.test").fingerprint  # type: ignore[union-attr]
    for path in (f"/.well-known/openpgpkey/hu/{wkd_hash('ct@x.test')}?l=ct",
                 f"/.well-known/openpgpkey/x.test/hu/{wkd_hash('ct@x.test')}"):
        status, ctype, body = wkd(path)
        assert (status, ctype) == (200, "application/octet-stream") and not body.startswith(b"-----")
        assert check_public_key(body).fingerprint == fpr
    assert wkd(f"/.well-known/openpgpkey/other.test/hu/{wkd_hash('ct@x.test')}")[0] == 404
    assert wkd(f"/.well-known/openpgpkey/hu/{wkd_hash('nobody@x.test')}")[0] == 404
    assert wkd("/.well-known/openpgpkey/x.test/policy")[:2] == (200, "text/plain; charset=utf-8")
    assert wkd("/.well-known/openpgpkey/policy")[0] == 200
    # the directory's own key is found by its address too
    assert wkd(f"/.well-known/openpgpkey/x.test/hu/{wkd_hash('directory@x.test')}")[2] == h.cli.key.public_binary()
    h.cli.update("ct@x.test", status="suspended")
    assert wkd(f"/.well-known/openpgpkey/hu/{wkd_hash('ct@x.test')}")[0] == 404


def test_accounts_deleted_behind_the_directorys_back(h: Harness) -> None:
    """`relay user del` on a participant or on the directory account: pushes still reach the
    others, requests from the orphan are dropped, the directory account comes back."""
    async def go() -> None:
        h.add("a@x.test")
        h.add("gone@x.test")
        await h.settle()
        h.store.accounts.delete("gone@x.test")
        h.cli.update("a@x.test", name="new name")
        await h.settle()
        assert [m["Subject"] for m in h.mailbox("a@x.test")][-1] == "Directory update: serial 3"
        await h.send("gone@x.test", "GET")
        await h.service.tick()
        assert h.service.statistics().requests == {"no-account": 1}
        h.store.accounts.delete("directory@x.test")
        await h.service.tick()
        await h.send("a@x.test", "GET")
        await h.service.tick()
        assert h.service.statistics().requests["answered"] == 1
    asyncio.run(go())


def test_suspended_participant_keeps_its_account_and_mail_but_leaves_the_network(h: Harness) -> None:
    """The documented decision (docs/directory.md, "Suspending"): suspension takes a participant
    out of the directory (document, pushes, answers, WKD); its account, password and waiting
    mail stay, so it can still log in and drain its mailbox. `resume` brings it back."""
    async def go() -> None:
        h.add("a@x.test")
        h.add("s@x.test", password="pw")
        await h.settle()
        assert [m["Subject"] for m in h.mailbox("s@x.test")] == ["Directory update: serial 2"]
        h.cli.update("s@x.test", status="suspended")
        await h.settle()
        assert [m["Subject"] for m in h.mailbox("a@x.test")][-1] == "Directory update: serial 3"
        doc = verify_document(h.cli.signed().json, h.cli.signed().signature, h.cli.key.public_armored())
        assert [p["address"] for p in doc["participants"]] == ["a@x.test"]
        assert len(h.mailbox("s@x.test")) == 1                   # no push, the old mail kept
        assert h.store.accounts.verify("s@x.test", "pw")         # can still log in and drain
        h.cli.update("s@x.test", status="active")
        await h.settle()
        assert [m["Subject"] for m in h.mailbox("s@x.test")][-1] == "Directory update: serial 4"
    asyncio.run(go())


def test_a_request_the_parser_trips_over_does_not_block_the_others(h: Harness) -> None:
    """`Message-ID: <@` made the stdlib raise IndexError: the request stayed in the directory
    mailbox and every later request behind it went unanswered."""
    async def go() -> None:
        h.add("a@x.test", push=False)
        h.store.accounts.add("stranger@x.test")
        await h.settle()
        d = h.store.begin_delivery("a@x.test", ["directory@x.test"], session_id="t", helo="gw",
                                   peer="127.0.0.1")
        d.write(b"From: <a@x.test>\r\nTo: <directory@x.test>\r\nSubject: GET\r\nMessage-ID: <@\r\n\r\nx\r\n")
        await d.commit()
        await h.send("a@x.test", "GET")
        await h.service.tick()
        assert [m["Subject"] for m in h.mailbox("a@x.test")] == ["Re: GET"]
        assert h.store.mailbox("directory@x.test").messages() == []
        assert h.service.statistics().requests == {"unreadable": 1, "answered": 1}
    asyncio.run(go())


def test_parse_request_raises_only_request_error_on_junk() -> None:
    import random

    from relay.directory.mail import RequestError, parse_request
    rnd = random.Random(7)
    pieces = [b"Return-Path: ", b"<", b">", b"@", b"From: ", b"Subject: ", b"=?utf-8?q?", b"?=",
              b"Content-Type: ", b"text/plain; charset=", b"\r\n", b"\r\n\r\n", b" ", b"GET",
              b"KEY ", b"Auto-Submitted: ", b"Content-Transfer-Encoding: base64", b"\xff", b"\x00",
              b";", b'"', b"(", b",", b"List-Id: ", b"Message-ID: ", b"References: ", b"QUJD"]
    for _ in range(3000):
        data = b"".join(rnd.choice(pieces) for _ in range(rnd.randint(1, 30)))
        try:
            parse_request(data)
        except RequestError:
            pass
