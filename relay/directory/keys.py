"""OpenPGP keys: checking a participant's public key, and the directory's own signing key.

pgpy does the parsing and signing (FACTS: fine for small data; keys and a directory document
are kilobytes). Every failed check raises a `DirectoryError` an operator can act on.
"""

from __future__ import annotations

import datetime
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

with warnings.catch_warnings():
    # pgpy 0.6 imports ciphers that cryptography deprecates (TripleDES, CAST5...): not ours to fix
    warnings.simplefilter("ignore")
    import pgpy  # type: ignore[import-untyped]
    from pgpy.constants import (  # type: ignore[import-untyped]
        EllipticCurveOID,
        HashAlgorithm,
        KeyFlags,
        PubKeyAlgorithm,
        SignatureType,
    )

from relay.directory.errors import DirectoryError

__all__ = ["DirectoryError", "DirectoryKey", "KeyInfo", "check_public_key", "verify_detached"]


# Keys are a few KiB; a 1 MiB bound refuses a wrong file (a DICOM study, a tarball) early.
MAX_KEY_FILE = 1024 * 1024

_ENCRYPT_FLAGS = {KeyFlags.EncryptCommunications, KeyFlags.EncryptStorage}
_ENCRYPT_ALGS = {PubKeyAlgorithm.RSAEncryptOrSign, PubKeyAlgorithm.RSAEncrypt,
                 PubKeyAlgorithm.ElGamal, PubKeyAlgorithm.ECDH}


def rfc3339(dt: datetime.datetime | None) -> str | None:
    if dt is None:
        return None
    return dt.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class KeyInfo:
    """A checked public key."""
    fingerprint: str                 # 40 upper-case hex digits
    expires: str | None              # RFC 3339 UTC, or None (never)
    armored: str                     # armored public key
    binary: bytes                    # the same, unarmored (WKD serves this)
    uids: tuple[str, ...]


def _load(data: bytes | str) -> pgpy.PGPKey:
    if isinstance(data, str):
        data = data.encode("utf-8", "replace")
    if len(data) > MAX_KEY_FILE:
        raise DirectoryError(f"malformed key: {len(data)} bytes is too large for an OpenPGP key")
    if not data.strip():
        raise DirectoryError("malformed key: the file is empty")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            key, others = pgpy.PGPKey.from_blob(data)
        except Exception as e:  # noqa: BLE001 (pgpy raises ValueError, PGPError, NotImplementedError...)
            raise DirectoryError(f"malformed key: not an OpenPGP key ({type(e).__name__}: {e})"[:300]) from None
    if not isinstance(key, pgpy.PGPKey) or key._key is None:
        raise DirectoryError("malformed key: no key found")
    if len(others) > 1 or data.count(b"-----BEGIN PGP") > 1:
        raise DirectoryError("malformed key: the file holds more than one key; give exactly one")
    return key


def _revoked(key: pgpy.PGPKey, primary: pgpy.PGPKey) -> bool:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for sig in key.revocation_signatures:
            try:
                if primary.verify(key, sig):
                    return True
            except Exception:  # noqa: BLE001, S112 (pgpy raises anything on bad input)
                continue
    return False


def _can_encrypt(key: pgpy.PGPKey) -> bool:
    try:
        flags = key._get_key_flags()
    except Exception:  # noqa: BLE001 (pgpy raises anything on bad input)
        return False
    return bool(flags & _ENCRYPT_FLAGS) and key.key_algorithm in _ENCRYPT_ALGS


def check_public_key(data: bytes | str, now: datetime.datetime | None = None) -> KeyInfo:
    """Parse an armored (or binary) OpenPGP public key and check that a gateway can use it:
    public (not secret), one key, self-signatures valid, neither expired nor revoked, and with
    a usable encryption-capable (sub)key. Raises DirectoryError saying what is wrong, and
    nothing else: pgpy parses some damaged keys and trips later (`expires_at`: IndexError)."""
    key = _load(data)
    try:
        return _check(key, now)
    except DirectoryError:
        raise
    except Exception as e:  # noqa: BLE001 (pgpy raises anything on bad input)
        raise DirectoryError(f"malformed key: {type(e).__name__}: {e}"[:300]) from None


def _check(key: pgpy.PGPKey, now: datetime.datetime | None) -> KeyInfo:
    if not key.is_public:
        raise DirectoryError("this is a SECRET key: give the participant's PUBLIC key "
                             "(gpg --armor --export ADDRESS)")
    if not key.is_primary:
        raise DirectoryError("malformed key: a subkey without its primary key")
    now = now or datetime.datetime.now(datetime.UTC)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if not key.userids:
            raise DirectoryError("malformed key: the key has no user ID")
        expires = key.expires_at
        if expires is not None and expires <= now:
            raise DirectoryError(f"expired key: {key.fingerprint} expired on {rfc3339(expires)}")
        if _revoked(key, key):
            raise DirectoryError(f"revoked key: {key.fingerprint} has been revoked by its owner")
        try:
            ok = bool(key.verify(key))
        except Exception as e:  # noqa: BLE001 (pgpy raises anything on bad input)
            raise DirectoryError(f"malformed key: its self-signatures cannot be checked ({e})"[:300]) from None
        if not ok:
            raise DirectoryError("malformed key: a self-signature does not verify (damaged or tampered key)")
        usable = []
        for k in [key, *key.subkeys.values()]:
            if not _can_encrypt(k):
                continue
            if k is not key:
                if _revoked(k, key):
                    continue
                if k.expires_at is not None and k.expires_at <= now:
                    continue
            usable.append(k)
        if not usable:
            raise DirectoryError(f"key {key.fingerprint} has no valid encryption-capable subkey: "
                                 "a gateway could not encrypt studies to it")
        fpr = str(key.fingerprint).replace(" ", "").upper()
        return KeyInfo(fingerprint=fpr, expires=rfc3339(expires), armored=str(key),
                       binary=bytes(key), uids=tuple(str(u.userid) for u in key.userids))


def binary_from_armored(armored: str) -> bytes:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        key, _ = pgpy.PGPKey.from_blob(armored)
        return bytes(key)


# --- the directory's own key ----------------------------------------------------------------

class DirectoryKey:
    """The directory's signing key: Ed25519, sign-only, in <data_dir>/directory/ (0600).

    Made on first use. Two processes racing to make it (the CLI and the server) both end up
    with the same key: the file is published with link(), which never overwrites.
    """

    FILE = "directory.sec.asc"

    def __init__(self, key: pgpy.PGPKey) -> None:
        self._key = key

    @classmethod
    def load_or_create(cls, data_dir: Path, uid_email: str | None = None) -> DirectoryKey:
        d = Path(data_dir) / "directory"
        d.mkdir(parents=True, exist_ok=True)
        os.chmod(d, 0o700)
        path = d / cls.FILE
        if not path.exists():
            armored = str(cls._generate(uid_email))
            tmp = d / f".{cls.FILE}.{os.getpid()}.tmp"
            # left by a process with our pid that died here (a container's pid 1 restarts
            # with the same pid): ours to replace, or O_EXCL would fail at every start
            tmp.unlink(missing_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, armored.encode("ascii"))
                os.fsync(fd)
            finally:
                os.close(fd)
            try:
                os.link(tmp, path)          # never replaces a key another process made first
            except FileExistsError:
                pass
            finally:
                os.unlink(tmp)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            key, _ = pgpy.PGPKey.from_file(str(path))
        return cls(key)

    @staticmethod
    def _generate(uid_email: str | None) -> pgpy.PGPKey:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            key = pgpy.PGPKey.new(PubKeyAlgorithm.EdDSA, EllipticCurveOID.Ed25519)
            uid = pgpy.PGPUID.new("Relay participant directory", email=uid_email or "")
            key.add_uid(uid, usage={KeyFlags.Sign, KeyFlags.Certify},
                        hashes=[HashAlgorithm.SHA512, HashAlgorithm.SHA256])
        return key

    @property
    def fingerprint(self) -> str:
        return str(self._key.fingerprint).replace(" ", "").upper()

    def public_armored(self) -> str:
        return str(self._key.pubkey)

    def public_binary(self) -> bytes:
        return bytes(self._key.pubkey)

    def sign_detached(self, data: bytes) -> str:
        """An armored detached binary-document signature (type 0x00) over exactly `data`."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return str(self._key.sign(bytes(data)))


def verify_detached(data: bytes, signature: bytes | str, pubkey: bytes | str | pgpy.PGPKey) -> str:
    """Check a detached signature over `data` by `pubkey`; returns the key's fingerprint.
    Raises DirectoryError when the signature is malformed, from another key, or does not match."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if not isinstance(pubkey, pgpy.PGPKey):
            try:
                pubkey, _ = pgpy.PGPKey.from_blob(pubkey)
            except Exception as e:  # noqa: BLE001 (pgpy raises anything on bad input)
                raise DirectoryError(f"directory key is not an OpenPGP key ({e})"[:300]) from None
        try:
            sig = pgpy.PGPSignature.from_blob(signature)
        except Exception as e:  # noqa: BLE001 (pgpy raises anything on bad input)
            raise DirectoryError(f"malformed signature ({e})"[:300]) from None
        if sig.type != SignatureType.BinaryDocument:
            raise DirectoryError(f"unexpected signature type {sig.type!r}")
        if sig.signer != pubkey.fingerprint.keyid:
            raise DirectoryError(f"signature is by key {sig.signer}, not the directory key "
                                 f"{pubkey.fingerprint.keyid}")
        try:
            ok = bool(pubkey.verify(bytes(data), sig))
        except Exception as e:  # noqa: BLE001 (pgpy raises anything on bad input)
            raise DirectoryError(f"signature cannot be checked ({e})"[:300]) from None
        if not ok:
            raise DirectoryError("BAD signature: the document was altered or signed by another key")
        return str(pubkey.fingerprint).replace(" ", "").upper()
