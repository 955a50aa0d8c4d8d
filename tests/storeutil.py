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


BACKENDS: list[StoreBackend] = [
    StoreBackend("maildir", _maildir_config, _maildir_leftovers),
]
