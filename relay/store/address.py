"""E-mail address normalisation for account names.

An account's address becomes a path (`mail/<domain>/<local>/`), so only a conservative
subset of RFC 5321 is accepted: a dot-atom local part (4.1.2) and a host name domain
(letters, digits, hyphens; 2.3.5). Both parts are lower-cased: the relay treats addresses
case-insensitively, as Postfix and Dovecot lookups do in practice.
"""

from __future__ import annotations

import re

from relay.store.errors import AddressError

MAX_LOCAL = 64        # RFC 5321 4.5.3.1.1
MAX_DOMAIN = 255      # RFC 5321 4.5.3.1.2
MAX_PATH = 254        # RFC 5321 4.5.3.1.3 (256 with the angle brackets)

_ATEXT = r"[a-z0-9!#$%&'*+\-=?^_`{|}~]"
_LOCAL_RE = re.compile(rf"^{_ATEXT}+(?:\.{_ATEXT}+)*$")
_LABEL_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")


def normalize_domain(domain: str) -> str:
    d = domain.strip().lower().rstrip(".")
    if not d or len(d) > MAX_DOMAIN or not all(_LABEL_RE.match(label) for label in d.split(".")):
        raise AddressError(f"not a valid domain: {domain!r}")
    return d


def normalize_address(address: str) -> str:
    """'Alice@Example.ORG' -> 'alice@example.org'. Raises AddressError on anything else."""
    if not isinstance(address, str):
        raise AddressError(f"not an address: {address!r}")
    a = address.strip()
    if a.startswith("<") and a.endswith(">"):
        a = a[1:-1]
    local, sep, domain = a.rpartition("@")
    if not sep or not local:
        raise AddressError(f"not an e-mail address (expected local@domain): {address!r}")
    local = local.lower()
    if len(local) > MAX_LOCAL or not _LOCAL_RE.match(local):
        raise AddressError(f"invalid local part in {address!r}")
    try:
        d = normalize_domain(domain)
    except AddressError:
        raise AddressError(f"invalid domain in {address!r}") from None
    out = f"{local}@{d}"
    if len(out) > MAX_PATH:
        raise AddressError(f"address too long: {address!r}")
    return out


def split(address: str) -> tuple[str, str]:
    """A normalised address -> (local, domain)."""
    local, _, domain = address.rpartition("@")
    return local, domain
