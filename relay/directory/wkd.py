"""OpenPGP Web Key Directory (draft-koch-openpgp-webkey-service) paths.

    direct:   /.well-known/openpgpkey/hu/<hash>[?l=<local>]
    advanced: /.well-known/openpgpkey/<domain>/hu/<hash>[?l=<local>]
    <hash> = z-base-32(SHA-1(lower-cased local part)), 32 characters.
"""

from __future__ import annotations

import hashlib

# z-base-32, http://philzimmermann.com/docs/human-oriented-base-32-encoding.txt (draft section 3.1)
_ZB32 = "ybndrfg8ejkmcpqxot1uwisza345h769"

PREFIX = "/.well-known/openpgpkey/"


def zbase32(data: bytes) -> str:
    bits = int.from_bytes(data, "big")
    nbits = len(data) * 8
    out = []
    for shift in range(nbits - 5, -5, -5):
        out.append(_ZB32[(bits >> shift) & 31 if shift >= 0 else (bits << -shift) & 31])
    return "".join(out)


def wkd_hash(address: str) -> str:
    """The WKD hash of an address's local part (the draft lower-cases ASCII letters only)."""
    local = address.rsplit("@", 1)[0]
    lowered = "".join(c.lower() if "A" <= c <= "Z" else c for c in local)
    return zbase32(hashlib.sha1(lowered.encode("utf-8")).digest())


def parse_path(path: str) -> tuple[str | None, str | None]:
    """(domain or None for the direct layout, hash) for a key URL; (domain, None) for a policy
    file; (None, None) when the path is not a WKD path. Query strings are ignored."""
    path = path.split("?", 1)[0]
    if not path.startswith(PREFIX):
        return None, None
    parts = path[len(PREFIX):].split("/")
    if parts == ["policy"]:
        return "", None
    if len(parts) == 2 and parts[0] == "hu" and parts[1]:
        return None, parts[1]
    if len(parts) == 2 and parts[1] == "policy" and parts[0]:
        return parts[0].lower(), None
    if len(parts) == 3 and parts[1] == "hu" and parts[0] and parts[2]:
        return parts[0].lower(), parts[2]
    return None, None
