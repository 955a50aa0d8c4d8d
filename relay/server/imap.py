"""IMAP server: asyncio glue around relay.protocol.imap.ImapConnection (read, feed, act, write).

The connection decides everything IMAP (states, capabilities, arguments, the view, sequence
sets, SEARCH, the FETCH response); this module does what its events ask: log in, read the
mailbox, set flags, expunge, open a message and send byte ranges of it, wait in IDLE.

- One INBOX per account (`store.mailbox(address)`, relay.store.api). The store's listing is
  given to the connection on SELECT, NOOP, CHECK, UID commands and during IDLE, its flags
  (api.Flag) translated to the connection's letters (FLAG_LETTERS) once per listing.
- Literal message bytes go from the file to the socket without being held, through the body
  streamer (relay/server/stream.py: os.sendfile on plain TCP, 1 MiB preads otherwise) and the
  session's FlowControl (relay/server/flow.py: a bounded write buffer). Server memory does not
  depend on message size; a partial FETCH reads only its range.
- IDLE (RFC 2177): store.changes pushes new mail and expunges at once; the connection sends
  EXISTS/EXPUNGE. Autologout after imap.idle_timeout (RFC 9051 5.4: at least 30 min).
- STARTTLS via StreamWriter.start_tls; bytes pipelined after STARTTLS are refused (RFC 9051
  6.2.1, command injection). LOGINDISABLED when relay.auth.plaintext_allowed says no.
- Counters: `relay.imap_stats.statistics()` -> ImapStats, read by relay/metrics.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple, cast

from relay import __version__, mimetree
from relay.auth import plaintext_allowed
from relay.log import get_logger
from relay.stats import TRANSFER_SECONDS, Histogram, HistogramSnapshot
from relay.policy.penalty import MAX_FAILURES_PER_SESSION, Verdict
from relay.protocol import imap as proto
from relay.protocol.imap import NEED_DATA, SELECTED, untagged
from relay.server.flow import FlowControl
from relay.server.listener import Session, create_stream_servers
from relay.server.pressure import RECHECK_SECONDS
from relay.server.stream import send_body
from relay.store.api import Body, Change, Flag, MessageInfo, StoreError, normalize_address

log = get_logger("imap")

INLINE_SCAN = 1024 * 1024         # MIME structure of files up to this size is parsed on the loop
READ_SIZE = 64 * 1024
WRITE_HIGH_WATER = 2 * 1024 * 1024   # transport buffer bound: two streamer chunks, then we wait
IDLE_POLL = 30.0                  # IDLE also re-reads the index this often (changes by other processes)
SPOOL_CHUNK = 1024 * 1024         # read size when a body without a file is spooled for the MIME scan
# The store's flags as the connection's letters (relay.protocol.imap FLAG_LETTERS) and back,
# for every combination of the five: one dict lookup per message.
_IMAP_NAMES = {Flag.SEEN: "\\Seen", Flag.ANSWERED: "\\Answered", Flag.FLAGGED: "\\Flagged",
               Flag.DELETED: "\\Deleted", Flag.DRAFT: "\\Draft"}
_LETTERS = {f: proto.letters_from_flags([n for g, n in _IMAP_NAMES.items() if g in f])
            for f in (Flag(v) for v in range(1 << len(_IMAP_NAMES)))}
_FLAGS = {v: k for k, v in _LETTERS.items()}


class _View(NamedTuple):
    """A message as the connection keeps it (proto.MessageView), with the store's id."""
    uid: int
    size: int
    internaldate: float
    flags: str
    id: str                        # opaque and stable: the MIME tree cache key


def _view(m: MessageInfo) -> _View:
    return _View(m.uid, m.size, m.internaldate, _LETTERS[m.flags], m.id)


@dataclass(frozen=True)
class ImapStats:
    messages_fetched: int          # whole messages sent (BODY[]/RFC822 up to the last byte)
    fetched_bytes: int             # message bytes sent in literals
    fetch_duration: HistogramSnapshot
    logins: int
    login_failures: int
    idle_pushes: int               # EXISTS/EXPUNGE pushed during IDLE
    commands: int


@dataclass
class ImapCounters:
    messages_fetched: int = 0
    fetched_bytes: int = 0
    fetch_duration: Histogram = field(default_factory=lambda: Histogram(TRANSFER_SECONDS))
    logins: int = 0
    login_failures: int = 0
    idle_pushes: int = 0
    commands: int = 0
    sessions: set[ImapSession] = field(default_factory=set)     # live, for tests and shutdown

    def statistics(self) -> ImapStats:
        return ImapStats(self.messages_fetched, self.fetched_bytes, self.fetch_duration.snapshot(),
                         self.logins, self.login_failures, self.idle_pushes, self.commands)


def counters(relay: Any) -> ImapCounters:
    c = getattr(relay, "imap_stats", None)
    if c is None:
        c = relay.imap_stats = ImapCounters()
    return c


def statistics(relay: Any) -> ImapStats:
    return counters(relay).statistics()


async def start(relay: Any, addrs: tuple[str, ...] | list[str], ssl_ctx: ssl.SSLContext | None = None,
                implicit_tls: bool = False) -> list[asyncio.Server]:
    counters(relay)

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await ImapSession(relay, r, w, ssl_ctx, implicit_tls).run()

    return await create_stream_servers(handle, addrs, "imap", ssl_ctx, implicit_tls, READ_SIZE)


class _Closed(Exception):
    """The client went away; the session ends."""


class _Bye(Exception):
    """End the session with "* BYE <text>" (None: said already); `outcome` is the session
    log's/registry's word."""

    def __init__(self, text: str | None, outcome: str = "timeout") -> None:
        super().__init__(text)
        self.text = text
        self.outcome = outcome


# exceptions that end the session by design (not bugs in one command)
_SESSION_ENDS = (_Closed, _Bye, ConnectionError, asyncio.IncompleteReadError, ssl.SSLError, TimeoutError)


class _Content:
    """One opened message for the connection's FETCH rendering (proto.MessageContent): its
    MIME tree from relay.mimetree, byte ranges of the file."""

    def __init__(self, fd: int | None, size: int, root: mimetree.Part | None) -> None:
        self.fd, self.size, self.root = fd, size, root

    def envelope(self) -> bytes:
        assert self.root is not None
        return proto.render(mimetree.envelope(self.root))

    def bodystructure(self, extended: bool) -> bytes:
        assert self.root is not None
        return mimetree.bodystructure(self.root, extended=extended)

    def locate(self, sec: proto.Section) -> tuple[int, int] | bytes | None:
        root = self.root
        assert root is not None
        part = mimetree.find_part(root, sec.part) if sec.part else root
        if part is None:
            return None
        target = part if not sec.part else part.message
        if sec.text == "":
            return part.body_offset, part.body_size
        if sec.text == "MIME":
            return part.header_offset, part.header_size
        if target is None:                             # HEADER/TEXT of a non-message part
            return b""
        if sec.text == "HEADER":
            return target.header_offset, target.header_size
        if sec.text == "TEXT":
            return target.body_offset, target.body_size
        assert self.fd is not None                     # a part section: the tree's file
        return mimetree.header_fields(self.fd, target, sec.fields, sec.text.endswith(".NOT"))


def _tree(name: str, size: int, fd: int, lines: bool) -> mimetree.Part:
    root = mimetree.tree(name, size, fd)
    if lines:
        mimetree.fill_lines(root, fd)
    return root


class ImapSession:
    def __init__(self, relay: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 ssl_ctx: ssl.SSLContext | None, implicit_tls: bool) -> None:
        self.relay, self.store, self.config = relay, relay.store, relay.config
        self.reader, self.writer = reader, writer
        self.flow = FlowControl(writer.transport, drain=writer.drain)
        self.ssl_ctx = ssl_ctx
        self.stats = counters(relay)
        peer = writer.get_extra_info("peername")
        self.peer_ip: str = peer[0] if peer else ""
        c = self.config.imap
        self.conn = proto.ImapConnection(
            self.config.hostname, max_line=c.max_line, max_literal=c.max_literal,
            tls_available=ssl_ctx is not None, tls_active=implicit_tls,
            plaintext_allowed=plaintext_allowed(self.config, self.peer_ip, implicit_tls),
            version=__version__)
        self.address: str | None = None
        self.mailbox: Any = None
        self.unsubscribe: Callable[[], None] | None = None
        self.changed = asyncio.Event()
        self.session: Session | None = None
        self.auth_failures = 0
        self.sent = 0
        self._commands = 0                    # of conn.statistics().commands, counted already
        self._pending_read: asyncio.Task[bytes] | None = None
        self._started = time.monotonic()      # the login deadline counts from here
        self._line_open = False               # the last bytes written did not end a line
        self._in_response = False             # a FETCH response with literals is being sent

    @property
    def sid(self) -> str:
        return self.session.sid if self.session else ""

    # --- I/O -----------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if not data:
            return
        self.flow.write(data)                 # ConnectionResetError when the transport closed
        self.sent += len(data)
        self._line_open = not data.endswith(b"\r\n")

    def write_buffer_size(self) -> int:
        return self.writer.transport.get_write_buffer_size()

    async def flush(self) -> None:
        """Wait while the write buffer is above its bound; a client that stops reading for
        idle_timeout is dropped (nothing more is produced while the buffer is full)."""
        await self.flow.wait_writable(self.config.imap.idle_timeout)

    def _start_read(self) -> asyncio.Task[bytes]:
        if self._pending_read is None:
            self._pending_read = asyncio.ensure_future(self.reader.read(READ_SIZE))
        return self._pending_read

    def _take_read(self) -> None:
        """Feed the connection the bytes of the finished read."""
        assert self._pending_read is not None
        data = self._pending_read.result()
        self._pending_read = None
        if not data:
            raise _Closed
        self.conn.receive_data(data)

    async def read_more(self) -> None:
        """Feed the connection the next bytes from the client (autologout on idle_timeout;
        before login, the login deadline: relay/server/pressure.py)."""
        pending = self._start_read()
        t0 = time.monotonic()
        while True:
            timeout, why = self._read_timeout(t0)
            if timeout <= 0:
                raise _Bye(why)
            try:
                await asyncio.wait_for(asyncio.shield(pending), timeout)
                break
            except TimeoutError:
                continue
        self._take_read()

    def _read_timeout(self, t0: float) -> tuple[float, str]:
        """(seconds to wait for the read begun at t0, why the session ends when they run
        out). imap.idle_timeout per read (RFC 9051 5.4); before login also what is left of
        the login timeout, counted from connect and not reset by each byte, shorter under
        stress, and looked at again every RECHECK_SECONDS (stress may begin meanwhile)."""
        c = self.config.imap
        now = time.monotonic()
        idle_left = t0 + c.idle_timeout - now
        if self.address is not None:
            return idle_left, "Autologout; idle for too long"
        limit = c.login_timeout
        if self.relay.sessions.stressed("imap"):
            limit = min(limit, c.stress_login_timeout)
        login_left = self._started + limit - now
        if idle_left <= login_left:
            return min(idle_left, RECHECK_SECONDS), "Autologout; idle for too long"
        return min(login_left, RECHECK_SECONDS), "Login timeout"

    async def _more_was_sent(self) -> bool:
        """Whether the client's bytes already wait in the reader (a read completes at once)."""
        pending = self._start_read()
        await asyncio.sleep(0)
        if not pending.done():
            return False                       # stays pending: after the handshake it reads TLS
        if pending.exception() is None and not pending.result():
            raise _Closed                      # the client went away instead
        return True

    # --- session -------------------------------------------------------------------------

    async def run(self) -> None:
        c = self.config.imap
        self.session = self.relay.sessions.open("imap", self.peer_ip, c.max_sessions,
                                                c.max_sessions_per_client, c.stress_threshold)
        if self.session is None:
            self.writer.write(b"* BYE [UNAVAILABLE] Too many connections or shutting down\r\n")
            await self._close()
            return
        self.session.closer = self._shutdown
        self.session.on_shutdown = self._on_shutdown
        self.session.evict = self._evict
        self.session.idle_since = self._started       # evictable under stress until login
        self.stats.sessions.add(self)
        outcome = "dropped"
        try:
            self.writer.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
            self.write(self.conn.greeting())
            outcome = await self._loop()
        except _Closed:
            pass
        except _Bye as e:
            outcome = e.outcome
            with contextlib.suppress(Exception):
                if e.text is not None:
                    self.write(untagged(f"BYE {e.text}"))
                await asyncio.wait_for(self.flush(), 5)
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError, TimeoutError) as e:
            log.info("connection_lost", sid=self.sid, error=type(e).__name__)
        except Exception as e:  # the connection or the glue failed: the state is not to be trusted
            outcome = "error"
            log.error("session_failed", sid=self.sid, error=type(e).__name__)
            with contextlib.suppress(Exception):
                self.write(untagged("BYE Internal error, closing"))
                await asyncio.wait_for(self.flush(), 5)
        finally:
            self.stats.sessions.discard(self)
            self._follow(False)
            if self._pending_read is not None:
                self._pending_read.cancel()
            log.info("session", sid=self.sid, peer=self.peer_ip, user=self.address or "",
                     outcome=outcome, bytes_out=self.sent)
            self.session.close(outcome)
            await self._close()

    def _evict(self) -> None:
        """Under stress with every slot taken: this session, not logged in, makes room."""
        with contextlib.suppress(Exception):
            self.writer.write(untagged("BYE [UNAVAILABLE] Server busy, closing idle session"))
        self.writer.close()

    def _shutdown(self) -> None:
        """Called by Relay.stop() after the grace period: say BYE (RFC 9051 7.1.5), close."""
        with contextlib.suppress(Exception):
            self.writer.write(untagged("BYE Server shutting down"))
        self.writer.close()

    def _on_shutdown(self) -> None:
        """Shutdown started: a session waiting in IDLE holds nothing, so it gets BYE at once
        (a gateway reconnects to the next server); other sessions finish within the grace."""
        if self.conn.idling:
            self._shutdown()

    async def _close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()
            await asyncio.wait_for(self.writer.wait_closed(), 5)

    async def _loop(self) -> str:
        conn = self.conn
        while True:
            ev = conn.next_event()             # raising: its state is lost, the session ends
            n = conn.statistics().commands
            self.stats.commands += n - self._commands
            self._commands = n
            if ev is NEED_DATA:
                await self.flush()
                await self.read_more()
                continue
            # pipelined commands from a client that reads nothing: a short command may have a
            # long answer (UID SEARCH ALL), so the write buffer is bounded per command, not
            # per 64 KiB read
            if self.writer.transport.get_write_buffer_size() > WRITE_HIGH_WATER:
                await self.flush()
            sent = self.sent
            try:
                try:
                    await self._handle(ev)
                except StoreError as e:       # a full disk: the reserve makes room, once
                    if self.sent != sent or not self.relay.reserve.release_for(e):
                        raise
                    await self._handle(ev)
            except StoreError as e:            # I/O trouble, account removed meanwhile: temporary
                self._failed(e, "temp")
            except _SESSION_ENDS:
                raise
            except Exception as e:             # a bug in one command: one line, NO, go on
                self._failed(e, "bug")
            self._follow(conn.state is SELECTED)
            if isinstance(ev, proto.Respond) and ev.close is not None:
                await self.flush()
                return ev.close

    def _failed(self, e: Exception, kind: str) -> None:
        """A command failed: one log line, `NO` and the session goes on; but when its response
        was cut inside a line or a literal, the client cannot parse what follows: BYE."""
        if kind == "temp":
            log.error("store_error", sid=self.sid, command=self.conn.command, error=str(e))
        else:
            log.error("command_failed", sid=self.sid, command=self.conn.command, error=type(e).__name__)
        if self._line_open or self._in_response:
            raise _Bye("Internal error, closing", "error")
        self.write(self.conn.failed(kind))

    async def _handle(self, ev: object) -> None:
        if isinstance(ev, proto.Respond):
            self.write(ev.data)
        elif isinstance(ev, proto.Refresh):
            self.write(self.conn.refreshed(await self._messages()))
        elif isinstance(ev, proto.Fetch):
            await self._fetch(ev)
        elif isinstance(ev, proto.StoreFlags):
            await self._store_flags(ev)
        elif isinstance(ev, proto.Expunge):
            await self._expunge(ev)
        elif isinstance(ev, proto.Authenticate):
            await self._authenticate(ev)
        elif isinstance(ev, proto.OpenMailbox):
            await self._open_mailbox()
        elif isinstance(ev, proto.MailboxStatus):
            mb = self.store.mailbox(self.address)
            messages = [_view(m) for m in await mb.messages()]
            self.write(self.conn.status_result(messages, await mb.uidvalidity(), await mb.uidnext()))
        elif isinstance(ev, proto.QuotaRequest):
            u = await self.store.ledger.usage(self.address)
            self.write(self.conn.quota_result(u.bytes, u.messages, u.quota_bytes, u.quota_messages))
        elif isinstance(ev, proto.Idle):
            await self._idle()
        elif isinstance(ev, proto.StartTls):
            await self._starttls()
        else:
            raise AssertionError(f"unhandled event {ev!r}")

    # --- the store -------------------------------------------------------------------------

    async def _messages(self) -> list[_View]:
        return [_view(m) for m in await self.mailbox.messages()]

    def _follow(self, selected: bool) -> None:
        """Follow the selected mailbox's changes while the connection is in SELECTED."""
        if selected and self.unsubscribe is None:
            self.changed.clear()
            self.unsubscribe = self.store.changes.subscribe(self.address, self._on_store_change)
        elif not selected and self.unsubscribe is not None:
            self.unsubscribe()
            self.unsubscribe = None
            self.mailbox = None

    def _on_store_change(self, change: Change) -> None:
        self.conn.mailbox_changed()
        self.changed.set()

    # --- events ----------------------------------------------------------------------------

    async def _authenticate(self, ev: proto.Authenticate) -> None:
        verdict = await self.relay.logins.verify("imap", self.peer_ip, ev.user, ev.password, self.sid)
        if verdict is not Verdict.OK:
            self.auth_failures += 1
            if verdict is Verdict.FAILED:
                self.stats.login_failures += 1
            self.write(self.conn.login_failed("auth" if verdict is Verdict.FAILED else "busy"))
            if self.auth_failures >= MAX_FAILURES_PER_SESSION:
                raise _Bye("Too many authentication failures", "auth_failures")
            return
        self.address = normalize_address(ev.user)
        if self.session is not None:
            self.session.idle_since = None
        self.stats.logins += 1
        try:                                   # bookkeeping: best effort (a full disk must
            await self.store.mailbox(self.address).note_poll()   # not keep a receiver from draining)
        except Exception as e:  # noqa: BLE001
            log.warning("note_poll_failed", sid=self.sid, error=type(e).__name__)
        self.write(self.conn.login_succeeded(self.address))

    async def _starttls(self) -> None:
        if await self._more_was_sent():
            self.write(self.conn.starttls_refused())          # BAD, then BYE
            raise _Bye(None, "protocol_error")
        assert self.ssl_ctx is not None
        self.write(self.conn.starttls_accepted())
        await self.flush()
        await self.writer.start_tls(self.ssl_ctx)
        self.flow.set_transport(self.writer.transport)
        self.conn.tls_started()

    async def _open_mailbox(self) -> None:
        self._follow(False)
        self.mailbox = self.store.mailbox(self.address)
        messages = await self._messages()
        self.write(self.conn.mailbox_opened(messages, await self.mailbox.uidvalidity(),
                                            await self.mailbox.uidnext()))

    async def _expunge(self, ev: proto.Expunge) -> None:
        deleted = proto.deleted_now(await self._messages(), ev.uids)
        gone: list[int] = []
        if deleted:
            self.relay.reserve.before_deletion()
            gone = await self.mailbox.expunge(deleted)
        self.write(self.conn.expunged(gone))

    async def _store_flags(self, ev: proto.StoreFlags) -> None:
        # +FLAGS/-FLAGS apply to the flags the message has now (another session or a Maildir
        # reader may have changed them since the view was taken): no lost update
        current = {m.uid: m for m in await self._messages()}
        for seq, uid in ev.targets:
            m = current.get(uid)
            if m is not None:
                letters = ev.request.apply(m.flags)
                if letters != m.flags:
                    try:
                        m = _view(await self.mailbox.set_flags(uid, _FLAGS[letters]))
                    except (StoreError, LookupError):
                        m = None                                # expunged meanwhile
            data = self.conn.flags_stored(seq, m)
            if data:
                self.write(data)
                await self.flush()
        self.write(self.conn.store_done())

    async def _set_seen(self, uid: int) -> _View | None:
        """\\Seen added to the flags the message has now; None when it is gone."""
        with contextlib.suppress(LookupError):
            flags = (await self.mailbox.info(uid)).flags
            return _view(await self.mailbox.set_flags(uid, flags | Flag.SEEN))
        return None

    async def _open(self, uid: int) -> Body | None:
        try:
            body: Body = await self.mailbox.body(uid)
        except LookupError:                          # expunged meanwhile (NoSuchMessage)
            return None
        return body

    async def _spool(self, body: Body) -> int:
        """A body the store cannot hand over as a file (no fileno()), copied into an unlinked
        temporary file chunk by chunk, for the MIME parser, which reads by offset."""
        fd, path = tempfile.mkstemp(prefix="imap-spool-", dir=self.config.data_dir)
        os.unlink(path)
        try:
            offset = 0
            while offset < body.size:
                data = await body.read(offset, SPOOL_CHUNK)
                if not data:
                    raise StoreError(f"message body ended at {offset} of {body.size}")
                os.write(fd, data)
                offset += len(data)
        except BaseException:
            os.close(fd)
            raise
        return fd

    async def _fetch(self, ev: proto.Fetch) -> None:
        for seq, uid, set_seen in ev.targets:
            body = await self._open(uid) if ev.needs_body else None
            if ev.needs_body and body is None:
                self.conn.fetch_missing()
            else:
                try:
                    await self._fetch_one(ev, seq, uid, set_seen, body)
                finally:
                    if body is not None:
                        body.close()
            await self.flush()                 # FETCH 1:* of 10,000 messages: bounded buffer
        self.write(self.conn.fetch_done())

    async def _fetch_one(self, ev: proto.Fetch, seq: int, uid: int, set_seen: bool, body: Body | None) -> None:
        seen = await self._set_seen(uid) if set_seen else None
        content = None
        spooled = -1
        try:
            if body is not None:
                fd = body.fileno()
                root = None
                if ev.needs_tree:
                    if fd is None:
                        fd = spooled = await self._spool(body)
                    name = (seen or cast(_View, self.conn.view[seq - 1])).id
                    if body.size <= INLINE_SCAN:   # a boundary scan may read the whole file:
                        root = _tree(name, body.size, fd, ev.needs_lines)   # not on the loop
                    else:                          # unless the file is small
                        root = await asyncio.to_thread(_tree, name, body.size, fd, ev.needs_lines)
                content = _Content(fd, body.size, root)
            out = self.conn.fetch_message(seq, content, seen)
            t0 = time.monotonic()
            self._in_response = True           # cut inside: the client cannot recover
            for piece in out.parts:
                if isinstance(piece, bytes):
                    self.write(piece)
                else:
                    assert body is not None
                    await self.send_file(body, piece.offset, piece.count)
            self._in_response = False
        finally:
            if spooled >= 0:
                os.close(spooled)
        if out.whole:
            self.stats.messages_fetched += 1
            self.stats.fetch_duration.observe(time.monotonic() - t0)
            with contextlib.suppress(Exception):
                await self.mailbox.note_fetched(uid)

    # --- IDLE ------------------------------------------------------------------------------

    async def _idle(self) -> None:
        self.write(proto.IDLE_CONTINUATION)
        deadline = time.monotonic() + self.config.imap.idle_timeout
        if not self.relay.sessions.accepting:         # shutdown began before the IDLE
            raise _Bye("Server shutting down", "shutdown")
        while True:
            ev = self.conn.next_event()
            if isinstance(ev, proto.Respond):
                self.write(ev.data)
                return
            await self.flush()
            pending = self._start_read()
            change = asyncio.ensure_future(self.changed.wait())
            left = deadline - time.monotonic()
            if left <= 0:
                change.cancel()
                raise _Bye("Autologout; idle for too long")
            done, _ = await asyncio.wait({pending, change}, timeout=min(left, IDLE_POLL),
                                         return_when=asyncio.FIRST_COMPLETED)
            change.cancel()
            if pending in done:
                self._take_read()
            if self.conn.state is SELECTED:
                self.changed.clear()
                data = self.conn.update(await self._messages())
                self.stats.idle_pushes += data.count(b"\r\n")
                self.write(data)

    # --- streaming -------------------------------------------------------------------------

    async def send_file(self, body: Body, offset: int, count: int) -> None:
        """`count` bytes of the open message from `offset`, by the body streamer (sendfile
        when the store gives a file, its read(offset, n) otherwise)."""
        self.stats.fetched_bytes += count
        self.sent += count
        await send_body(body, self.flow, offset, count, timeout=self.config.imap.idle_timeout)
