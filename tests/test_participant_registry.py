"""Participant records and the serial (sqlite, no server), and the document built from them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_directory_keys import make_key, public

from relay.directory import DirectoryError
from relay.directory.document import build, canonical_json
from relay.directory.keys import KeyInfo, check_public_key
from relay.directory.registry import Registry


@pytest.fixture
def reg(tmp_path: Path) -> Registry:
    r = Registry.open(tmp_path)
    yield r
    r.close()


def key(email: str) -> KeyInfo:
    return check_public_key(public(make_key(email)))


def test_every_change_bumps_the_serial(reg: Registry) -> None:
    assert reg.serial() == 0
    k = key("b@x.test")
    assert reg.add("B@X.test", k, name="B", org="Org", role="practice", contact="+49 1") == 1
    assert reg.add("a@x.test", key("a@x.test")) == 2
    p = reg.get("b@x.test")
    assert p is not None and (p.address, p.role, p.fingerprint, p.status, p.push) == \
        ("b@x.test", "practice", k.fingerprint, "active", True)
    assert [q.address for q in reg.list()] == ["a@x.test", "b@x.test"]
    assert reg.update("b@x.test", name="B2") == 3
    assert reg.update("b@x.test", name="B2") == 3            # nothing changed: no new serial
    assert reg.update("b@x.test", touch=True) == 4           # quota changed outside the table
    assert reg.update("b@x.test", status="suspended") == 5
    assert [q.address for q in reg.list(active_only=True)] == ["a@x.test"]
    new = key("b@x.test")
    assert reg.update("b@x.test", key=new) == 6
    assert reg.get("b@x.test").fingerprint == new.fingerprint  # type: ignore[union-attr]
    assert reg.update("b@x.test", push=False) == 7
    assert reg.remove("b@x.test") == 8
    assert reg.get("b@x.test") is None


def test_serial_is_shared_between_connections(tmp_path: Path) -> None:
    a, b = Registry.open(tmp_path), Registry.open(tmp_path)
    a.add("a@x.test", key("a@x.test"))
    assert b.serial() == 1 and b.get("a@x.test") is not None
    a.close(), b.close()


@pytest.mark.parametrize("call, message", [
    (lambda r, k: r.add("not-an-address", k), "not a plain e-mail address"),
    (lambda r, k: r.add("a@x.test", k, role="clinic"), "--role: must be one of"),
    (lambda r, k: r.add("a@x.test", k, name="x" * 201), "at most 200"),
    (lambda r, k: r.add("a@x.test", k, org="line\nbreak"), "control characters"),
    (lambda r, k: r.update("nobody@x.test", name="x"), "is not a participant"),
    (lambda r, k: r.remove("nobody@x.test"), "is not a participant"),
    (lambda r, k: r.update("dup@x.test", status="gone"), "status must be one of"),
])
def test_bad_input_is_refused_and_changes_nothing(reg: Registry, call: object, message: str) -> None:
    reg.add("dup@x.test", key("dup@x.test"))
    with pytest.raises(DirectoryError, match=message):
        call(reg, key("a@x.test"))  # type: ignore[operator]
    assert reg.serial() == 1


def test_duplicate_address_and_duplicate_key_are_refused(reg: Registry) -> None:
    k = key("a@x.test")
    reg.add("a@x.test", k)
    with pytest.raises(DirectoryError, match="already a participant"):
        reg.add("A@x.TEST", key("a@x.test"))
    with pytest.raises(DirectoryError, match="already belongs to a@x.test"):
        reg.add("b@x.test", k)
    reg.add("b@x.test", key("b@x.test"))
    with pytest.raises(DirectoryError, match="already belongs to a@x.test"):
        reg.update("b@x.test", key=k)
    assert reg.serial() == 2


def test_document_lists_active_participants_sorted_canonically(reg: Registry) -> None:
    for a in ("c@x.test", "a@x.test", "b@x.test"):
        reg.add(a, key(a), name=f"Klinik {a[0].upper()} Müller", role="teleradiology-centre")
    reg.update("b@x.test", status="suspended")
    serial, data = build(reg, lambda a: 1000 + ord(a[0]), "x.test", "directory@x.test")
    doc = json.loads(data)
    assert serial == doc["serial"] == 4
    assert canonical_json(doc) == data and b"\n" not in data and "Müller".encode() in data
    assert doc["format"] == "relay-directory/1" and doc["domain"] == "x.test"
    assert doc["directory_address"] == "directory@x.test"
    assert doc["generated"].endswith("Z") and len(doc["generated"]) == 20
    assert [p["address"] for p in doc["participants"]] == ["a@x.test", "c@x.test"]
    p = doc["participants"][0]
    assert sorted(p) == ["address", "contact", "fingerprint", "key_expires", "name", "org",
                         "public_key", "quota_bytes", "role", "status"]
    assert p["quota_bytes"] == 1000 + ord("a") and p["status"] == "active"
    assert check_public_key(p["public_key"]).fingerprint == p["fingerprint"]
