"""The directory as one object: participant records + accounts + the signing key + the signed
document. Used by the CLI (no server needed) and by the running server's DirectoryService."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from relay.config import Config, ConfigError
from relay.directory import document
from relay.directory.keys import DirectoryError, DirectoryKey, KeyInfo
from relay.directory.registry import Participant, Registry, normalize_address


class Directory:
    def __init__(self, config: Config, store: Any, registry: Registry | None = None) -> None:
        self.config = config
        self.store = store
        self.registry = registry or Registry.open(Path(config.data_dir))
        self._key: DirectoryKey | None = None
        self._signed: document.Signed | None = None

    def close(self) -> None:
        self.registry.close()

    # --- identity --------------------------------------------------------------------------

    @property
    def address(self) -> str | None:
        """`[directory] address`, else directory@<domain of the first participant>; None while
        there is neither."""
        if self.config.directory.address:
            try:
                return normalize_address(self.config.directory.address)
            except DirectoryError as e:
                raise ConfigError(f"directory.address: {e}") from None
        domain = self.registry.first_domain()
        return f"directory@{domain}" if domain else None

    @property
    def domain(self) -> str | None:
        a = self.address
        return a.rsplit("@", 1)[1] if a else None

    @property
    def key(self) -> DirectoryKey:
        if self._key is None:
            self._key = DirectoryKey.load_or_create(Path(self.config.data_dir), self.address)
        return self._key

    def ensure_account(self) -> str | None:
        """Create the directory's own account (no password: nobody logs in as it)."""
        from relay.store.api import AccountExists

        address = self.address
        if address is None:
            return None
        if self.store.accounts.get(address) is None:
            try:
                self.store.accounts.add(address)
            except AccountExists:
                pass
        return address

    def quota_of(self, address: str) -> int:
        acc = self.store.accounts.get(address)
        q = getattr(acc, "quota_bytes", None)
        return int(q) if q is not None else self.config.quota.default_bytes

    # --- the document ----------------------------------------------------------------------

    def signed(self) -> document.Signed:
        """The current signed document, rebuilt only when the serial moved."""
        serial = self.registry.serial()
        if self._signed is None or self._signed.serial != serial:
            serial, data = document.build(self.registry, self.quota_of, self.domain or "",
                                          self.address or "")
            self._signed = document.sign(self.key, serial, data)
        return self._signed

    # --- participants (each change bumps the serial) ---------------------------------------

    def add(self, address: str, key: KeyInfo, password: str | None = None,
            quota_bytes: int | None = None, adopt: bool = False, **fields: Any) -> Participant:
        from relay.store.api import AccountExists

        address = normalize_address(address)
        if address == self.address:
            raise DirectoryError(f"{address} is the directory's own address")
        if self.registry.get(address) is not None:
            raise DirectoryError(f"{address} is already a participant")
        created = False
        if self.store.accounts.get(address) is None:
            try:
                self.store.accounts.add(address, password=password, quota_bytes=quota_bytes)
                created = True
            except AccountExists:
                pass
        if not created:
            if not adopt:
                raise DirectoryError(f"an account {address} already exists; pass --adopt to make "
                                     "it a participant")
            if password is not None:
                self.store.accounts.set_password(address, password)
            if quota_bytes is not None:
                self.store.accounts.set_quota(address, quota_bytes=quota_bytes)
        try:
            self.registry.add(address, key, **fields)
        except BaseException:
            if created:
                self.store.accounts.delete(address)
            raise
        self.ensure_account()
        p = self.registry.get(address)
        assert p is not None
        return p

    def update(self, address: str, key: KeyInfo | None = None, quota_bytes: int | None = None,
               password: str | None = None, **fields: Any) -> Participant:
        address = normalize_address(address)
        if self.registry.get(address) is None:
            raise DirectoryError(f"{address} is not a participant")
        if quota_bytes is not None:
            self.store.accounts.set_quota(address, quota_bytes=quota_bytes)
            fields["touch"] = True
        if password is not None:
            self.store.accounts.set_password(address, password)
        self.registry.update(address, key=key, **fields)
        p = self.registry.get(address)
        assert p is not None
        return p

    def remove(self, address: str, keep_mail: bool = False) -> None:
        address = normalize_address(address)
        self.registry.remove(address)
        if not keep_mail and self.store.accounts.get(address) is not None:
            self.store.accounts.delete(address)
