"""The participant directory as the gateway sees it (docs/directory.md).

The document (directory.json + detached directory.json.asc) is verified against the pinned
directory key (`directory_key`) before it is parsed; a document with a lower serial than one
already accepted is refused (replay of an old directory). The accepted copy is kept at
<state_dir>/directory.json(.asc); peers' keys are imported into the gateway's keyring and
looked up by address with the fingerprint the directory lists.
"""

from __future__ import annotations

import datetime
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from relay.gateway.config import GatewayConfig
from relay.gateway.pgp import Keyring
from relay.gateway.state import State
from relay.log import get_logger

log = get_logger("gateway.directory")

FORMAT = "relay-directory/1"


class DirectoryError(ValueError):
    """A directory document we refuse (bad signature, wrong format, older serial)."""


EXPIRY_WARNING = 30 * 86400.0     # warn about keys that expire within 30 days


@dataclass(frozen=True)
class Peer:
    address: str
    fingerprint: str
    name: str
    expires: float | None = None  # the key's expiry (Unix time), None = never

    def expires_in(self, now: float | None = None) -> float | None:
        return None if self.expires is None else self.expires - (time.time() if now is None else now)


def _expiry(value: object) -> float | None:
    """RFC 3339 UTC from the document ("2028-01-01T00:00:00Z") -> Unix time; None if absent."""
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.datetime.fromisoformat(value).timestamp()     # 3.11 reads the "Z"
    except ValueError:
        return None


def _verify_with_gpg(json_bytes: bytes, sig_bytes: bytes, pinned_key: str, home: Path) -> dict[str, Any]:
    ring = Keyring(home)
    try:
        fprs = ring.import_public(pinned_key)
        if not fprs:
            raise DirectoryError("directory_key: no OpenPGP public key in it")
        with tempfile.TemporaryDirectory(dir=home) as tmp:
            data = Path(tmp) / "directory.json"
            data.write_bytes(json_bytes)
            sig = Path(tmp) / "directory.json.asc"
            sig.write_bytes(sig_bytes)
            with open(sig, "rb") as s:
                res = ring.gpg.verify_file(s, str(data))
        if not res.valid or (res.pubkey_fingerprint or res.fingerprint) not in fprs:
            raise DirectoryError(f"directory signature not valid by the pinned key ({res.status})")
    finally:
        ring.close()
    try:
        doc = json.loads(json_bytes.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DirectoryError(f"directory.json: not JSON ({e})") from None
    if not isinstance(doc, dict):
        raise DirectoryError("directory.json: not an object")
    return doc


def verify(json_bytes: bytes, sig_bytes: bytes, pinned_key: str, home: Path) -> dict[str, Any]:
    """The verified document. Uses the directory's own verifier when it is installed."""
    try:
        from relay.directory import DirectoryError as TheirError
        from relay.directory.document import verify_document
    except ImportError:
        doc = _verify_with_gpg(json_bytes, sig_bytes, pinned_key, home)
    else:
        try:
            doc = verify_document(json_bytes, sig_bytes, pinned_key)
        except (TheirError, ValueError) as e:
            raise DirectoryError(str(e)) from None
    if doc.get("format") != FORMAT:
        raise DirectoryError(f"directory.json: format is {doc.get('format')!r}, expected {FORMAT}")
    if not isinstance(doc.get("serial"), int) or not isinstance(doc.get("participants"), list):
        raise DirectoryError("directory.json: serial/participants missing")
    return doc


class Directory:
    def __init__(self, cfg: GatewayConfig, state: State, ring: Keyring) -> None:
        self.cfg = cfg
        self.state = state
        self.ring = ring
        self.peers: dict[str, Peer] = {}
        self.serial = -1
        self.path = cfg.state_dir / "directory.json"

    def load(self) -> None:
        """Load the accepted copy, or adopt the configured local copy (`directory`) if newer."""
        self._load_accepted()
        if self.cfg.directory is not None:
            p = self.cfg.directory
            sig = p.with_name(p.name + ".asc")
            if p.exists() and sig.exists() and p.read_bytes() != (
                    self.path.read_bytes() if self.path.exists() else b""):
                try:
                    self.accept(p.read_bytes(), sig.read_bytes())
                except DirectoryError as e:
                    log.warning("directory_refused", path=str(p), reason=str(e))
        if not self.peers:
            log.warning("directory_empty", hint="run `relay gateway directory --config GW.toml`")

    def _load_accepted(self) -> None:
        """Our own copy was verified when accepted (and its keys imported then): read it back
        without a second signature check; re-import only keys missing from the keyring."""
        if not self.path.exists():
            return
        try:
            doc = json.loads(self.path.read_bytes())
        except (ValueError, OSError) as e:
            log.warning("directory_unreadable", path=str(self.path), error=str(e))
            return
        have = {k["fingerprint"] for k in self.ring.gpg.list_keys()}
        self.peers, self.serial = self._peers(doc, have), int(doc["serial"])

    def _peers(self, doc: dict[str, Any], have: set[str] | None = None) -> dict[str, Peer]:
        peers: dict[str, Peer] = {}
        for p in doc["participants"]:
            if not isinstance(p, dict) or p.get("status", "active") != "active":
                continue
            addr = str(p.get("address", "")).lower()
            fpr = str(p.get("fingerprint", "")).upper()
            known = have is not None and fpr in have
            if not known and (len(fpr) != 40 or fpr not in self.ring.import_public(str(p.get("public_key", "")))):
                log.warning("directory_entry_skipped", address=addr, reason="key does not match fingerprint")
                continue
            peers[addr] = Peer(addr, fpr, str(p.get("name", "")), _expiry(p.get("key_expires")))
        return peers

    def accept(self, json_bytes: bytes, sig_bytes: bytes) -> bool:
        """Verify and adopt a document. False if it is not newer than the one held."""
        assert self.cfg.directory_key is not None
        pinned = self.cfg.directory_key.read_text(encoding="ascii")
        doc = verify(json_bytes, sig_bytes, pinned, self.cfg.state_dir / "dirkey")
        serial = doc["serial"]
        high = int(self.state.get_meta("directory_serial", "-1"))
        if serial < high:
            raise DirectoryError(f"directory serial {serial} is older than {high} already accepted")
        if serial <= self.serial:
            return False
        peers = self._peers(doc)
        self.peers, self.serial = peers, serial
        self.state.set_meta("directory_serial", str(serial))
        if self.path.exists() and self.path.read_bytes() == json_bytes:
            return True
        for name, data in ((self.path.name + ".asc", sig_bytes), (self.path.name, json_bytes)):
            tmp = self.path.with_name(name + ".tmp")
            tmp.write_bytes(data)
            os.replace(tmp, self.path.with_name(name))
        log.info("directory_accepted", serial=serial, participants=len(peers))
        for peer, left in self.expiring():
            log.warning("key_expiring", address=peer.address, fingerprint=peer.fingerprint,
                        days=round(left / 86400, 1), own=peer.address == self.cfg.address.lower())
        return True

    def expiring(self, within: float = EXPIRY_WARNING) -> list[tuple[Peer, float]]:
        """Participants whose key expires within `within` seconds (or has expired: negative),
        soonest first. The operator rotates them (`relay participant update --key`)."""
        now = time.time()
        found = [(p, left) for p in self.peers.values()
                 if (left := p.expires_in(now)) is not None and left < within]
        return sorted(found, key=lambda x: x[1])

    def peer(self, address: str) -> Peer | None:
        return self.peers.get(address.lower())

    def by_fingerprint(self, fpr: str) -> Peer | None:
        return next((p for p in self.peers.values() if p.fingerprint == fpr.upper()), None)
