"""A mailbox (the account's INBOX): the index in sqlite, kept in step with the Maildir.

The hot path (`messages()`, `path()`) reads the index only. Two stat() calls per call
compare new/ and cur/ mtimes with what the store last recorded; only when they differ (mutt,
Dovecot or an operator changed the Maildir) is the directory scanned and the index
reconciled. Our own changes record the new mtimes in the same transaction, when nobody
else changed the directory in between.
"""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from relay.log import get_logger
from relay.store.api import ChangeKind
from relay.store.errors import NoSuchAccount, NoSuchMessage, StoreError
from relay.store.maildir import names

if TYPE_CHECKING:
    from relay.store.maildir.core import Store

log = get_logger("store")


class MessageInfo(NamedTuple):
    """Immutable; a NamedTuple rather than a dataclass: built 10,000 at a time per SELECT."""
    uid: int
    name: str                 # Maildir base name "<unique>,S=<size>" (also the POP3 UIDL)
    size: int                 # bytes of the stored file (trace headers included)
    internaldate: float       # Unix time of delivery
    flags: str                # Maildir letters in ASCII order, e.g. "FS"


def _filename(name: str, location: str, flags: str) -> str:
    """location is 'new/<file>' or 'cur/<file>' (exact); bare 'new'/'cur' is derived."""
    if "/" in location:
        return location
    return f"new/{name}" if location == "new" else f"cur/{name}:2,{flags}"


class Mailbox:
    def __init__(self, store: Store, address: str) -> None:
        self.store = store
        self.address = address
        self.path_root = store.accounts.maildir(address)

    def _account(self) -> sqlite3.Row:
        row = self.store.db.one("SELECT uidvalidity, uidnext, new_mtime, cur_mtime FROM accounts"
                                " WHERE address=?", (self.address,))
        if row is None:
            raise NoSuchAccount(f"{self.address}: no such account")
        return row

    @property
    def uidvalidity(self) -> int:
        return int(self._account()["uidvalidity"])

    @property
    def uidnext(self) -> int:
        self.refresh()
        return int(self._account()["uidnext"])

    def _mtimes(self) -> tuple[int, int]:
        try:
            return (os.stat(self.path_root / "new").st_mtime_ns, os.stat(self.path_root / "cur").st_mtime_ns)
        except OSError as e:
            raise StoreError(f"{self.path_root}: Maildir unreadable: {e.strerror}") from e

    # --- reconciliation ------------------------------------------------------------------

    def refresh(self) -> bool:
        """Reconcile when new/ or cur/ changed behind the store's back. True if it scanned."""
        row = self._account()
        if (row["new_mtime"], row["cur_mtime"]) == self._mtimes():
            return False
        self.reconcile()
        return True

    def reconcile(self) -> tuple[int, int]:
        """Scan the Maildir and make the index (and ledger) match it.
        Returns (messages added, messages removed)."""
        pre = self._mtimes()
        files: dict[str, str] = {}                     # base name -> "new/f" | "cur/f"
        for sub in ("new", "cur"):
            try:
                entries = list(os.scandir(self.path_root / sub))
            except OSError as e:
                raise StoreError(f"{self.path_root / sub}: unreadable: {e.strerror}") from e
            for ent in entries:
                if ent.name.startswith(".") or not ent.is_file(follow_symlinks=False):
                    continue
                base, _ = names.split_info(ent.name)
                if base in self.store._pending:        # a delivery of ours is committing it
                    continue
                if sub == "cur" or base not in files:
                    files[base] = f"{sub}/{ent.name}"
        added, removed = [], []
        now = time.time()
        with self.store.db.transaction() as c:
            rows = {r["name"]: r for r in c.execute(
                "SELECT uid, name, size, internaldate, location, flags FROM messages WHERE address=?",
                (self.address,))}
            for name, r in rows.items():
                loc = files.get(name)
                if loc is None:
                    removed.append(r)
                    c.execute("DELETE FROM messages WHERE address=? AND uid=?", (self.address, r["uid"]))
                elif loc != _filename(name, r["location"], r["flags"]):
                    flags = names.split_info(loc)[1] or ""
                    c.execute("UPDATE messages SET location=?, flags=? WHERE address=? AND uid=?",
                              (loc, names.normalize_flags(flags), self.address, r["uid"]))
            acct = c.execute("SELECT uidnext, new_mtime, cur_mtime FROM accounts WHERE address=?",
                             (self.address,)).fetchone()
            uid = acct["uidnext"]
            for name in sorted(set(files) - set(rows)):
                loc = files[name]
                path = self.path_root / loc
                try:
                    st = path.stat()
                except FileNotFoundError:
                    continue
                size = names.size_from_name(name)
                size = st.st_size if size is None else size
                flags = names.normalize_flags(names.split_info(loc)[1] or "")
                c.execute("INSERT INTO messages(address, uid, name, size, internaldate, flags, location)"
                          " VALUES (?,?,?,?,?,?,?)", (self.address, uid, name, size, st.st_mtime, flags, loc))
                added.append((uid, size))
                uid += 1
            dbytes = sum(s for _, s in added) - sum(r["size"] for r in removed)
            # nothing to write, nothing to sync (start-up reconciles every mailbox)
            if added or removed or (acct["new_mtime"], acct["cur_mtime"]) != pre:
                c.execute("UPDATE accounts SET uidnext=?, new_mtime=?, cur_mtime=?,"
                          " usage_bytes=MAX(0, usage_bytes+?), usage_messages=MAX(0, usage_messages+?)"
                          " WHERE address=?",
                          (uid, pre[0], pre[1], dbytes, len(added) - len(removed), self.address))
        if added or removed:
            log.info("reconciled", mailbox=self.address, added=len(added), removed=len(removed))
        if removed:
            self.store._record_deleted(self.address, [(r["size"], now - r["internaldate"]) for r in removed])
        if added:
            self.store._notify(self.address, ChangeKind.NEW, sum(s for _, s in added), len(added))
        return len(added), len(removed)

    def _note_own_change(self, c: sqlite3.Connection, before: tuple[int, int], after: tuple[int, int]) -> None:
        """Our own rename/unlink changed the directories: record the new mtimes, unless
        someone else had changed them before (then the next refresh scans)."""
        row = c.execute("SELECT new_mtime, cur_mtime FROM accounts WHERE address=?", (self.address,)).fetchone()
        if (row["new_mtime"], row["cur_mtime"]) == before:
            c.execute("UPDATE accounts SET new_mtime=?, cur_mtime=? WHERE address=?", (*after, self.address))

    # --- reading -------------------------------------------------------------------------

    def _version(self) -> tuple[int, int, tuple[int, int]]:
        db = self.store.db
        return (db.generation, db.data_version(), self._mtimes())

    def messages(self) -> list[MessageInfo]:
        """Every message in UID order, from the index. Kept in memory between changes: a
        repeated call (each IMAP command, each poll) costs two stat() calls and one pragma
        while nothing changed (no commit here or in another process, same Maildir mtimes)."""
        cache = self.store._messages_cache
        hit = cache.get(self.address)
        if hit is not None and hit[0] == self._version():
            return list(hit[1])
        self.refresh()
        version = self._version()             # before reading: a later change misses next time
        rows = self.store.db.query("SELECT uid, name, size, internaldate, flags FROM messages"
                                   " WHERE address=? ORDER BY uid", (self.address,), raw=True)
        msgs = list(map(MessageInfo._make, rows))
        cache[self.address] = (version, msgs)
        return list(msgs)

    def _row(self, uid: int) -> sqlite3.Row:
        row = self.store.db.one("SELECT uid, name, size, internaldate, flags, location, first_fetch"
                                " FROM messages WHERE address=? AND uid=?", (self.address, uid))
        if row is None:
            raise NoSuchMessage(f"{self.address}: no message with UID {uid}")
        return row

    def info(self, uid: int) -> MessageInfo:
        r = self._row(uid)
        return MessageInfo(r["uid"], r["name"], r["size"], r["internaldate"], r["flags"])

    def path(self, uid: int) -> Path:
        """The message's current file. Follows an external move (reconciles once)."""
        r = self._row(uid)
        p = self.path_root / _filename(r["name"], r["location"], r["flags"])
        if not p.exists():
            self.reconcile()
            r = self._row(uid)
            p = self.path_root / _filename(r["name"], r["location"], r["flags"])
        return p

    # --- changing ------------------------------------------------------------------------

    def set_flags(self, uid: int, flags: str) -> MessageInfo:
        """Set the message's flags: the file moves to cur/ as '<name>:2,<sorted letters>'
        (Dovecot and mutt read it the same way)."""
        letters = names.normalize_flags(flags)
        src = self.path(uid)
        r = self._row(uid)
        loc = f"cur/{r['name']}:2,{letters}"
        dst = self.path_root / loc
        before = self._mtimes()
        if src != dst:
            try:
                os.rename(src, dst)
            except OSError as e:
                raise StoreError(f"{src}: cannot set flags: {e.strerror}") from e
        with self.store.db.transaction(durable=False) as c:
            c.execute("UPDATE messages SET flags=?, location=? WHERE address=? AND uid=?",
                      (letters, loc, self.address, uid))
            self._note_own_change(c, before, self._mtimes())
        return MessageInfo(r["uid"], r["name"], r["size"], r["internaldate"], letters)

    def expunge(self, uids: list[int] | tuple[int, ...] | set[int]) -> list[int]:
        """Delete these messages (files, index rows, ledger). Returns the UIDs that existed."""
        self.refresh()
        before = self._mtimes()
        gone: list[sqlite3.Row] = []
        for uid in sorted(set(uids)):
            try:
                p = self.path(uid)
            except NoSuchMessage:
                continue
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass
            except OSError as e:
                raise StoreError(f"{p}: cannot delete: {e.strerror}") from e
            gone.append(self._row(uid))
        if not gone:
            return []
        with self.store.db.transaction() as c:
            # only rows still there: `relay quota recalc` in another process may have seen the
            # unlink first and settled them already
            gone = [r for r in gone if c.execute("DELETE FROM messages WHERE address=? AND uid=?",
                                                 (self.address, r["uid"])).rowcount]
            c.execute("UPDATE accounts SET usage_bytes=MAX(0, usage_bytes-?),"
                      " usage_messages=MAX(0, usage_messages-?) WHERE address=?",
                      (sum(r["size"] for r in gone), len(gone), self.address))
            self._note_own_change(c, before, self._mtimes())
        if not gone:
            return []
        now = time.time()
        self.store._record_deleted(self.address, [(r["size"], now - r["internaldate"]) for r in gone])
        return [r["uid"] for r in gone]

    def note_fetched(self, uid: int) -> None:
        """A client read the whole message. The first time counts for delivery->fetch latency."""
        now = time.time()
        with self.store.db.transaction(durable=False, bookkeeping=True) as c:
            row = c.execute("SELECT internaldate FROM messages WHERE address=? AND uid=? AND first_fetch IS NULL",
                            (self.address, uid)).fetchone()
            if row is None:
                return
            c.execute("UPDATE messages SET first_fetch=? WHERE address=? AND uid=?", (now, self.address, uid))
        self.store._fetch_latency.observe(max(0.0, now - row["internaldate"]))
