"""The gateway's one-pass data path (issue 15, item 5): DICOM files -> MIME -> gpg -> armor on
send; armor -> gpg -> MIME -> DICOM files on receive, with real gpg and no temporary files.

Keys are generated at test time (gpg --quick-gen-key in temporary GNUPGHOMEs)."""

from __future__ import annotations

import random
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay.gateway import dicommime as dm
from relay.gateway import message as M
from relay.gateway.mime import ArmorDecoder, ArmorEncoder, ChunkReader, MimeError
from relay.gateway.pgp import Keyring, PgpError, generate_key
from relay.gateway.synthetic import synthetic_study


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, str]]:
    base = tmp_path_factory.mktemp("keys")
    return {n: generate_key(base / n, f"{n} <{n}@example.test>") for n in ("a", "b")}


@pytest.fixture
def rings(tmp_path: Path, keys: dict[str, tuple[str, str]]) -> Iterator[tuple[Keyring, Keyring]]:
    """a (sender) and b (receiver), each knowing the other's public key."""
    made = []
    for me, peer in (("a", "b"), ("b", "a")):
        (tmp_path / f"{me}.sec.asc").write_text(keys[me][0])      # test fixture key
        ring = Keyring(tmp_path / f"gnupg-{me}", tmp_path / f"{me}.sec.asc")
        ring.import_public(keys[peer][1])
        made.append(ring)
    yield made[0], made[1]
    for r in made:
        r.close()


def _gpg_decrypts(ring: Keyring, armored: bytes) -> bytes:
    r = subprocess.run(["gpg", "--homedir", str(ring.home), "--batch", "--decrypt"], input=armored,
                       capture_output=True, timeout=60, check=False)
    assert r.returncode == 0, r.stderr.decode(errors="replace")
    return r.stdout


@pytest.mark.parametrize("size", [3 * 20_000, 3 * 20_000 + 1, 3 * 20_000 + 2])
def test_our_armor_is_read_by_the_gpg_cli_whatever_the_padding(size: int, rings: tuple[Keyring, Keyring]) -> None:
    """GnuPG 2.2 misreads an armor without the CRC24 line when the data needs no "=" padding
    (it decodes the END line as data): the CRC line is what makes every length work."""
    a, b = rings
    binary: list[bytes] = []
    data = random.Random(size).randbytes(size)
    a.encrypt_sign_stream(ChunkReader([data]), b.fingerprint, binary.append)
    blob = b"".join(binary)
    for cut in range(3):        # the OpenPGP data itself in all three padding cases
        enc = ArmorEncoder()
        armored = b"".join(enc.feed(blob[i:i + 4096]) for i in range(0, len(blob), 4096)) + enc.finish()
        lines = armored.split(b"\r\n")
        assert lines[0] == b"-----BEGIN PGP MESSAGE-----" and lines[1] == b""
        assert lines[-2] == b"-----END PGP MESSAGE-----" and lines[-3].startswith(b"=")
        assert all(len(x) <= 64 for x in lines[2:-3]) and b"\n" not in armored.replace(b"\r\n", b"")
        if cut == 0:
            assert _gpg_decrypts(b, armored) == data
        blob = blob[:-1]        # the ciphertext is now broken, but the armor must still round-trip
        dec = ArmorDecoder()
        assert b"".join(dec.feed(armored[i:i + 77]) for i in range(0, len(armored), 77)) + dec.finish() \
            == b"".join(binary)[:len(b"".join(binary)) - cut]


def test_armor_decoder_reads_gpgs_own_armor_with_header_lines_in_any_chunking(rings: tuple[Keyring, Keyring]) -> None:
    a, b = rings
    data = random.Random(1).randbytes(100_000)
    r = subprocess.run(["gpg", "--homedir", str(a.home), "--batch", "--trust-model", "always", "--armor",
                        "--comment", "made by a test", "--emit-version", "-e", "-r", b.fingerprint],
                       input=data, capture_output=True, timeout=60, check=True)
    armored = r.stdout
    assert b"\nComment: made by a test\n" in armored and b"\nVersion: " in armored
    binary: list[bytes] = []
    rnd = random.Random(2)
    pos, dec = 0, ArmorDecoder()
    while pos < len(armored):
        n = rnd.randint(1, 300)
        binary.append(dec.feed(armored[pos:pos + n]))
        pos += n
    binary.append(dec.finish())
    r = subprocess.run(["gpg", "--homedir", str(b.home), "--batch", "--decrypt"], input=b"".join(binary),
                       capture_output=True, timeout=60, check=True)
    assert r.stdout == data
    with pytest.raises(MimeError, match="END"):
        dec = ArmorDecoder()
        dec.feed(armored[:len(armored) // 2])
        dec.finish()


def _round_trip(tmp: Path, a: Keyring, b: Keyring, encoding: str) -> tuple[list[Path], list[dm.ExtractedFile], int]:
    files = synthetic_study(tmp / f"in-{encoding}", n=3, rows=128, cols=128, frames=20)
    insts = next(iter(dm.group_studies(files).values()))
    msg = tmp / f"msg-{encoding}"
    size = M.build_encrypted(dm.study_chunks(insts, encoding), msg, a, b.fingerprint, "a@example.test",
                             "b@example.test", M.new_message_id("example.test"))
    assert size == msg.stat().st_size
    with open(msg, "rb") as fp:
        _, armored = M.open_encrypted(fp)
        source = ChunkReader(M.dearmored(armored))
        v, got, failed = b.decrypt_verify_into(source, lambda plain: dm.extract_study(plain, tmp / f"out-{encoding}"))
    assert failed is None and source.error is None and got is not None
    assert v.decrypted and v.good and v.signer == a.fingerprint
    return files, got, size


@pytest.mark.parametrize("encoding", ["base64", "binary"])
def test_study_round_trip_is_byte_identical(encoding: str, tmp_path: Path, rings: tuple[Keyring, Keyring]) -> None:
    a, b = rings
    files, got, size = _round_trip(tmp_path, a, b, encoding)
    assert [e.path.read_bytes() for e in got] == [f.read_bytes() for f in files]
    assert list(tmp_path.glob("**/*.mime")) == [] and list(tmp_path.glob("**/*.asc.*")) == []
    dicom = sum(f.stat().st_size for f in files)
    # base64 inside, armor outside: 4/3 * 78/76 * 4/3 * 66/64 = 1.88; binary inside: 1.38
    assert size / dicom == pytest.approx(1.88 if encoding == "base64" else 1.38, abs=0.03)
    # the message is still RFC 3156 PGP/MIME that the gpg CLI reads
    with open(tmp_path / f"msg-{encoding}", "rb") as fp:
        _, armored = M.open_encrypted(fp)
        plain = _gpg_decrypts(b, b"".join(armored))
    assert f"Content-Transfer-Encoding: {encoding}\r\n".encode() in plain[:4000]


def test_files_written_under_a_bad_verdict_are_reported_as_such(tmp_path: Path, rings: tuple[Keyring, Keyring],
                                                                   keys: dict[str, tuple[str, str]]) -> None:
    """The plaintext streams out before gpg has checked the signature: the verdict comes with
    it, and the consumer's error (not DICOM) is handed back, not raised over the verdict."""
    a, b = rings
    (tmp_path / "c.sec.asc").write_text(keys["b"][0])       # b's key without a's public key
    c = Keyring(tmp_path / "gnupg-c", tmp_path / "c.sec.asc")
    try:
        files = synthetic_study(tmp_path / "in", n=1, rows=64, cols=64)
        insts = next(iter(dm.group_studies(files).values()))
        M.build_encrypted(dm.study_chunks(insts), tmp_path / "msg", a, b.fingerprint, "a@example.test",
                          "b@example.test", "<1@example.test>")
        with open(tmp_path / "msg", "rb") as fp:
            _, armored = M.open_encrypted(fp)
            v, got, failed = c.decrypt_verify_into(ChunkReader(M.dearmored(armored)),
                                                   lambda plain: dm.extract_study(plain, tmp_path / "out"))
        assert v.decrypted and v.signed and not v.good and v.key_id and failed is None

        def refuse(plain: object) -> None:
            raise dm.NotDicom("refused by the consumer")
        with open(tmp_path / "msg", "rb") as fp:
            _, armored = M.open_encrypted(fp)
            v, got, failed = b.decrypt_verify_into(ChunkReader(M.dearmored(armored)), refuse)
        assert v.good and got is None and isinstance(failed, dm.NotDicom)
    finally:
        c.close()


def test_gpg_refusing_at_the_start_is_a_pgp_error_not_a_broken_pipe(rings: tuple[Keyring, Keyring]) -> None:
    """gpg that stops before reading its input (here: no such recipient key; also an expired
    signing key) makes python-gnupg's stdin feeder raise BrokenPipeError on a big study: the
    caller gets PgpError with gpg's own reason instead."""
    a, _ = rings
    big = ChunkReader([bytes(1 << 20)] * 8)                 # well beyond the pipe's buffer
    with pytest.raises(PgpError, match="invalid recipient|No public key"):
        a.encrypt_sign_stream(big, "0123456789ABCDEF0123456789ABCDEF01234567", lambda _: None)
    v, got, failed = a.decrypt_verify_into(ChunkReader([bytes(1 << 20)] * 8), lambda plain: plain.read())
    assert not v.decrypted and not v.good and "NODATA" in v.status and failed is None


def test_a_consumer_that_stops_early_does_not_block_gpg(tmp_path: Path, rings: tuple[Keyring, Keyring]) -> None:
    a, b = rings
    data = random.Random(4).randbytes(24 * 1024 * 1024)    # 3x the queue between gpg and us
    binary: list[bytes] = []
    a.encrypt_sign_stream(ChunkReader([data[i:i + 1 << 20] for i in range(0, len(data), 1 << 20)]),
                          b.fingerprint, binary.append)

    def first_block_only(plain: object) -> int:
        assert hasattr(plain, "read")
        return len(plain.read())
    v, got, failed = b.decrypt_verify_into(ChunkReader(binary), first_block_only)
    assert v.good and got and got <= 1 << 20 and failed is None


def test_a_broken_source_is_reported_after_gpg_finished(tmp_path: Path, rings: tuple[Keyring, Keyring]) -> None:
    """A DICOM file that cannot be read half-way: the error itself, no half message left."""
    a, b = rings

    def chunks() -> Iterator[bytes]:
        yield b"x" * 1000
        raise OSError("disk read error")
    with pytest.raises(OSError, match="disk read error"):
        M.build_encrypted(chunks(), tmp_path / "msg", a, b.fingerprint, "a@x.test", "b@x.test", "<2@x.test>")
    assert not (tmp_path / "msg").exists()
    source = ChunkReader(chunks())
    assert source.read() == b"x" * 1000 and source.read() == b"" and isinstance(source.error, OSError)
