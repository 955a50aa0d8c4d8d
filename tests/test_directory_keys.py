"""Participant key checks, the directory key, and detached signatures checked by stock gpg.

Also home of `make_key` (TEST FIXTURE ONLY: throwaway keys made at test time), used by the
other directory test files.
"""

from __future__ import annotations

import datetime
import json
import os
import stat
import subprocess
import warnings
from pathlib import Path

import pytest

from relay.directory import DirectoryError, verify_document
from relay.directory.document import canonical_json
from relay.directory.keys import (  # pgpy, imported there with its warnings silenced
    DirectoryKey,
    EllipticCurveOID,
    HashAlgorithm,
    KeyFlags,
    PubKeyAlgorithm,
    check_public_key,
    pgpy,
)

UTC = datetime.UTC


def make_key(email: str, expires: datetime.timedelta | None = None,
             created: datetime.datetime | None = None, encrypt: bool = True,
             revoke: bool = False, revoke_subkey: bool = False) -> pgpy.PGPKey:
    """A gateway key (secret): Ed25519 primary + Curve25519 encryption subkey."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        key = pgpy.PGPKey.new(PubKeyAlgorithm.EdDSA, EllipticCurveOID.Ed25519, created=created)
        extra = {"key_expiration": expires} if expires else {}
        key.add_uid(pgpy.PGPUID.new("Gateway", email=email), usage={KeyFlags.Sign, KeyFlags.Certify},
                    hashes=[HashAlgorithm.SHA256], **extra)
        if encrypt:
            sub = pgpy.PGPKey.new(PubKeyAlgorithm.ECDH, EllipticCurveOID.Curve25519, created=created)
            key.add_subkey(sub, usage={KeyFlags.EncryptCommunications, KeyFlags.EncryptStorage})
            if revoke_subkey:
                bound = key.subkeys[sub.fingerprint.keyid]
                bound |= key.revoke(bound)
        if revoke:
            key |= key.revoke(key)
    return key


def public(key: pgpy.PGPKey) -> str:
    return str(key.pubkey)


def write_key(path: Path, email: str, **kw: object) -> tuple[Path, pgpy.PGPKey]:
    key = make_key(email, **kw)  # type: ignore[arg-type]
    path.write_text(public(key))
    return path, key


def gpg(home: Path, *args: str, input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    home.mkdir(mode=0o700, exist_ok=True)
    return subprocess.run(["gpg", "--homedir", str(home), "--batch", "--no-tty", *args],
                          input=input, capture_output=True, timeout=60, check=False)


# --- participant keys --------------------------------------------------------------------------

def test_good_key_gives_fingerprint_expiry_and_both_encodings() -> None:
    key = make_key("ct@hospital.test", expires=datetime.timedelta(days=30))
    info = check_public_key(public(key))
    assert info.fingerprint == str(key.fingerprint).replace(" ", "")
    assert len(info.fingerprint) == 40 and info.fingerprint == info.fingerprint.upper()
    expected = (key.created + datetime.timedelta(days=30)).astimezone(UTC)
    assert info.expires == expected.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert info.armored.startswith("-----BEGIN PGP PUBLIC KEY BLOCK-----")
    assert check_public_key(info.binary).fingerprint == info.fingerprint
    assert check_public_key(make_key("x@y.test").pubkey.__str__()).expires is None


@pytest.mark.parametrize("data, message", [
    (b"", "malformed key: the file is empty"),
    (b"hello, I am not a key\n", "malformed key: not an OpenPGP key"),
    (b"-----BEGIN PGP PUBLIC KEY BLOCK-----\n\nAAAA\n-----END PGP PUBLIC KEY BLOCK-----\n",
     "malformed key"),
    (b"\x00" * (2 * 1024 * 1024), "too large"),
])
def test_malformed_keys_are_refused(data: bytes, message: str) -> None:
    with pytest.raises(DirectoryError, match=message):
        check_public_key(data)


def test_truncated_armor_is_refused() -> None:
    """Lines cut out of the armor: always "malformed key", never another exception (about one
    damaged key in 25 used to raise IndexError from pgpy's expires_at)."""
    for _ in range(25):
        lines = public(make_key("a@b.test")).splitlines()
        for start in (3, 4, 5, 6):
            damaged = "\n".join(lines[:start] + lines[start + 2:])
            with pytest.raises(DirectoryError, match="malformed key"):
                check_public_key(damaged)


def test_secret_key_is_refused_with_a_hint() -> None:
    with pytest.raises(DirectoryError, match="SECRET key.*--export"):
        check_public_key(str(make_key("a@b.test")))


def test_expired_key_is_refused() -> None:
    ago = datetime.datetime.now(UTC) - datetime.timedelta(days=10)
    key = make_key("a@b.test", created=ago, expires=datetime.timedelta(days=1))
    with pytest.raises(DirectoryError, match="expired key: .* expired on"):
        check_public_key(public(key))


def test_revoked_key_is_refused() -> None:
    with pytest.raises(DirectoryError, match="revoked key"):
        check_public_key(public(make_key("a@b.test", revoke=True)))


@pytest.mark.parametrize("kw", [{"encrypt": False}, {"revoke_subkey": True}])
def test_key_without_usable_encryption_subkey_is_refused(kw: dict[str, bool]) -> None:
    with pytest.raises(DirectoryError, match="no valid encryption-capable subkey"):
        check_public_key(public(make_key("a@b.test", **kw)))  # type: ignore[arg-type]


def test_two_keys_in_one_file_are_refused() -> None:
    two = public(make_key("a@b.test")) + "\n" + public(make_key("c@d.test"))
    with pytest.raises(DirectoryError, match="more than one key"):
        check_public_key(two)


def test_keys_made_by_gpg(tmp_path: Path) -> None:
    """gpg's own keys: accepted with an encryption subkey; sign-only and revoked refused."""
    home = tmp_path / "gnupg"
    for email, algo, usage in (("good@x.test", "ed25519", "sign"), ("signonly@x.test", "ed25519", "sign")):
        assert gpg(home, "--passphrase", "", "--quick-gen-key", f"GW <{email}>", algo, usage, "2y").returncode == 0
    fpr = next(line.split(":")[9] for line in gpg(home, "--with-colons", "--list-keys", "good@x.test")
               .stdout.decode().splitlines() if line.startswith("fpr"))
    assert gpg(home, "--passphrase", "", "--quick-add-key", fpr, "cv25519", "encr").returncode == 0
    good = gpg(home, "--armor", "--export", "good@x.test").stdout
    info = check_public_key(good)
    assert info.fingerprint == fpr and info.expires is not None
    with pytest.raises(DirectoryError, match="no valid encryption-capable subkey"):
        check_public_key(gpg(home, "--armor", "--export", "signonly@x.test").stdout)
    # gpg's own revocation certificate, made at key creation
    rev = (home / "openpgp-revocs.d" / f"{fpr}.rev").read_text().replace(":-----BEGIN", "-----BEGIN")
    assert gpg(home, "--import", input=rev.encode()).returncode == 0
    with pytest.raises(DirectoryError, match="revoked key"):
        check_public_key(gpg(home, "--armor", "--export", "good@x.test").stdout)


# --- the directory key and signatures ------------------------------------------------------------

def test_directory_key_is_made_once_private_and_ed25519(tmp_path: Path) -> None:
    k1 = DirectoryKey.load_or_create(tmp_path, "directory@x.test")
    k2 = DirectoryKey.load_or_create(tmp_path)
    assert k1.fingerprint == k2.fingerprint
    d = tmp_path / "directory"
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    assert stat.S_IMODE((d / DirectoryKey.FILE).stat().st_mode) == 0o600
    assert [p.name for p in d.iterdir()] == [DirectoryKey.FILE]      # no temporary left over
    assert "PRIVATE" not in k1.public_armored()
    # the public key refuses to be a participant key (sign-only), but it is a valid key
    with pytest.raises(DirectoryError, match="encryption-capable"):
        check_public_key(k1.public_armored())


def test_a_temporary_left_by_a_crash_with_our_pid_does_not_stop_the_start(tmp_path: Path) -> None:
    """A container's relay is pid 1 at every start: a temporary key file left by a crash at
    pid 1 must not make O_EXCL fail at every later start."""
    d = tmp_path / "directory"
    d.mkdir()
    (d / f".{DirectoryKey.FILE}.{os.getpid()}.tmp").write_text("half a key")
    k = DirectoryKey.load_or_create(tmp_path, "directory@x.test")
    assert [p.name for p in d.iterdir()] == [DirectoryKey.FILE] and k.fingerprint


def test_gpg_verifies_the_detached_signature_and_catches_tampering(tmp_path: Path) -> None:
    key = DirectoryKey.load_or_create(tmp_path)
    data = canonical_json({"name": "Klinikum Müller-Lüdenscheid", "serial": 7})
    (tmp_path / "d.json").write_bytes(data)
    (tmp_path / "d.json.asc").write_text(key.sign_detached(data))
    home = tmp_path / "gnupg"
    assert gpg(home, "--import", input=key.public_armored().encode()).returncode == 0
    ok = gpg(home, "--status-fd", "1", "--verify", str(tmp_path / "d.json.asc"), str(tmp_path / "d.json"))
    assert ok.returncode == 0 and f"VALIDSIG {key.fingerprint}".encode() in ok.stdout
    (tmp_path / "d.json").write_bytes(data.replace(b"7", b"8"))
    bad = gpg(home, "--status-fd", "1", "--verify", str(tmp_path / "d.json.asc"), str(tmp_path / "d.json"))
    assert bad.returncode != 0 and b"BADSIG" in bad.stdout


def _doc(serial: int = 3) -> bytes:
    return canonical_json({"format": "relay-directory/1", "serial": serial, "participants": []})


def test_verify_document(tmp_path: Path) -> None:
    key = DirectoryKey.load_or_create(tmp_path / "a")
    other = DirectoryKey.load_or_create(tmp_path / "b")
    data = _doc()
    sig = key.sign_detached(data)
    assert verify_document(data, sig, key.public_armored())["serial"] == 3
    assert verify_document(data, sig.encode(), key.public_armored().encode(), min_serial=3)["serial"] == 3
    with pytest.raises(DirectoryError, match="BAD signature"):
        verify_document(data.replace(b"3", b"4"), sig, key.public_armored())
    with pytest.raises(DirectoryError, match="not the directory key"):
        verify_document(data, other.sign_detached(data), key.public_armored())
    with pytest.raises(DirectoryError, match="rollback"):
        verify_document(data, sig, key.public_armored(), min_serial=4)
    with pytest.raises(DirectoryError, match="malformed signature"):
        verify_document(data, "garbage", key.public_armored())
    wrong = canonical_json({"format": "something-else/2", "serial": 1})
    with pytest.raises(DirectoryError, match="not a relay-directory/1 document"):
        verify_document(wrong, key.sign_detached(wrong), key.public_armored())
    assert json.loads(data) == verify_document(data, sig, key.public_armored())


def test_key_file_is_never_replaced_by_a_racing_process(tmp_path: Path) -> None:
    """Two processes creating the key at once both end up with the same one."""
    code = ("import sys; from relay.directory.keys import DirectoryKey;"
            "print(DirectoryKey.load_or_create(sys.argv[1]).fingerprint)")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    procs = [subprocess.Popen(["python3", "-c", code, str(tmp_path)], stdout=subprocess.PIPE, env=env)
             for _ in range(3)]
    fprs = {p.communicate(timeout=60)[0].strip() for p in procs}
    assert len(fprs) == 1 and len(fprs.pop()) == 40
