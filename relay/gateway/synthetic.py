"""Synthetic DICOM studies for tests and the benchmark (no patient data: made-up values).

A CT-like image per file, explicit VR little endian, written with pydicom; the pixel data is
pseudo-random so that nothing along the path can compress it away (or, with `pixels`, whatever
the caller makes: bench/bench_gateway.py's smooth CT phantom).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid


def synthetic_study(folder: Path, n: int = 3, rows: int = 64, cols: int = 64, frames: int = 1,
                    study_uid: str | None = None, pixels: Callable[[int], bytes] | None = None) -> list[Path]:
    """Write n instances of one new study into folder; returns their paths. pixels(i): the
    pixel data of instance i (rows*cols*frames 16-bit values), random bytes by default."""
    folder.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid()
    series_uid = generate_uid()
    paths = []
    for i in range(1, n + 1):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.PatientName = "Test^Synthetic"
        ds.PatientID = "SYN0001"
        ds.Modality = "CT"
        ds.StudyDate = "20261128"
        ds.InstanceNumber = i
        ds.Rows, ds.Columns = rows, cols
        if frames > 1:
            ds.NumberOfFrames = frames
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        ds.PixelData = pixels(i) if pixels else os.urandom(rows * cols * 2 * frames)
        p = folder / f"IMG{i:05d}.dcm"
        ds.save_as(p, enforce_file_format=True)
        paths.append(p)
    return paths


def read_dataset_bytes(path: Path) -> bytes:
    """The bytes of a Part 10 file after its file meta group: what a DICOM network transfer
    carries (each hop writes its own meta header, PS3.10 7.1)."""
    with open(path, "rb") as fp:
        fp.seek(128 + 4)
        # group 0002 length element: (0002,0000) UL, explicit VR: tag 4 + VR 2 + len 2 + value 4
        head = fp.read(12)
        group_len = int.from_bytes(head[8:12], "little")
        fp.seek(128 + 4 + 12 + group_len)
        return fp.read()
