"""The directory inside the running server: answers e-mail commands sent to the directory
address, pushes every change to the participants, and serves the document and WKD over HTTP.

One task does all the work, one step at a time, on the server's loop:
  - the store's notification for the directory mailbox (or a timer tick) wakes it;
  - each tick it compares the serial in the database with the last pushed one. A change made
    by the CLI in another process is therefore seen within POLL_INTERVAL; changes in quick
    succession are pushed once, when the serial has been still for one tick;
  - requests are read with a bound (header block + a little body), answered by delivering
    straight into the asker's mailbox (store.begin_delivery), then expunged.
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


class DirectoryService:
    def __init__(self, relay: Any) -> None:
        self.relay = relay
        self.directory = Directory(relay.config, relay.store)
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

    def _on_mail(self, kind: str, nbytes: int, nmessages: int) -> None:
        if kind == "new":
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
        if self._subscribed != address or self.relay.store.accounts.get(address) is None:
            self.directory.ensure_account()
            if self._unsubscribe is not None:
                self._unsubscribe()
            self._unsubscribe = self.relay.store.subscribe(address, self._on_mail)
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
        from relay.store import NoSuchAccount, QuotaExceeded

        d = self.directory
        signed = d.signed()
        address = d.address or ""
        raw = mail.push(address, self.relay.config.hostname, signed.serial, signed.json, signed.signature)
        rcpts, reservations, skipped, missing = [], [], [], []
        for p in d.registry.list(active_only=True):
            if not p.push:
                continue
            try:
                reservations.append(self.relay.store.quota.reserve(p.address, len(raw) + 1024))
                rcpts.append(p.address)
            except QuotaExceeded:
                skipped.append(p.address)
            except NoSuchAccount:         # account deleted behind the directory's back (user del)
                missing.append(p.address)
        try:
            if rcpts:
                await self._deliver(rcpts, raw)
        finally:
            for r in reservations:
                r.release()
        d.registry.set_pushed_serial(signed.serial)
        self._pushes += 1
        self._push_recipients += len(rcpts)
        notes = {k: ",".join(v) for k, v in (("over_quota", skipped), ("no_account", missing)) if v}
        log.info("directory-push", serial=signed.serial, recipients=len(rcpts), bytes=len(raw), **notes)

    async def _deliver(self, recipients: list[str], raw: bytes) -> None:
        d = self.relay.store.begin_delivery("", recipients, session_id="directory",
                                            helo="directory", peer=None, protocol="LOCAL")
        try:
            d.write(raw)
            await d.commit()
        finally:
            d.abort()                       # no-op after a commit

    # --- requests --------------------------------------------------------------------------

    def _count(self, outcome: str) -> None:
        self._requests[outcome] = self._requests.get(outcome, 0) + 1

    async def answer_requests(self, address: str) -> None:
        from relay.store import StoreError

        mb = self.relay.store.mailbox(address)
        for info in mb.messages()[:MAX_PER_TICK]:
            try:
                await self._answer(mb, info)
            except (StoreError, OSError):
                raise                       # the store's trouble: retried after RETRY_AFTER
            except Exception as e:          # one bad request must not block the queue
                self._count("failed")
                log.error("directory-request", uid=info.uid, outcome="failed", error=repr(e), exc_info=e)
            mb.expunge([info.uid])

    async def _answer(self, mb: Any, info: Any) -> None:
        from relay.store import NoSuchAccount, QuotaExceeded, StoreError

        try:
            req = mail.read_request(mb.path(info.uid))
        except (OSError, mail.RequestError) as e:
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
        raw = self._reply(req)
        try:
            reservation = self.relay.store.quota.reserve(req.sender, len(raw) + 1024)
        except QuotaExceeded:
            self._count("over-quota")
            log.warning("directory-request", outcome="over-quota", **fields)
            return
        except NoSuchAccount:
            self._count("no-account")
            log.warning("directory-request", outcome="no-account", **fields)
            return
        try:
            await self._deliver([req.sender], raw)
        except StoreError as e:
            self._count("failed")
            log.error("directory-request", outcome="failed", error=str(e), **fields)
            self._retry_at = time.monotonic() + RETRY_AFTER
            return
        finally:
            reservation.release()
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

    def _reply(self, req: mail.Request) -> bytes:
        d = self.directory
        cmd = req.command
        host = self.relay.config.hostname
        address = d.address or ""
        if cmd.verb == "GET":
            signed = d.signed()
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
