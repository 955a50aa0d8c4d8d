"""The store's exceptions. Each names what went wrong in words an operator can act on."""

from __future__ import annotations


class StoreError(Exception):
    """A store operation failed (I/O, database). Temporary: SMTP answers 451 4.3.0."""


class StoreUnavailable(StoreError):
    """The backend cannot be reached (a database node down, a failover in progress):
    temporary, SMTP answers 451 4.3.0, IMAP NO [UNAVAILABLE]; the node recovers by itself."""


class KdfBusy(StoreError):
    """Too many password checks waiting: answer "try again later" without checking."""


class StorageFull(StoreError):
    """The file system has no room (ENOSPC, EDQUOT): temporary, SMTP answers 452 4.3.1."""


def os_error(message: str, e: OSError) -> StoreError:
    """The StoreError for an OSError: StorageFull when the disk (or a disk quota) is full."""
    import errno
    cls = StorageFull if e.errno in (errno.ENOSPC, errno.EDQUOT) else StoreError
    return cls(f"{message}: {e.strerror}")


class AddressError(StoreError, ValueError):
    """A malformed e-mail address."""


class AccountExists(StoreError):
    """`accounts.add` of an address that already has an account."""


class NoSuchAccount(StoreError):
    """An operation on an address without an account."""


class NoSuchMessage(StoreError, KeyError):
    """A UID that is not (or no longer) in the mailbox."""


class QuotaExceeded(StoreError):
    """A reservation would take a recipient over its byte or message quota (452 4.2.2)."""

    def __init__(self, address: str, reason: str) -> None:
        super().__init__(f"{address}: over quota ({reason})")
        self.address = address
        self.reason = reason          # "bytes" | "messages"
