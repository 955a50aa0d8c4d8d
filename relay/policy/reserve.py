"""Disk reserve: room kept for deletions, so that receivers can drain a full disk (issue 12).

When another writer fills the file system to 100 %, the relay must still let receivers log in,
EXPUNGE, DELE and QUIT: that is what frees space. Deleting a message file needs no space, but
its index and ledger rows are removed in a sqlite transaction, and the write-ahead log may
have to grow for it (SQLITE_FULL otherwise). So a file of `[backpressure] disk_reserve` bytes
(default 8 MiB, blocks really allocated) is kept at <data_dir>/run/disk-reserve:

- before a deletion (IMAP EXPUNGE/CLOSE, POP3 QUIT) `before_deletion()` removes it when less
  than its size is free, and the deletion commits in the room it leaves;
- when a command fails with "disk full" anyway, `release_for(error)` removes it and the server
  retries that command once;
- once free space is back above min_free_disk plus the reserve, the next deletion re-creates it.

Bookkeeping writes (last poll, first fetch) are best effort: their failure is logged, the
login or fetch goes on. Chosen over keeping free pages inside sqlite (a large WAL or
`PRAGMA journal_size_limit`): a plain file works the same for every sqlite state and every
file system, and an operator sees it and can remove it by hand.
"""

from __future__ import annotations

import errno
import os
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from relay.log import get_logger

log = get_logger("policy")

RESERVE_FILE = "run/disk-reserve"


@dataclass(frozen=True)
class ReserveStats:
    size: int              # configured bytes (0 = no reserve)
    reserved_bytes: int    # size while the file exists, else 0
    releases: int          # times it was removed to let a deletion through


def is_disk_full(e: BaseException) -> bool:
    """An error (or its cause) that says the file system or a disk quota is full."""
    seen: BaseException | None = e
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if isinstance(seen, sqlite3.Error) and getattr(seen, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
            return True
        seen = seen.__cause__
    return False


class DiskReserve:
    def __init__(self, data_dir: Path, size: int, keep_free: int,
                 free_disk: Callable[[], int]) -> None:
        self.path = Path(data_dir) / RESERVE_FILE
        self.size = size
        self.keep_free = keep_free
        self.free_disk = free_disk
        self.releases = 0

    def create(self, need_free: int) -> bool:
        """Allocate the reserve when it is missing and `need_free` bytes are free besides."""
        if not self.size or self.path.exists():
            return False
        try:
            if self.free_disk() < need_free + self.size:
                return False
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError:
            return False
        try:
            os.posix_fallocate(fd, 0, self.size)
        except OSError as e:
            os.close(fd)
            self.path.unlink(missing_ok=True)
            log.warning("disk-reserve-failed", path=str(self.path), error=e.strerror)
            return False
        os.close(fd)
        return True

    def start(self) -> None:
        """At startup: a reserve when there is room for it twice."""
        self.create(self.size)

    def release(self, why: str) -> bool:
        """Remove the reserve; False when there was none."""
        try:
            self.path.unlink()
        except FileNotFoundError:
            return False
        except OSError as e:
            log.warning("disk-reserve-failed", path=str(self.path), error=e.strerror)
            return False
        self.releases += 1
        log.warning("disk-reserve-released", path=str(self.path), size=self.size, reason=why)
        return True

    def before_deletion(self) -> None:
        """Make room for the deletion about to run, or re-create the reserve when the
        disk has room again."""
        if not self.size:
            return
        try:
            free = self.free_disk()
        except OSError:
            return
        if free < self.size:
            self.release("disk nearly full before a deletion")
        else:
            self.create(self.keep_free)

    def release_for(self, e: BaseException) -> bool:
        """A command failed: True when it failed for a full disk and the reserve was
        removed now (the caller retries once)."""
        return is_disk_full(e) and self.release("disk full")

    def statistics(self) -> ReserveStats:
        return ReserveStats(self.size, self.size if self.path.exists() else 0, self.releases)
