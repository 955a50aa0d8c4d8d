"""OpenPGP through GnuPG (python-gnupg, `*_file` functions with `output=`): streams in constant
memory (FACTS: 13 MiB for 500 MB; pgpy holds ~4x the payload and armors at ~2 MB/s).

One GNUPGHOME per gateway under its state dir, holding the gateway's secret key and the
public keys of the directory's participants. Trust comes from the signed directory, not from
GnuPG's web of trust: we encrypt to the fingerprint the directory lists (always_trust) and
accept a signature only if VALIDSIG names the sender's fingerprint from the directory.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import gnupg  # type: ignore[import-untyped]

from relay.log import get_logger

log = get_logger("gateway.pgp")

# gpg-agent's socket lives in GNUPGHOME; a Unix socket path is limited to ~107 bytes (sun_path)
_MAX_HOME = 80


class PgpError(RuntimeError):
    """GnuPG refused an operation; the message says why."""


@dataclass(frozen=True)
class Verdict:
    """The outcome of decrypt + verify. `ok` only with DECRYPTION_OKAY and a good signature."""
    decrypted: bool
    signed: bool
    good: bool
    signer: str          # VALIDSIG primary key fingerprint ("" if none)
    key_id: str          # the signing key id from ERRSIG/NO_PUBKEY ("" if none)
    status: str          # the [GNUPG:] lines, for the quarantine reason file
    bad_signature: bool = False   # BADSIG: the content does not match its signature (gpg then
                                  # stops before DECRYPTION_OKAY, although decryption worked)
    key_expired: bool = False     # EXPKEYSIG/REVKEYSIG: signed by a key expired or revoked since
                                  # (still `good` if it signed while valid: Keyring.judge)


def _status_lines(stderr: str) -> list[list[str]]:
    return [line.split()[1:] for line in stderr.splitlines() if line.startswith("[GNUPG:] ")]


# OpenPGP reason-for-revocation codes (RFC 4880 5.2.3.23) after which signatures made before
# the revocation stay good: the key was replaced or retired, not compromised. "No reason"
# (0) and "compromised" (2) void every signature (docs/decisions.md, "Gateway verdicts").
REVOCATION_KEEPS_OLD_SIGNATURES = {1: "superseded", 3: "retired"}


@dataclass(frozen=True)
class SigStatus:
    """What GnuPG's status lines say about the one signature of a message (pure parsing)."""
    kinds: frozenset[str]
    signer: str            # VALIDSIG primary key fingerprint
    sig_id: str            # SIG_ID: names the signature (GnuPG DETAILS: for replay detection)
    sig_time: float        # VALIDSIG sig-timestamp: when the signer says it signed
    key_expired_at: float | None    # KEYEXPIRED (the earliest, if several)


def parse_status(status: list[list[str]]) -> SigStatus:
    kinds = frozenset(s[0] for s in status if s)
    validsig = next((s for s in status if s and s[0] == "VALIDSIG"), [])
    sig_id = next((s[1] for s in status if s and s[0] == "SIG_ID" and len(s) > 1), "")
    expired = [float(s[1]) for s in status if len(s) > 1 and s[0] == "KEYEXPIRED" and s[1].isdigit()]
    sig_time = float(validsig[3]) if len(validsig) > 3 and validsig[3].isdigit() else 0.0
    return SigStatus(kinds, validsig[-1] if validsig else "", sig_id, sig_time,
                     min(expired) if expired else None)


def status_of(v: Verdict) -> SigStatus:
    """The parsed status lines of a verdict (they are kept as text for reason.txt)."""
    return parse_status([line.split() for line in v.status.splitlines()])


def signature_still_good(st: SigStatus, revocation: tuple[float, int] | None) -> tuple[bool, str]:
    """A valid signature (VALIDSIG) by a key that has expired or been revoked since: good if it
    was made while the key was valid. (good, why) - `why` explains either way."""
    if not st.signer or not st.sig_time or st.kinds & {"BADSIG", "ERRSIG"}:
        return False, "no valid signature"
    if "REVKEYSIG" in st.kinds:
        if revocation is None:
            return False, "the key is revoked (no revocation details found)"
        when, code = revocation
        kept = REVOCATION_KEEPS_OLD_SIGNATURES.get(code)
        if kept is None:
            return False, f"the key is revoked (reason code {code}: every signature of it is void)"
        if st.sig_time >= when:
            return False, f"signed at {_iso(st.sig_time)}, after the key was revoked ({kept}) at {_iso(when)}"
        return True, f"signed at {_iso(st.sig_time)}, before the key was revoked ({kept}) at {_iso(when)}"
    if "EXPKEYSIG" in st.kinds:
        if st.key_expired_at is None:
            return False, "the key has expired (no expiry time reported)"
        if st.sig_time >= st.key_expired_at:
            return False, f"signed at {_iso(st.sig_time)}, after the key expired at {_iso(st.key_expired_at)}"
        return True, f"signed at {_iso(st.sig_time)}, before the key expired at {_iso(st.key_expired_at)}"
    return False, "not an expired or revoked key"


def _iso(t: float) -> str:
    import time
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


class Keyring:
    def __init__(self, home: Path, secret_key: Path | None = None, passphrase: str | None = None,
                 compress_level: int = 0) -> None:
        home.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._link: Path | None = None
        gpg_home = home
        if len(str(home.resolve())) > _MAX_HOME:
            # keep the keyring under the state dir but reach it through a short symlink
            self._link = Path(tempfile.mkdtemp(prefix="rgw")) / "h"
            self._link.symlink_to(home.resolve())
            gpg_home = self._link
        os.chmod(home, 0o700)
        self.home = gpg_home
        self.gpg = gnupg.GPG(gnupghome=str(gpg_home))
        self.gpg.encoding = "utf-8"
        self.gpg.buffer_size = 1024 * 1024     # the stdin feeder thread: 64x fewer loops than 16 KiB
        self.passphrase = passphrase
        self.compress_level = compress_level
        self.fingerprint = ""
        if secret_key is not None:
            res = self.gpg.import_keys(secret_key.read_text(encoding="ascii"), passphrase=passphrase)
            secrets = [k["fingerprint"] for k in self.gpg.list_keys(secret=True)]
            if not secrets:
                raise PgpError(f"{secret_key}: no OpenPGP secret key in it ({res.summary()})")
            self.fingerprint = secrets[0]

    def close(self) -> None:
        subprocess.run(["gpgconf", "--homedir", str(self.home), "--kill", "gpg-agent"],
                       capture_output=True, timeout=10, check=False)
        if self._link is not None:
            shutil.rmtree(self._link.parent, ignore_errors=True)

    def import_public(self, armored: str) -> list[str]:
        res = self.gpg.import_keys(armored)
        return [f for f in res.fingerprints if f]

    def export_public(self) -> str:
        return str(self.gpg.export_keys(self.fingerprint))

    def judge(self, st: SigStatus) -> tuple[bool, str]:
        """A signature by an expired (EXPKEYSIG) or revoked (REVKEYSIG) key: (good, why)."""
        if not st.kinds & {"EXPKEYSIG", "REVKEYSIG"}:
            return False, "not an expired or revoked key"
        revocation = self.revocation(st.signer) if "REVKEYSIG" in st.kinds else None
        return signature_still_good(st, revocation)

    def revocation(self, fpr: str) -> tuple[float, int] | None:
        """(time, reason code) of the primary key's revocation, from `gpg --list-sigs
        --with-colons` (a `rev` record: field 6 the time, field 11 "20x,<code>")."""
        if not fpr:
            return None
        res = subprocess.run(["gpg", "--homedir", str(self.home), "--batch", "--with-colons",
                              "--list-sigs", fpr], capture_output=True, text=True, timeout=60, check=False)
        for line in res.stdout.splitlines():
            f = line.split(":")
            if f[0] == "sub":
                break                       # a subkey's revocation is not the key's
            if f[0] == "rev" and len(f) > 10 and f[10].startswith("20") and f[5].isdigit():
                code = f[10].partition(",")[2]
                return float(f[5]), int(code, 16) if code else 0
        return None

    def own_key_expiry(self) -> float | None:
        """When this gateway's own key expires (Unix time), None if never; 0 if revoked."""
        for k in self.gpg.list_keys(secret=False, keys=[self.fingerprint]):
            if k.get("trust") == "r":
                return 0.0
            return float(k["expires"]) if k.get("expires") else None
        return None

    def encrypt_sign(self, src: Path, dst: Path, recipient_fpr: str) -> None:
        """Sign with our key and encrypt to recipient_fpr, armored, src file -> dst file."""
        res = self.gpg.encrypt_file(str(src), recipients=[recipient_fpr], sign=self.fingerprint,
                                    always_trust=True, armor=True, output=str(dst),
                                    passphrase=self.passphrase,
                                    extra_args=["--compress-level", str(self.compress_level)])
        if not res.ok:
            dst.unlink(missing_ok=True)
            raise PgpError(f"encryption to {recipient_fpr} failed: {res.status} {res.stderr[-500:]}")

    def sign_bytes(self, data: bytes) -> tuple[bytes, str]:
        """Detached armored signature of small data -> (signature, RFC 3156 micalg)."""
        res = self.gpg.sign(data, keyid=self.fingerprint, detach=True, binary=False,
                            passphrase=self.passphrase)
        if not res.data:
            raise PgpError(f"signing failed: {res.status}")
        algo = {"2": "sha1", "8": "sha256", "9": "sha384", "10": "sha512", "11": "sha224"}.get(
            str(res.hash_algo), "sha512")
        return bytes(res.data), f"pgp-{algo}"

    def verify_bytes(self, data: bytes, signature: bytes) -> str:
        """The primary key fingerprint of a good detached signature over data, else ""."""
        with tempfile.NamedTemporaryFile(dir=self.home, suffix=".asc") as sig:
            sig.write(signature)
            sig.flush()
            res = self.gpg.verify_data(sig.name, data)
        return str(res.pubkey_fingerprint or "") if res.valid else ""

    def decrypt_verify(self, src: Path, dst: Path) -> Verdict:
        """Decrypt src into dst and check the signature. dst is deleted unless the result is
        DECRYPTION_OKAY with GOODSIG+VALIDSIG (the caller still checks the signer)."""
        res = self.gpg.decrypt_file(str(src), output=str(dst), passphrase=self.passphrase)
        status = _status_lines(res.stderr or "")
        kinds = {s[0] for s in status if s}
        signer = next((s[-1] for s in status if s and s[0] == "VALIDSIG"), "")
        key_id = next((s[1] for s in status if s and s[0] in ("ERRSIG", "NO_PUBKEY") and len(s) > 1), "")
        decrypted = "DECRYPTION_OKAY" in kinds and "DECRYPTION_FAILED" not in kinds
        signed = bool(kinds & {"GOODSIG", "BADSIG", "ERRSIG", "EXPSIG", "EXPKEYSIG", "REVKEYSIG", "VALIDSIG"})
        good = ("GOODSIG" in kinds and bool(signer) and not kinds & {"BADSIG", "ERRSIG"}
                or self.judge(parse_status(status))[0])       # signed while the key was valid
        v = Verdict(decrypted, signed, good, signer, key_id,
                    "\n".join(" ".join(s) for s in status), "BADSIG" in kinds,
                    bool(kinds & {"EXPKEYSIG", "REVKEYSIG"}))
        if not (v.decrypted and v.good):
            dst.unlink(missing_ok=True)
        return v


def generate_key(home: Path, uid: str) -> tuple[str, str]:
    """Test/bench helper: a fresh ed25519/cv25519 key without passphrase in `home`.
    Returns (armored secret key, armored public key)."""
    return generate_key_expiring(home, uid, "never")


def generate_key_expiring(home: Path, uid: str, expire: str) -> tuple[str, str]:
    """generate_key whose signing (primary) key expires per gpg's `expire` ("1d", "seconds=30")."""
    ring = Keyring(home)
    try:
        subprocess.run(["gpg", "--homedir", str(ring.home), "--batch", "--passphrase", "",
                        "--quick-gen-key", uid, "ed25519", "sign", expire],
                       check=True, capture_output=True, timeout=60)
        fpr = ring.gpg.list_keys(secret=True)[0]["fingerprint"]
        subprocess.run(["gpg", "--homedir", str(ring.home), "--batch", "--passphrase", "",
                        "--quick-add-key", fpr, "cv25519", "encr", "never"],
                       check=True, capture_output=True, timeout=60)
        sec = ring.gpg.export_keys(fpr, secret=True, expect_passphrase=False)
        pub = ring.gpg.export_keys(fpr)
        return str(sec), str(pub)
    finally:
        ring.close()
