"""SASL decoding and the plaintext policy (contract: [auth] plaintext)."""

from __future__ import annotations

import base64

import pytest

from relay import auth
from relay.config import from_dict


def b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


def test_plain() -> None:
    assert auth.decode_plain(b64(b"\x00alice@x.test\x00pw")) == ("", "alice@x.test", "pw")
    assert auth.decode_plain(b64(b"alice@x.test\x00alice@x.test\x00p\xc3\xa4")) == (
        "alice@x.test", "alice@x.test", "p\u00e4")


@pytest.mark.parametrize("raw", [b"nonul", b"\x00\x00pw", b"a\x00b\x00c\x00d",
                                 b"other@x\x00alice@x\x00pw", b"\x00u\x00\xff\xfe"])
def test_plain_malformed(raw: bytes) -> None:
    with pytest.raises(auth.AuthError):
        auth.decode_plain(b64(raw))


def test_plain_bad_base64() -> None:
    with pytest.raises(auth.AuthError):
        auth.decode_plain("***")


def test_login_field() -> None:
    assert auth.decode_login_field(b64(b"bob")) == "bob"
    with pytest.raises(auth.AuthError):
        auth.decode_login_field("%%%")


@pytest.mark.parametrize("mode,peer,tls,allowed", [
    ("loopback", "127.0.0.1", False, True),
    ("loopback", "127.8.9.1", False, True),
    ("loopback", "::1", False, True),
    ("loopback", "192.0.2.7", False, False),
    ("loopback", "192.0.2.7", True, True),
    ("never", "127.0.0.1", False, False),
    ("never", "127.0.0.1", True, True),
    ("always", "192.0.2.7", False, True),
    ("loopback", None, False, False),
    ("loopback", "not-an-ip", False, False),
])
def test_plaintext_policy(mode: str, peer: str | None, tls: bool, allowed: bool) -> None:
    cfg = from_dict({"auth": {"plaintext": mode}})
    assert auth.plaintext_allowed(cfg, peer, tls) is allowed
