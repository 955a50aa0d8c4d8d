"""The gateway's local state: sqlite under its state dir.

sent       each study sent, until its MDN arrives (`relay gateway status`)
received   each message imported (a retry after a lost mailbox delete imports nothing twice)
partials   message/partial parts held on disk until their set is complete
downloads  mailbox messages being fetched (resume from the size on disk) or held
meta       e.g. the highest directory serial seen (never go back to an older document)
mdn_pending  receipts owed (positive for imported studies, negative for refused ones), until
           the relay took them (retried)
signatures each imported message's signature (GnuPG SIG_ID): a replay under a new Message-ID
           carries the same signature and is refused
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sent (
    message_id TEXT PRIMARY KEY, study_uid TEXT NOT NULL, recipient TEXT NOT NULL,
    files INTEGER NOT NULL, bytes INTEGER NOT NULL, parts INTEGER NOT NULL,
    sent_at REAL NOT NULL, confirmed_at REAL, disposition TEXT);
CREATE TABLE IF NOT EXISTS received (
    message_id TEXT PRIMARY KEY, study_uid TEXT NOT NULL, sender TEXT NOT NULL,
    files INTEGER NOT NULL, imported_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS partials (
    pid TEXT NOT NULL, number INTEGER NOT NULL, total INTEGER, path TEXT NOT NULL,
    mailbox_key TEXT NOT NULL, sender TEXT NOT NULL, received_at REAL NOT NULL,
    PRIMARY KEY (pid, number));
CREATE TABLE IF NOT EXISTS downloads (
    mailbox_key TEXT PRIMARY KEY, path TEXT NOT NULL, size INTEGER NOT NULL,
    state TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS mdn_pending (
    message_id TEXT PRIMARY KEY, recipient TEXT NOT NULL, files INTEGER NOT NULL,
    since REAL NOT NULL);
CREATE TABLE IF NOT EXISTS signatures (
    sig_id TEXT PRIMARY KEY, signer TEXT NOT NULL, message_id TEXT NOT NULL,
    study_uid TEXT NOT NULL, seen_at REAL NOT NULL);
"""

# columns added after the first release: (table, column, declaration) - added to older DBs
_ADDED_COLUMNS = (
    ("mdn_pending", "disposition", "TEXT"),    # NULL = processed
    ("mdn_pending", "error", "TEXT"),          # RFC 8098 3.2.8 Error: field of a negative MDN
    ("sent", "warned_at", "REAL"),             # study_unconfirmed logged at this time
)

POSITIVE = "processed"        # RFC 8098 3.2.6.2: imported (`processed/error`: imported, PACS failed)
NEGATIVE_MARKS = ("deleted", "failed", "denied")


def is_negative(disposition: str | None) -> bool:
    """An MDN that reports a refusal: RFC 8098 `deleted` (our quarantine), RFC 2298's
    `failed`/`denied` from older peers. `processed/error` is a receipt with a warning."""
    d = (disposition or "").lower()
    return any(m in d for m in NEGATIVE_MARKS)



@dataclass(frozen=True)
class Sent:
    message_id: str
    study_uid: str
    recipient: str
    files: int
    bytes: int
    parts: int
    sent_at: float
    confirmed_at: float | None
    disposition: str | None
    warned_at: float | None = None

    @property
    def refused(self) -> bool:
        return self.confirmed_at is not None and is_negative(self.disposition)


@dataclass(frozen=True)
class PendingMdn:
    message_id: str
    recipient: str
    files: int
    since: float
    disposition: str = POSITIVE     # processed | processed/error | deleted/error
    error: str = ""


class State:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # the PACS listener forwards from its watcher thread; sqlite3 serialises the calls
        self.db = sqlite3.connect(path, isolation_level=None, timeout=30, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.executescript(_SCHEMA)
        for table, column, decl in _ADDED_COLUMNS:
            have = {r[1] for r in self.db.execute(f"PRAGMA table_info({table})")}
            if column not in have:
                self.db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {decl}")

    def close(self) -> None:
        self.db.close()

    # sent / MDN
    def add_sent(self, message_id: str, study_uid: str, recipient: str, files: int, nbytes: int,
                 parts: int) -> None:
        self.db.execute("INSERT OR REPLACE INTO sent VALUES (?,?,?,?,?,?,?,NULL,NULL,NULL)",
                        (message_id, study_uid, recipient, files, nbytes, parts, time.time()))

    def forget_sent(self, message_id: str) -> None:
        self.db.execute("DELETE FROM sent WHERE message_id=? AND confirmed_at IS NULL", (message_id,))

    def confirm(self, message_id: str, reporter: str, disposition: str) -> bool:
        """Mark a sent study confirmed by an MDN from its recipient. False if unknown."""
        cur = self.db.execute(
            "UPDATE sent SET confirmed_at=?, disposition=? WHERE message_id=? AND recipient=?"
            " AND confirmed_at IS NULL", (time.time(), disposition, message_id, reporter))
        return cur.rowcount == 1

    def sent(self, unconfirmed_only: bool = False) -> list[Sent]:
        q = ("SELECT message_id, study_uid, recipient, files, bytes, parts, sent_at, confirmed_at,"
             " disposition, warned_at FROM sent" + (" WHERE confirmed_at IS NULL" if unconfirmed_only else ""))
        return [Sent(*row) for row in self.db.execute(q + " ORDER BY sent_at")]

    def overdue(self, older_than: float, now: float | None = None) -> list[Sent]:
        """Unconfirmed studies sent more than `older_than` seconds ago, not yet warned about."""
        limit = (time.time() if now is None else now) - older_than
        return [s for s in self.sent(unconfirmed_only=True) if s.sent_at < limit and s.warned_at is None]

    def mark_warned(self, message_id: str) -> None:
        self.db.execute("UPDATE sent SET warned_at=? WHERE message_id=?", (time.time(), message_id))

    # received
    def was_imported(self, message_id: str) -> bool:
        return self.db.execute("SELECT 1 FROM received WHERE message_id=?", (message_id,)).fetchone() is not None

    def add_received(self, message_id: str, study_uid: str, sender: str, files: int,
                     sig_id: str = "", signer: str = "") -> None:
        with self.db:
            self.db.execute("BEGIN")
            self.db.execute("INSERT OR REPLACE INTO received VALUES (?,?,?,?,?)",
                            (message_id, study_uid, sender, files, time.time()))
            if sig_id:
                self.db.execute("INSERT OR IGNORE INTO signatures VALUES (?,?,?,?,?)",
                                (sig_id, signer, message_id, study_uid, time.time()))

    def signature_seen(self, sig_id: str, signer: str) -> tuple[str, str] | None:
        """(message_id, study_uid) of the imported message that carried this signature."""
        row = self.db.execute("SELECT message_id, study_uid FROM signatures WHERE sig_id=? AND signer=?",
                              (sig_id, signer)).fetchone()
        return (str(row[0]), str(row[1])) if row else None

    # receipts owed
    def add_pending_mdn(self, message_id: str, recipient: str, files: int,
                        disposition: str | None = None, error: str | None = None) -> None:
        self.db.execute("INSERT OR IGNORE INTO mdn_pending (message_id, recipient, files, since,"
                        " disposition, error) VALUES (?,?,?,?,?,?)",
                        (message_id, recipient, files, time.time(), disposition, error))

    def pending_mdns(self) -> list[PendingMdn]:
        return [PendingMdn(str(m), str(r), int(n), float(t), d or POSITIVE, e or "")
                for m, r, n, t, d, e in self.db.execute(
                    "SELECT message_id, recipient, files, since, disposition, error FROM mdn_pending"
                    " ORDER BY since")]

    def drop_pending_mdn(self, message_id: str) -> None:
        self.db.execute("DELETE FROM mdn_pending WHERE message_id=?", (message_id,))

    # partials
    def add_partial(self, pid: str, number: int, total: int | None, path: Path, mailbox_key: str,
                    sender: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO partials VALUES (?,?,?,?,?,?,?)",
                        (pid, number, total, str(path), mailbox_key, sender, time.time()))

    def partial_set(self, pid: str) -> list[tuple[int, int | None, Path, str, str, float]]:
        return [(n, t, Path(p), k, s, at) for n, t, p, k, s, at in self.db.execute(
            "SELECT number, total, path, mailbox_key, sender, received_at FROM partials"
            " WHERE pid=? ORDER BY number", (pid,))]

    def partial_ids(self) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT DISTINCT pid FROM partials")]

    def drop_partials(self, pid: str) -> None:
        self.db.execute("DELETE FROM partials WHERE pid=?", (pid,))

    def held_keys(self) -> set[str]:
        return {r[0] for r in self.db.execute("SELECT mailbox_key FROM partials")}

    # downloads
    def download(self, key: str) -> tuple[Path, int, str] | None:
        row = self.db.execute("SELECT path, size, state FROM downloads WHERE mailbox_key=?", (key,)).fetchone()
        return (Path(row[0]), row[1], row[2]) if row else None

    def set_download(self, key: str, path: Path, size: int, state: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO downloads VALUES (?,?,?,?)", (key, str(path), size, state))

    def downloads(self) -> list[tuple[str, Path, str]]:
        return [(k, Path(p), st) for k, p, st in self.db.execute("SELECT mailbox_key, path, state FROM downloads")]

    def drop_download(self, key: str) -> None:
        self.db.execute("DELETE FROM downloads WHERE mailbox_key=?", (key,))

    # meta
    def get_meta(self, key: str, default: str = "") -> str:
        row = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return str(row[0]) if row else default

    def set_meta(self, key: str, value: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta VALUES (?,?)", (key, value))
