"""What send, receive and the PACS link share: the state DB, the keyring, the directory."""

from __future__ import annotations

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

    def workdir(self, kind: str) -> Path:
        """A fresh scratch folder under the state dir (same file system as inbox/quarantine
        when they share a disk, so results move in with a rename)."""
        d = self.cfg.state_dir / kind / f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"
        d.mkdir(parents=True)
        return d

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
