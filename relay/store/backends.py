"""Which store backend serves a relay: the one place that names the backends' modules."""

from __future__ import annotations

from collections.abc import Callable

from relay.config import Config
from relay.store.api import MessageStore
from relay.store.errors import StoreError


def _maildir(config: Config) -> MessageStore:
    from relay.store.maildir.backend import MaildirStore
    return MaildirStore(config)


# name -> constructor (no network I/O in it: `await store.open()` connects and recovers)
BACKENDS: dict[str, Callable[[Config], MessageStore]] = {"maildir": _maildir}
DEFAULT_BACKEND = "maildir"


def open_store(config: Config, backend: str = DEFAULT_BACKEND) -> MessageStore:
    """The store for this configuration; `await store.open()` before use."""
    make = BACKENDS.get(backend)
    if make is None:
        raise StoreError(f"unknown store backend {backend!r} (known: {', '.join(sorted(BACKENDS))})")
    return make(config)
