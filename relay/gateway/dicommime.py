"""DICOM studies <-> MIME (DICOM PS3.12 Annex K "DICOM MIME media", RFC 3240).

One study = one multipart/mixed entity with one `application/dicom` part per file, base64,
written and read in blocks: a study is never held in memory and pixel data is never decoded
(pydicom reads headers only, stop_before_pixels).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from email.message import Message
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError

from relay.gateway.mime import (
    B64_BLOCK,
    BLOCK,
    Base64Decoder,
    Base64Encoder,
    MimeError,
    MultipartReader,
    new_boundary,
    param,
    read_headers,
)


class NotDicom(ValueError):
    """A file or MIME part that is not a DICOM Part 10 object."""


@dataclass(frozen=True)
class Instance:
    path: Path
    study_uid: str
    series_uid: str
    sop_uid: str
    size: int


_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def read_instance(path: Path) -> Instance:
    """Header of one DICOM Part 10 file (no pixel data read). Raises NotDicom."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True,
                             specific_tags=["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"])
    except (InvalidDicomError, OSError, ValueError, EOFError, KeyError, TypeError) as e:
        raise NotDicom(f"{path.name}: not a DICOM file ({e.__class__.__name__}: {e})") from None
    if not hasattr(ds, "file_meta") or "TransferSyntaxUID" not in ds.file_meta:
        raise NotDicom(f"{path.name}: no DICOM file meta information (PS3.10 preamble/DICM)")
    study = str(ds.get("StudyInstanceUID", "") or "")
    sop = str(ds.get("SOPInstanceUID", "") or ds.file_meta.get("MediaStorageSOPInstanceUID", ""))
    if not _UID_RE.match(study) or not _UID_RE.match(sop):
        raise NotDicom(f"{path.name}: missing or malformed StudyInstanceUID/SOPInstanceUID")
    return Instance(path, study, str(ds.get("SeriesInstanceUID", "") or ""), sop, path.stat().st_size)


DICOMDIR = "DICOMDIR"        # PS3.10 8.6: the media directory's fixed file ID, at the file-set root


def find_files(paths: Iterable[str | Path]) -> list[Path]:
    """Files given, and every file below the folders given (sorted, hidden files skipped).
    A folder holding a DICOMDIR is a media file set (a CD export): only the files its records
    reference are taken (a viewer, autorun.inf and the like beside them are not), and the
    DICOMDIR itself is not (docs/gateway.md, "CD exports")."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_file() and p.name.upper() == DICOMDIR:
            out += dicomdir_files(p)
        elif p.is_dir():
            for root, dirs, files in os.walk(p):
                index = next((f for f in files if f.upper() == DICOMDIR), None)
                if index is not None:
                    out += dicomdir_files(Path(root) / index)
                    dirs[:] = []                 # the file set below is the DICOMDIR's
                    continue
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                out += [Path(root) / f for f in sorted(files) if not f.startswith(".")]
        elif p.is_file():
            out.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such file or folder")
    return out


def dicomdir_files(index: Path) -> list[Path]:
    """The files a DICOMDIR references (ReferencedFileID, relative to its folder), in record
    order. Media mounted with lower-case names (ISO 9660 `map=normal`) are found too."""
    try:
        ds = pydicom.dcmread(index, stop_before_pixels=True)
        records = list(ds.DirectoryRecordSequence)
    except (InvalidDicomError, OSError, ValueError, EOFError, KeyError, TypeError, AttributeError) as e:
        raise NotDicom(f"{index}: not a readable DICOMDIR ({e.__class__.__name__}: {e})") from None
    out: list[Path] = []
    for rec in records:
        ref = rec.get("ReferencedFileID")
        if not ref:
            continue
        parts = [str(ref)] if isinstance(ref, str) else [str(c) for c in ref]
        path = index.parent.joinpath(*parts)
        if not path.is_file() and index.parent.joinpath(*(c.lower() for c in parts)).is_file():
            path = index.parent.joinpath(*(c.lower() for c in parts))
        if not path.is_file():
            raise NotDicom(f"{index}: names {'/'.join(parts)}, which is not there (an incomplete copy "
                           "of the medium?)")
        out.append(path)
    if not out:
        raise NotDicom(f"{index}: references no files")
    return out


def group_studies(files: Iterable[Path]) -> dict[str, list[Instance]]:
    """StudyInstanceUID -> its instances (in file order). Raises NotDicom on the first non-DICOM
    file: the administrator fixes the input rather than have a study sent incomplete."""
    studies: dict[str, list[Instance]] = {}
    for f in files:
        inst = read_instance(f)
        studies.setdefault(inst.study_uid, []).append(inst)
    return studies


def file_id(n: int) -> str:
    """RFC 3240 'id': a DICOM File ID component (<= 8 chars of A-Z 0-9 _)."""
    return f"IM{n:06d}"


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)[:120] or "file.dcm"


def write_study(instances: list[Instance], out_path: Path) -> int:
    """Write the study as a MIME entity (headers + multipart/mixed body, CRLF) to out_path.
    Returns its size."""
    boundary = new_boundary()
    enc = Base64Encoder()
    with open(out_path, "wb") as out:
        out.write(
            f'Content-Type: multipart/mixed; boundary="{boundary}"\r\n'
            f"Content-Description: DICOM study {instances[0].study_uid}\r\n"
            f"\r\n"
            f"This is a DICOM study in MIME format (DICOM PS3.12 Annex K, RFC 3240).\r\n".encode())
        for n, inst in enumerate(instances, 1):
            name = _safe_name(inst.path.name)
            out.write(
                f"\r\n--{boundary}\r\n"
                f'Content-Type: application/dicom; id="{file_id(n)}"; name="{name}"\r\n'
                f"Content-Transfer-Encoding: base64\r\n"
                f'Content-Disposition: attachment; filename="{name}"\r\n'
                f"\r\n".encode())
            with open(inst.path, "rb") as src:
                while data := src.read(B64_BLOCK):
                    out.write(enc.feed(data))
            out.write(enc.finish())
        out.write(f"\r\n--{boundary}--\r\n".encode())
        return out.tell()


@dataclass(frozen=True)
class ExtractedFile:
    path: Path
    name: str
    instance: Instance


def extract_study(mime_path: Path, out_dir: Path) -> list[ExtractedFile]:
    """Decode every part of a study entity into out_dir (one file per part, in order) and check
    each is DICOM. Raises NotDicom (a part that is not application/dicom or not DICOM) or
    MimeError (malformed MIME)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    result: list[ExtractedFile] = []
    with open(mime_path, "rb") as fp:
        head, _ = read_headers(fp)
        if head.get_content_type() == "application/dicom":
            parts = None
        elif head.get_content_maintype() == "multipart":
            boundary = param(head, "boundary")
            if not boundary:
                raise MimeError("multipart without a boundary")
            parts = MultipartReader(fp, boundary).parts()
        else:
            raise NotDicom(f"content is {head.get_content_type()}, not DICOM")

        def one(h: Message, chunks: Iterable[bytes], n: int) -> None:
            if h.get_content_type() != "application/dicom":
                raise NotDicom(f"part {n} is {h.get_content_type()}, not application/dicom")
            cte = (h.get("content-transfer-encoding") or "7bit").strip().lower()
            name = _safe_name(param(h, "name") or param(h, "filename", "content-disposition")
                              or f"{file_id(n)}.dcm")
            target = out_dir / f"{n:06d}.part"
            dec = Base64Decoder() if cte == "base64" else None
            if cte not in ("base64", "binary", "8bit", "7bit"):
                raise MimeError(f"part {n}: unsupported Content-Transfer-Encoding {cte}")
            with open(target, "wb") as out:
                out.writelines(dec.feed(c) if dec else c for c in chunks)
                if dec:
                    dec.finish()
                out.flush()
                os.fsync(out.fileno())      # it leaves the mailbox once imported
            inst = read_instance(target)
            result.append(ExtractedFile(target, name, inst))

        if parts is None:
            one(head, iter(lambda: fp.read(BLOCK), b""), 1)
        else:
            for n, (headers, chunks) in enumerate(parts, 1):
                one(headers, chunks, n)
    if not result:
        raise NotDicom("no DICOM parts")
    return result
