"""DICOM e-mails from the pool: valid MIME and DICOM (stdlib email parser, pydicom, dcmtk's
dcmdump), digests that catch a changed byte, message/partial pieces that reassemble."""

from __future__ import annotations

import base64
import email
import email.policy
import itertools
import os
import random
import subprocess
import zlib
from pathlib import Path

import pydicom
import pytest

from loadgen.message import PgpPool, Pool, build_study, crc32_combine, verify_file


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Pool:
    return Pool.build(tmp_path_factory.mktemp("pool"), 300_000)


def _write(path: Path, msg, trace: bytes = b"Return-Path: <x@y.test>\r\nReceived: by relay.test\r\n") -> Path:  # type: ignore[no-untyped-def]
    path.write_bytes(trace + b"".join(msg.chunks()))
    return path


def test_crc32_combine_matches_zlib() -> None:
    rng = random.Random(3)
    for n1, n2 in [(0, 5), (1, 1), (1000, 3333), (70000, 1), (5, 200000)]:
        a, b = rng.randbytes(n1), rng.randbytes(n2)
        assert crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(a + b)


def test_pool_parts_step_up_by_four(pool: Pool) -> None:
    sizes = [p.size for p in pool.parts]
    assert len(sizes) == 4 and sizes[0] < 5000   # 4 KiB .. 256 KiB for messages up to 300 kB
    assert all(3.5 < b / a < 4.5 for a, b in itertools.pairwise(sizes))
    for p in pool.parts:
        assert os.path.getsize(p.path) == p.size and zlib.crc32(p.path.read_bytes()) == p.crc


def test_message_is_multipart_mixed_with_valid_dicom_parts(pool: Pool, tmp_path: Path) -> None:
    (msg,) = build_study("run1", 7, "ct@hosp.test", "tele@centre.test", "CT", 200_000, 1, pool)
    assert abs(msg.size - 200_000) < 5000
    parsed = email.message_from_bytes(b"".join(msg.chunks()), policy=email.policy.default)
    assert parsed.get_content_type() == "multipart/mixed"
    assert parsed["X-Loadgen-Id"] == "run1.7.1" and parsed["To"] == "tele@centre.test"
    parts = list(parsed.iter_attachments())
    assert len(parts) >= 2
    for i, part in enumerate(parts):
        assert part.get_content_type() == "application/dicom"
        assert part.get_filename().endswith(".dcm") and len(part.get_filename()) == 12   # IM000003.dcm
        raw = part.get_content()
        path = tmp_path / f"obj{i}.dcm"
        path.write_bytes(raw)
        ds = pydicom.dcmread(path)
        assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
        assert len(ds.PixelData) == ds.Rows * ds.Columns * ds.NumberOfFrames * 2
        dump = subprocess.run(["dcmdump", "-q", str(path)], capture_output=True, text=True,
                              timeout=30, check=True).stdout
        assert "LOADGEN^SYNTHETIC" in dump


def test_digest_verifies_and_catches_one_changed_byte(pool: Pool, tmp_path: Path) -> None:
    (msg,) = build_study("run1", 8, "a@x.test", "b@x.test", "CR", 90_000, 1, pool)
    path = _write(tmp_path / "m.eml", msg)
    v = verify_file(path)
    assert v.ok and v.id == "run1.8.1" and v.size == msg.body_size
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    bad = verify_file(path)
    assert not bad.ok and bad.id == "run1.8.1" and "digest" in bad.reason
    path.write_bytes(bytes(data[:-10]))
    assert not verify_file(path).ok                   # truncated
    path.write_bytes(b"Subject: hello\r\n\r\nbody\r\n")
    assert verify_file(path).id is None and not verify_file(path).ok


def test_big_study_goes_as_message_partial_pieces_that_reassemble(pool: Pool, tmp_path: Path) -> None:
    msgs = build_study("run2", 3, "a@x.test", "b@x.test", "XA", 900_000, 3, pool)
    assert [m.piece for m in msgs] == [1, 2, 3] and len({m.id for m in msgs}) == 3
    inner = b""
    for m in msgs:
        assert verify_file(_write(tmp_path / f"{m.id}.eml", m)).ok
        outer = email.message_from_bytes(b"".join(m.chunks()), policy=email.policy.default)
        assert outer.get_content_type() == "message/partial"
        assert outer.get_param("number") == str(m.piece) and outer.get_param("total") == "3"
        inner += b"".join(m.chunks())[len(m.header):]
    whole = email.message_from_bytes(inner, policy=email.policy.default)
    assert whole.get_content_type() == "multipart/mixed"
    parts = list(whole.iter_attachments())
    assert sum(len(base64.b64decode(p.get_payload())) for p in parts) > 600_000
    sizes = [m.size for m in msgs]
    assert max(sizes) < 2 * min(sizes)                 # pieces are balanced by bytes


def test_pgp_mime_message_from_the_pre_encrypted_pool(tmp_path: Path) -> None:
    from relay.gateway.pgp import Keyring

    pgp = PgpPool.build(tmp_path / "pgp", 40_000)
    assert [p.size for p in pgp.parts][-1] >= 30_000 and len(pgp.parts) == 5       # 4 KiB x 2^k
    (msg,) = build_study("run3", 1, "a@x.test", "b@x.test", "CT", 33_000, 1, Pool(tmp_path, []), pgp=pgp)
    assert 0.7 < msg.size / 33_000 < 1.45
    path = _write(tmp_path / "m.eml", msg)
    assert verify_file(path).ok
    outer = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
    assert outer.get_content_type() == "multipart/encrypted"
    assert outer.get_param("protocol") == "application/pgp-encrypted"
    version, data = outer.get_payload()
    assert version.get_content_type() == "application/pgp-encrypted" and "Version: 1" in version.get_payload()
    armor = data.get_payload(decode=True)
    assert armor.startswith(b"-----BEGIN PGP MESSAGE-----")
    (tmp_path / "c.asc").write_bytes(armor)
    ring = Keyring(tmp_path / "ring", secret_key=tmp_path / "pgp" / "key.asc")
    try:
        v = ring.decrypt_verify(tmp_path / "c.asc", tmp_path / "plain.mime")
    finally:
        ring.close()
    assert v.decrypted and v.good
    inner = email.message_from_bytes((tmp_path / "plain.mime").read_bytes(), policy=email.policy.default)
    (part,) = list(inner.iter_attachments())
    (tmp_path / "x.dcm").write_bytes(part.get_content())
    assert pydicom.dcmread(tmp_path / "x.dcm").PatientName == "LOADGEN^SYNTHETIC"


def test_a_slow_sender_streams_a_second_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pacing an 8 MiB chunk at 200 kB/s: pieces of ~200 kB with pauses of about a second,
    not the whole chunk and then 42 s of silence (servers drop a DATA that stalls for 3 min)."""
    import types

    from loadgen import run as runmod

    class Clock:                                   # stop.wait() advances a virtual clock
        def __init__(self) -> None:
            self.now = 0.0
            self.waits: list[float] = []

        def monotonic(self) -> float:
            return self.now

        def wait(self, seconds: float) -> bool:
            self.waits.append(seconds)
            self.now += seconds
            return False

    clock = Clock()
    monkeypatch.setattr(runmod, "time", types.SimpleNamespace(monotonic=clock.monotonic))
    data = bytes(range(256)) * (8 * 4096)           # 8 MiB
    pieces = list(runmod._paced(iter([b"head\r\n", data]), 200_000, clock))  # type: ignore[arg-type]
    assert b"".join(pieces) == b"head\r\n" + data
    assert max(len(p) for p in pieces) <= 200_000 and len(pieces) >= 40
    assert max(clock.waits) <= 1.01 and 41 < clock.now < 43
    fast = list(runmod._paced(iter([data]), 1e12, clock))  # type: ignore[arg-type]
    assert fast == [data]                           # a fast link: the chunk as it is
