"""Which store backend serves a relay: the one place that names the backends' modules."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable

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


# --- admin commands (relay/store/cli.py): what differs between backends ----------------------

@contextlib.asynccontextmanager
async def admin_store(config: Config) -> AsyncIterator[MessageStore]:
    """The configured store for one admin command. Maildir's open() is the server's crash
    recovery (it rescans every mailbox): an admin command does not run it, the engine works
    as constructed. Other backends open as a node does."""
    store = open_store(config)
    if config.store.backend != "maildir":
        await store.open()
    try:
        yield store
    finally:
        await store.close()


async def never_fetched(store: MessageStore, address: str) -> int:
    """Messages of the mailbox that no client has read whole yet."""
    from relay.store.maildir.backend import MaildirStore
    if isinstance(store, MaildirStore):
        row = store.engine.db.one("SELECT COUNT(*) FROM messages WHERE address=? AND first_fetch IS NULL",
                                  (address,))
        return int(row[0]) if row else 0
    from relay.store.postgresql.store import PgStore
    assert isinstance(store, PgStore)
    return await store.never_fetched(address)


async def recalc(store: MessageStore, address: str | None) -> list[tuple[str, tuple[int, int], tuple[int, int]]]:
    """Rebuild the ledger from the stored messages (Maildir: the index from the Maildirs
    first): (address, (bytes, messages) before, after) for each account that changed."""
    from relay.store.maildir.backend import MaildirStore
    if isinstance(store, MaildirStore):
        from relay.store.maildir import admin
        return admin.recalc(store.engine, address)
    from relay.store.postgresql.store import PgStore
    assert isinstance(store, PgStore)
    return await store.recalc(address)
