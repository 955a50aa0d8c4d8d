"""Versioned schema migrations: numbered SQL files in migrations/ (package data), applied at
open under an advisory lock, so that two nodes starting together apply each one once."""

from __future__ import annotations

import re
from importlib import resources

import psycopg

from relay.log import get_logger

log = get_logger("store.postgresql")

# pg_advisory_lock key: any constant unique to this application ("relay" in ASCII).
MIGRATION_LOCK = 0x72656C6179
_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")


def migrations() -> list[tuple[int, str, str]]:
    """(version, file name, SQL) in version order."""
    found = []
    for entry in resources.files("relay.store.postgresql").joinpath("migrations").iterdir():
        m = _NAME.match(entry.name)
        if m:
            found.append((int(m.group(1)), entry.name, entry.read_text(encoding="utf-8")))
    found.sort()
    versions = [v for v, _, _ in found]
    if versions != list(range(1, len(found) + 1)):
        raise RuntimeError(f"relay.store.postgresql migrations are not numbered 1..n: {versions}")
    return found


def latest_version() -> int:
    return len(migrations())


async def migrate(conn: psycopg.AsyncConnection[tuple[object, ...]]) -> list[int]:
    """Bring the schema up to date; the versions applied now (empty when it was current).
    `conn` is in autocommit mode; each migration runs in its own transaction."""
    applied_now = []
    await conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK,))
    try:
        await conn.execute("CREATE TABLE IF NOT EXISTS schema_version ("
                           " version integer PRIMARY KEY, name text NOT NULL,"
                           " applied timestamptz NOT NULL DEFAULT now())")
        cur = await conn.execute("SELECT version FROM schema_version")
        have = {int(str(r[0])) for r in await cur.fetchall()}
        todo = migrations()
        if have and max(have) > len(todo):
            raise RuntimeError(f"the database's schema is version {max(have)}, newer than this relay "
                               f"knows ({len(todo)}): upgrade the relay on this node")
        for version, name, sql in todo:
            if version in have:
                continue
            async with conn.transaction():
                await conn.execute(sql.encode())     # bytes: no %-placeholder parsing
                await conn.execute("INSERT INTO schema_version (version, name) VALUES (%s, %s)",
                                   (version, name))
            log.info("schema-migrated", version=version, name=name)
            applied_now.append(version)
    finally:
        await conn.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK,))
    return applied_now
