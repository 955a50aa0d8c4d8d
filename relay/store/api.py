"""The store's interface: what the servers, the policy and the directory may use.

Every backend (relay/store/maildir/: Maildir + sqlite, the embedded default; a PostgreSQL
backend, issue 14) implements these Protocols; tests/test_store_conformance.py checks any
backend against them. Nothing above the store imports a backend module, a file path, a
Maildir flag letter or a Maildir base name.

Sync or async, per method (docs/decisions.md, "The store seam: sync or async"):

  * A method that may wait for the network is `async`: a PostgreSQL round trip costs
    0.1-1 ms, and a blocked event loop stalls every session of the process for that long.
    That covers every read or change of accounts, the mailbox index and the ledger, the
    reservation at RCPT, the commit, and body reads. The Maildir backend answers these from
    local sqlite and files without suspending (an `async def` that never awaits costs a
    coroutine, ~0.3 us, nothing next to the sqlite call), so its figures do not change.
  * A method called on the hot path of a byte stream, or from code that cannot wait, is sync
    and never blocks on the network: `Delivery.write()` (hands the chunk on, or copies it into
    a bounded buffer; `wait_writable()` is the async back-pressure, as with asyncio's
    `write()`/`drain()`), `Delivery.abort()` and `Ledger.release()` (a networked backend
    finishes them in the background; its recovery removes what a dead process left),
    `Body.fileno()`/`close()`, `ChangeFeed.subscribe()`.
  * `statistics()` and `Ledger.snapshot()` are sync, as everywhere in the relay: a backend
    answers them from figures it keeps current in memory (from its own changes, the change
    feed and a bounded-age refresh), never with a round trip per call.
  * Handles are made without I/O: `MessageStore.mailbox(address)` and
    `MessageStore.begin_delivery(envelope)` return at once; the first async call on them
    raises NoSuchAccount etc.

Messages are addressed by their UID inside a mailbox (every backend keeps IMAP UIDs anyway,
RFC 9051 2.3.1.1). Beyond that, identities are opaque strings chosen by the backend:
`MessageInfo.id` (stable for the message's life; POP3's UIDL) and `DeliveryReceipt.id` (the
"queued as" id of SMTP's 250 reply). Flags are the `Flag` enum; a backend may keep other
flags it finds (Maildir's "P"), which `set_flags` leaves alone.

Errors are the exceptions of relay.store.errors (re-exported here): StoreError (temporary:
451 4.3.0), StorageFull (452 4.3.1), StoreUnavailable (the backend cannot be reached: 4xx /
NO [UNAVAILABLE], the node recovers by itself), NoSuchAccount, NoSuchMessage, AccountExists,
AddressError, QuotaExceeded.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol, runtime_checkable

from relay.stats import HistogramSnapshot
from relay.store.address import normalize_address, normalize_domain
from relay.store.errors import (
    AccountExists,
    AddressError,
    KdfBusy,
    NoSuchAccount,
    NoSuchMessage,
    QuotaExceeded,
    StorageFull,
    StoreError,
    StoreUnavailable,
)

__all__ = [
    "Account", "AccountExists", "Accounts", "AddressError", "Body", "Change", "ChangeFeed",
    "ChangeKind", "Delivery", "DeliveryReceipt", "EXTEND_STEP", "Envelope", "Flag", "KdfBusy", "Ledger", "LedgerEntry",
    "LedgerStats", "Mailbox", "MailboxStats", "MessageInfo", "MessageStore", "NO_FLAGS", "NoSuchAccount",
    "NoSuchMessage", "QuotaExceeded", "Refusal", "Reservation", "StorageFull", "StoreError",
    "StoreStats", "StoreUnavailable", "Usage", "normalize_address", "normalize_domain",
]


# A delivery grows its reservations at least once per this many bytes written past them (the
# ledger sees a message without SIZE= as it streams; one that crosses a quota is stopped then,
# not after filling the disk). Backends may extend more often.
EXTEND_STEP = 4 * 1024 * 1024

# --- values ------------------------------------------------------------------------------------
class Flag(enum.Flag):
    """The IMAP system flags a message can carry (RFC 9051 2.3.2; \\Recent is not kept)."""
    SEEN = enum.auto()
    ANSWERED = enum.auto()
    FLAGGED = enum.auto()
    DELETED = enum.auto()
    DRAFT = enum.auto()


NO_FLAGS = Flag(0)


class MessageInfo(NamedTuple):
    """One message as listed. A NamedTuple: built 10,000 at a time per SELECT."""
    uid: int                  # IMAP UID, ascending in delivery order, never reused (per UIDVALIDITY)
    id: str                   # opaque and stable; equal ids mean the same bytes (copies of one
                              # delivery may share it), else unique in the store; printable
                              # ASCII without spaces, at most 70 chars (RFC 1939 UIDL)
    size: int                 # bytes of the stored message (trace headers included)
    internaldate: float       # Unix time of delivery
    flags: Flag


@dataclass(frozen=True)
class Account:
    address: str
    quota_bytes: int | None          # None = the config default
    quota_messages: int | None       # None = the config default; 0 = unlimited
    created: float
    has_password: bool = True


@dataclass(frozen=True)
class Usage:
    """An account's ledger, read from the authority (async): stored plus reserved."""
    bytes: int                     # stored and not yet expunged
    messages: int
    quota_bytes: int               # effective (override or default); 0 = unlimited
    quota_messages: int            # 0 = unlimited
    reserved_bytes: int = 0        # held for deliveries in flight (every node of the store)
    reserved_messages: int = 0

    def refusal(self, nbytes: int, nmessages: int = 1) -> Refusal | None:
        """Whether nbytes and nmessages more fit next to what is stored and reserved: the
        quota arithmetic, for every backend's ledger."""
        if self.quota_bytes and self.bytes + self.reserved_bytes + nbytes > self.quota_bytes:
            return Refusal.OVER_QUOTA_BYTES
        if (nmessages and self.quota_messages
                and self.messages + self.reserved_messages + nmessages > self.quota_messages):
            return Refusal.OVER_QUOTA_MESSAGES
        return None


@dataclass(frozen=True)
class Envelope:
    """What the delivery's trace headers (Return-Path, Received: RFC 5321 4.4) record."""
    sender: str                    # reverse path, "" for the null sender
    session_id: str = ""
    helo: str = ""
    peer: str | None = None        # client IP address
    protocol: str = "ESMTP"        # RFC 3848 with-protocol type


@dataclass(frozen=True)
class DeliveryReceipt:
    id: str                        # opaque, printable ASCII, no spaces: SMTP's "queued as"
    size: int                      # bytes stored per recipient (trace headers included)
    recipients: tuple[str, ...]    # normalised addresses, each holds one copy's UID now


class Refusal(enum.Enum):
    """Why add_recipient() did not take an address (no exception: RCPT's usual outcomes)."""
    NO_SUCH_ACCOUNT = "no-such-account"
    OVER_QUOTA_BYTES = "bytes"
    OVER_QUOTA_MESSAGES = "messages"


class ChangeKind(enum.Enum):
    NEW = "new"                    # messages arrived (a commit, or found by reconciliation)
    EXPUNGE = "expunge"            # messages left the mailbox (the drain rate)


@dataclass(frozen=True)
class Change:
    address: str
    kind: ChangeKind
    nbytes: int
    nmessages: int


# --- statistics -------------------------------------------------------------------------------
@dataclass(frozen=True)
class LedgerEntry:
    """One mailbox in the ledger. backlog = stored + streaming (what the policy paces on)."""
    stored_bytes: int
    stored_messages: int
    reserved_bytes: int            # held by open deliveries (declared size, grown while streaming)
    reserved_messages: int
    streaming_bytes: int           # of those, written so far (a networked backend: at least
                                   # as of its last extend)
    quota_bytes: int               # effective; 0 = unlimited
    quota_messages: int

    @property
    def backlog_bytes(self) -> int:
        return self.stored_bytes + self.streaming_bytes


@dataclass(frozen=True)
class LedgerStats:
    mailboxes: dict[str, LedgerEntry]
    reserved_bytes: int            # all mailboxes
    reservations: int              # open reservations (one per recipient of a delivery)
    refusals: dict[str, int] = field(default_factory=dict)   # "bytes"/"messages" -> count


@dataclass(frozen=True)
class MailboxStats:
    backlog_bytes: int             # undrained mail (the ledger)
    backlog_messages: int
    oldest_age_seconds: float      # age of the oldest message waiting; 0 when empty
    quota_bytes: int               # effective quota (override or default); 0 = none
    quota_messages: int            # 0 = none
    last_poll: float               # Unix time of the last IMAP/POP3 login; 0 = never


@dataclass(frozen=True)
class StoreStats:
    accounts: int
    messages_stored: int           # this process: deliveries, one per recipient
    stored_bytes: int
    messages_deleted: int          # this process: expunged (or removed behind the store's back)
    deleted_bytes: int
    backlog_bytes: int             # all mailboxes
    backlog_messages: int
    mailboxes: dict[str, MailboxStats]
    delivery_to_fetch_seconds: HistogramSnapshot    # relay.stats.WAIT_SECONDS buckets
    delivery_to_delete_seconds: HistogramSnapshot


# --- the Protocols ----------------------------------------------------------------------------
class Reservation(Protocol):
    """Bytes (and one message) held for one recipient of a delivery in flight."""
    @property
    def address(self) -> str: ...
    @property
    def nbytes(self) -> int: ...
    @property
    def open(self) -> bool: ...          # False once released or settled


@runtime_checkable
class Ledger(Protocol):
    """The single record of bytes stored and in flight per mailbox, and the quota arithmetic.

    reserve (RCPT: declared size, one message) -> extend (while streaming past it) ->
    settle (commit: in flight becomes stored, in the commit's transaction) | release (abort).
    Deliveries drive it; callers above the store read usage()/snapshot()/statistics()."""

    async def reserve(self, address: str, nbytes: int) -> Reservation:
        """Hold nbytes and one message; QuotaExceeded (holding nothing) if they do not fit
        next to what is stored and reserved; NoSuchAccount."""
        ...

    async def extend(self, reservation: Reservation, nbytes: int) -> None:
        """Hold nbytes more; QuotaExceeded (holding nothing more) if they do not fit."""
        ...

    def note_streamed(self, reservation: Reservation, nbytes: int) -> None:
        """nbytes more of the message were written (the backlog the policy paces on)."""
        ...

    def release(self, reservation: Reservation) -> None:
        """Give the bytes back (abort). Idempotent; never blocks."""
        ...

    def settle(self, reservation: Reservation) -> None:
        """The message is stored (its bytes were added to the stored figures by the commit):
        the reservation ends without giving anything back. Idempotent; never blocks."""
        ...

    async def usage(self, address: str) -> Usage:
        """The authority's figures (NoSuchAccount)."""
        ...

    def snapshot(self, address: str) -> LedgerEntry | None:
        """From memory, at most a second or so old; None for an address the ledger does not
        know (yet). Cheap: the policy calls it per chunk."""
        ...

    def statistics(self) -> LedgerStats: ...


@runtime_checkable
class Accounts(Protocol):
    async def add(self, address: str, password: str | None = None, quota_bytes: int | None = None,
                  quota_messages: int | None = None) -> Account:
        """AccountExists, AddressError. Hashes the password (argon2id) off the loop."""
        ...

    async def get(self, address: str) -> Account | None:
        """None also for a malformed address."""
        ...

    async def list(self) -> list[Account]:
        """Ordered by domain, then address."""
        ...

    async def delete(self, address: str) -> None:
        """The account and every message in it (NoSuchAccount)."""
        ...

    async def set_password(self, address: str, password: str | None) -> None:
        """None: the account only receives. Hashes off the loop."""
        ...

    async def set_quota(self, address: str, quota_bytes: int | None = None,
                        quota_messages: int | None = None) -> Account:
        """None leaves that one unchanged; 0 = unlimited."""
        ...

    async def verify(self, address: str, password: str) -> bool:
        """argon2 runs on an executor (and only when no recent success is cached); False for
        no account, no password, a wrong one; KdfBusy when too many checks wait already."""
        ...

    async def is_local_domain(self, domain: str) -> bool:
        """A domain with at least one account (an account added by another process counts
        at once): SMTP answers 550 5.1.1 for it, 550 5.7.1 (no relaying) otherwise."""
        ...


@runtime_checkable
class Body(Protocol):
    """A message's bytes, open for reading (a stable view: an expunge meanwhile does not cut
    it short). close() on every path; also a context manager."""

    @property
    def size(self) -> int: ...

    def fileno(self) -> int | None:
        """A file descriptor positioned nowhere in particular (use os.sendfile/os.pread with
        offsets), or None when the body is not a local file: then read() only."""
        ...

    async def read(self, offset: int, n: int) -> bytes:
        """Up to n bytes at offset; b"" at or past the end, or for n == 0."""
        ...

    def close(self) -> None: ...
    def __enter__(self) -> Body: ...
    def __exit__(self, *exc: object) -> None: ...


@runtime_checkable
class Mailbox(Protocol):
    """An account's INBOX. Made without I/O; NoSuchAccount from the first call on it."""

    @property
    def address(self) -> str: ...

    async def uidvalidity(self) -> int: ...

    async def uidnext(self) -> int: ...

    async def messages(self) -> list[MessageInfo]:
        """Every message, in UID order. Cheap to repeat while nothing changed."""
        ...

    async def info(self, uid: int) -> MessageInfo:
        """NoSuchMessage."""
        ...

    async def set_flags(self, uid: int, flags: Flag) -> MessageInfo:
        """Replace the message's system flags (others the backend keeps stay); NoSuchMessage."""
        ...

    async def expunge(self, uids: Iterable[int]) -> list[int]:
        """Delete these messages and settle the ledger; returns the UIDs that existed."""
        ...

    async def body(self, uid: int) -> Body:
        """NoSuchMessage."""
        ...

    async def note_fetched(self, uid: int) -> None:
        """A client read the whole message (the first time counts for delivery->fetch latency)."""
        ...

    async def note_poll(self) -> None:
        """IMAP/POP3 login: the last poll time (metrics, alerts)."""
        ...


@runtime_checkable
class Delivery(Protocol):
    """One message on its way into one or more mailboxes; stored once, one UID per recipient.

        d = store.begin_delivery(Envelope(...))
        await d.add_recipient(address, declared_size)   # RCPT: None, or a Refusal
        await d.start()                                 # DATA / first BDAT
        d.write(chunk) ...; if not d.writable: await d.wait_writable()
        receipt = await d.commit()                      # durable for every recipient: 250
        d.abort()                                       # every other outcome (idempotent)

    start() ends the recipients and writes the trace headers (they name the recipients):
    add_recipient() after it raises StoreError. A delivery abandoned by a
    dead process leaves nothing visible and no reservation after the backend's recovery."""

    @property
    def recipients(self) -> Sequence[str]: ...
    @property
    def size(self) -> int: ...           # bytes written so far (trace headers included)

    async def add_recipient(self, address: str, declared_size: int) -> Refusal | None:
        """Reserve declared_size bytes (0: unknown) and one message in the ledger for this
        account. None = taken (also for an address already taken); a Refusal otherwise.
        AddressError for a malformed address; StoreError when the store fails."""
        ...

    async def start(self) -> None:
        """The message follows: the backend gets ready to take its bytes and writes the trace
        headers. StoreError (StorageFull) when it cannot: SMTP answers DATA with 451/452
        instead of 354. A second call does nothing."""
        ...

    def write(self, chunk: bytes | bytearray | memoryview) -> None:
        """Append bytes (after start()). Never blocks on the network; the chunk may be reused by the caller
        as soon as this returns. StoreError (StorageFull, QuotaExceeded when the message has
        grown past a recipient's quota) for a failure known at once."""
        ...

    @property
    def writable(self) -> bool:
        """False when the caller should await wait_writable() before the next write()."""
        ...

    async def wait_writable(self) -> None:
        """Return once the backend can take more (its buffer has drained, the reservation
        has been extended); raises what write() would for a failure found meanwhile."""
        ...

    async def commit(self) -> DeliveryReceipt:
        """Make the message durable for every recipient, settle the ledger (growing the
        reservations to the final size first: QuotaExceeded), notify the change feed. Raises
        StoreError with nothing delivered; abort() then cleans up."""
        ...

    def abort(self) -> None:
        """Drop the message and release its reservations. Idempotent; a no-op once commit()
        has started (a commit in progress finishes: stored, never half-lost)."""
        ...


ChangeCallback = Callable[[Change], None]


@runtime_checkable
class ChangeFeed(Protocol):
    def subscribe(self, address: str | None, callback: ChangeCallback) -> Callable[[], None]:
        """callback(change) on the event loop after each durable change of the mailbox (by
        any process or node of the store, as soon as the backend learns of it); address None:
        of every mailbox (the policy's drain rates). Returns the function that unsubscribes.
        A callback must not raise (errors are logged)."""
        ...


@runtime_checkable
class MessageStore(Protocol):
    """The store. `async open()` once before use (recovery: a crashed delivery's residue and
    reservations are removed), `async close()` at the end."""

    @property
    def accounts(self) -> Accounts: ...
    @property
    def ledger(self) -> Ledger: ...
    @property
    def changes(self) -> ChangeFeed: ...

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    def mailbox(self, address: str) -> Mailbox:
        """No I/O. AddressError for a malformed address."""
        ...

    def begin_delivery(self, envelope: Envelope) -> Delivery:
        """No I/O: recipients come with add_recipient()."""
        ...

    def statistics(self) -> StoreStats: ...
