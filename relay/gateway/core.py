"""What send, receive and the PACS link share: the state DB, the keyring, the directory."""

from __future__ import annotations

import os
import shutil
import time
import uuid
from pathlib import Path
from types import TracebackType
from typing import Self

from relay.gateway.config import GatewayConfig
from relay.gateway.peers import Directory
from relay.gateway.pgp import Keyring
from relay.gateway.state import State

WORKDIR_KINDS = ("incoming", "outgoing")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:          # someone else's process: alive
        return True
    return True


class GatewayError(RuntimeError):
    """An operation the gateway cannot do; the message is for the administrator."""


class Gateway:
    def __init__(self, cfg: GatewayConfig) -> None:
        self.cfg = cfg
        for d in (cfg.state_dir, cfg.inbox, cfg.quarantine):
            d.mkdir(parents=True, exist_ok=True)
        self.state = State(cfg.state_dir / "gateway.db")
        assert cfg.secret_key is not None
        self.ring = Keyring(cfg.state_dir / "gnupg", cfg.secret_key, cfg.get_passphrase(),
                            cfg.compress_level)
        self.directory = Directory(cfg, self.state, self.ring)
        self.directory.load()
        self.sweep_workdirs()

    def workdir(self, kind: str) -> Path:
        """A fresh scratch folder under the state dir (same file system as inbox/quarantine
        when they share a disk, so results move in with a rename). Named with our pid, so
        that a later start can tell the leftovers of a killed process from a live one's."""
        d = (self.cfg.state_dir / kind
             / f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        d.mkdir(parents=True)
        return d

    def sweep_workdirs(self) -> list[Path]:
        """Remove scratch folders of gateway processes that no longer run (a send or receive
        killed mid-study leaves up to ~4x the study there). `receive` and `pacs-listen` may
        share the state dir: a live process's folders are kept."""
        removed = []
        for kind in WORKDIR_KINDS:
            base = self.cfg.state_dir / kind
            if not base.is_dir():
                continue
            for d in base.iterdir():
                parts = d.name.split("-")
                if len(parts) != 3 or not parts[1].isdigit() or _alive(int(parts[1])):
                    continue
                remove_tree(d)
                removed.append(d)
        return removed

    def close(self) -> None:
        self.ring.close()
        self.state.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
