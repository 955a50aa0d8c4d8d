"""Repair of the Maildir backend: its admin interface, not part of relay.store.api.

- recover(store): at start-up (MaildirStore.open()): remove tmp/ files of dead processes (and
  any older than 36 h), reconcile every mailbox with its Maildir, rebuild a ledger that
  disagrees with the index.
- recalc(store, address=None): `relay quota recalc`: reconcile and rebuild the ledger, safe
  while the server runs.
- reconcile(store, address): one mailbox's index made to match its Maildir (the engine also
  does this by itself when new/ or cur/ changed behind its back).
"""

from __future__ import annotations

import os
import time

from relay.log import get_logger
from relay.store.maildir import names
from relay.store.maildir.core import Store
from relay.store.maildir.delivery import LIVE_TMP
from relay.store.maildir.mailbox import Mailbox

log = get_logger("store")

STALE_TMP_SECONDS = 36 * 3600     # Maildir convention: tmp/ files older than 36 h are garbage


def reconcile(store: Store, address: str) -> tuple[int, int]:
    """(messages added, messages removed) to the index of that mailbox."""
    return store.mailbox(address).reconcile()


def recalc(store: Store, address: str | None = None) -> list[tuple[str, tuple[int, int], tuple[int, int]]]:
    """Rebuild index and ledger from the Maildir (one account, or all). Safe while the
    server runs. Returns (address, (bytes, messages) before, after) for every account
    whose ledger changed."""
    addrs = [store.accounts.require(address)] if address else [a.address for a in store.accounts.list()]
    changed = []
    for addr in addrs:
        before = store.db.one("SELECT usage_bytes, usage_messages FROM accounts WHERE address=?", (addr,))
        if before is None:
            continue
        Mailbox(store, addr).reconcile()
        with store.db.transaction() as c:
            now = c.execute("SELECT usage_bytes, usage_messages FROM accounts WHERE address=?", (addr,)).fetchone()
            total = c.execute("SELECT COALESCE(SUM(size), 0), COUNT(*) FROM messages WHERE address=?",
                              (addr,)).fetchone()
            if (now[0], now[1]) != (total[0], total[1]):
                c.execute("UPDATE accounts SET usage_bytes=?, usage_messages=? WHERE address=?",
                          (total[0], total[1], addr))
        old, new = (before[0], before[1]), (total[0], total[1])
        if old != new:
            changed.append((addr, old, new))
    return changed


def recover(store: Store) -> None:
    """Once at server start-up: remove tmp/ files left by a crash (a dead process's, or
    older than 36 h); reconcile every mailbox's index with its Maildir and rebuild a
    ledger that disagrees with the index."""
    removed = 0
    now = time.time()
    me = os.getpid()
    for row in store.db.query("SELECT address FROM accounts"):
        tmp = store.accounts.maildir(row["address"]) / "tmp"
        try:
            entries = list(os.scandir(tmp))
        except FileNotFoundError:
            names.create(tmp.parent)
            continue
        for e in entries:
            if not e.is_file(follow_symlinks=False) or e.path in LIVE_TMP:
                continue
            pid = names.pid_of(e.name)
            try:
                stale = now - e.stat(follow_symlinks=False).st_mtime > STALE_TMP_SECONDS
            except FileNotFoundError:
                continue
            if stale or pid is None or pid == me or not _alive(pid):
                try:
                    os.unlink(e.path)
                    removed += 1
                except FileNotFoundError:
                    pass
    if removed:
        log.info("recover-tmp", removed=removed)
    for addr, old, new in recalc(store):
        log.warning("ledger-rebuilt", mailbox=addr, bytes_before=old[0], messages_before=old[1],
                    bytes=new[0], messages=new[1])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
