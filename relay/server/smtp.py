"""SMTP server: asyncio glue around relay.protocol.smtp (read, feed, act, write).

Bytes go from the socket into a 1 MiB receive buffer lent for the one read by
`relay.read_buffers` (BufferedProtocol, no per-read allocation, no buffer per idle session:
relay/server/pressure.py), the protocol cuts them into dot-unstuffed memoryviews, and each
view is written to the delivery's tmp file with os.write on the loop. At the end of the message reading is
paused, `delivery.commit()` fsyncs in a thread, and only then is 250 sent; reading resumes
and pipelined commands already in the buffer are answered in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from relay import auth as authmod
from relay.log import get_logger
from relay.policy.backpressure import R_DISK_LOW, R_OVER_QUOTA
from relay.policy.penalty import MAX_FAILURES_PER_SESSION, Verdict
from relay.protocol import smtp as P
from relay.protocol.smtp import NEED_DATA, PAUSED, Reply
from relay.server.listener import Session, create_servers
from relay.server.pressure import RECHECK_SECONDS, Deadline
from relay.stats import SIZE_BYTES, TRANSFER_SECONDS, Histogram, HistogramSnapshot
from relay.store.api import (
    AddressError,
    Delivery,
    Envelope,
    QuotaExceeded,
    Refusal,
    StorageFull,
    StoreError,
    normalize_address,
)

if TYPE_CHECKING:
    from relay.server.app import Relay

log = get_logger("smtp")

# Reads between messages take at most this much of the lent buffer: commands are short (RFC
# 5321 4.5.3.1.4: 512 octets a line), and what a read brings beyond a command that waits for
# a commit is copied out of the buffer, so this bounds that copy (pipelining, RFC 2920).
COMMAND_READ = 64 * 1024

R_MAIL_OK = Reply(250, "2.1.0", "Sender OK")
R_RCPT_OK = Reply(250, "2.1.5", "Recipient OK")
R_UNKNOWN_USER = Reply(550, "5.1.1", "No such user here")
R_NO_RELAY = Reply(550, "5.7.1", "Relaying denied")
R_STORE = Reply(451, "4.3.0", "Temporary local problem, try again later")
R_BUSY = Reply(421, "4.7.0", "Too many connections, try again later")
R_SHUTDOWN = Reply(421, "4.3.2", "Service shutting down")
R_SERVER_BUG = Reply(451, "4.3.0", "Internal error, try again later")
R_UNTRUSTED = Reply(421, "4.3.0", "Internal error, closing")
R_EVICTED = Reply(421, "4.7.0", "Server busy, closing idle session")
R_AUTH_TEMP = Reply(454, "4.7.0", "Temporary authentication failure, try again later")  # RFC 4954 6
R_AUTH_CLOSE = Reply(421, "4.7.0", "Too many authentication failures, closing")


# --- statistics ------------------------------------------------------------------------------
@dataclass(frozen=True)
class SmtpStats:
    sessions: int                             # sessions served (refused ones: relay.sessions)
    messages_received: int                    # accepted with 250 (after the fsync)
    received_bytes: int                       # message octets of those
    messages_rejected: int                    # data received (or drained) but not accepted
    rejected_bytes: int
    replies: dict[tuple[str, str], int]       # (code class "2xx", enhanced code) -> count
    ingest_duration: HistogramSnapshot        # DATA/first BDAT -> final reply, seconds
    message_size: HistogramSnapshot           # accepted messages, bytes


class SmtpCounters:
    """The SMTP servers' figures (one per Relay): `relay.smtp_stats.statistics()`."""

    def __init__(self) -> None:
        self.sessions = 0
        self.accepted = 0
        self.accepted_bytes = 0
        self.rejected = 0
        self.rejected_bytes = 0
        self.replies: Counter[tuple[str, str]] = Counter()
        self.duration = Histogram(TRANSFER_SECONDS)
        self.size = Histogram(SIZE_BYTES)

    def reply(self, r: Reply) -> None:
        if r.enhanced:                        # EHLO/HELO, 354, 334, banner carry none
            self.replies[(f"{r.code // 100}xx", r.enhanced)] += 1

    def statistics(self) -> SmtpStats:
        return SmtpStats(self.sessions, self.accepted, self.accepted_bytes, self.rejected,
                         self.rejected_bytes, dict(self.replies), self.duration.snapshot(),
                         self.size.snapshot())


# --- one session -----------------------------------------------------------------------------
class _Message:
    """The transaction in progress: envelope, the store's delivery (its recipients hold
    their reservations in the store's ledger), pacer."""

    def __init__(self, mail: P.MailFrom, delivery: Delivery) -> None:
        self.mail = mail
        self.recipients: list[str] = []
        self.delivery: Delivery | None = delivery
        self.pacer: Any = None
        self.claim: Any = None               # declared SIZE not yet written (free disk)
        self.started = 0.0                    # DATA / first BDAT: the message is being written
        self.size = 0

    def abort(self) -> None:
        """Every terminal outcome: the delivery aborted (a no-op once committed), which
        releases its reservations; the pacer closed."""
        if self.delivery is not None:
            self.delivery.abort()
            self.delivery = None
        if self.claim is not None:
            self.claim.release()
            self.claim = None
        if self.pacer is not None:
            self.pacer.close()
            self.pacer = None


class SmtpSession(asyncio.BufferedProtocol):
    def __init__(self, relay: Relay, ssl_ctx: ssl.SSLContext | None, implicit_tls: bool,
                 counters: SmtpCounters) -> None:
        self.relay = relay
        self.config = relay.config
        self.ssl_ctx = ssl_ctx
        self.implicit_tls = implicit_tls
        self.counters = counters
        self.loop = asyncio.get_running_loop()
        self.transport: Any = None
        self.session: Session | None = None
        self.conn: P.SmtpConnection | None = None
        self.peer = ""
        self.msg: _Message | None = None
        self._lent: tuple[bytearray, memoryview] | None = None   # the read buffer, during a read
        self._paused: set[str] = set()        # reasons reading is paused: "task", "pace", "write"
        self._task: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._deadline = Deadline(self.loop.time)
        self._request_t = 0.0                 # when the current request's deadline started
        self._auth_failures = 0
        self._bytes = 0
        self._messages = 0
        self._outcome = "ok"
        self._shutting_down = False

    # --- connection ------------------------------------------------------------------------
    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.peer = peer[0] if peer else ""
        c = self.config.smtp
        self.session = self.relay.sessions.open("smtp", self.peer, c.max_sessions,
                                                c.max_sessions_per_client, c.stress_threshold)
        if self.session is None:
            reply = R_BUSY if self.relay.sessions.accepting else R_SHUTDOWN
            self.counters.reply(reply)
            transport.write(reply.render())
            transport.close()
            return
        self.counters.sessions += 1
        self.session.closer = self._shutdown
        self.session.on_shutdown = self._on_shutdown
        self.session.evict = self._evict
        self.conn = P.SmtpConnection(
            self.config.hostname, c.max_message_size, max_recipients=c.max_recipients,
            max_errors=c.max_errors, tls_available=self.ssl_ctx is not None and not self.implicit_tls,
            tls_active=self.implicit_tls,
            auth_allowed=authmod.plaintext_allowed(self.config, self.peer, self.implicit_tls),
            on_reply=self.counters.reply)
        self._flush()
        self._request_started()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._return_buffer()
        if self.session is None:
            return
        if self.msg is not None and self._task is None:
            if self.msg.started:
                self._outcome = "dropped-in-message"
            self._end_message(None, "connection lost")
        if exc is not None and self._outcome == "ok":
            self._outcome = "error"
        elif self.conn is not None and not self.conn.closed and self._outcome == "ok":
            self._outcome = "dropped"
        log.info("session", sid=self.session.sid, peer=self.peer, outcome=self._outcome,
                 messages=self._messages, bytes=self._bytes,
                 seconds=round(time.monotonic() - self.session.started, 3),
                 tls=bool(self.conn and self.conn.tls_active),
                 user=(self.conn.authenticated if self.conn else None) or "")
        session, outcome = self.session, self._outcome
        if self._task is not None:            # a commit in progress finishes first (never
            self._task.add_done_callback(lambda t: session.close(outcome))   # cancelled)
        else:
            session.close(outcome)

    def _shutdown(self) -> None:
        """Close now with 421 4.3.2: at shutdown between messages, or after the grace period."""
        if self.conn is not None and not self.conn.closed:
            self.conn.close_with(R_SHUTDOWN)
            self._flush()
        self._outcome = "shutdown"
        if self.transport is not None:
            self.transport.close()

    def _on_shutdown(self) -> None:
        """Shutdown started: a session between messages gets 421 4.3.2 now; one with a
        message in progress finishes it (within the grace period) and is closed after."""
        self._shutting_down = True
        self._close_if_idle()

    def _evict(self) -> None:
        """Under stress with every slot taken, a new client needs this idle session's slot."""
        self._outcome = "evicted"
        if self.conn is not None and not self.conn.closed:
            self.conn.close_with(R_EVICTED)
            self._flush()
        if self.transport is not None:
            self.transport.close()

    def _close_if_idle(self) -> None:
        if (self._shutting_down and self.msg is None and self._task is None
                and self.conn is not None and not self.conn.closed):
            self._shutdown()

    # --- flow control ----------------------------------------------------------------------
    def _pause(self, reason: str) -> None:
        if not self._paused and self.transport is not None:
            self.transport.pause_reading()
        self._paused.add(reason)

    def _resume(self, reason: str) -> None:
        if reason not in self._paused:
            return
        self._paused.discard(reason)
        if not self._paused and self.transport is not None and not self.transport.is_closing():
            self._request_started()           # our pause is not the client's time
            self.transport.resume_reading()

    def pause_writing(self) -> None:
        """Replies waiting in the transport passed its high-water mark (a client that
        pipelines commands but reads no replies): stop reading until they drain."""
        self._pause("write")

    def resume_writing(self) -> None:
        self._resume("write")

    def _request_started(self) -> None:
        """The client's turn begins (a command was answered, reading resumed): the deadline of
        the next request starts. Between messages it is a whole command line's; during
        DATA/BDAT the data timeout, moved on by each chunk at min_data_rate (pressure.py)."""
        assert self.conn is not None
        c = self.config.smtp
        self._request_t = self.loop.time()
        if self.conn.in_message:
            self._deadline.start(c.data_timeout, c.min_data_rate)
        else:
            self._deadline.start(self._command_timeout())
        if self.session is not None:          # evictable under stress: idle, no transaction
            self.session.idle_since = (time.monotonic() if self.msg is None and self._task is None
                                       and not self.conn.in_message else None)
        self._arm_timer()

    def _command_timeout(self) -> float:
        c = self.config.smtp
        if self.relay.sessions.stressed("smtp"):
            return min(c.command_timeout, c.stress_command_timeout)
        return c.command_timeout

    def _arm_timer(self) -> None:
        """One timer per session, at the deadline or RECHECK_SECONDS from now, whichever is
        first (stress may begin meanwhile and shorten the deadline). A later deadline does not
        touch the timer (it looks again when it fires); only an earlier one re-arms it."""
        at = min(self._deadline.expires, self.loop.time() + RECHECK_SECONDS)
        if self._timer is not None:
            if self._timer.when() <= at:
                return
            self._timer.cancel()
        self._timer = self.loop.call_at(at, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self.conn is None or self.conn.closed:
            return
        if self._paused - {"write"} or self._task is not None:   # our turn (commit, pacing)
            self._request_started()
            return
        if not self.conn.in_message:
            self._deadline.shorten(self._request_t, self._command_timeout())
        if self._deadline.remaining() > 0:
            self._arm_timer()
            return
        self._outcome = "timeout"
        if "write" in self._paused and self.transport is not None:
            self.transport.abort()            # it reads nothing: a 421 would never leave
            return
        self.conn.close_with(Reply(421, "4.4.2", f"{self.config.hostname} Timeout, closing"))
        self._flush()

    # --- reading ---------------------------------------------------------------------------
    def get_buffer(self, sizehint: int) -> memoryview:
        if self._lent is None:
            self._lent = self.relay.read_buffers.acquire()
        view = self._lent[1]
        return view if self.conn is not None and self.conn.in_message else view[:COMMAND_READ]

    def buffer_updated(self, nbytes: int) -> None:
        if self.conn is None or self._lent is None:   # refused session, closing
            self._return_buffer()
            return
        self._bytes += nbytes
        try:
            self.conn.receive_data(self._lent[0], nbytes)
            self._process()
        except Exception as e:                # the protocol object itself failed: its state
            self._untrusted(e)                # cannot be trusted, end the session cleanly
        finally:
            self._return_buffer()

    def _return_buffer(self) -> None:
        """Give the read buffer back; input the protocol has not consumed yet (pipelined
        commands behind a commit) is copied out of it first."""
        pair, self._lent = self._lent, None
        if pair is None:
            return
        if self.conn is not None:
            self.conn.receive_data(b"")       # joins (copies) what is left unread, if anything
        self.relay.read_buffers.release(pair)

    def eof_received(self) -> bool | None:
        self._return_buffer()
        return None

    # --- unexpected exceptions -----------------------------------------------------------
    def _command_failed(self, verb: str, e: BaseException) -> None:
        """A bug while handling one command: one log line, 451 4.3.0, the session goes on.
        A message in progress is given up (its data is drained, then 451)."""
        log.error("command-failed", sid=self._sid, command=verb, error=type(e).__name__)
        conn = self.conn
        assert conn is not None
        if conn.closed:
            return
        try:
            conn.reply(R_SERVER_BUG)          # the command that awaited its reply gets 451
        except RuntimeError:                  # it had its reply already, or it is message data
            if conn.in_message and self.msg is not None:
                self._fail_message(R_SERVER_BUG, "failed")
            return
        if self.msg is not None and self.msg.started:     # DATA/BDAT had begun the message
            self._end_message(R_SERVER_BUG, "failed")

    def _untrusted(self, e: BaseException) -> None:
        log.error("session-failed", sid=self._sid, error=type(e).__name__)
        self._outcome = "error"
        if self.msg is not None:
            self._end_message(None, "failed")
        if self.conn is not None and not self.conn.closed:
            self.conn.close_with(R_UNTRUSTED)
        with contextlib.suppress(Exception):
            self._flush()
        if self.transport is not None:
            self.transport.close()

    def _flush(self) -> None:
        assert self.conn is not None
        out = self.conn.data_to_send()
        if out and self.transport is not None and not self.transport.is_closing():
            self.transport.write(out)
        if self.conn.closed and self.transport is not None:
            self.transport.close()

    def _process(self) -> None:
        """Handle events until the protocol needs data or an event needs to wait."""
        conn = self.conn
        assert conn is not None
        written = 0
        commands = 0
        while self._task is None:
            ev = conn.next_event()
            if ev is NEED_DATA or ev is PAUSED:
                break
            if isinstance(ev, P.DataChunk):
                written += len(ev.data)
                try:
                    self._write_chunk(ev.data)
                except Exception as e:
                    self._command_failed("DATA", e)
                continue
            commands += 1
            handler = _HANDLERS.get(type(ev))
            if handler is not None:
                try:
                    handler(self, ev)
                except Exception as e:
                    self._command_failed(_VERBS.get(type(ev), type(ev).__name__), e)
        self._flush()
        if written and self.msg is not None and self.msg.pacer is not None:
            delay = self.msg.pacer.on_data(written)
            if delay > 0:
                self._pause("pace")
                self.loop.call_later(delay, self._resume, "pace")
        if self._task is None and not conn.closed:
            if commands:
                self._request_started()
            elif written:
                self._deadline.progress(written)
        self._close_if_idle()

    def _spawn(self, coro: Any, verb: str) -> None:
        """Run an awaitable step with reading paused; then go on with buffered input. The
        step is never cancelled: a commit that started completes (nothing half-stored)."""
        self._pause("task")
        if self.session is not None:
            self.session.idle_since = None
        self._task = self.loop.create_task(self._run(coro, verb))

    async def _run(self, coro: Any, verb: str) -> None:
        try:
            await coro
        except Exception as e:
            self._command_failed(verb, e)
        finally:
            self._task = None
        if self.transport is None or self.transport.is_closing():
            if self.msg is not None:          # the step (RCPT, DATA) ran past the close
                self._end_message(None, "connection lost")
            return
        try:
            self._process()                   # may start the next step (pipelined input)
        except Exception as e:
            self._untrusted(e)
            return
        if self._task is None:
            self._resume("task")
        self._close_if_idle()

    # --- events ----------------------------------------------------------------------------
    def _reset(self, ev: Any = None) -> None:
        if self.msg is not None:
            self._end_message(None, "reset")

    def _on_mail(self, ev: P.MailFrom) -> None:
        assert self.conn is not None
        if self.msg is not None:              # defensive: nothing of the last one may linger
            self._end_message(None, "reset")
        self.msg = _Message(ev, self.relay.store.begin_delivery(Envelope(
            ev.address, self._sid, self.conn.client_name, self.peer, self._protocol_name())))
        self.conn.reply(R_MAIL_OK)

    def _on_rcpt(self, ev: P.RcptTo) -> None:
        self._spawn(self._rcpt(ev.address), "RCPT")   # the store may wait on its database

    async def _rcpt(self, address: str) -> None:
        reply = await self._check_rcpt(address)
        assert self.conn is not None
        self.conn.reply(reply)

    async def _check_rcpt(self, address: str) -> Reply:
        """The recipient joins the delivery, which reserves the declared size in the ledger."""
        msg = self.msg
        assert msg is not None and msg.delivery is not None
        try:
            addr = normalize_address(f"postmaster@{self.config.hostname}"
                                     if address.lower() == "postmaster" else address)
        except AddressError:
            return P.R_BAD_RCPT
        local, _, domain = addr.rpartition("@")
        if addr in msg.recipients:
            return R_RCPT_OK
        policy = self.relay.policy
        try:
            if policy is not None:
                refusal = policy.check_rcpt(addr, msg.mail.size, msg.claim)
                if refusal is not None:
                    return refusal  # type: ignore[no-any-return]
            taken = await msg.delivery.add_recipient(addr, msg.mail.size or 0)
            if taken is Refusal.NO_SUCH_ACCOUNT and local.lower() == "postmaster":
                target = await self._postmaster(domain)       # RFC 5321 4.5.1
                if target is not None:
                    addr = target
                    if addr in msg.recipients:
                        return R_RCPT_OK
                    taken = await msg.delivery.add_recipient(addr, msg.mail.size or 0)
            if taken is Refusal.NO_SUCH_ACCOUNT:
                local_domain = await self.relay.store.accounts.is_local_domain(domain)
                return R_UNKNOWN_USER if local_domain else R_NO_RELAY
        except StoreError as e:
            log.warning("rcpt-store-error", sid=self._sid, error=str(e))
            return R_STORE
        if taken is not None:                 # over quota (bytes or messages)
            if policy is not None:
                policy.deferred("quota", addr, size=msg.mail.size or 0, limit=taken.value, sid=self._sid)
            return R_OVER_QUOTA
        msg.recipients.append(addr)
        if msg.claim is None and msg.mail.size and policy is not None:
            msg.claim = policy.claim_disk(msg.mail.size)
        return R_RCPT_OK

    async def _postmaster(self, domain: str) -> str | None:
        """The account postmaster@<hostname or a served domain> goes to, when no account has
        that address: [smtp] postmaster, or (empty) the oldest account."""
        accounts = self.relay.store.accounts
        if domain != self.config.hostname.lower() and not await accounts.is_local_domain(domain):
            return None
        if self.config.smtp.postmaster:
            try:
                return normalize_address(self.config.smtp.postmaster)
            except AddressError:
                return None
        every = await accounts.list()
        return min(every, key=lambda a: a.created).address if every else None

    async def _begin(self) -> Reply | None:
        """The message follows (DATA / first BDAT): the store gets ready for its bytes; a
        reply when it cannot."""
        msg = self.msg
        assert msg is not None and msg.delivery is not None
        msg.started = time.monotonic()
        try:
            await msg.delivery.start()
        except StoreError as e:
            log.warning("begin-delivery-failed", sid=self._sid, error=str(e))
            return self._store_failure(e)
        if self.relay.policy is not None:
            msg.pacer = self.relay.policy.pacer(list(msg.recipients))
        return None

    def _protocol_name(self) -> str:
        """RFC 3848 with-protocol types."""
        assert self.conn is not None
        name = "ESMTP" if self.conn.esmtp else "SMTP"
        if self.conn.tls_active:
            name += "S"
        if self.conn.authenticated is not None:
            name += "A"
        return name

    def _on_data_start(self, ev: P.DataStart) -> None:
        self._spawn(self._data_start(), "DATA")

    async def _data_start(self) -> None:
        reply = await self._begin()
        assert self.conn is not None
        self.conn.reply(reply or P.R_354)

    def _on_bdat_start(self, ev: P.BdatStart) -> None:
        if ev.first:
            self._spawn(self._bdat_start(), "BDAT")

    async def _bdat_start(self) -> None:
        failure = await self._begin()
        if failure is not None:
            self._fail_message(failure, "failed")

    def _write_chunk(self, data: memoryview) -> None:
        msg = self.msg
        if msg is None or msg.delivery is None:
            return
        msg.size += len(data)
        if msg.claim is not None:
            msg.claim.wrote(len(data))
        try:
            msg.delivery.write(data)
        except StoreError as e:
            self._fail_message(self._write_failure(e, msg.size), "over-quota"
                               if isinstance(e, QuotaExceeded) else "failed")
            return
        if not msg.delivery.writable:          # a slow store pushes back: reading pauses
            self._spawn(self._wait_writable(msg), "DATA")

    async def _wait_writable(self, msg: _Message) -> None:
        if msg.delivery is None:
            return
        try:
            await msg.delivery.wait_writable()
        except StoreError as e:
            if self.msg is msg:
                self._fail_message(self._write_failure(e, msg.size), "over-quota"
                                   if isinstance(e, QuotaExceeded) else "failed")

    def _write_failure(self, e: StoreError, size: int) -> Reply:
        """The reply for a message the store stopped taking: 452 4.2.2 when it grew past a
        recipient's quota (the ledger's QuotaExceeded), else as _store_failure."""
        if isinstance(e, QuotaExceeded):
            if self.relay.policy is not None:
                self.relay.policy.deferred("quota_end_of_data", e.address, size=size, sid=self._sid)
            return R_OVER_QUOTA
        log.warning("write-failed", sid=self._sid, error=str(e))
        return self._store_failure(e)

    def _store_failure(self, e: Exception) -> Reply:
        """451 4.3.0; 452 4.3.1 (storage low, counted as a "disk" deferral) when the file
        system is full: the message was larger than the space min_free_disk kept free."""
        if not isinstance(e, StorageFull):
            return R_STORE
        if self.relay.policy is not None and self.msg is not None:
            for addr in self.msg.recipients:
                self.relay.policy.deferred("disk", addr, sid=self._sid, error=str(e))
        return R_DISK_LOW

    def _fail_message(self, reply: Reply, outcome: str) -> None:
        """The message cannot be kept: the protocol drains the rest of its data and then
        answers `reply`; the delivery, reservations and pacer are released now."""
        assert self.conn is not None
        self.conn.fail_message(reply)
        self._end_message(reply, outcome)

    def _on_aborted(self, ev: P.DataAborted) -> None:
        if self.msg is not None:
            self.msg.started = self.msg.started or time.monotonic()
            self._end_message(ev.reply, "too-big" if ev.reply.code == 552 else "failed")

    def _on_bdat_end(self, ev: P.BdatEnd) -> None:
        assert self.conn is not None
        if not ev.last:
            self.conn.reply(Reply(250, "2.0.0", f"{ev.size} octets received"))
            return
        self._spawn(self._finish(ev.total), "BDAT")

    def _on_data_end(self, ev: P.DataEnd) -> None:
        self._spawn(self._finish(ev.size), "DATA")

    async def _finish(self, size: int) -> None:
        """End of the message: policy and quota checks, fsync and link, then the reply."""
        conn, msg = self.conn, self.msg
        assert conn is not None
        if msg is None or msg.delivery is None:
            conn.reply(R_STORE)
            return
        msg.size = size
        try:
            receipt = await msg.delivery.commit()     # grows the reservations to the size first
        except QuotaExceeded as e:
            reply = self._write_failure(e, size)
        except (StoreError, OSError) as e:
            log.warning("commit-failed", sid=self._sid, error=str(e))
            reply = self._store_failure(e)
        else:
            msg.delivery = None
            reply = Reply(250, "2.0.0", f"Ok: queued as {receipt.id}")
        self._end_message(reply, "accepted" if reply.code == 250 else "refused")
        conn.reply(reply)

    def _end_message(self, reply: Reply | None, outcome: str) -> None:
        """Every terminal outcome of a transaction: log, count, release, abort."""
        msg = self.msg
        if msg is None:
            return
        self.msg = None
        accepted = reply is not None and reply.code == 250
        seconds = time.monotonic() - msg.started if msg.started else 0.0
        if msg.started:
            if accepted:
                self.counters.accepted += 1
                self.counters.accepted_bytes += msg.size
                self.counters.size.observe(msg.size)
                self._messages += 1
            else:
                self.counters.rejected += 1
                self.counters.rejected_bytes += msg.size
            self.counters.duration.observe(seconds)
            log.info("message", sid=self._sid, sender=msg.mail.address,
                     rcpts=len(msg.recipients), size=msg.size, outcome=outcome,
                     reply=f"{reply.code} {reply.enhanced}" if reply else "",
                     seconds=round(seconds, 3))
        msg.abort()

    def _on_auth(self, ev: P.AuthPlain | P.AuthLogin) -> None:
        self._spawn(self._auth(ev), "AUTH")

    async def _auth(self, ev: P.AuthPlain | P.AuthLogin) -> None:
        conn = self.conn
        assert conn is not None
        try:
            if isinstance(ev, P.AuthPlain):
                _, user, password = authmod.decode_plain(ev.response)
            else:
                user = authmod.decode_login_field(ev.username)
                password = authmod.decode_login_field(ev.password)
        except authmod.AuthError:
            conn.reply(P.R_AUTH_B64)
            return
        verdict = await self.relay.logins.verify("smtp", self.peer, user, password, self._sid)
        if verdict is Verdict.OK:
            conn.authenticated = user
            conn.reply(P.R_AUTH_OK)
            return
        conn.reply(P.R_AUTH_FAILED if verdict is Verdict.FAILED else R_AUTH_TEMP)
        self._auth_failures += 1
        if self._auth_failures >= MAX_FAILURES_PER_SESSION:
            self._outcome = "auth_failures"
            conn.close_with(R_AUTH_CLOSE)

    def _on_starttls(self, ev: P.StartTls) -> None:
        self._flush()                         # the 220 goes out in clear
        self._spawn(self._starttls(), "STARTTLS")

    async def _starttls(self) -> None:
        assert self.conn is not None and self.ssl_ctx is not None
        try:
            self.transport = await self.loop.start_tls(self.transport, self, self.ssl_ctx,
                                                       server_side=True)
        except (OSError, ssl.SSLError, ConnectionError) as e:
            log.info("tls-failed", sid=self._sid, error=str(e))
            self._outcome = "tls-failed"
            self.conn.close_with(Reply(421, "4.7.0", "TLS negotiation failed"))
            self.transport.close()
            return
        self.conn.tls_started()
        self.transport.pause_reading()        # the new transport reads at once; "task" holds

    @property
    def _sid(self) -> str:
        return self.session.sid if self.session is not None else ""


_VERBS: dict[type, str] = {
    P.MailFrom: "MAIL", P.RcptTo: "RCPT", P.DataStart: "DATA", P.BdatStart: "BDAT",
    P.DataEnd: "DATA", P.BdatEnd: "BDAT", P.DataAborted: "DATA", P.AuthPlain: "AUTH",
    P.AuthLogin: "AUTH", P.StartTls: "STARTTLS", P.Rset: "RSET", P.Ehlo: "EHLO", P.Helo: "HELO",
    P.Quit: "QUIT",
}

_HANDLERS: dict[type, Any] = {
    P.MailFrom: SmtpSession._on_mail,
    P.RcptTo: SmtpSession._on_rcpt,
    P.DataStart: SmtpSession._on_data_start,
    P.BdatStart: SmtpSession._on_bdat_start,
    P.DataEnd: SmtpSession._on_data_end,
    P.BdatEnd: SmtpSession._on_bdat_end,
    P.DataAborted: SmtpSession._on_aborted,
    P.AuthPlain: SmtpSession._on_auth,
    P.AuthLogin: SmtpSession._on_auth,
    P.StartTls: SmtpSession._on_starttls,
    P.Rset: SmtpSession._reset,
    P.Ehlo: SmtpSession._reset,
    P.Helo: SmtpSession._reset,
    P.Quit: SmtpSession._reset,
}


async def start(relay: Relay, addrs: tuple[str, ...] | list[str], ssl_ctx: ssl.SSLContext | None = None,
                implicit_tls: bool = False) -> list[asyncio.Server]:
    """Listen on `addrs`; with implicit_tls the TLS handshake comes first (smtps style)."""
    counters = relay.smtp_stats
    return await create_servers(lambda: SmtpSession(relay, ssl_ctx, implicit_tls, counters),
                                addrs, "smtp.listen", ssl_ctx if implicit_tls else None)


def statistics(relay: Relay) -> SmtpStats:
    return relay.smtp_stats.statistics()
