"""Realistic DICOM e-mails, composed from a pool of pre-built parts so CPU is not the bottleneck.

The pool holds `application/dicom` MIME parts (RFC 3240; DICOM PS3.12 Annex K: each part one
DICOM file, named after its File ID with ".dcm"), each a synthetic DICOM object made with
pydicom (random pixel data: incompressible, like real noise or ciphertext), base64 in CRLF
lines of 76 characters. Part sizes go up in steps of 4 (4 KiB .. 256 MiB of e-mail bytes), so
any message size is a sum of at most 3 parts per step. Each part's CRC-32 is computed once; a
message's body digest is combined from its parts' CRCs (zlib's crc32_combine), so the sender
never reads a byte to digest it. Receivers compute the CRC of what they got and compare.

Each message carries `X-Loadgen-Id` and `X-Loadgen-Digest: crc32=<8 hex>; size=<body bytes>`
(the body is everything after the header block's empty line). A study larger than the
profile's `partial_above` goes as message/partial pieces (RFC 2046 5.2.2), cut at part
boundaries; each piece is a message with its own id and digest.
"""

from __future__ import annotations

import base64
import math
import os
import random
import shutil
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from email.utils import formatdate
from pathlib import Path

BASE = 4096
STEP = 4
MAX_LEVEL = 8                                  # 4 KiB * 4^8 = 256 MiB
READ = 1024 * 1024
BOUNDARY = "loadgen-dicom-boundary-7d1f"       # base64 never contains '-': safe as a boundary


# --- CRC-32 combination (zlib's crc32_combine, GF(2) matrix method) -------------------------

def _gf2_times(mat: list[int], vec: int) -> int:
    s = 0
    i = 0
    while vec:
        if vec & 1:
            s ^= mat[i]
        vec >>= 1
        i += 1
    return s


def _gf2_square(mat: list[int]) -> list[int]:
    return [_gf2_times(mat, mat[n]) for n in range(32)]


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """CRC-32 of A+B from crc32(A), crc32(B) and len(B)."""
    op = [0xEDB88320] + [1 << n for n in range(31)]    # the operator for one zero bit
    for _ in range(3):
        op = _gf2_square(op)                           # ... for one zero byte
    while len2 > 0:
        if len2 & 1:
            crc1 = _gf2_times(op, crc1)
        len2 >>= 1
        if len2:
            op = _gf2_square(op)
    return crc1 ^ crc2


# --- the pool ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Part:
    path: Path
    size: int
    crc: int


def _dicom_object(dicom_bytes: int, rng: random.Random, n: int) -> bytes:
    """A synthetic multi-frame grayscale (16 bit) Secondary Capture object of about
    `dicom_bytes`, with random pixel data."""
    import io

    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

    pixels = max(512, dicom_bytes - 700)                    # ~700 bytes of meta and attributes
    if pixels < 1024 * 1024:
        cols, rows, frames = 256, max(1, pixels // 512), 1
    else:
        cols, rows, frames = 256, 256, pixels // (256 * 256 * 2)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID("1.2.840.10008.5.1.4.1.1.7.3")   # Multi-frame Grayscale Word SC
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = "LOADGEN^SYNTHETIC"
    ds.PatientID = f"LG{n:06d}"
    ds.Modality = "OT"
    ds.ConversionType = "SYN"
    ds.InstanceNumber = n
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns, ds.NumberOfFrames = rows, cols, frames
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = rng.randbytes(rows * cols * frames * 2)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _write_part(path: Path, dicom: bytes, file_id: str) -> Part:
    head = (f"Content-Type: application/dicom; name=\"{file_id}.dcm\"\r\n"
            f"Content-Transfer-Encoding: base64\r\n"
            f"Content-Disposition: attachment; filename=\"{file_id}.dcm\"\r\n"
            f"Content-Description: synthetic DICOM object (loadgen)\r\n\r\n").encode()
    crc = zlib.crc32(head)
    size = len(head)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, head)
        step = 57 * 16384                                 # whole lines per chunk
        for i in range(0, len(dicom), step):
            enc = base64.encodebytes(dicom[i:i + step]).replace(b"\n", b"\r\n")
            os.write(fd, enc)
            crc = zlib.crc32(enc, crc)
            size += len(enc)
    finally:
        os.close(fd)
    return Part(path, size, crc)


class Pool:
    """Parts of e-mail size BASE * STEP**level, level 0 .. `levels - 1`."""

    def __init__(self, directory: Path, parts: list[Part]) -> None:
        self.directory = directory
        self.parts = parts

    @classmethod
    def build(cls, directory: Path, largest_message: int, seed: int = 1) -> Pool:
        """Make the parts needed for messages up to `largest_message` bytes (at most the
        256 MiB step; larger messages take several of those)."""
        directory.mkdir(parents=True, exist_ok=True)
        rng = random.Random(seed)
        levels = 1
        while levels <= MAX_LEVEL and BASE * STEP ** levels <= largest_message:
            levels += 1
        parts = []
        for level in range(levels):
            target = BASE * STEP ** level
            dicom_bytes = (target - 300) * 57 // 78
            dicom = _dicom_object(dicom_bytes, rng, level + 1)
            parts.append(_write_part(directory / f"part{level}.mime", dicom, f"IM{level + 1:06d}"))
        return cls(directory, parts)

    @property
    def bytes(self) -> int:
        return sum(p.size for p in self.parts)

    def compose(self, target: int) -> list[Part]:
        """Parts adding up to about `target` bytes (largest first; at least one part)."""
        out: list[Part] = []
        left = target
        for part in reversed(self.parts):
            while part.size <= left:
                out.append(part)
                left -= part.size
        return out or [self.parts[0]]


class PgpPool:
    """Pre-encrypted PGP/MIME payloads (RFC 3156): for each size step (x2, 4 KiB .. 256 MiB)
    one multipart/mixed entity with one DICOM part, signed and encrypted by gpg (the gateway's
    streaming Keyring) to a key made for the run, armored, with CRLF line ends. A PGP/MIME
    message takes the step nearest its size; receivers check its digest, not its plaintext."""

    MAX = BASE * 2 ** 16                           # 256 MiB

    def __init__(self, parts: list[Part], home: Path) -> None:
        self.parts = parts
        self.home = home

    @classmethod
    def build(cls, directory: Path, largest_message: int, seed: int = 1) -> PgpPool:
        from relay.gateway.pgp import Keyring, generate_key

        directory.mkdir(parents=True, exist_ok=True)
        sec, _ = generate_key(directory / "keygen", "loadgen <loadgen@loadgen.invalid>")
        (directory / "key.asc").write_text(sec)
        ring = Keyring(directory / "gnupg", secret_key=directory / "key.asc")
        rng = random.Random(seed + 1)
        parts: list[Part] = []
        try:
            size = BASE
            while True:
                dicom = _dicom_object(max(512, (size - 1200) * 57 // 78 * 3 // 4), rng, len(parts) + 1)
                plain = _write_part(directory / "part.mime", dicom, f"IM{len(parts) + 1:06d}")
                inner = directory / "inner.mime"
                with open(inner, "wb") as o, open(plain.path, "rb") as i:
                    o.write(f"Content-Type: multipart/mixed; boundary=\"{BOUNDARY}\"\r\n\r\n"
                            f"--{BOUNDARY}\r\n".encode())
                    shutil.copyfileobj(i, o, READ)
                    o.write(f"--{BOUNDARY}--\r\n".encode())
                ring.encrypt_sign(inner, directory / "armor.asc", ring.fingerprint)
                parts.append(_crlf_copy(directory / "armor.asc", directory / f"pgp{len(parts)}.asc"))
                if size >= min(largest_message, cls.MAX):
                    break
                size *= 2
        finally:
            ring.close()
            for f in ("part.mime", "inner.mime", "armor.asc"):
                (directory / f).unlink(missing_ok=True)
        return cls(parts, directory / "gnupg")

    @property
    def bytes(self) -> int:
        return sum(p.size for p in self.parts)

    def nearest(self, target: int) -> Part:
        return min(self.parts, key=lambda p: abs(math.log(p.size / max(1, target))))


def _crlf_copy(src: Path, dst: Path) -> Part:
    """gpg's armor (LF lines) as CRLF lines, with its CRC-32."""
    crc, size = 0, 0
    with open(src, "rb") as i, open(dst, "wb") as o:
        while chunk := i.read(READ):
            out = chunk.replace(b"\n", b"\r\n")          # armor has no CR of its own
            o.write(out)
            crc, size = zlib.crc32(out, crc), size + len(out)
    return Part(dst, size, crc)


PGP_BOUNDARY = "loadgen-pgp-boundary-3c9a"
_PGP_HEAD = (f"This is an OpenPGP/MIME encrypted message (RFC 3156).\r\n--{PGP_BOUNDARY}\r\n"
             "Content-Type: application/pgp-encrypted\r\n"
             "Content-Description: PGP/MIME version identification\r\n\r\nVersion: 1\r\n\r\n"
             f"--{PGP_BOUNDARY}\r\n"
             "Content-Type: application/octet-stream; name=\"encrypted.asc\"\r\n"
             "Content-Disposition: inline; filename=\"encrypted.asc\"\r\n\r\n").encode()
_PGP_TAIL = f"--{PGP_BOUNDARY}--\r\n".encode()


# --- messages ------------------------------------------------------------------------------

Segment = bytes | Part


@dataclass
class Message:
    id: str                     # X-Loadgen-Id
    sender: str
    recipient: str
    header: bytes               # the header block, ending with the empty line
    segments: list[Segment]     # the body
    body_size: int
    body_crc: int
    study: int = 0
    piece: int = 1
    pieces: int = 1

    @property
    def size(self) -> int:
        return len(self.header) + self.body_size

    def chunks(self, size: int = READ) -> Iterator[bytes]:
        """The whole message, streamed: header, then body segments read from the pool."""
        yield self.header
        for seg in self.segments:
            if isinstance(seg, bytes):
                yield seg
                continue
            with open(seg.path, "rb", buffering=0) as f:
                while chunk := f.read(size):
                    yield chunk


def _digest(segments: list[Segment]) -> tuple[int, int]:
    crc, size = 0, 0
    for seg in segments:
        if isinstance(seg, bytes):
            crc, n = zlib.crc32(seg, crc), len(seg)
        else:
            crc, n = crc32_combine(crc, seg.crc, seg.size), seg.size
        size += n
    return crc, size


def digest_header(crc: int, size: int) -> str:
    return f"crc32={crc:08x}; size={size}"


def build_study(run_id: str, study: int, sender: str, recipient: str, modality: str,
                target: int, pieces: int, pool: Pool, sim_time: float = 0.0,
                pgp: PgpPool | None = None) -> list[Message]:
    """The messages carrying one study of about `target` e-mail bytes: one multipart/mixed
    message, or `pieces` message/partial pieces of it; with `pgp`, one PGP/MIME message."""
    date = formatdate(sim_time + 1_767_571_200, usegmt=True)   # simulated time from Mon 2026-01-05
    if pgp is not None:
        segs: list[Segment] = [_PGP_HEAD, pgp.nearest(target), _PGP_TAIL]
        crc, size = _digest(segs)
        mid = f"{run_id}.{study}.1"
        head = [f"From: <{sender}>", f"To: <{recipient}>", f"Date: {date}",
                f"Message-ID: <{mid}@loadgen.invalid>", "Subject: DICOM", "MIME-Version: 1.0",
                (f"Content-Type: multipart/encrypted; protocol=\"application/pgp-encrypted\"; "
                f"boundary=\"{PGP_BOUNDARY}\""),
                f"X-Loadgen-Id: {mid}", f"X-Loadgen-Digest: {digest_header(crc, size)}"]
        header = ("\r\n".join(head) + "\r\n\r\n").encode()
        return [Message(mid, sender, recipient, header, segs, size, crc, study)]
    parts = pool.compose(target)
    inner_id = f"<{run_id}.{study}@loadgen.invalid>"
    subject = f"DICOM study {study} ({modality}, {len(parts)} objects)"
    mime = (f"MIME-Version: 1.0\r\n"
            f"Content-Type: multipart/mixed; boundary=\"{BOUNDARY}\"\r\n").encode()
    delim = f"--{BOUNDARY}\r\n".encode()
    close = f"--{BOUNDARY}--\r\n".encode()
    groups: list[list[Part]] = [[] for _ in range(max(1, min(pieces, len(parts))))]
    for part in parts:                   # largest first, each to the lightest piece so far
        min(groups, key=lambda g: sum(p.size for p in g)).append(part)
    total = len(groups)
    out = []
    for k, group in enumerate(groups, 1):
        segs = []
        if total > 1 and k == 1:
            segs.append(mime + f"Subject: {subject}\r\nMessage-ID: {inner_id}\r\n\r\n".encode())
        for part in group:
            segs += [delim, part]
        if k == total:
            segs.append(close)
        crc, size = _digest(segs)
        mid = f"{run_id}.{study}.{k}"
        head = [f"From: <{sender}>", f"To: <{recipient}>", f"Date: {date}",
                f"Message-ID: <{mid}@loadgen.invalid>"]
        if total > 1:
            head += [f"Subject: {subject} [{k}/{total}]", "MIME-Version: 1.0",
                     f"Content-Type: message/partial; id=\"{inner_id[1:-1]}\"; number={k}; total={total}"]
        else:
            head += [f"Subject: {subject}", *mime.decode().rstrip("\r\n").split("\r\n")]
        head += [f"X-Loadgen-Id: {mid}", f"X-Loadgen-Digest: {digest_header(crc, size)}"]
        header = ("\r\n".join(head) + "\r\n\r\n").encode()
        out.append(Message(mid, sender, recipient, header, segs, size, crc, study, k, total))
    return out


# --- verification ----------------------------------------------------------------------------

HEADER_LIMIT = 256 * 1024


@dataclass(frozen=True)
class Verdict:
    id: str | None              # None: no X-Loadgen-Id found
    ok: bool
    size: int                   # body bytes received
    reason: str = ""


def verify_file(path: str | os.PathLike[str]) -> Verdict:
    """Check a downloaded message against its own X-Loadgen-Digest (streamed, 4 MiB reads)."""
    with open(path, "rb", buffering=0) as f:
        head = b""
        while (end := head.find(b"\r\n\r\n")) < 0:
            more = f.read(64 * 1024)
            if not more or len(head) > HEADER_LIMIT:
                return Verdict(None, False, 0, "no header block")
            head += more
        body_start = head[end + 4:]
        fields: dict[str, str] = {}
        for line in head[:end].split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.lower() in (b"x-loadgen-id", b"x-loadgen-digest"):
                fields[name.lower().decode()] = value.strip().decode("ascii", "replace")
        mid = fields.get("x-loadgen-id")
        want = fields.get("x-loadgen-digest")
        if mid is None or want is None:
            return Verdict(mid, False, 0, "no X-Loadgen-Id/X-Loadgen-Digest")
        crc = zlib.crc32(body_start)
        size = len(body_start)
        while chunk := f.read(4 * READ):
            crc = zlib.crc32(chunk, crc)
            size += len(chunk)
    got = digest_header(crc, size)
    return Verdict(mid, got == want, size, "" if got == want else f"digest {got} != {want}")
