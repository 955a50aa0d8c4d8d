"""The store backends the conformance suite (tests/test_store_conformance.py) runs against.

A backend joins with one entry in BACKENDS: how to make a Config for it in a fresh directory,
what a crashed delivery may leave behind that its recovery must remove, and how to tell two
bodies are one stored copy. The suite opens `relay.store.backends.open_store(config, name)`
and `await store.open()`, and uses nothing but relay.store.api after that.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from conftest import make_config

from relay.config import Config
from relay.store.api import Body


def _fd_identity(body: Body) -> object:
    fd = body.fileno()
    assert fd is not None
    st = os.fstat(fd)
    return (st.st_dev, st.st_ino)


@dataclass(frozen=True)
class StoreBackend:
    name: str                                              # relay.store.backends.BACKENDS key
    config: Callable[[Path, dict[str, Any]], Config]        # (fresh directory, sections) -> Config
    leftovers: Callable[[Config], list[str]]               # a crash's residue (recovery removes it)
    body_identity: Callable[[Body], object] = _fd_identity  # equal for one stored copy
    skip: Callable[[], str | None] = lambda: None          # why this backend cannot run here

    def __str__(self) -> str:
        return self.name


def _maildir_config(path: Path, sections: dict[str, Any]) -> Config:
    return make_config(path, **sections)


def _maildir_leftovers(config: Config) -> list[str]:
    """Files in any tmp/ (a delivery that died mid-write)."""
    root = Path(config.data_dir) / "mail"
    return sorted(str(p) for p in root.glob("*/*/tmp/*")) if root.exists() else []


_pg: list[Any] = []       # this process's PostgreSQL server (tests/pgutil.py), started on first use


def _pg_skip() -> str | None:
    from pgutil import pg_bindir
    try:
        pg_bindir()
    except RuntimeError as e:
        return str(e)
    return None


def _pg_config(path: Path, sections: dict[str, Any]) -> Config:
    """A fresh database on this process's server (stopped at exit) for a new directory; the
    same database again for a directory that has one (a second process on the same store)."""
    import atexit

    from pgutil import PgServer
    note = path / "postgresql.dsn"
    if note.exists():
        dsn = note.read_text()
    else:
        if not _pg:
            _pg.append(PgServer.create())
            atexit.register(_pg[0].destroy)
        dsn = _pg[0].create_database()
        path.mkdir(parents=True, exist_ok=True)
        note.write_text(dsn)
    return make_config(path, store={"backend": "postgresql", "dsn": dsn}, **sections)


def _pg_leftovers(config: Config) -> list[str]:
    """Reservations and unsealed bodies (a delivery that died mid-write)."""
    import psycopg
    with psycopg.connect(config.store.dsn) as conn:
        rows = conn.execute("SELECT 'reservation ' || id || ' of ' || node FROM reservations UNION ALL"
                            " SELECT 'unsealed body ' || id || ' of ' || node FROM bodies WHERE NOT complete"
                            " ORDER BY 1").fetchall()
    return [str(r[0]) for r in rows]


def _pg_body_identity(body: Body) -> object:
    from relay.store.postgresql.store import PgBody
    assert isinstance(body, PgBody)
    return body.body_id


BACKENDS: list[StoreBackend] = [
    StoreBackend("maildir", _maildir_config, _maildir_leftovers),
    StoreBackend("postgresql", _pg_config, _pg_leftovers, _pg_body_identity, _pg_skip),
]
