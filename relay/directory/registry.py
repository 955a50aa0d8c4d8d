"""Participant records in the relay's sqlite database (`<data_dir>/relay.db`), beside the
store's accounts, in tables of their own. Every change bumps the directory serial in the same
transaction, so a reader never sees a change without its serial.

The CLI and the running server each open their own connection; sqlite (WAL, set by the store)
serialises writers, and the server notices a CLI change by polling `serial()`.
"""

from __future__ import annotations

import re
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from relay.directory.errors import DirectoryError

if TYPE_CHECKING:
    from relay.directory.keys import KeyInfo

ROLES = ("hospital", "practice", "teleradiology-centre")
STATUSES = ("active", "suspended")

# RFC 5322 dot-atom local part and a DNS domain with at least one dot; no quoted local parts
# (gateways and WKD hashing want plain addresses).
_ADDRESS_RE = re.compile(
    r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
    r"@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z0-9-]{2,63}$")
# Free-text fields end up in JSON and in mail headers of nobody; still bounded and one line.
MAX_TEXT = 200

_SCHEMA = """
CREATE TABLE IF NOT EXISTS directory_participants (
    address     TEXT PRIMARY KEY,
    name        TEXT NOT NULL DEFAULT '',
    org         TEXT NOT NULL DEFAULT '',
    role        TEXT NOT NULL,
    contact     TEXT NOT NULL DEFAULT '',
    public_key  TEXT NOT NULL,
    fingerprint TEXT NOT NULL UNIQUE,
    key_expires TEXT,
    status      TEXT NOT NULL DEFAULT 'active',
    push        INTEGER NOT NULL DEFAULT 1,
    created     REAL NOT NULL,
    updated     REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS directory_state (
    name  TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
INSERT OR IGNORE INTO directory_state (name, value) VALUES ('serial', '0'), ('pushed_serial', '0');
"""


@dataclass(frozen=True)
class Participant:
    address: str
    name: str
    org: str
    role: str
    contact: str
    public_key: str
    fingerprint: str
    key_expires: str | None
    status: str
    push: bool
    created: float
    updated: float


def normalize_address(address: str) -> str:
    a = address.strip().lower()
    if not _ADDRESS_RE.match(a) or len(a) > 254:
        raise DirectoryError(f"not a plain e-mail address: {address!r}")
    return a


def check_text(field: str, value: str) -> str:
    if len(value) > MAX_TEXT:
        raise DirectoryError(f"--{field}: at most {MAX_TEXT} characters")
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise DirectoryError(f"--{field}: control characters (newlines, tabs) are not allowed")
    return value.strip()


def check_role(role: str) -> str:
    if role not in ROLES:
        raise DirectoryError(f"--role: must be one of {', '.join(ROLES)}, not {role!r}")
    return role


class Registry:
    def __init__(self, db_path: Path) -> None:
        self.path = Path(db_path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                                   timeout=10.0)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA busy_timeout = 10000")
        with self._tx():
            for stmt in filter(str.strip, _SCHEMA.split(";")):
                self._db.execute(stmt)

    @classmethod
    def open(cls, data_dir: Path) -> Registry:
        return cls(Path(data_dir) / "relay.db")

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _bump(self) -> int:
        self._db.execute("UPDATE directory_state SET value = CAST(value AS INTEGER) + 1 "
                         "WHERE name = 'serial'")
        return self.serial()

    def _state(self, name: str) -> str | None:
        row = self._db.execute("SELECT value FROM directory_state WHERE name = ?", (name,)).fetchone()
        return None if row is None else str(row[0])

    # --- reading ---------------------------------------------------------------------------

    def serial(self) -> int:
        return int(self._state("serial") or 0)

    def pushed_serial(self) -> int:
        return int(self._state("pushed_serial") or 0)

    def set_pushed_serial(self, serial: int) -> None:
        self._db.execute("UPDATE directory_state SET value = ? WHERE name = 'pushed_serial'",
                         (str(serial),))

    @staticmethod
    def _row(row: sqlite3.Row) -> Participant:
        d = dict(row)
        d["push"] = bool(d["push"])
        return Participant(**d)

    def get(self, address: str) -> Participant | None:
        row = self._db.execute("SELECT * FROM directory_participants WHERE address = ?",
                               (address.strip().lower(),)).fetchone()
        return None if row is None else self._row(row)

    def list(self, active_only: bool = False) -> list[Participant]:
        sql = "SELECT * FROM directory_participants"
        if active_only:
            sql += " WHERE status = 'active'"
        return [self._row(r) for r in self._db.execute(sql + " ORDER BY address")]

    def first_domain(self) -> str | None:
        """The domain of the earliest participant (the default directory address's domain)."""
        row = self._db.execute("SELECT address FROM directory_participants "
                               "ORDER BY created, address LIMIT 1").fetchone()
        return None if row is None else str(row[0]).rsplit("@", 1)[1]

    # --- changing (each bumps the serial) --------------------------------------------------

    def add(self, address: str, key: KeyInfo, name: str = "", org: str = "",
            role: str = "hospital", contact: str = "", push: bool = True) -> int:
        address = normalize_address(address)
        check_role(role)
        now = time.time()
        with self._tx() as db:
            if self.get(address) is not None:
                raise DirectoryError(f"{address} is already a participant")
            self._check_fingerprint(key.fingerprint, address)
            db.execute(
                "INSERT INTO directory_participants (address, name, org, role, contact, public_key,"
                " fingerprint, key_expires, status, push, created, updated)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'active', ?, ?, ?)",
                (address, check_text("name", name), check_text("org", org), role,
                 check_text("contact", contact), key.armored, key.fingerprint, key.expires,
                 int(push), now, now))
            return self._bump()

    def _check_fingerprint(self, fingerprint: str, address: str) -> None:
        row = self._db.execute("SELECT address FROM directory_participants WHERE fingerprint = ?"
                               " AND address != ?", (fingerprint, address)).fetchone()
        if row is not None:
            raise DirectoryError(f"key {fingerprint} already belongs to {row[0]}: "
                                 "each gateway needs a key of its own")

    def update(self, address: str, key: KeyInfo | None = None, **fields: Any) -> int:
        """Change name/org/role/contact/push/status and/or the key; bumps the serial even when
        only the account's quota changed (it is part of the document): pass touch=True."""
        touch = fields.pop("touch", False)
        address = normalize_address(address)
        with self._tx() as db:
            p = self.get(address)
            if p is None:
                raise DirectoryError(f"{address} is not a participant")
            changes: dict[str, Any] = {}
            for f in ("name", "org", "contact"):
                if fields.get(f) is not None:
                    changes[f] = check_text(f, fields[f])
            if fields.get("role") is not None:
                changes["role"] = check_role(fields["role"])
            if fields.get("status") is not None:
                if fields["status"] not in STATUSES:
                    raise DirectoryError(f"status must be one of {', '.join(STATUSES)}")
                changes["status"] = fields["status"]
            if fields.get("push") is not None:
                changes["push"] = bool(fields["push"])
            if key is not None:
                self._check_fingerprint(key.fingerprint, address)
                changes.update(public_key=key.armored, fingerprint=key.fingerprint,
                               key_expires=key.expires)
            new = replace(p, **changes)
            if new == p and not touch:
                return self.serial()          # nothing changed: no new serial
            db.execute(
                "UPDATE directory_participants SET name=?, org=?, role=?, contact=?, public_key=?,"
                " fingerprint=?, key_expires=?, status=?, push=?, updated=? WHERE address=?",
                (new.name, new.org, new.role, new.contact, new.public_key, new.fingerprint,
                 new.key_expires, new.status, int(new.push), time.time(), address))
            return self._bump()

    def remove(self, address: str) -> int:
        address = normalize_address(address)
        with self._tx() as db:
            if db.execute("DELETE FROM directory_participants WHERE address = ?",
                          (address,)).rowcount == 0:
                raise DirectoryError(f"{address} is not a participant")
            return self._bump()
