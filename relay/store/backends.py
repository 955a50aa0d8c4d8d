"""Which store backend serves a relay: the one place that names the backends' modules."""

from __future__ import annotations

from collections.abc import Callable

from relay.config import Config
from relay.store.api import MessageStore
from relay.store.errors import StoreError


def _maildir(config: Config) -> MessageStore:
    from relay.store.maildir.backend import MaildirStore
    return MaildirStore(config)


def _postgresql(config: Config) -> MessageStore:
    from relay.store.postgresql.store import PgStore
    return PgStore(config)


# name -> constructor (no network I/O in it: `await store.open()` connects and recovers)
BACKENDS: dict[str, Callable[[Config], MessageStore]] = {"maildir": _maildir, "postgresql": _postgresql}
DEFAULT_BACKEND = "maildir"


def open_store(config: Config, backend: str | None = None) -> MessageStore:
    """The store for this configuration ([store] backend unless named); `await store.open()`
    before use."""
    backend = backend or config.store.backend or DEFAULT_BACKEND
    make = BACKENDS.get(backend)
    if make is None:
        raise StoreError(f"unknown store backend {backend!r} (known: {', '.join(sorted(BACKENDS))})")
    return make(config)
