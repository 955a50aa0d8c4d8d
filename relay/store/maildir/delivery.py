"""Two-phase delivery: begin -> write chunks -> commit (or abort).

The message is written once, into the first recipient's tmp/ (O_EXCL), after the trace
headers. commit() fsyncs it (in a thread), hard-links it into every recipient's new/,
fsyncs those directories, removes the tmp name, and then records the index rows and the
ledger in one sqlite transaction. Only then is the message accepted (250).
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from relay.log import get_logger
from relay.store.address import normalize_address
from relay.store.api import EXTEND_STEP, ChangeKind, DeliveryReceipt, Envelope, Refusal
from relay.store.errors import QuotaExceeded, StoreError, os_error
from relay.store.maildir import names
from relay.store.trace import trace_headers

if TYPE_CHECKING:
    from relay.store.maildir.core import Store
    from relay.store.maildir.ledger import Held

log = get_logger("store")

# tmp/ files of deliveries in progress in this process: recover() must not remove them.
LIVE_TMP: set[str] = set()

# A message that grows past its reservation (no SIZE=, or more than declared) extends the
# reservation of every recipient as it streams, once per EXTEND_STEP (relay.store.api).
RESERVE_STEP = EXTEND_STEP


class Delivery:
    """One message on its way into the store (relay.store.api.Delivery). Not thread-safe;
    used from the event loop. Recipients first (each reserves in the ledger), then the
    trace headers and the message into the first recipient's tmp/ (created at the first
    write), then commit() or abort()."""

    def __init__(self, store: Store, envelope: Envelope) -> None:
        self.store = store
        self.envelope = envelope
        self.recipients: list[str] = []
        self.maildirs: list[Path] = []
        self.unique = names.unique_name(store.config.hostname)
        self.tmp_path: Path | None = None
        self.size = 0                 # bytes written, trace headers included
        self.name: str | None = None  # the Maildir base name, once committed
        self._held: list[Held] = []
        self._declared = 0            # bytes each reservation holds for the message proper
        self._header_len = 0
        self._state = "open"          # open -> committing -> committed | aborted
        self._fd = -1

    # --- recipients ----------------------------------------------------------------------------
    async def add_recipient(self, address: str, declared_size: int) -> Refusal | None:
        return self.add(address, declared_size)

    def add(self, address: str, declared_size: int, reserve: bool = True) -> Refusal | None:
        """add_recipient() without suspending; reserve=False: no reservation (the legacy
        begin_delivery() of the admin tools and tests)."""
        addr = normalize_address(address)
        if self._state != "open" or self._fd >= 0:
            raise StoreError("recipients come before the message")
        if addr in self.recipients:
            return None
        if not self.store.accounts.exists(addr):
            return Refusal.NO_SUCH_ACCOUNT
        if reserve:
            try:
                held = self.store.ledger.reserve(addr, declared_size)
            except QuotaExceeded as e:
                return Refusal(e.reason)
            self._held.append(held)
            self._declared = max(self._declared, held.nbytes)
        self.recipients.append(addr)
        return None

    def _open(self) -> None:
        """The tmp file (O_EXCL) in the first recipient's Maildir, with the trace headers."""
        if not self.recipients:
            raise StoreError("a delivery needs at least one recipient")
        self.maildirs = [self.store.accounts.maildir(r) for r in self.recipients]
        path = self.maildirs[0] / "tmp" / self.unique
        try:
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as e:
            self.abort()              # nothing of ours to remove (the name may be another's)
            raise os_error(f"{path}: cannot create", e) from e
        self.tmp_path = path
        LIVE_TMP.add(str(path))
        env = self.envelope
        header = trace_headers(env.sender, self.recipients, self.store.config.hostname,
                               env.session_id, env.helo, env.peer, env.protocol)
        try:
            self._write(header)
        except StoreError:
            self.abort()
            raise
        self._header_len = len(header)

    # --- the message ---------------------------------------------------------------------------
    async def start(self) -> None:
        if self._fd < 0:
            if self._state != "open":
                raise StoreError(f"start on a delivery that is {self._state}")
            self._open()

    def write(self, chunk: bytes | bytearray | memoryview) -> None:
        """Append bytes (synchronous os.write; short writes are continued). QuotaExceeded
        when the message grows past a recipient's quota (checked every RESERVE_STEP)."""
        if self._fd < 0 and self._state == "open":
            self._open()
        n = self._write(chunk)
        for h in self._held:
            self.store.ledger.note_streamed(h, n)
        if self._held and self.size - self._header_len >= self._declared + RESERVE_STEP:
            self._extend_to(self.size - self._header_len)

    @property
    def writable(self) -> bool:
        return True                   # write() has written everything already

    async def wait_writable(self) -> None:
        return None

    def _write(self, chunk: bytes | bytearray | memoryview) -> int:
        if self._state != "open":
            raise StoreError(f"write on a delivery that is {self._state}")
        view = memoryview(chunk).cast("B") if not isinstance(chunk, bytes) else memoryview(chunk)
        total = len(view)
        try:
            while view:
                n = os.write(self._fd, view)
                view = view[n:]
                self.size += n
        except OSError as e:
            raise os_error(f"{self.tmp_path}: write failed", e) from e
        return total

    def _extend_to(self, nbytes: int) -> None:
        """Grow every reservation to nbytes; QuotaExceeded (naming the recipient) if one does
        not fit."""
        for h in self._held:
            self.store.ledger.extend(h, nbytes - h.nbytes)
        self._declared = max(self._declared, nbytes)

    def _publish(self, name: str) -> list[tuple[int, int]]:
        """In a thread: fsync, link into every new/, fsync dirs, drop the tmp name.
        Returns (new/ mtime before, after) per recipient."""
        assert self.tmp_path is not None
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd = -1
        mtimes: list[tuple[int, int]] = []
        linked: list[Path] = []
        try:
            for md in self.maildirs:
                before = os.stat(md / "new").st_mtime_ns
                target = md / "new" / name
                os.link(self.tmp_path, target)
                linked.append(target)
                mtimes.append((before, os.stat(md / "new").st_mtime_ns))
            for md in dict.fromkeys(self.maildirs):
                names.fsync_dir(md / "new")
        except OSError:
            for p in linked:
                try:
                    os.unlink(p)
                except OSError:
                    pass
            raise
        try:
            os.unlink(self.tmp_path)
            names.fsync_dir(self.tmp_path.parent)
        except OSError as e:   # the message is safe in new/; recover() removes a stale tmp name
            log.warning("tmp-unlink-failed", path=str(self.tmp_path), error=e.strerror)
        return mtimes

    def _unpublish(self, name: str) -> None:
        for md in self.maildirs:
            try:
                os.unlink(md / "new" / name)
            except OSError:
                pass

    async def commit(self) -> DeliveryReceipt:
        """Make the message durable for every recipient and settle the ledger; returns the
        receipt (its id: the Maildir unique name). Raises StoreError (nothing delivered; also
        QuotaExceeded when the message outgrew a quota) on failure; abort() then cleans up."""
        if self._state != "open":
            raise StoreError(f"commit on a delivery that is {self._state}")
        if self._fd < 0:
            self._open()
        if self._held and self.size - self._header_len > self._declared:
            self._extend_to(self.size - self._header_len)
        self._state = "committing"
        name = f"{self.unique},S={self.size}"
        self.store._pending.add(name)
        try:
            try:
                mtimes = await asyncio.to_thread(self._publish, name)
            except OSError as e:
                self._state = "open"     # abort() removes the tmp file
                raise os_error(f"{self.tmp_path}: cannot commit", e) from e
            LIVE_TMP.discard(str(self.tmp_path))
            try:
                self.store._index_new(self.recipients, name, self.size, time.time(), mtimes)
            except BaseException:
                self._unpublish(name)
                self._state = "aborted"
                self._release()
                raise
        finally:
            self.store._pending.discard(name)
        self._state = "committed"
        self.name = name
        for h in self._held:          # in flight -> stored, before anyone is told
            self.store.ledger.settle(h)
        for r in self.recipients:
            self.store._notify(r, ChangeKind.NEW, self.size, 1)
        return DeliveryReceipt(self.unique, self.size, tuple(self.recipients))

    def _release(self) -> None:
        for h in self._held:
            self.store.ledger.release(h)

    def abort(self) -> None:
        """Remove the tmp file. Idempotent; a no-op once commit() has started (a commit in
        progress finishes: the message is then stored, never half-lost)."""
        if self._state != "open":
            return
        self._state = "aborted"
        self._release()
        if self._fd >= 0:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = -1
        if self.tmp_path is None:
            return
        try:
            os.unlink(self.tmp_path)
        except FileNotFoundError:
            pass
        except OSError as e:
            log.warning("tmp-unlink-failed", path=str(self.tmp_path), error=e.strerror)
        LIVE_TMP.discard(str(self.tmp_path))

    def __del__(self) -> None:
        if getattr(self, "_state", None) == "open":
            self.abort()
