"""Two-phase delivery: begin -> write chunks -> commit (or abort).

The message is written once, into the first recipient's tmp/ (O_EXCL), after the trace
headers. commit() fsyncs it (in a thread), hard-links it into every recipient's new/,
fsyncs those directories, removes the tmp name, and then records the index rows and the
ledger in one sqlite transaction. Only then is the message accepted (250).
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from datetime import UTC, datetime
from email.utils import format_datetime
from pathlib import Path
from typing import TYPE_CHECKING

from relay.log import get_logger
from relay.store import maildir
from relay.store.errors import StoreError, os_error

if TYPE_CHECKING:
    from relay.store.core import Store

log = get_logger("store")

# tmp/ files of deliveries in progress in this process: recover() must not remove them.
LIVE_TMP: set[str] = set()

_UNSAFE = re.compile(r"[\x00-\x1f\x7f]")


def _clean(value: str) -> str:
    """Trace header fields come from the client: no CR, LF or other controls."""
    return _UNSAFE.sub("?", value)


def _peer_literal(peer: str | None) -> str:
    if not peer:
        return "unknown"
    if ":" in peer:
        return f"[IPv6:{_clean(peer)}]"
    return f"[{_clean(peer)}]"


def trace_headers(sender: str, recipients: list[str], hostname: str, session_id: str,
                  helo: str, peer: str | None, protocol: str, when: float | None = None) -> bytes:
    """Return-Path and Received (RFC 5321 4.4), CRLF line ends, folded."""
    date = format_datetime(datetime.fromtimestamp(time.time() if when is None else when, UTC))
    lines = [f"Return-Path: <{_clean(sender)}>",
             f"Received: from {_clean(helo) or 'unknown'} ({_peer_literal(peer)})",
             f"\tby {hostname} (relay) with {_clean(protocol)} id {_clean(session_id)}"]
    if len(recipients) == 1:
        lines.append(f"\tfor <{recipients[0]}>; {date}")
    else:
        lines[-1] += ";"
        lines.append(f"\t{date}")
    return ("\r\n".join(lines) + "\r\n").encode("utf-8", "replace")


class Delivery:
    """One message on its way into the store. Not thread-safe; used from the event loop."""

    def __init__(self, store: Store, sender: str, recipients: list[str], header: bytes) -> None:
        self.store = store
        self.sender = sender
        self.recipients = recipients
        self.maildirs = [store.accounts.maildir(r) for r in recipients]
        self.unique = maildir.unique_name(store.config.hostname)
        self.tmp_path = self.maildirs[0] / "tmp" / self.unique
        self.size = 0
        self.name: str | None = None
        self._state = "open"          # open -> committing -> committed | aborted
        self._fd = -1
        try:
            self._fd = os.open(self.tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as e:
            self._state = "aborted"   # nothing of ours to remove (the name may be another's)
            raise os_error(f"{self.tmp_path}: cannot create", e) from e
        LIVE_TMP.add(str(self.tmp_path))
        try:
            self.write(header)
        except StoreError:
            self.abort()
            raise

    def write(self, chunk: bytes | bytearray | memoryview) -> None:
        """Append bytes (synchronous os.write; short writes are continued)."""
        if self._state != "open":
            raise StoreError(f"write on a delivery that is {self._state}")
        view = memoryview(chunk).cast("B") if not isinstance(chunk, bytes) else memoryview(chunk)
        try:
            while view:
                n = os.write(self._fd, view)
                view = view[n:]
                self.size += n
        except OSError as e:
            raise os_error(f"{self.tmp_path}: write failed", e) from e

    def _publish(self, name: str) -> list[tuple[int, int]]:
        """In a thread: fsync, link into every new/, fsync dirs, drop the tmp name.
        Returns (new/ mtime before, after) per recipient."""
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
                maildir.fsync_dir(md / "new")
        except OSError:
            for p in linked:
                try:
                    os.unlink(p)
                except OSError:
                    pass
            raise
        try:
            os.unlink(self.tmp_path)
            maildir.fsync_dir(self.tmp_path.parent)
        except OSError as e:   # the message is safe in new/; recover() removes a stale tmp name
            log.warning("tmp-unlink-failed", path=str(self.tmp_path), error=e.strerror)
        return mtimes

    def _unpublish(self, name: str) -> None:
        for md in self.maildirs:
            try:
                os.unlink(md / "new" / name)
            except OSError:
                pass

    async def commit(self) -> str:
        """Make the message durable for every recipient; returns its Maildir base name.
        Raises StoreError (nothing delivered) on failure; abort() then cleans up."""
        if self._state != "open":
            raise StoreError(f"commit on a delivery that is {self._state}")
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
                raise
        finally:
            self.store._pending.discard(name)
        self._state = "committed"
        self.name = name
        for r in self.recipients:
            self.store._notify(r, "new", self.size, 1)
        return name

    def abort(self) -> None:
        """Remove the tmp file. Idempotent; a no-op once commit() has started (a commit in
        progress finishes: the message is then stored, never half-lost)."""
        if self._state != "open":
            return
        self._state = "aborted"
        if self._fd >= 0:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = -1
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
