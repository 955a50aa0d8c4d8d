"""Maildir conventions (https://cr.yp.to/proto/maildir.html, Dovecot's and mutt's readers).

Unique names `<secs>.M<usec>P<pid>Q<n>.<host>`; in new/ with `,S=<size>` appended (Dovecot's
size field, lets readers skip a stat); in cur/ followed by `:2,<flags>` with the flag letters
in ASCII order.
"""

from __future__ import annotations

import itertools
import os
import re
import time
from pathlib import Path

SUBDIRS = ("tmp", "new", "cur")
FLAG_LETTERS = "DFPRST"          # Draft Flagged Passed Replied Seen Trashed

_counter = itertools.count(1)
_SIZE_RE = re.compile(r",S=(\d+)")
_PID_RE = re.compile(r"^\d+\.(?:[^.]*?)P(\d+)")


def create(path: Path) -> None:
    for sub in SUBDIRS:
        (path / sub).mkdir(parents=True, exist_ok=True)


def host_part(hostname: str) -> str:
    """Maildir escapes '/' and ':' in the host part."""
    return hostname.replace("/", r"\057").replace(":", r"\072")


def unique_name(hostname: str) -> str:
    now = time.time()
    secs = int(now)
    usec = int((now - secs) * 1_000_000)
    return f"{secs}.M{usec}P{os.getpid()}Q{next(_counter)}.{host_part(hostname)}"


def pid_of(name: str) -> int | None:
    m = _PID_RE.match(name)
    return int(m.group(1)) if m else None


def split_info(filename: str) -> tuple[str, str | None]:
    """'<base>:2,FS' -> ('<base>', 'FS'); a name without info -> (name, None)."""
    base, sep, info = filename.partition(":")
    if not sep:
        return filename, None
    if info.startswith("2,"):
        return base, info[2:]
    return base, ""


def size_from_name(base: str) -> int | None:
    m = _SIZE_RE.search(base)
    return int(m.group(1)) if m else None


def normalize_flags(letters: str) -> str:
    """Keep the known letters once, ASCII order. Unknown letters are kept too (a Maildir
    reader may use lower-case keyword letters); they sort after the upper-case ones."""
    return "".join(sorted({c for c in letters if c.isalpha()}))


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
