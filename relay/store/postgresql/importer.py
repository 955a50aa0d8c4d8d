"""Copy a store into PostgreSQL: `relay store migrate --to postgresql --dsn DSN` (docs/cluster.md).

An admin extension of this backend, not part of relay.store.api: it writes what a delivery
never writes itself (a password hash as it is, the source's UIDVALIDITY and UIDs, flags,
internal dates and message ids, so that IMAP caches and POP3 UIDLs stay valid). The source is
any relay.store.api.MessageStore, read through the api only; its password hashes come from
a callable (the Maildir backend keeps them in relay.db). A message stored once for several
recipients (Maildir hard links: the same fileno inode) is stored once here too.

Safe to run again after an interruption: accounts and messages already copied are skipped.
Run it with the relay stopped (or its SMTP listener closed), then switch [store] backend.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from relay.store.api import Account, Body, MessageInfo, MessageStore
from relay.store.errors import StoreError
from relay.store.postgresql.store import PgStore

READ_STEP = 1 << 20           # bytes read from the source per call (one body chunk)


@dataclass
class ImportReport:
    accounts: int = 0              # created in PostgreSQL
    accounts_skipped: int = 0      # there already
    messages: int = 0              # copied
    messages_skipped: int = 0      # there already (same UID)
    bodies: int = 0                # stored (fewer than messages when recipients shared one)
    bytes: int = 0                 # bytes of those bodies
    seconds: float = 0.0


def maildir_hashes(data_dir: Path) -> Callable[[str], str | None]:
    """The Maildir backend's password hashes (relay.db, read-only)."""
    db = sqlite3.connect(f"file:{data_dir / 'relay.db'}?mode=ro", uri=True)

    def get(address: str) -> str | None:
        row = db.execute("SELECT password FROM accounts WHERE address = ?", (address,)).fetchone()
        return None if row is None or row[0] is None else str(row[0])
    return get


async def _ensure_account(dst: PgStore, acc: Account, pw_hash: str | None, uidvalidity: int) -> bool:
    """Create the account as it was (hash, quotas, UIDVALIDITY); False if it exists."""
    async with dst._conn() as conn:
        cur = await conn.execute(
            "INSERT INTO accounts (address, domain, password_hash, quota_bytes, quota_messages, created,"
            " uidvalidity) VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT (address) DO NOTHING RETURNING 1",
            (acc.address, acc.address.rsplit("@", 1)[1], pw_hash, acc.quota_bytes, acc.quota_messages,
             acc.created, uidvalidity))
        return await cur.fetchone() is not None


def _identity(body: Body) -> object:
    """The stored file behind a body (equal for Maildir hard links), None when not a file."""
    fd = body.fileno()
    if fd is None:
        return None
    st = os.fstat(fd)
    return (st.st_dev, st.st_ino)


async def _copy_body(dst: PgStore, body: Body, what: str) -> int:
    """Stream one message body into a new sealed body; its id."""
    async with dst._conn() as conn:
        bid = await dst.bodies.new(conn, dst.node_id)
    cs = dst.bodies.chunk_size
    off = seq = 0
    while off < body.size or seq == 0:
        data = await body.read(off, min(cs, body.size - off))
        if not data and body.size:
            raise StoreError(f"{what}: the source ended at {off} of {body.size} bytes")
        async with dst._conn() as conn:
            await dst.bodies.put(conn, bid, seq, data)
        off += len(data)
        seq += 1
    async with dst._conn() as conn, conn.transaction():
        if not await dst.bodies.seal(conn, bid, body.size):
            raise StoreError(f"{what}: the copy is incomplete")
    return bid


async def _add_message(dst: PgStore, address: str, info: MessageInfo, body: int) -> None:
    async with dst._conn() as conn, conn.transaction():
        await conn.execute("INSERT INTO messages (address, uid, body, size, internaldate, flags, ext_id)"
                           " VALUES (%s, %s, %s, %s, %s, %s, %s)",
                           (address, info.uid, body, info.size, info.internaldate, info.flags.value, info.id))
        await conn.execute("UPDATE accounts SET usage_bytes = usage_bytes + %s, usage_messages = usage_messages + 1,"
                           " uidnext = GREATEST(uidnext, %s), modseq = modseq + 1 WHERE address = %s",
                           (info.size, info.uid + 1, address))


async def import_store(src: MessageStore, dst: PgStore, hashes: Callable[[str], str | None],
                       progress: Callable[[str], None] = lambda line: None) -> ImportReport:
    """Copy every account and message of `src` (opened) into `dst` (opened)."""
    report = ImportReport()
    t0 = time.monotonic()
    shared: dict[object, int] = {}          # source inode -> body id (one copy per message)
    for acc in await src.accounts.list():
        mb = src.mailbox(acc.address)
        uidvalidity, uidnext = await mb.uidvalidity(), await mb.uidnext()
        if await _ensure_account(dst, acc, hashes(acc.address), uidvalidity):
            report.accounts += 1
        else:
            report.accounts_skipped += 1
        have = {m.uid for m in await dst.mailbox(acc.address).messages()}
        copied = 0
        for info in await mb.messages():
            if info.uid in have:
                report.messages_skipped += 1
                continue
            with await mb.body(info.uid) as body:
                ident = _identity(body)
                if ident is not None and ident in shared:
                    bid = shared[ident]
                else:
                    bid = await _copy_body(dst, body, f"{acc.address} UID {info.uid}")
                    if ident is not None:
                        shared[ident] = bid
                    report.bodies += 1
                    report.bytes += info.size
            await _add_message(dst, acc.address, info, bid)
            report.messages += 1
            copied += 1
        async with dst._conn() as conn:
            await conn.execute("UPDATE accounts SET uidnext = GREATEST(uidnext, %s) WHERE address = %s",
                               (uidnext, acc.address))
        progress(f"{acc.address}: {copied} messages copied")
    report.seconds = time.monotonic() - t0
    return report
