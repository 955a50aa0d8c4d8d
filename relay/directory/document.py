"""The signed directory document: `directory.json` (canonical JSON) + `directory.json.asc`
(detached armored signature by the directory key). Format: docs/directory.md.
"""

from __future__ import annotations

import datetime
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from relay.directory.keys import DirectoryError, DirectoryKey, rfc3339, verify_detached
from relay.directory.registry import Registry

FORMAT = "relay-directory/1"
# A document of 10 000 participants with 3 KiB keys is ~40 MB; refuse anything far beyond it.
MAX_DOCUMENT = 64 * 1024 * 1024


def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


@dataclass(frozen=True)
class Signed:
    serial: int
    json: bytes          # the exact bytes that were signed
    signature: bytes     # armored detached signature (ASCII)


def build(registry: Registry, quota_of: Callable[[str], int], domain: str, directory_address: str,
          now: datetime.datetime | None = None) -> tuple[int, bytes]:
    """(serial, directory.json bytes) from the registry's active participants."""
    serial = registry.serial()
    participants = [{
        "address": p.address, "name": p.name, "org": p.org, "role": p.role,
        "contact": p.contact, "status": p.status, "fingerprint": p.fingerprint,
        "key_expires": p.key_expires, "public_key": p.public_key,
        "quota_bytes": quota_of(p.address),
    } for p in registry.list(active_only=True)]
    doc = {
        "format": FORMAT, "serial": serial,
        "generated": rfc3339(now or datetime.datetime.now(datetime.UTC)),
        "domain": domain, "directory_address": directory_address,
        "participants": participants,
    }
    return serial, canonical_json(doc)


def sign(key: DirectoryKey, serial: int, data: bytes) -> Signed:
    return Signed(serial, data, key.sign_detached(data).encode("ascii"))


def export(signed: Signed, out_dir: Path) -> tuple[Path, Path]:
    """Write DIR/directory.json and DIR/directory.json.asc (each via a temporary file + rename,
    so a reader never sees half a document)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, data in (("directory.json", signed.json), ("directory.json.asc", signed.signature)):
        path = out_dir / name
        tmp = out_dir / f".{name}.{os.getpid()}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, path)
        paths.append(path)
    return paths[0], paths[1]


def verify_document(json_bytes: bytes, sig_bytes: bytes | str, pubkey: Any,
                    min_serial: int | None = None) -> dict[str, Any]:
    """Verify a directory document with the pinned directory key and return it parsed.

    `pubkey`: the directory's armored public key (str/bytes) or a pgpy.PGPKey. With
    `min_serial`, a document older than that serial is refused (rollback protection).
    Raises DirectoryError (bad signature, other key, wrong format, older serial)."""
    if len(json_bytes) > MAX_DOCUMENT:
        raise DirectoryError("directory document too large")
    verify_detached(bytes(json_bytes), sig_bytes, pubkey)
    try:
        doc = json.loads(bytes(json_bytes).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise DirectoryError(f"signed, but not JSON ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise DirectoryError(f"not a {FORMAT} document")
    serial = doc.get("serial")
    if not isinstance(serial, int) or isinstance(serial, bool) or serial < 0:
        raise DirectoryError("document has no valid serial")
    if not isinstance(doc.get("participants"), list):
        raise DirectoryError("document has no participants list")
    if min_serial is not None and serial < min_serial:
        raise DirectoryError(f"document serial {serial} is older than {min_serial} (rollback refused)")
    return doc
