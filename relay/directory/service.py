"""The directory inside the running server: answers e-mail commands sent to the directory
address, pushes every change to the participants, and serves the document and WKD over HTTP.

One task does all the work, one step at a time, on the server's loop:
  - the store's notification for the directory mailbox (or a timer tick) wakes it;
  - each tick it compares the serial in the database with the last pushed one. A change made
    by the CLI in another process is therefore seen within POLL_INTERVAL; changes in quick
    succession are pushed once, when the serial has been still for one tick;
  - requests are read with a bound (header block + a little body), answered by delivering
    straight into the asker's mailbox (store.begin_delivery), then expunged.

Only relay.store.api is used. Directory (core.py, shared with the admin CLI) reads accounts
synchronously (quotas in the document): it is given `_AccountsView`, refreshed from the store
before each document is built.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from relay.directory import mail, wkd
from relay.directory.core import Directory
from relay.directory.keys import binary_from_armored
from relay.log import get_logger
from relay.store.api import (
    Account,
    AccountExists,
    Change,
    ChangeKind,
    Envelope,
    Mailbox,
    MessageInfo,
    MessageStore,
    Refusal,
    StoreError,
)

log = get_logger("directory")

POLL_INTERVAL = 0.5          # seconds between serial checks (a CLI change is pushed within ~1 s)
RETRY_AFTER = 30.0           # after a failed push or reply: wait, do not hammer a full disk
RATE_LIMIT = 10              # requests per sender ...
RATE_WINDOW = 60.0           # ... per this many seconds; beyond: ignored and logged
MAX_PER_TICK = 100           # requests handled per tick, so one flood cannot hog the loop


@dataclass(frozen=True)
class DirectoryStats:
    serial: int
    pushed_serial: int
    requests: dict[str, int]          # outcome -> count: answered, ignored, rate-limited, ...
    pushes: int
    push_recipients: int


class RateLimiter:
    """At most `limit` events per key in any `window` seconds (sliding window, bounded keys)."""

    def __init__(self, limit: int = RATE_LIMIT, window: float = RATE_WINDOW,
                 clock: Callable[[], float] = time.monotonic, max_keys: int = 10000) -> None:
        self.limit, self.window, self.clock, self.max_keys = limit, window, clock, max_keys
        self._events: dict[str, deque[float]] = {}

    def allow(self, key: str) -> bool:
        now = self.clock()
        q = self._events.get(key)
        if q is None:
            if len(self._events) >= self.max_keys:
                self._prune(now)
            q = self._events[key] = deque()
        while q and q[0] <= now - self.window:
            q.popleft()
        if len(q) >= self.limit:
            return False
        q.append(now)
        return True

    def _prune(self, now: float) -> None:
        for k in [k for k, q in self._events.items() if not q or q[-1] <= now - self.window]:
            del self._events[k]
        while len(self._events) >= self.max_keys:        # still full: forget the oldest key
            del self._events[next(iter(self._events))]


class _AccountsView:
    """The accounts as Directory reads them (get, synchronously), copied from the store."""

    def __init__(self) -> None:
        self.known: dict[str, Account] = {}

    def get(self, address: str) -> Account | None:
        return self.known.get(address)


class _StoreView:
    def __init__(self) -> None:
        self.accounts = _AccountsView()


class DirectoryService:
    def __init__(self, relay: Any) -> None:
        self.relay = relay
        self.store: MessageStore = relay.store
        self._view = _StoreView()
        self.directory = Directory(relay.config, self._view)
        self.limiter = RateLimiter()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._http: list[asyncio.Server] = []
        self._subscribed: str | None = None
        self._unsubscribe: Callable[[], None] | None = None
        self._seen_serial = -1
        self._retry_at = 0.0
        self._requests: dict[str, int] = {}
        self._pushes = 0
        self._push_recipients = 0
        relay.http_routes["/directory/"] = self.http_directory
        relay.http_routes[wkd.PREFIX] = self.http_wkd

    # --- life cycle ------------------------------------------------------------------------

    async def start(self) -> None:
        self.directory.address        # noqa: B018  (a bad [directory] address fails the start)
        self.directory.key            # noqa: B018  (made on first use: make it now, not mid-request)
        listen = self.relay.config.directory.http_listen
        if listen:                    # a listener of its own, e.g. behind an https reverse proxy
            from relay.server import http
            from relay.server.listener import bound_addresses

            routes = {"/directory/": self.http_directory, wkd.PREFIX: self.http_wkd}
            self._http = await http.start(routes, [listen], key="directory.http_listen")
            self.relay.bound["directory_http"] = bound_addresses(self._http)
        await self._refresh_view()    # the HTTP document's quotas, before the first tick
        self._task = asyncio.create_task(self._run(), name="directory")

    async def stop(self) -> None:
        for server in self._http:
            server.close()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        if self._unsubscribe is not None:
            self._unsubscribe()
        self.directory.close()

    def statistics(self) -> DirectoryStats:
        reg = self.directory.registry
        return DirectoryStats(reg.serial(), reg.pushed_serial(), dict(self._requests),
                              self._pushes, self._push_recipients)

    def _on_mail(self, change: Change) -> None:
        if change.kind is ChangeKind.NEW:
            self._wake.set()

    async def _run(self) -> None:
        while True:
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.error("directory-error", exc_info=e, error=repr(e))
                self._retry_at = time.monotonic() + RETRY_AFTER
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), POLL_INTERVAL)
            except TimeoutError:
                pass

    async def tick(self) -> None:
        """One round: subscribe once the address is known, push a settled change, answer mail."""
        address = self.directory.address
        if address is None:
            return                                # no participants yet
        if self._subscribed != address or await self.store.accounts.get(address) is None:
            try:                          # its own account (no password: nobody logs in as it)
                await self.store.accounts.add(address)
            except AccountExists:
                pass
            if self._unsubscribe is not None:
                self._unsubscribe()
            self._unsubscribe = self.store.changes.subscribe(address, self._on_mail)
            self._subscribed = address
            log.info("directory-ready", address=address, key=self.directory.key.fingerprint,
                     serial=self.directory.registry.serial())
        if time.monotonic() < self._retry_at:
            return
        reg = self.directory.registry
        serial = reg.serial()
        if serial > reg.pushed_serial() and serial == self._seen_serial:
            await self.push()
        self._seen_serial = serial
        await self.answer_requests(address)

    # --- pushes ----------------------------------------------------------------------------

    async def push(self) -> None:
        """Deliver the current signed document to every active participant that wants it:
        one stored message, hard-linked into each mailbox. Over-quota mailboxes are skipped."""
        d = self.directory
        signed = await self._signed()
        address = d.address or ""
        raw = mail.push(address, self.relay.config.hostname, signed.serial, signed.json, signed.signature)
        rcpts, skipped, missing = [], [], []
        delivery = self._delivery()
        try:
            for p in d.registry.list(active_only=True):
                if not p.push:
                    continue
                refusal = await delivery.add_recipient(p.address, len(raw))
                if refusal is None:
                    rcpts.append(p.address)
                elif refusal is Refusal.NO_SUCH_ACCOUNT:   # deleted behind the directory's back
                    missing.append(p.address)
                else:
                    skipped.append(p.address)
            if rcpts:
                await self._deliver(delivery, raw)
        finally:
            delivery.abort()                  # no-op after a commit
        d.registry.set_pushed_serial(signed.serial)
        self._pushes += 1
        self._push_recipients += len(rcpts)
        notes = {k: ",".join(v) for k, v in (("over_quota", skipped), ("no_account", missing)) if v}
        log.info("directory-push", serial=signed.serial, recipients=len(rcpts), bytes=len(raw), **notes)

    async def _refresh_view(self) -> None:
        known = {a.address: a for a in await self.store.accounts.list()}
        if known != self._view.accounts.known:
            self._view.accounts.known = known
            self.directory._signed = None     # built with other quotas: build it again

    async def _signed(self) -> Any:
        """The signed document, with the accounts' quotas as they are now."""
        await self._refresh_view()
        return self.directory.signed()

    def _delivery(self) -> Any:
        return self.store.begin_delivery(Envelope("", "directory", "directory", None, "LOCAL"))

    @staticmethod
    async def _deliver(delivery: Any, raw: bytes) -> None:
        """The message to the recipients the delivery holds (their reservations made)."""
        await delivery.start()
        delivery.write(raw)
        if not delivery.writable:
            await delivery.wait_writable()
        await delivery.commit()

    # --- requests --------------------------------------------------------------------------

    def _count(self, outcome: str) -> None:
        self._requests[outcome] = self._requests.get(outcome, 0) + 1

    async def answer_requests(self, address: str) -> None:
        mb = self.store.mailbox(address)
        for info in (await mb.messages())[:MAX_PER_TICK]:
            try:
                await self._answer(mb, info)
            except (StoreError, OSError):
                raise                       # the store's trouble: retried after RETRY_AFTER
            except Exception as e:          # one bad request must not block the queue
                self._count("failed")
                log.error("directory-request", uid=info.uid, outcome="failed", error=repr(e), exc_info=e)
            await mb.expunge([info.uid])

    async def _answer(self, mb: Mailbox, info: MessageInfo) -> None:
        try:
            with await mb.body(info.uid) as body:
                req = mail.parse_request(await body.read(0, mail.MAX_HEAD + mail.MAX_BODY_PEEK))
        except (OSError, LookupError, mail.RequestError) as e:
            self._count("unreadable")
            log.warning("directory-request", uid=info.uid, size=info.size, outcome="unreadable", reason=str(e))
            return
        fields = {"sender": req.sender, "command": req.command.text or req.command.verb,
                  "msgid": req.message_id, "size": info.size}
        reason = self._refuse(req)
        if reason is not None:
            self._count(reason[0])
            log.info("directory-request", outcome=reason[0], reason=reason[1], **fields)
            return
        assert req.sender is not None
        raw = await self._reply(req)
        delivery = self._delivery()
        try:
            refusal = await delivery.add_recipient(req.sender, len(raw))
            if refusal is not None:
                outcome = "no-account" if refusal is Refusal.NO_SUCH_ACCOUNT else "over-quota"
                self._count(outcome)
                log.warning("directory-request", outcome=outcome, **fields)
                return
            await self._deliver(delivery, raw)
        except StoreError as e:
            self._count("failed")
            log.error("directory-request", outcome="failed", error=str(e), **fields)
            self._retry_at = time.monotonic() + RETRY_AFTER
            return
        finally:
            delivery.abort()                  # no-op after a commit
        self._count("answered")
        log.info("directory-request", outcome="answered", bytes=len(raw), **fields)

    def _refuse(self, req: mail.Request) -> tuple[str, str] | None:
        """(outcome, reason) when the request gets no answer (RFC 3834, participants only)."""
        if req.auto is not None:
            return "ignored-auto", req.auto
        assert req.sender is not None
        p = self.directory.registry.get(req.sender)
        if p is None:
            return "ignored-stranger", "sender is not a participant"
        if p.status != "active":
            return "ignored-inactive", f"participant is {p.status}"
        if not self.limiter.allow(req.sender):
            return "rate-limited", f"more than {RATE_LIMIT} requests in {RATE_WINDOW:.0f} s"
        return None

    async def _reply(self, req: mail.Request) -> bytes:
        d = self.directory
        cmd = req.command
        host = self.relay.config.hostname
        address = d.address or ""
        if cmd.verb == "GET":
            signed = await self._signed()
            if cmd.since is not None and signed.serial <= cmd.since:
                return mail.reply(req, address, host, f"unchanged: serial {signed.serial}\r\n",
                                  serial=signed.serial)
            return mail.reply(req, address, host,
                              f"The participant directory, serial {signed.serial}.\r\n",
                              serial=signed.serial, document=(signed.json, signed.signature))
        serial = d.registry.serial()              # every reply says which serial it reflects
        if cmd.verb == "KEY":
            p = d.registry.get(cmd.address or "")
            if p is None or p.status != "active":
                return mail.reply(req, address, host, f"no such participant: {cmd.address}\r\n",
                                  serial=serial)
            return mail.reply(req, address, host,
                              f"OpenPGP key of {p.address}: {p.fingerprint}\r\n",
                              serial=serial, key=(p.address, p.public_key))
        return mail.reply(req, address, host, mail.HELP, serial=serial)

    # --- HTTP (read-only) ------------------------------------------------------------------

    def http_directory(self, target: str) -> tuple[int, str, bytes]:
        name = target.split("?", 1)[0][len("/directory/"):]
        d = self.directory
        if name == "key.asc":
            return 200, "application/pgp-keys", d.key.public_armored().encode("ascii")
        if name in ("directory.json", "directory.json.asc"):
            if d.address is None:
                return 404, "text/plain; charset=utf-8", b"no participants yet\n"
            signed = d.signed()
            if name == "directory.json":
                return 200, "application/json", signed.json
            return 200, "application/pgp-signature", signed.signature
        return 404, "text/plain; charset=utf-8", b"not found\n"

    def http_wkd(self, target: str) -> tuple[int, str, bytes]:
        domain, hashed = wkd.parse_path(target)
        if hashed is None:
            if domain is not None:            # a policy file: empty = defaults (draft 4.5)
                return 200, "text/plain; charset=utf-8", b""
            return 404, "text/plain; charset=utf-8", b"not found\n"
        keys: list[bytes] = []
        d = self.directory
        for p in d.registry.list(active_only=True):
            if wkd.wkd_hash(p.address) == hashed and domain in (None, p.address.rsplit("@", 1)[1]):
                keys.append(binary_from_armored(p.public_key))
        own = d.address
        if own and wkd.wkd_hash(own) == hashed and domain in (None, own.rsplit("@", 1)[1]):
            keys.append(d.key.public_binary())
        if not keys:
            return 404, "text/plain; charset=utf-8", b"no key\n"
        return 200, "application/octet-stream", b"".join(keys)
