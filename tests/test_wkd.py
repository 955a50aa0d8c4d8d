"""WKD hashing and paths, checked against GnuPG's own gpg-wks-client."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from relay.directory.wkd import parse_path, wkd_hash, zbase32

ADDRESSES = ["Joe.Doe@Example.ORG", "ct@hospital.test", "a@b.test", "MRT-2.Nord+x@klinik-ruhr.test",
             "directory@relay.test", "o'neil@x.test", "q@r.test", "müller@x.test"]


def _wks_client() -> str:
    path = shutil.which("gpg-wks-client") or "/usr/lib/gnupg/gpg-wks-client"
    assert Path(path).exists(), "gpg-wks-client (Debian package gpg-wks-client) is required"
    return path


def test_hash_matches_gpg_wks_client() -> None:
    out = subprocess.run([_wks_client(), "--print-wkd-hash", *ADDRESSES], capture_output=True,
                         text=True, timeout=30, check=True).stdout.splitlines()
    assert len(out) == len(ADDRESSES)
    for address, line in zip(ADDRESSES, out):
        theirs = line.split()[0]
        assert wkd_hash(address) == theirs, address


def test_zbase32_known_vectors() -> None:
    # From the z-base-32 specification: bit strings, here whole bytes only
    assert zbase32(b"") == ""
    assert zbase32(b"\x00") == "yy"
    assert zbase32(b"\xf0\xbf\xc7") == "6n9hq"
    assert zbase32(b"\xd4\x7a\x04") == "4t7ye"
    assert len(zbase32(bytes(20))) == 32


@pytest.mark.parametrize("path, expected", [
    ("/.well-known/openpgpkey/hu/abc", (None, "abc")),
    ("/.well-known/openpgpkey/hu/abc?l=joe", (None, "abc")),
    ("/.well-known/openpgpkey/Example.ORG/hu/abc", ("example.org", "abc")),
    ("/.well-known/openpgpkey/policy", ("", None)),
    ("/.well-known/openpgpkey/example.org/policy", ("example.org", None)),
    ("/.well-known/openpgpkey/hu/", (None, None)),
    ("/.well-known/openpgpkey/a/b/c/d", (None, None)),
    ("/.well-known/openpgpkey/../../etc/passwd", (None, None)),
    ("/elsewhere", (None, None)),
])
def test_parse_path(path: str, expected: tuple[str | None, str | None]) -> None:
    assert parse_path(path) == expected
