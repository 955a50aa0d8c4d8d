"""POP3 server: asyncio glue around relay.protocol.pop3 (read, feed, act, write).

- One POP3 session per mailbox at a time (RFC 1939 8: the maildrop lock); a second login gets
  -ERR [IN-USE]. The maildrop is the snapshot `mailbox.messages()` taken at login.
- DELE only marks; QUIT in TRANSACTION enters UPDATE and removes the marked messages through
  `mailbox.expunge` (which frees quota). A dropped connection or an idle timeout removes nothing.
- RETR streams the file: 1 MiB preads (the next one read in a thread while the current one is
  being sent), dot-stuffed by `DotStuffer`, written with flow control (`drain()` after each
  chunk, a bounded write buffer). Server memory is a few MiB per session whatever the size.
- STLS (RFC 2595) via StreamWriter.start_tls; implicit TLS listeners get the TLS context at bind.
- Counters: `relay.pop3.statistics()` -> Pop3Stats (messages/bytes fetched, fetch
  durations, logins), read by relay/metrics.py.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import ssl
import time
from dataclasses import dataclass
from typing import Any

from relay.auth import plaintext_allowed
from relay.log import get_logger
from relay.stats import TRANSFER_SECONDS, Histogram, HistogramSnapshot
from relay.protocol import pop3 as proto
from relay.policy.penalty import MAX_FAILURES_PER_SESSION, Verdict
from relay.server.listener import Session, create_stream_servers
from relay.server.pressure import RECHECK_SECONDS
from relay.store.api import Body, StoreError

log = get_logger("pop3")

RETR_CHUNK = 1024 * 1024          # pread size for RETR (FACTS: big chunks, few syscalls)
TOP_CHUNK = 64 * 1024             # TOP reads only as far as the header and n lines reach
READ_SIZE = 4096                  # commands are short (255 octets, RFC 2449 4)
WRITE_HIGH_WATER = 2 * RETR_CHUNK  # transport buffer bound before drain() waits


@dataclass(frozen=True)
class Pop3Stats:
    messages_fetched: int          # complete RETRs
    fetched_bytes: int             # message bytes sent by RETR and TOP (before stuffing)
    fetch_duration: HistogramSnapshot   # seconds per complete RETR
    logins: int
    login_failures: int
    in_use_refusals: int
    messages_deleted: int          # removed in the UPDATE state


class Pop3Service:
    """One relay's POP3 state shared by its sessions: the maildrop locks and the counters
    (`statistics()` is their frozen view). Lives at `relay.pop3`."""

    def __init__(self) -> None:
        self.locks: set[str] = set()      # addresses with a session in TRANSACTION
        self.messages_fetched = 0
        self.fetched_bytes = 0
        self.fetch_duration = Histogram(TRANSFER_SECONDS)
        self.logins = 0
        self.login_failures = 0
        self.in_use_refusals = 0
        self.messages_deleted = 0

    def statistics(self) -> Pop3Stats:
        return Pop3Stats(self.messages_fetched, self.fetched_bytes,
                         self.fetch_duration.snapshot(), self.logins, self.login_failures,
                         self.in_use_refusals, self.messages_deleted)


def service(relay: Any) -> Pop3Service:
    """relay.pop3 (set in Relay.__init__)."""
    svc: Pop3Service = relay.pop3
    return svc


def statistics(relay: Any) -> Pop3Stats:
    return service(relay).statistics()


async def start(relay: Any, addrs: tuple[str, ...] | list[str], ssl_ctx: ssl.SSLContext | None = None,
                implicit_tls: bool = False) -> list[asyncio.Server]:
    service(relay)

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await Pop3Session(relay, r, w, ssl_ctx, implicit_tls).run()

    return await create_stream_servers(handle, addrs, "pop3", ssl_ctx, implicit_tls)


class Pop3Session:
    def __init__(self, relay: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 ssl_ctx: ssl.SSLContext | None, implicit_tls: bool) -> None:
        self.relay = relay
        self.store = relay.store
        self.reader, self.writer = reader, writer
        self.ssl_ctx = ssl_ctx
        self.stats = service(relay)
        peer = writer.get_extra_info("peername")
        self.peer_ip: str = peer[0] if peer else ""
        self.conn = proto.Pop3Connection(
            relay.config.hostname, tls_available=ssl_ctx is not None and not implicit_tls,
            tls_active=implicit_tls,
            plaintext_allowed=plaintext_allowed(relay.config, self.peer_ip, implicit_tls))
        self.address: str | None = None       # the logged-in user
        self.locked: str | None = None        # the maildrop this session holds the lock of
        self.mailbox: Any = None
        self.session: Session | None = None
        self.sent = 0
        self.auth_failures = 0
        self._started = time.monotonic()      # the login deadline counts from here
        self._in_response = False             # a multi-line RETR/TOP answer is being sent

    async def run(self) -> None:
        c = self.relay.config.pop3
        self.session = self.relay.sessions.open("pop3", self.peer_ip, c.max_sessions,
                                                c.max_sessions_per_client, c.stress_threshold)
        if self.session is None:
            self.writer.write(proto.err("Too many connections or shutting down, try later",
                                        "SYS/TEMP"))
            await self._close()
            return
        self.session.closer = self.writer.close
        self.session.evict = self._evict
        self.session.idle_since = self._started       # evictable under stress until login
        outcome = "dropped"
        try:
            self.writer.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
            self.writer.write(self.conn.greeting())
            outcome = await self._loop()
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError, TimeoutError) as e:
            log.info("connection_lost", sid=self.session.sid, error=type(e).__name__)
        except Exception as e:  # the protocol or the glue failed: the state is not to be trusted
            outcome = "error"
            log.error("session_failed", sid=self.session.sid, error=type(e).__name__)
            with contextlib.suppress(Exception):
                self._out(proto.err("Internal error, closing", "SYS/TEMP"))
        finally:
            self._unlock()
            await self._close()
            log.info("session", sid=self.session.sid, peer=self.peer_ip, user=self.address or "",
                     outcome=outcome, bytes=self.sent)
            self.session.close(outcome)

    def _evict(self) -> None:
        """Under stress with every slot taken: this session, not logged in, makes room."""
        with contextlib.suppress(Exception):
            self.writer.write(proto.err("Server busy, closing idle session", "SYS/TEMP"))
        self.writer.close()

    def _read_timeout(self, t0: float) -> float:
        """Seconds to wait for the read begun at t0: pop3.idle_timeout per read (RFC 1939 3);
        before login also what is left of the login timeout (from connect, not reset by
        each byte; shorter under stress), looked at again every RECHECK_SECONDS."""
        c = self.relay.config.pop3
        now = time.monotonic()
        idle_left = t0 + c.idle_timeout - now
        if self.address is not None:
            return float(idle_left)
        limit = c.login_timeout
        if self.relay.sessions.stressed("pop3"):
            limit = min(limit, c.stress_login_timeout)
        return float(min(idle_left, self._started + limit - now, RECHECK_SECONDS))

    async def _read(self) -> bytes | None:
        """The next bytes from the client, or None on a timeout."""
        t0 = time.monotonic()
        while True:
            timeout = self._read_timeout(t0)
            if timeout <= 0:
                return None
            try:
                async with asyncio.timeout(timeout):     # no task per read, unlike wait_for
                    return await self.reader.read(READ_SIZE)
            except TimeoutError:
                continue

    async def _close(self) -> None:
        try:
            self.writer.close()
            await asyncio.wait_for(self.writer.wait_closed(), 5)
        except (TimeoutError, OSError, ssl.SSLError):
            pass

    async def _write(self, data: bytes) -> None:
        self._out(data)
        await self._drain()

    def _out(self, data: bytes) -> None:
        """Write; a transport closed by the peer (RST) or by shutdown is a lost connection
        (uvloop refuses the write with RuntimeError, which would read as a server error)."""
        if self.writer.transport.is_closing():
            raise ConnectionResetError("connection closed")
        self.writer.write(data)

    async def _drain(self) -> None:
        """Wait until the transport is below its high-water mark; a client that reads nothing
        for the idle timeout is dropped."""
        if self.writer.transport.get_write_buffer_size() > WRITE_HIGH_WATER // 2:
            async with asyncio.timeout(self.relay.config.pop3.idle_timeout):
                await self.writer.drain()

    async def _loop(self) -> str:
        conn = self.conn
        while True:
            ev = conn.next_event()
            if ev is proto.NEED_DATA:
                await self._drain()
                data = await self._read()
                if data is None:
                    # RFC 1939 3: autologout; nothing is deleted.
                    self._out(proto.err("Idle timeout, closing the connection"))
                    return "timeout"
                if not data:
                    return "dropped"
                conn.receive_data(data)
                continue
            try:
                outcome = await self._handle(ev)
            except _SESSION_ENDS:
                raise
            except Exception as e:             # a bug in one command: one line, -ERR, go on
                log.error("command_failed", sid=self.sid, command=_VERBS.get(type(ev), type(ev).__name__),
                          error=type(e).__name__)
                outcome = self._recover(ev)
            if outcome is not None:
                return outcome

    def _recover(self, ev: object) -> str | None:
        """After a failed command: -ERR [SYS/TEMP] when the client can still parse what
        follows; the session ends when a multi-line answer was cut."""
        if isinstance(ev, proto.Authenticate):
            self._unlock()
            self.address = None
            try:
                self._out(self.conn.auth_failed("temp"))
            except proto.ProtocolError:
                return "error"
            return None
        if isinstance(ev, proto.Retrieve) and not self._in_response:
            self._out(proto.err("Temporary failure, try again later", "SYS/TEMP"))
            return None
        return "error"

    async def _handle(self, ev: object) -> str | None:
        """One event; a session outcome when the session ends."""
        conn = self.conn
        if isinstance(ev, proto.Respond):
            self._out(ev.data)
            if ev.close:
                return "ok"
            # pipelined LIST/UIDL from a client that reads nothing: a 6-byte command can
            # make a long reply, so the write buffer is bounded per reply, not per read
            await self._drain()
        elif isinstance(ev, proto.Authenticate):
            self._out(await self._authenticate(ev))
            if self.auth_failures >= MAX_FAILURES_PER_SESSION:
                return "auth_failures"          # RFC 1939 8: guessing ends here
        elif isinstance(ev, proto.Retrieve):
            await self._retrieve(ev)
        elif isinstance(ev, proto.StartTls):
            # No await between the reply and start_tls: the client's ClientHello must not
            # reach the plaintext reader (start_tls pauses reading before it yields).
            assert self.ssl_ctx is not None
            self.writer.write(ev.reply)
            await self.writer.start_tls(self.ssl_ctx)
            conn.tls_started()
        elif isinstance(ev, proto.Quit):
            await self._write(await self._update(ev))
            return "ok"
        return None

    # --- AUTHORIZATION -> TRANSACTION ---------------------------------------------------
    async def _authenticate(self, ev: proto.Authenticate) -> bytes:
        store = self.store
        verdict = await self.relay.logins.verify("pop3", self.peer_ip, ev.user, ev.password, self.sid)
        if verdict is Verdict.BUSY:
            self.auth_failures += 1
            return self.conn.auth_failed("temp")
        try:
            account = await store.accounts.get(ev.user) if verdict is Verdict.OK else None
        except StoreError as e:  # store failure: temporary
            log.error("auth_store_error", sid=self.sid, error=str(e))
            return self.conn.auth_failed("temp")
        if account is None:
            self.stats.login_failures += 1
            self.auth_failures += 1
            return self.conn.auth_failed("auth")
        address = account.address
        locks = self.stats.locks
        if address in locks:
            self.stats.in_use_refusals += 1
            return self.conn.auth_failed("in-use")
        locks.add(address)
        self.locked = self.address = address
        try:
            try:
                mb = store.mailbox(address)
                snapshot = [proto.Message(m.uid, m.size) for m in await mb.messages()]
            except StoreError as e:           # a full disk: the reserve makes room, once
                if not self.relay.reserve.release_for(e):
                    raise
                snapshot = [proto.Message(m.uid, m.size) for m in await mb.messages()]
            uidvalidity = await mb.uidvalidity()
        except Exception as e:
            log.error("maildrop_error", sid=self.sid, error=f"{type(e).__name__}: {e}")
            self._unlock()
            self.address = None
            return self.conn.auth_failed("temp")
        try:                                   # bookkeeping: best effort (a full disk must
            await mb.note_poll()               # not keep a receiver from draining)
        except Exception as e:  # noqa: BLE001
            log.warning("note_poll_failed", sid=self.sid, error=type(e).__name__)
        if self.session is not None:
            self.session.idle_since = None
        self.mailbox = mb
        self.stats.logins += 1
        log.info("login", sid=self.sid, user=address, mechanism=ev.mechanism,
                 messages=len(snapshot), tls=self.conn.tls_active)
        return self.conn.auth_succeeded(address, uidvalidity, snapshot)

    def _unlock(self) -> None:
        if self.locked:
            self.stats.locks.discard(self.locked)
            self.locked = None

    @property
    def sid(self) -> str:
        return self.session.sid if self.session else "-"

    # --- TRANSACTION -------------------------------------------------------------------
    async def _retrieve(self, ev: proto.Retrieve) -> None:
        try:
            body = await self.mailbox.body(ev.uid)
        except StoreError:  # expunged meanwhile (IMAP) or unreadable
            self._out(proto.err(f"Message {ev.msgno} is no longer available", "SYS/PERM"))
            return
        started = time.monotonic()
        stuffer = proto.DotStuffer()
        top = proto.TopFilter(ev.top_lines) if ev.top_lines is not None else None
        reader = _Prefetcher(body, RETR_CHUNK if top is None else TOP_CHUNK)
        try:
            self._out(ev.head)
            self._in_response = True
            while True:
                data = await reader.next()
                if not data:
                    break
                if top is not None:
                    data = top.feed(data)
                self.sent += len(data)
                self.stats.fetched_bytes += len(data)
                self._out(stuffer.feed(data))
                await self._drain()
                if top is not None and top.done:
                    break
            self._out(stuffer.finish())
            self._in_response = False
        finally:
            reader.close()
        if top is None:
            self.stats.messages_fetched += 1
            self.stats.fetch_duration.observe(time.monotonic() - started)
            try:
                await self.mailbox.note_fetched(ev.uid)
            except Exception as e:  # bookkeeping must not break the session
                log.error("note_fetched_failed", sid=self.sid, uid=ev.uid, exc_info=e)

    # --- UPDATE ------------------------------------------------------------------------
    async def _update(self, ev: proto.Quit) -> bytes:
        failed = 0
        if ev.expunge:
            self.relay.reserve.before_deletion()
            try:
                # only what was removed here (an IMAP session may have expunged some already)
                try:
                    removed = await self.mailbox.expunge(list(ev.expunge))
                except StoreError as e:       # a full disk: the reserve makes room, once
                    if not self.relay.reserve.release_for(e):
                        raise
                    removed = await self.mailbox.expunge(list(ev.expunge))
                self.stats.messages_deleted += len(removed)
            except Exception as e:  # report, keep the messages
                log.error("expunge_failed", sid=self.sid, uids=len(ev.expunge), exc_info=e)
                failed = len(ev.expunge)
        return self.conn.update_done(failed)


# exceptions that end the session by design (not bugs in one command)
_SESSION_ENDS = (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError, TimeoutError)
_VERBS = {proto.Authenticate: "AUTH", proto.Retrieve: "RETR", proto.Quit: "QUIT",
          proto.StartTls: "STLS", proto.Respond: "-"}


class _Prefetcher:
    """Reads a body chunk by chunk, one chunk ahead of the sender, so that reads overlap the
    socket writes and never block the loop: os.pread in a small pool of its own when the
    store gives a file descriptor (Maildir), else the body's own async read(). The body is
    closed when the last read in flight has finished (never under a running pread)."""

    def __init__(self, body: Body, chunk: int) -> None:
        self._body, self._chunk, self._offset = body, chunk, 0
        self._fd = body.fileno()
        self._loop = asyncio.get_running_loop()
        self._inflight: asyncio.Future[bytes] | None = None
        self._submit()

    def _submit(self) -> None:
        if self._fd is not None:
            self._inflight = asyncio.wrap_future(
                _executor().submit(os.pread, self._fd, self._chunk, self._offset), loop=self._loop)
        else:
            self._inflight = asyncio.ensure_future(self._body.read(self._offset, self._chunk))

    async def next(self) -> bytes:
        assert self._inflight is not None
        data = await self._inflight
        self._offset += len(data)
        if data:
            self._submit()
        else:
            self._inflight = None
        return data

    def close(self) -> None:
        body, inflight, self._inflight = self._body, self._inflight, None
        if inflight is None or inflight.done():
            body.close()
            return

        def finished(f: asyncio.Future[bytes]) -> None:
            if not f.cancelled():
                f.exception()                 # retrieved: a read error after the client left
            body.close()
        inflight.add_done_callback(finished)


_pool: concurrent.futures.ThreadPoolExecutor | None = None


def _executor() -> concurrent.futures.ThreadPoolExecutor:
    """A small pool of our own: file reads must not queue behind argon2 hashing."""
    global _pool
    if _pool is None:
        _pool = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="pop3-read")
    return _pool
