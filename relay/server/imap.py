"""IMAP server: asyncio glue around relay.protocol.imap (read, feed, act, write).

- One INBOX per account (`store.mailbox(address)`); mailbox names are compared with "INBOX"
  and never used as paths. The session keeps a view (the message list the client knows,
  sequence number = position + 1) and brings it up to date on NOOP, CHECK and during IDLE
  (EXPUNGE and EXISTS responses), never in the middle of FETCH/STORE/SEARCH.
- Literal message bytes go from the file to the socket without being held: on a plain TCP
  connection with os.sendfile while the socket takes them (zero copy), otherwise (TLS, or the
  socket is full) 1 MiB preads written with flow control (write buffer bound + drain). Server
  memory does not depend on message size; a partial FETCH reads only its range.
- IDLE (RFC 2177): store.subscribe pushes "new"/"expunge" at once; the view is refreshed and
  EXISTS/EXPUNGE sent. Autologout after imap.idle_timeout (RFC 9051 5.4: at least 30 min).
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
from dataclasses import dataclass
from typing import Any

from relay import __version__, mimetree
from relay.auth import AuthError, decode_plain, plaintext_allowed
from relay.log import get_logger
from relay.stats import TRANSFER_SECONDS, Histogram, HistogramSnapshot
from relay.protocol import imap as proto
from relay.protocol.imap import (
    AUTH,
    NEED_DATA,
    NOT_AUTH,
    SELECTED,
    ClientLine,
    Command,
    Continuation,
    ImapSyntaxError,
    Reject,
    tagged,
    untagged,
)
from relay.policy.penalty import MAX_FAILURES_PER_SESSION, Verdict
from relay.server.listener import Session, create_stream_servers
from relay.server.pressure import RECHECK_SECONDS
from relay.store.api import Body, Change, Flag, MessageInfo, StoreError, normalize_address

log = get_logger("imap")

CHUNK = 1024 * 1024               # pread size when sendfile cannot be used
SENDFILE_MAX = 16 * 1024 * 1024   # one os.sendfile call at most
INLINE_SCAN = 1024 * 1024         # MIME structure of files up to this size is parsed on the loop
WAKE_CHUNK = 64 * 1024            # sent through the transport when sendfile finds the socket full
READ_SIZE = 64 * 1024
WRITE_HIGH_WATER = 2 * CHUNK      # transport buffer bound before drain() waits
IDLE_POLL = 30.0                  # IDLE also re-reads the index this often (changes by other processes)
PERMANENT = proto.SYSTEM_FLAGS
# The store's flags as IMAP names, and the protocol module's encoding of every combination
# (relay.protocol.imap works on its own flag letters: proto.letters_from_flags).
_NAMES = {Flag.SEEN: "\\Seen", Flag.ANSWERED: "\\Answered", Flag.FLAGGED: "\\Flagged",
          Flag.DELETED: "\\Deleted", Flag.DRAFT: "\\Draft"}
_ALL_FLAGS = [Flag(v) for v in range(1 << len(_NAMES))]
_TO_PROTO = {f: proto.letters_from_flags([n for g, n in _NAMES.items() if g in f]) for f in _ALL_FLAGS}
_FROM_PROTO = {v: k for k, v in _TO_PROTO.items()}


def _proto_flags(flags: Flag) -> str:
    return _TO_PROTO[flags]


def _store_flags(encoded: str) -> Flag:
    return _FROM_PROTO[proto.letters_from_flags(proto.flags_from_letters(encoded))]


_TREE_ITEMS = frozenset({"RFC822.HEADER", "RFC822.TEXT", "ENVELOPE", "BODYSTRUCTURE", "BODY"})


@dataclass(frozen=True)
class ImapStats:
    messages_fetched: int          # whole messages sent (BODY[]/RFC822 up to the last byte)
    fetched_bytes: int             # message bytes sent in literals
    fetch_duration: HistogramSnapshot
    logins: int
    login_failures: int
    idle_pushes: int               # EXISTS/EXPUNGE pushed during IDLE
    commands: int


class ImapCounters:
    def __init__(self) -> None:
        self.messages_fetched = 0
        self.fetched_bytes = 0
        self.fetch_duration = Histogram(TRANSFER_SECONDS)
        self.logins = 0
        self.login_failures = 0
        self.idle_pushes = 0
        self.commands = 0

    def statistics(self) -> ImapStats:
        return ImapStats(self.messages_fetched, self.fetched_bytes, self.fetch_duration.snapshot(),
                         self.logins, self.login_failures, self.idle_pushes, self.commands)


def counters(relay: Any) -> ImapCounters:
    c: ImapCounters = relay.imap_stats           # set in Relay.__init__
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
    """The client went away or timed out; the session ends."""


class _Bye(Exception):
    """End the session with "* BYE <text>"; `outcome` is the session log's/registry's word."""

    def __init__(self, text: str, outcome: str = "timeout") -> None:
        super().__init__(text)
        self.text = text
        self.outcome = outcome


# exceptions that end the session by design (not bugs in one command)
_SESSION_ENDS = (_Closed, _Bye, ConnectionError, asyncio.IncompleteReadError, ssl.SSLError, TimeoutError)


def _is_inbox(name: str) -> bool:
    return name.upper() == "INBOX"


def _matches_inbox(reference: str, pattern: str) -> bool:
    """LIST wildcards (* and %) against the one mailbox name."""
    import fnmatch

    full = (reference + pattern).replace("%", "*")
    return fnmatch.fnmatchcase("INBOX", full.upper().replace("[", "[[]"))


class ImapSession:
    def __init__(self, relay: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 ssl_ctx: ssl.SSLContext | None, implicit_tls: bool) -> None:
        self.relay, self.store, self.config = relay, relay.store, relay.config
        self.reader, self.writer = reader, writer
        self.ssl_ctx = ssl_ctx
        self.tls = implicit_tls
        self.stats = counters(relay)
        peer = writer.get_extra_info("peername")
        self.peer_ip: str = peer[0] if peer else ""
        self.parser = self._new_parser()
        self.state = NOT_AUTH
        self.address: str | None = None
        self.mailbox: Any = None
        self.readonly = False
        self.view: list[Any] = []               # MessageInfo, in UID order (seq = index + 1)
        self.unsubscribe: Callable[[], None] | None = None
        self.changed = asyncio.Event()
        self.session: Session | None = None
        self.auth_failures = 0
        self.sent = 0
        self._pending_read: asyncio.Task[bytes] | None = None
        self._idling = False                  # waiting in IDLE: nothing to finish at shutdown
        self._started = time.monotonic()      # the login deadline counts from here
        self._line_open = False               # the last bytes written did not end a line
        self._in_response = False             # a FETCH response with literals is being sent

    def _new_parser(self) -> proto.ImapParser:
        return proto.ImapParser(self.config.imap.max_line, self.config.imap.max_literal)

    # --- I/O -----------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        self._check_open()
        self.sent += len(data)
        self.writer.write(data)
        self._line_open = not data.endswith(b"\r\n")

    def _check_open(self) -> None:
        """A transport closed by the peer (RST) or by shutdown refuses writes with
        RuntimeError under uvloop; that is a lost connection, not a server error."""
        if self.writer.transport.is_closing():
            raise ConnectionResetError("connection closed")

    async def flush(self) -> None:
        """drain(), but a client that stops reading for idle_timeout is dropped (bounded
        memory either way: nothing more is produced while the buffer is full)."""
        if self.writer.transport.get_write_buffer_size():
            await asyncio.wait_for(self.writer.drain(), self.config.imap.idle_timeout)
        else:
            await self.writer.drain()

    async def read_more(self) -> None:
        """Feed the parser the next bytes from the client (autologout on idle_timeout; before
        login, the login deadline: relay/server/pressure.py)."""
        if self._pending_read is None:
            self._pending_read = asyncio.ensure_future(self.reader.read(READ_SIZE))
        t0 = time.monotonic()
        while True:
            timeout, why = self._read_timeout(t0)
            if timeout <= 0:
                raise _Bye(why)
            try:
                data = await asyncio.wait_for(asyncio.shield(self._pending_read), timeout)
                break
            except TimeoutError:
                continue
        self._pending_read = None
        if not data:
            raise _Closed
        self.parser.receive_data(data)

    def _read_timeout(self, t0: float) -> tuple[float, str]:
        """(seconds to wait for the read begun at t0, why the session ends when they run
        out). imap.idle_timeout per read (RFC 9051 5.4); before login also what is left of
        the login timeout, counted from connect and not reset by each byte, shorter under
        stress, and looked at again every RECHECK_SECONDS (stress may begin meanwhile)."""
        c = self.config.imap
        now = time.monotonic()
        idle_left = t0 + c.idle_timeout - now
        if self.state != NOT_AUTH:
            return idle_left, "Autologout; idle for too long"
        limit = c.login_timeout
        if self.relay.sessions.stressed("imap"):
            limit = min(limit, c.stress_login_timeout)
        login_left = self._started + limit - now
        if idle_left <= login_left:
            return min(idle_left, RECHECK_SECONDS), "Autologout; idle for too long"
        return min(login_left, RECHECK_SECONDS), "Login timeout"

    async def next_event(self) -> proto.Event:
        while True:
            ev = self.parser.next_event()
            if ev is not NEED_DATA:
                return ev
            await self.flush()
            await self.read_more()

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
        outcome = "dropped"
        try:
            self.writer.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
            self.write(untagged(f"OK [CAPABILITY {self.capabilities()}] {self.config.hostname} IMAP ready"))
            outcome = await self._loop()
        except _Closed:
            pass
        except _Bye as e:
            outcome = e.outcome
            with contextlib.suppress(Exception):
                self.write(untagged(f"BYE {e.text}"))
                await asyncio.wait_for(self.flush(), 5)
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError, TimeoutError) as e:
            log.info("connection_lost", sid=self.session.sid, error=type(e).__name__)
        except Exception as e:  # the parser or the glue failed: the state is not to be trusted
            outcome = "error"
            log.error("session_failed", sid=self.session.sid, error=type(e).__name__)
            with contextlib.suppress(Exception):
                self.write(untagged("BYE Internal error, closing"))
                await asyncio.wait_for(self.flush(), 5)
        finally:
            self._deselect()
            if self._pending_read is not None:
                self._pending_read.cancel()
            log.info("session", sid=self.session.sid, peer=self.peer_ip, user=self.address or "",
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

    async def _close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()
            await asyncio.wait_for(self.writer.wait_closed(), 5)

    async def _loop(self) -> str:
        while True:
            ev = await self.next_event()
            if isinstance(ev, Continuation):
                self.write(f"+ {ev.text}\r\n".encode())
                continue
            if isinstance(ev, Reject):
                self.write(ev.to_bytes())
                continue
            if isinstance(ev, ClientLine):                  # only expected inside a command
                self.write(b"* BAD Unexpected line\r\n")
                continue
            assert isinstance(ev, Command)
            self.stats.commands += 1
            bad = proto.check_state(ev, self.state)
            if bad is not None:
                self.write(bad.to_bytes())
                continue
            handler = getattr(self, "cmd_" + ev.name.lower())
            # pipelined commands from a client that reads nothing: a short command may have a
            # long answer (UID SEARCH ALL), so the write buffer is bounded per command, not
            # per 64 KiB read
            if self.writer.transport.get_write_buffer_size() > WRITE_HIGH_WATER:
                await self.flush()
            sent = self.sent
            try:
                try:
                    await handler(ev)
                except StoreError as e:       # a full disk: the reserve makes room, once
                    if self.sent != sent or not self.relay.reserve.release_for(e):
                        raise
                    await handler(ev)
            except ImapSyntaxError as e:
                self.write(tagged(ev.tag, "BAD", str(e) if str(e).startswith("[") else f"Syntax error: {e}"))
            except StoreError as e:            # I/O trouble, account removed meanwhile: temporary
                log.error("store_error", sid=self.session.sid if self.session else "", command=ev.name,
                          error=str(e))
                self._after_failure()
                self.write(tagged(ev.tag, "NO", "[UNAVAILABLE] Temporary failure, try again later"))
            except _SESSION_ENDS:
                raise
            except Exception as e:             # a bug in one command: one line, NO, go on
                log.error("command_failed", sid=self.session.sid if self.session else "",
                          command=ev.name, error=type(e).__name__)
                self._after_failure()
                self.write(tagged(ev.tag, "NO", "[SERVERBUG] Internal error, try again later"))
            if self.state == proto.LOGOUT:
                await self.flush()
                return "ok"

    def _after_failure(self) -> None:
        """A command failed: when its response was cut inside a line or a literal, the
        client cannot parse what follows; the session ends with BYE instead."""
        if self._line_open or self._in_response:
            raise _Bye("Internal error, closing", "error")

    # --- any state -----------------------------------------------------------------------

    def capabilities(self) -> str:
        caps = ["IMAP4rev1", "SASL-IR", "ID", "ENABLE", "IDLE", "LITERAL+"]
        if self.state == NOT_AUTH:
            if self.ssl_ctx is not None and not self.tls:
                caps.append("STARTTLS")
            if plaintext_allowed(self.config, self.peer_ip, self.tls):
                caps.append("AUTH=PLAIN")
            else:
                caps.append("LOGINDISABLED")
        else:
            caps += ["UIDPLUS", "UNSELECT", "NAMESPACE", "QUOTA", "QUOTA=RES-STORAGE",
                     "QUOTA=RES-MESSAGE"]
        return " ".join(caps)

    async def cmd_capability(self, cmd: Command) -> None:
        self.write(untagged("CAPABILITY " + self.capabilities()))
        self.write(tagged(cmd.tag, "OK", "Capability completed"))

    async def cmd_noop(self, cmd: Command) -> None:
        await self.refresh()
        self.write(tagged(cmd.tag, "OK", "NOOP completed"))

    async def cmd_check(self, cmd: Command) -> None:
        await self.refresh()
        self.write(tagged(cmd.tag, "OK", "CHECK completed"))

    async def cmd_logout(self, cmd: Command) -> None:
        self.write(untagged("BYE Logging out"))
        self.write(tagged(cmd.tag, "OK", "Logout completed"))
        self.state = proto.LOGOUT

    async def cmd_id(self, cmd: Command) -> None:
        self.write(untagged(b"ID " + proto.render(["name", "relay", "version", __version__])))
        self.write(tagged(cmd.tag, "OK", "ID completed"))

    # --- not authenticated ---------------------------------------------------------------

    async def cmd_starttls(self, cmd: Command) -> None:
        if self.ssl_ctx is None or self.tls:
            self.write(tagged(cmd.tag, "BAD", "STARTTLS not available"))
            return
        if self.parser.buffered or self.reader._buffer:  # type: ignore[attr-defined]
            self.write(tagged(cmd.tag, "BAD", "Nothing may follow STARTTLS before the handshake"))
            raise _Bye("Command injection refused", "protocol_error")
        self.write(tagged(cmd.tag, "OK", "Begin TLS negotiation now"))
        await self.flush()
        await self.writer.start_tls(self.ssl_ctx)
        self.tls = True
        self.parser = self._new_parser()

    async def _login(self, tag: str, user: str, password: str) -> None:
        sid = self.session.sid if self.session else ""
        verdict = await self.relay.logins.verify("imap", self.peer_ip, user, password, sid)
        if verdict is not Verdict.OK:
            self.auth_failures += 1
            if verdict is Verdict.FAILED:
                self.stats.login_failures += 1
                self.write(tagged(tag, "NO", "[AUTHENTICATIONFAILED] Authentication failed"))
            else:
                self.write(tagged(tag, "NO", "[UNAVAILABLE] Too many attempts, try again later"))
            if self.auth_failures >= MAX_FAILURES_PER_SESSION:
                raise _Bye("Too many authentication failures", "auth_failures")
            return
        self.address = normalize_address(user)
        self.state = AUTH
        if self.session is not None:
            self.session.idle_since = None
        self.stats.logins += 1
        try:                                   # bookkeeping: best effort (a full disk must
            await self.store.mailbox(self.address).note_poll()   # not keep a receiver from draining)
        except Exception as e:  # noqa: BLE001
            log.warning("note_poll_failed", sid=sid, error=type(e).__name__)
        self.write(tagged(tag, "OK", f"[CAPABILITY {self.capabilities()}] Logged in"))

    def _plaintext_refused(self, tag: str) -> bool:
        if plaintext_allowed(self.config, self.peer_ip, self.tls):
            return False
        self.write(tagged(tag, "NO", "[PRIVACYREQUIRED] Use STARTTLS or TLS first"))
        return True

    async def cmd_login(self, cmd: Command) -> None:
        proto.want_args(cmd, 2, 2)
        user, password = proto.astring(cmd.args[0]), proto.astring(cmd.args[1])
        if not self._plaintext_refused(cmd.tag):
            await self._login(cmd.tag, user, password)

    async def cmd_authenticate(self, cmd: Command) -> None:
        proto.want_args(cmd, 1, 2)
        if proto.atom(cmd.args[0]).upper() != "PLAIN":
            self.write(tagged(cmd.tag, "NO", "Unsupported authentication mechanism"))
            return
        if self._plaintext_refused(cmd.tag):
            return
        if len(cmd.args) == 2:                                  # SASL-IR (RFC 4959)
            response = proto.astring(cmd.args[1]).encode()
            if response == b"=":
                response = b""
        else:
            self.write(b"+ \r\n")
            self.parser.expect_line()
            ev = await self.next_event()
            if not isinstance(ev, ClientLine):
                self.write(tagged(cmd.tag, "BAD", "Authentication exchange failed"))
                return
            response = ev.data.strip()
            if response == b"*":
                self.write(tagged(cmd.tag, "BAD", "Authentication cancelled"))
                return
        try:
            _, user, password = decode_plain(response)
        except AuthError as e:
            self.write(tagged(cmd.tag, "BAD", f"Invalid SASL PLAIN response: {e}"))
            return
        await self._login(cmd.tag, user, password)

    # --- authenticated -------------------------------------------------------------------

    async def cmd_enable(self, cmd: Command) -> None:
        proto.want_args(cmd, 1)
        self.write(untagged("ENABLED"))                         # nothing to enable
        self.write(tagged(cmd.tag, "OK", "ENABLE completed"))

    async def _list(self, cmd: Command, kind: str) -> None:
        proto.want_args(cmd, 2, 2)
        ref, pattern = proto.astring(cmd.args[0]), proto.astring(cmd.args[1])
        if kind == "LIST" and pattern == "":
            self.write(untagged(b'LIST (\\Noselect) "/" ""'))
        elif _matches_inbox(ref, pattern):
            attrs = "\\HasNoChildren" if kind == "LIST" else ""
            self.write(untagged(f'{kind} ({attrs}) "/" INBOX'))
        self.write(tagged(cmd.tag, "OK", f"{kind} completed"))

    async def cmd_list(self, cmd: Command) -> None:
        await self._list(cmd, "LIST")

    async def cmd_lsub(self, cmd: Command) -> None:
        await self._list(cmd, "LSUB")

    async def cmd_namespace(self, cmd: Command) -> None:
        self.write(untagged('NAMESPACE (("" "/")) NIL NIL'))
        self.write(tagged(cmd.tag, "OK", "NAMESPACE completed"))

    def _no_such_mailbox(self, tag: str) -> None:
        self.write(tagged(tag, "NO", "[NONEXISTENT] Only INBOX exists"))

    async def _not_supported(self, cmd: Command) -> None:
        self.write(tagged(cmd.tag, "NO", "[CANNOT] Only INBOX exists here"))

    cmd_create = cmd_delete = cmd_rename = _not_supported

    async def cmd_subscribe(self, cmd: Command) -> None:
        proto.want_args(cmd, 1, 1)
        if _is_inbox(proto.astring(cmd.args[0])):
            self.write(tagged(cmd.tag, "OK", "SUBSCRIBE completed"))
        else:
            self._no_such_mailbox(cmd.tag)

    cmd_unsubscribe = cmd_subscribe

    async def cmd_append(self, cmd: Command) -> None:
        self.write(tagged(cmd.tag, "NO", "[CANNOT] APPEND is not supported: INBOX is filled by SMTP"))

    async def cmd_copy(self, cmd: Command) -> None:
        self.write(tagged(cmd.tag, "NO", f"[CANNOT] {cmd.name} is not supported: only INBOX exists"))

    cmd_move = cmd_copy

    async def cmd_status(self, cmd: Command) -> None:
        proto.want_args(cmd, 2, 2)
        if not _is_inbox(proto.astring(cmd.args[0])):
            self._no_such_mailbox(cmd.tag)
            return
        items = cmd.args[1] if isinstance(cmd.args[1], list) else [cmd.args[1]]
        mb = self.store.mailbox(self.address)
        msgs = await mb.messages()
        values = {"MESSAGES": len(msgs), "UIDNEXT": await mb.uidnext(), "UIDVALIDITY": await mb.uidvalidity(),
                  "RECENT": 0, "UNSEEN": sum(1 for m in msgs if Flag.SEEN not in m.flags),
                  "DELETED": sum(1 for m in msgs if Flag.DELETED in m.flags), "SIZE": sum(m.size for m in msgs)}
        out: list[str] = []
        for it in items:
            name = proto.atom(it).upper()
            if name not in values:
                raise ImapSyntaxError(f"unknown STATUS item {name}")
            out.append(f"{name} {values[name]}")
        self.write(untagged(f"STATUS INBOX ({' '.join(out)})"))
        self.write(tagged(cmd.tag, "OK", "STATUS completed"))

    async def _select(self, cmd: Command, readonly: bool) -> None:
        proto.want_args(cmd, 1, 2)
        self._deselect()
        self.state = AUTH
        if not _is_inbox(proto.astring(cmd.args[0])):
            self._no_such_mailbox(cmd.tag)
            return
        self.mailbox = self.store.mailbox(self.address)
        self.readonly = readonly
        self.view = list(await self.mailbox.messages())
        self.changed.clear()
        self.unsubscribe = self.store.changes.subscribe(self.address, self._on_store_change)
        self.state = SELECTED
        self.write(untagged(f"FLAGS ({PERMANENT})"))
        perm = "" if readonly else PERMANENT
        self.write(untagged(f"OK [PERMANENTFLAGS ({perm})] Flags permitted"))
        self.write(untagged(f"{len(self.view)} EXISTS"))
        self.write(untagged("0 RECENT"))
        unseen = next((i + 1 for i, m in enumerate(self.view) if Flag.SEEN not in m.flags), None)
        if unseen is not None:
            self.write(untagged(f"OK [UNSEEN {unseen}] First unseen"))
        self.write(untagged(f"OK [UIDVALIDITY {await self.mailbox.uidvalidity()}] UIDs valid"))
        self.write(untagged(f"OK [UIDNEXT {await self.mailbox.uidnext()}] Predicted next UID"))
        mode = "READ-ONLY" if readonly else "READ-WRITE"
        self.write(tagged(cmd.tag, "OK", f"[{mode}] {cmd.name} completed"))

    async def cmd_select(self, cmd: Command) -> None:
        await self._select(cmd, False)

    async def cmd_examine(self, cmd: Command) -> None:
        await self._select(cmd, True)

    def _on_store_change(self, change: Change) -> None:
        self.changed.set()

    def _deselect(self) -> None:
        if self.unsubscribe is not None:
            self.unsubscribe()
            self.unsubscribe = None
        self.mailbox = None
        self.view = []

    async def cmd_getquotaroot(self, cmd: Command) -> None:
        proto.want_args(cmd, 1, 1)
        if not _is_inbox(proto.astring(cmd.args[0])):
            self._no_such_mailbox(cmd.tag)
            return
        self.write(untagged('QUOTAROOT INBOX ""'))
        self.write(untagged(await self._quota_line()))
        self.write(tagged(cmd.tag, "OK", "GETQUOTAROOT completed"))

    async def cmd_getquota(self, cmd: Command) -> None:
        proto.want_args(cmd, 1, 1)
        if proto.astring(cmd.args[0]) != "":
            self.write(tagged(cmd.tag, "NO", "[NONEXISTENT] No such quota root"))
            return
        self.write(untagged(await self._quota_line()))
        self.write(tagged(cmd.tag, "OK", "GETQUOTA completed"))

    async def _quota_line(self) -> bytes:
        """RFC 9208 5.1: STORAGE in units of 1024 octets; a resource without limit is left out."""
        u = await self.store.ledger.usage(self.address)
        res = []
        if u.quota_bytes:
            res.append(f"STORAGE {(u.bytes + 1023) // 1024} {u.quota_bytes // 1024}")
        if u.quota_messages:
            res.append(f"MESSAGE {u.messages} {u.quota_messages}")
        return f'QUOTA "" ({" ".join(res)})'.encode()

    # --- IDLE ----------------------------------------------------------------------------

    def _on_shutdown(self) -> None:
        """Shutdown started: a session waiting in IDLE holds nothing, so it gets BYE at once
        (a gateway reconnects to the next server); other sessions finish within the grace."""
        if self._idling:
            self._shutdown()

    async def cmd_idle(self, cmd: Command) -> None:
        self.write(b"+ idling\r\n")
        self.parser.expect_line()
        deadline = time.monotonic() + self.config.imap.idle_timeout
        self._idling = True
        try:
            await self._idle(cmd, deadline)
        finally:
            self._idling = False

    async def _idle(self, cmd: Command, deadline: float) -> None:
        if not self.relay.sessions.accepting:         # shutdown began before the IDLE
            raise _Bye("Server shutting down", "shutdown")
        while True:
            ev = self.parser.next_event()
            if isinstance(ev, ClientLine):
                if ev.data.strip().upper() == b"DONE":
                    self.write(tagged(cmd.tag, "OK", "IDLE terminated"))
                else:
                    self.write(tagged(cmd.tag, "BAD", "Expected DONE"))
                return
            if ev is not NEED_DATA:
                self.write(tagged(cmd.tag, "BAD", "Expected DONE"))
                return
            await self.flush()
            if self._pending_read is None:
                self._pending_read = asyncio.ensure_future(self.reader.read(READ_SIZE))
            change = asyncio.ensure_future(self.changed.wait())
            left = deadline - time.monotonic()
            if left <= 0:
                change.cancel()
                raise _Bye("Autologout; idle for too long")
            done, _ = await asyncio.wait({self._pending_read, change}, timeout=min(left, IDLE_POLL),
                                         return_when=asyncio.FIRST_COMPLETED)
            change.cancel()
            if self._pending_read in done:
                data = self._pending_read.result()
                self._pending_read = None
                if not data:
                    raise _Closed
                self.parser.receive_data(data)
            if self.state == SELECTED:
                n = await self.refresh()
                self.stats.idle_pushes += n

    async def refresh(self) -> int:
        """Bring the view up to date: EXPUNGE for vanished messages (highest first), FETCH
        FLAGS for changed flags, EXISTS for new ones. Returns the number of responses."""
        self.changed.clear()
        if self.state != SELECTED:
            return 0
        current = await self.mailbox.messages()
        by_uid = {m.uid: m for m in current}
        sent = 0
        for seq in range(len(self.view), 0, -1):
            if self.view[seq - 1].uid not in by_uid:
                del self.view[seq - 1]
                self.write(untagged(f"{seq} EXPUNGE"))
                sent += 1
        for i, m in enumerate(self.view):
            now = by_uid[m.uid]
            if now.flags != m.flags:
                self.view[i] = now
                self.write(untagged(b"%d FETCH (FLAGS %s UID %d)" % (
                    i + 1, proto.render_flags(_proto_flags(now.flags)), m.uid)))
                sent += 1
        top = self.view[-1].uid if self.view else 0
        new = [m for m in current if m.uid > top]
        if new:
            self.view += new
            self.write(untagged(f"{len(self.view)} EXISTS"))
            sent += 1
        return sent

    async def catch_up(self, cmd: Command) -> None:
        """Mail that arrived since the last command becomes visible to SEARCH, FETCH and STORE
        without a NOOP (pollers that stay selected and only UID SEARCH): a UID command may
        carry every update, a sequence-number command only EXISTS, since EXPUNGE would shift
        the numbers it names (RFC 9051 7.4.1, RFC 3501 7.4.1). A UID command always compares
        the flags too: the store announces new mail and expunges, not flag changes."""
        if self.state != SELECTED:
            return
        if cmd.uid:
            await self.refresh()
            return
        if not self.changed.is_set():
            return
        top = self.view[-1].uid if self.view else 0
        new = [m for m in await self.mailbox.messages() if m.uid > top]
        if new:
            self.view += new
            self.write(untagged(f"{len(self.view)} EXISTS"))

    # --- selected ------------------------------------------------------------------------

    def _targets(self, cmd: Command, spec: proto.Arg) -> list[tuple[int, Any]]:
        """(seq, MessageInfo) of the messages a sequence set (or UID set) names."""
        seqset = proto.parse_sequence_set(proto.atom(spec))
        if cmd.uid:
            if not self.view:
                return []
            star = self.view[-1].uid
            return [(i + 1, m) for i, m in enumerate(self.view) if seqset.contains(m.uid, star)]
        n = len(self.view)
        for a, b in seqset.ranges:
            for x in (a, b):
                if x is not None and x > n:
                    raise ImapSyntaxError("Invalid message sequence number")
        if not n:
            raise ImapSyntaxError("No messages")
        return [(i + 1, m) for i, m in enumerate(self.view) if seqset.contains(i + 1, n)]

    async def _deleted_now(self, uids: set[int] | None = None) -> list[int]:
        """UIDs of the view (or of `uids`) that carry \\Deleted now, not as last viewed:
        another session may have set or cleared it since."""
        mine = {m.uid for m in self.view} if uids is None else uids
        return [mi.uid for mi in await self.mailbox.messages() if Flag.DELETED in mi.flags and mi.uid in mine]

    async def cmd_close(self, cmd: Command) -> None:
        if not self.readonly:
            deleted = await self._deleted_now()
            if deleted:
                self.relay.reserve.before_deletion()
                await self.mailbox.expunge(deleted)
        self._deselect()
        self.state = AUTH
        self.write(tagged(cmd.tag, "OK", "CLOSE completed"))

    async def cmd_unselect(self, cmd: Command) -> None:
        self._deselect()
        self.state = AUTH
        self.write(tagged(cmd.tag, "OK", "UNSELECT completed"))

    async def cmd_expunge(self, cmd: Command) -> None:
        if self.readonly:
            self.write(tagged(cmd.tag, "NO", "[READ-ONLY] Mailbox is read-only"))
            return
        if cmd.uid:
            proto.want_args(cmd, 1, 1)
            named = {m.uid for _, m in self._targets(cmd, cmd.args[0])}
        else:
            proto.want_args(cmd, 0, 0)
            named = {m.uid for m in self.view}
        deleted = await self._deleted_now(named)
        if deleted:
            self.relay.reserve.before_deletion()
        gone = set(await self.mailbox.expunge(deleted)) if deleted else set()
        for seq in range(len(self.view), 0, -1):
            if self.view[seq - 1].uid in gone:
                del self.view[seq - 1]
                self.write(untagged(f"{seq} EXPUNGE"))
        self.write(tagged(cmd.tag, "OK", "EXPUNGE completed"))

    async def cmd_search(self, cmd: Command) -> None:
        await self.catch_up(cmd)
        args = list(cmd.args)
        if args and isinstance(args[0], str) and args[0].upper() == "RETURN":
            raise ImapSyntaxError("SEARCH RETURN (ESEARCH) is not supported")
        key = proto.parse_search(args)
        match = key.compile(len(self.view), self.view[-1].uid if self.view else 0)
        hits = [m.uid if cmd.uid else i for i, m in enumerate(self.view, 1)
                if match(i, m.uid, _proto_flags(m.flags), m.internaldate, m.size)]
        self.write(untagged("SEARCH" + "".join(f" {h}" for h in hits)))
        self.write(tagged(cmd.tag, "OK", "SEARCH completed"))

    async def cmd_store(self, cmd: Command) -> None:
        seqset_arg = cmd.args[0] if cmd.args else ""
        _, req = proto.parse_store(cmd.args)
        if self.readonly:
            self.write(tagged(cmd.tag, "NO", "[READ-ONLY] Mailbox is read-only"))
            return
        targets = self._targets(cmd, seqset_arg)
        # +FLAGS/-FLAGS apply to the flags the message has now (another session or a Maildir
        # reader may have changed them since the view was taken): no lost update
        current = {mi.uid: mi for mi in await self.mailbox.messages()} if targets else {}
        for seq, m in targets:
            now = current.get(m.uid)
            if now is None:
                continue                                    # expunged meanwhile
            m = now
            flags = _store_flags(req.apply(_proto_flags(m.flags)))
            if flags != m.flags:
                try:
                    m = await self.mailbox.set_flags(m.uid, flags)
                except (StoreError, LookupError):
                    continue                                # expunged meanwhile
            self.view[seq - 1] = m
            if not req.silent:
                uid = b" UID %d" % m.uid if cmd.uid else b""
                self.write(untagged(b"%d FETCH (FLAGS %s%s)" % (
                    seq, proto.render_flags(_proto_flags(m.flags)), uid)))
                await self.flush()
        self.write(tagged(cmd.tag, "OK", "STORE completed"))

    async def cmd_fetch(self, cmd: Command) -> None:
        await self.catch_up(cmd)
        proto.want_args(cmd, 2, 2)
        atts = proto.parse_fetch_atts(cmd.args[1])
        if cmd.uid and not any(a.name == "UID" for a in atts):
            atts.insert(0, proto.FetchAtt("UID"))
        missing = 0
        for seq, m in self._targets(cmd, cmd.args[0]):
            if not await self._fetch_one(seq, m, atts):
                missing += 1
            await self.flush()                 # FETCH 1:* of 10,000 messages: bounded buffer
        if missing:
            self.write(tagged(cmd.tag, "NO", "[EXPUNGEISSUED] Some messages no longer exist"))
        else:
            self.write(tagged(cmd.tag, "OK", "FETCH completed"))

    async def _open(self, m: MessageInfo) -> Body | None:
        try:
            body: Body = await self.mailbox.body(m.uid)
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
                data = await body.read(offset, CHUNK)
                if not data:
                    raise StoreError(f"message body ended at {offset} of {body.size}")
                os.write(fd, data)
                offset += len(data)
        except BaseException:
            os.close(fd)
            raise
        return fd

    async def _fetch_one(self, seq: int, m: MessageInfo, atts: list[proto.FetchAtt]) -> bool:
        needs_file = any(a.name not in ("UID", "FLAGS", "INTERNALDATE", "RFC822.SIZE") for a in atts)
        body = await self._open(m) if needs_file else None
        if needs_file and body is None:
            return False
        spooled = -1
        try:
            if not self.readonly and Flag.SEEN not in m.flags and any(a.sets_seen for a in atts):
                with contextlib.suppress(LookupError):
                    flags = (await self.mailbox.info(m.uid)).flags      # now, not as viewed
                    m = await self.mailbox.set_flags(m.uid, flags | Flag.SEEN)
                    self.view[seq - 1] = m
                    if not any(a.name == "FLAGS" for a in atts):
                        atts = [*atts, proto.FetchAtt("FLAGS")]
            size = body.size if body is not None else m.size
            fd = body.fileno() if body is not None else None
            root = None
            # the MIME tree only for structure items and part sections: BODY[] and its
            # partials are plain byte ranges (a partial of a 2 GB message reads only its range)
            if any((a.section is None and a.name in _TREE_ITEMS)
                   or (a.section is not None and a.section != proto.Section()) for a in atts):
                assert body is not None
                if fd is None:
                    fd = spooled = await self._spool(body)
                if size <= INLINE_SCAN:                # a boundary scan may read the whole file:
                    root = self._tree(m.id, size, fd, atts)    # not on the loop, unless small
                else:
                    root = await asyncio.to_thread(self._tree, m.id, size, fd, atts)
            resp = proto.FetchResponse(seq)
            whole = False
            for a in atts:
                whole |= self._render_att(resp, a, m, fd, size, root)
            resp.finish()
            t0 = time.monotonic()
            self._in_response = True                   # cut inside: the client cannot recover
            for piece in resp.parts:
                if isinstance(piece, bytes):
                    self.write(piece)
                else:
                    assert body is not None
                    _, off, count = piece
                    await self.send_body(body, fd, off, count)
            self._in_response = False
            if whole:
                self.stats.messages_fetched += 1
                self.stats.fetch_duration.observe(time.monotonic() - t0)
                with contextlib.suppress(Exception):
                    await self.mailbox.note_fetched(m.uid)
            return True
        finally:
            if spooled >= 0:
                os.close(spooled)
            if body is not None:
                body.close()

    @staticmethod
    def _tree(name: str, size: int, fd: int, atts: list[proto.FetchAtt]) -> mimetree.Part:
        root = mimetree.tree(name, size, fd)
        if any(a.name == "BODYSTRUCTURE" or (a.name == "BODY" and a.section is None) for a in atts):
            mimetree.fill_lines(root, fd)
        return root

    def _render_att(self, resp: proto.FetchResponse, a: proto.FetchAtt, m: MessageInfo, fd: int | None,
                    size: int, root: mimetree.Part | None) -> bool:
        """Add one item; True when it sends the whole message up to its last byte."""
        name = a.name
        if name == "UID":
            resp.add("UID", str(m.uid).encode())
        elif name == "FLAGS":
            resp.add("FLAGS", proto.render_flags(_proto_flags(m.flags)))
        elif name == "INTERNALDATE":
            resp.add("INTERNALDATE", proto.quote(proto.imap_datetime(m.internaldate)))
        elif name == "RFC822.SIZE":
            resp.add("RFC822.SIZE", str(size).encode())
        elif name == "RFC822":
            resp.add_file_literal("RFC822", 0, size)
            return True
        else:
            if a.section == proto.Section():              # BODY[]: no MIME parse needed
                return self._render_section(resp, a, None, fd, size)
            assert root is not None
            if name == "RFC822.HEADER":
                resp.add_file_literal(name, root.header_offset, root.header_size)
            elif name == "RFC822.TEXT":
                resp.add_file_literal(name, root.body_offset, root.body_size)
            elif name == "ENVELOPE":
                resp.add(name, proto.render(mimetree.envelope(root)))
            elif name == "BODYSTRUCTURE" or (name == "BODY" and a.section is None):
                resp.add(name, mimetree.bodystructure(root, extended=name == "BODYSTRUCTURE"))
            else:
                return self._render_section(resp, a, root, fd, size)
        return False

    def _render_section(self, resp: proto.FetchResponse, a: proto.FetchAtt, root: Any, fd: int | None,
                        size: int) -> bool:
        sec = a.section
        assert sec is not None
        rname = a.response_name()
        data: bytes | None = None
        rng: tuple[int, int] | None = None
        if not sec.part and not sec.text:
            rng = (0, size)
        else:
            part = mimetree.find_part(root, sec.part) if sec.part else root
            if part is None:
                resp.add(rname, b"NIL")
                return False
            target = part if not sec.part else part.message
            if sec.text == "":
                rng = (part.body_offset, part.body_size)
            elif sec.text == "MIME":
                rng = (part.header_offset, part.header_size)
            elif target is None:                          # HEADER/TEXT of a non-message part
                data = b""
            elif sec.text == "HEADER":
                rng = (target.header_offset, target.header_size)
            elif sec.text == "TEXT":
                rng = (target.body_offset, target.body_size)
            else:
                assert fd is not None                     # a part section: the tree's file
                data = mimetree.header_fields(fd, target, sec.fields, sec.text.endswith(".NOT"))
        if a.partial is not None:
            off, length = a.partial
            if data is not None:
                data = data[off:off + length]
            else:
                assert rng is not None
                start = min(off, rng[1])
                rng = (rng[0] + start, max(0, min(length, rng[1] - start)))
        if data is not None:
            resp.add_literal_bytes(rname, data)
            return False
        assert rng is not None
        resp.add_file_literal(rname, rng[0], rng[1])
        return not sec.part and not sec.text and rng[0] + rng[1] >= size and rng[1] > 0

    # --- streaming -----------------------------------------------------------------------

    async def send_body(self, body: Body, fd: int | None, offset: int, count: int) -> None:
        """`count` bytes of the body from `offset`: from its file (send_file) when the store
        gives one, else read(offset, n) a chunk at a time through the transport."""
        if fd is not None:
            await self.send_file(fd, offset, count)
            return
        self.stats.fetched_bytes += count
        self.sent += count
        while count > 0:
            data = await body.read(offset, min(CHUNK, count))
            if not data:
                raise OSError(f"message body shorter than expected at {offset}")
            self._check_open()
            self.writer.write(data)
            offset += len(data)
            count -= len(data)
            await self.flush()

    async def send_file(self, fd: int, offset: int, count: int) -> None:
        """`count` bytes of the file from `offset` to the client, never holding more than one
        chunk: os.sendfile on plain TCP while the socket accepts data (the transport's buffer
        empty, so order is kept), else a pread chunk through the transport and drain()."""
        sock = None if self.tls else self.writer.get_extra_info("socket")
        sockfd = sock.fileno() if sock is not None else -1
        transport = self.writer.transport
        self.stats.fetched_bytes += count
        self.sent += count
        while count > 0:
            if sockfd >= 0 and transport.get_write_buffer_size() == 0:
                try:
                    n = os.sendfile(sockfd, fd, offset, min(count, SENDFILE_MAX))
                except (BlockingIOError, InterruptedError):
                    n = 0
                except (BrokenPipeError, ConnectionResetError):
                    raise                           # the client went away
                except OSError:
                    sockfd = -1                     # not a socket sendfile can use: pread from now
                    n = 0
                if n > 0:
                    offset += n
                    count -= n
                    continue
            # TLS: the whole chunk; plain TCP with a full socket: a small piece through the
            # transport, which waits for the socket to drain, then sendfile again
            data = os.pread(fd, min(CHUNK if sockfd < 0 else WAKE_CHUNK, count), offset)
            if not data:
                raise OSError(f"message file shorter than expected at {offset}")
            self._check_open()
            self.writer.write(data)
            offset += len(data)
            count -= len(data)
            if sockfd >= 0:
                await asyncio.wait_for(self._wait_flushed(), self.config.imap.idle_timeout)
            else:
                await self.flush()

    async def _wait_flushed(self) -> None:
        """Wait until the transport has sent everything (then os.sendfile may go on): with a
        high-water mark of 0, drain() returns only once the buffer is empty."""
        transport = self.writer.transport
        transport.set_write_buffer_limits(high=0, low=0)
        try:
            await self.writer.drain()
        finally:
            if not transport.is_closing():
                transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
