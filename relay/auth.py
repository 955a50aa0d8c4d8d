"""Authentication pieces shared by SMTP, IMAP and POP3.

- `plaintext_allowed`: the contract's `[auth] plaintext` setting.
- SASL PLAIN (RFC 4616) and LOGIN decoding.
Verification itself is `store.accounts.verify` (argon2id, with a credential cache).
"""

from __future__ import annotations

import base64
import binascii
import ipaddress

from relay.config import Config


class AuthError(ValueError):
    """Malformed SASL data (the protocol answers 501 / BAD / -ERR)."""


def is_loopback(peer_ip: str | None) -> bool:
    if not peer_ip:
        return False
    try:
        return ipaddress.ip_address(peer_ip.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def plaintext_allowed(config: Config, peer_ip: str | None, tls_active: bool) -> bool:
    """May this client send a password over this connection?"""
    if tls_active:
        return True
    mode = config.auth.plaintext
    if mode == "always":
        return True
    if mode == "loopback":
        return is_loopback(peer_ip)
    return False


def b64decode_strict(data: str | bytes) -> bytes:
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise AuthError("invalid base64") from None


def decode_plain(b64: str | bytes) -> tuple[str, str, str]:
    """SASL PLAIN: base64(authzid NUL authcid NUL passwd) -> (authzid, user, password)."""
    raw = b64decode_strict(b64)
    parts = raw.split(b"\x00")
    if len(parts) != 3 or not parts[1]:
        raise AuthError("malformed PLAIN response")
    try:
        authzid, user, password = (p.decode("utf-8") for p in parts)
    except UnicodeDecodeError:
        raise AuthError("PLAIN response is not UTF-8") from None
    if authzid and authzid.lower() != user.lower():
        raise AuthError("authorization identity differs from user")
    return authzid, user, password


def decode_login_field(b64: str | bytes) -> str:
    """SASL LOGIN: one base64 field (user, then password)."""
    try:
        return b64decode_strict(b64).decode("utf-8")
    except UnicodeDecodeError:
        raise AuthError("LOGIN response is not UTF-8") from None
