"""PACS link against dcmtk (the real storescu/storescp from /usr/bin, not pynetdicom's apps
of the same name): storescu -> our Storage SCP; our Storage SCU -> storescp.

Byte-identity is checked on the dataset after the file meta group: DIMSE carries only the
dataset, and every hop writes its own Part 10 meta header (PS3.10 7.1)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import pydicom
import pytest

from relay.gateway.config import from_dict
from relay.gateway.pacs import StorageScp, push_study
from relay.gateway.synthetic import read_dataset_bytes, synthetic_study

STORESCU = "/usr/bin/storescu"
STORESCP = "/usr/bin/storescp"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def gw_config(tmp: Path, **kw: object) -> object:
    (tmp / "k.asc").write_text("unused in this test")
    raw = {"address": "ct@example.test", "secret_key": "k.asc", "directory_key": "k.asc", **kw}
    return from_dict(raw, tmp)


def wait_for(cond: object, timeout: float = 20.0) -> None:
    assert callable(cond)
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


class StorescpExited(RuntimeError):
    """storescp ended before it listened (its port was taken meanwhile: free_port() races)."""


def start_storescp(out: Path, port: int, accept: tuple[str, ...] = ("+xa",)) -> subprocess.Popen[bytes]:
    """dcmtk's storescp; `accept`: its transfer syntax options (+xa all; () uncompressed only)."""
    out.mkdir(parents=True, exist_ok=True)
    p = subprocess.Popen([STORESCP, "-aet", "PACS", *accept, "+B", "-od", str(out), str(port)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_for(lambda: p.poll() is not None or _listening(port))
    if p.poll() is not None:
        raise StorescpExited(p.communicate()[1].decode(errors="replace"))
    return p


def push_to_storescp(tmp: Path, study: Path, accept: tuple[str, ...] = ("+xa",)) -> tuple[int, Path]:
    """push_study() of `study` to a storescp started for it: (files pushed, its output folder)."""
    for attempt in range(3):
        port = free_port()
        try:
            scp = start_storescp(tmp / "pacs", port, accept)
            break
        except StorescpExited:
            if attempt == 2:
                raise
    try:
        cfg = gw_config(tmp, pacs=f"127.0.0.1:{port}", pacs_ae="PACS")
        return push_study(cfg, study), tmp / "pacs"  # type: ignore[arg-type]
    finally:
        scp.terminate()
        scp.wait(10)


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_storescu_to_scp_groups_studies_after_quiet_period(tmp_path: Path) -> None:
    a = synthetic_study(tmp_path / "in" / "a", n=3)
    b = synthetic_study(tmp_path / "in" / "b", n=2, rows=32, cols=32)
    cfg = gw_config(tmp_path, dicom_listen="127.0.0.1:0", quiet_period=0.5, state_dir="state")
    got: list[str] = []

    def on_study(folder: Path) -> None:
        shutil.copytree(folder, tmp_path / "fwd" / folder.name)
        got.append(folder.name)

    scp = StorageScp(cfg, on_study)  # type: ignore[arg-type]
    port = scp.start()
    try:
        for files in (a, b):
            r = subprocess.run([STORESCU, "-aec", "RELAYGW", "127.0.0.1", str(port), *map(str, files)],
                               capture_output=True, timeout=60, check=False)
            assert r.returncode == 0, r.stderr
        wait_for(lambda: len(got) == 2)
        time.sleep(0.6)
        assert len(got) == 2           # each study forwarded once
    finally:
        scp.stop()
    assert not any((tmp_path / "state" / "pacs-in").iterdir())     # spool emptied
    for files in (a, b):
        dss = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
        fwd = tmp_path / "fwd" / str(dss[0].StudyInstanceUID)
        assert {p.name: read_dataset_bytes(p) for p in fwd.iterdir()} == {
            f"{ds.SOPInstanceUID}.dcm": read_dataset_bytes(f) for ds, f in zip(dss, files, strict=True)}


def test_scp_keeps_a_study_whose_forwarding_failed(tmp_path: Path) -> None:
    a = synthetic_study(tmp_path / "in", n=2)
    cfg = gw_config(tmp_path, dicom_listen="127.0.0.1:0", quiet_period=0.3, state_dir="state")
    calls: list[str] = []

    def failing(folder: Path) -> None:
        calls.append(folder.name)
        raise RuntimeError("relay down")

    scp = StorageScp(cfg, failing)  # type: ignore[arg-type]
    port = scp.start()
    try:
        subprocess.run([STORESCU, "-aec", "RELAYGW", "127.0.0.1", str(port), *map(str, a)],
                       capture_output=True, timeout=60, check=True)
        wait_for(lambda: len(calls) >= 2)       # retried after another quiet period
    finally:
        scp.stop()
    assert len(list((tmp_path / "state" / "pacs-in" / calls[0]).iterdir())) == 2


def test_push_study_to_storescp_is_bit_preserving(tmp_path: Path) -> None:
    files = synthetic_study(tmp_path / "study", n=3)
    assert push_to_storescp(tmp_path, tmp_path / "study")[0] == 3
    received = sorted(read_dataset_bytes(p) for p in (tmp_path / "pacs").iterdir())
    assert received == sorted(read_dataset_bytes(f) for f in files)


def test_push_to_absent_pacs_is_a_clear_error(tmp_path: Path) -> None:
    from relay.gateway.core import GatewayError
    synthetic_study(tmp_path / "study", n=1)
    cfg = gw_config(tmp_path, pacs=f"127.0.0.1:{free_port()}")
    with pytest.raises(GatewayError, match="association refused or not reachable"):
        push_study(cfg, tmp_path / "study")  # type: ignore[arg-type]


def test_a_pause_inside_one_association_does_not_cut_the_study_in_two(tmp_path: Path) -> None:
    """A PACS that waits longer than quiet_period between two images of one association: the
    study is forwarded once, whole, after the association is released."""
    from pynetdicom import AE

    files = synthetic_study(tmp_path / "in", n=2)
    cfg = gw_config(tmp_path, dicom_listen="127.0.0.1:0", quiet_period=0.2, state_dir="state")
    got: list[int] = []
    scp = StorageScp(cfg, lambda folder: got.append(len(list(folder.iterdir()))))  # type: ignore[arg-type]
    port = scp.start()
    try:
        ae = AE(ae_title="PACS")
        meta = pydicom.filereader.read_file_meta_info(files[0])
        ae.add_requested_context(meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID)
        assoc = ae.associate("127.0.0.1", port, ae_title="RELAYGW")
        assert assoc.is_established
        try:
            assert assoc.send_c_store(files[0]).Status == 0
            time.sleep(1.0)                     # 5 quiet periods with the association open
            assert got == []
            assert assoc.send_c_store(files[1]).Status == 0
        finally:
            assoc.release()
        wait_for(lambda: got != [])
    finally:
        scp.stop()
    assert got == [2]


def test_scp_answers_c_echo_from_dcmtk(tmp_path: Path) -> None:
    """docs/gateway.md tells the administrator to check the link with echoscu."""
    cfg = gw_config(tmp_path, dicom_listen="127.0.0.1:0", state_dir="state")
    scp = StorageScp(cfg, lambda folder: None)  # type: ignore[arg-type]
    port = scp.start()
    try:
        r = subprocess.run(["/usr/bin/echoscu", "-aec", "RELAYGW", "127.0.0.1", str(port)],
                           capture_output=True, timeout=60, check=False)
    finally:
        scp.stop()
    assert r.returncode == 0, r.stderr


# objects in compressed transfer syntaxes, as pydicom ships them: RLE, JPEG-LS lossless,
# JPEG 2000, JPEG extended (lossy)
COMPRESSED = ["MR_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm", "JPEG2000.dcm", "JPGExtended.dcm"]


@pytest.mark.parametrize("only", ["", "+xi"], ids=["uncompressed", "implicit-only"])
def test_push_falls_back_to_uncompressed_for_a_pacs_that_takes_nothing_else(tmp_path: Path, only: str) -> None:
    """dcmtk's storescp accepts only uncompressed transfer syntaxes by default (`+xi`: only
    implicit VR little endian): the compressed objects arrive decompressed, pixel for pixel."""
    from pydicom.data import get_testdata_file
    from pydicom.uid import ImplicitVRLittleEndian, UncompressedTransferSyntaxes, generate_uid

    study = tmp_path / "study"
    study.mkdir()
    expected = {}
    for name in COMPRESSED:
        src = get_testdata_file(name)
        assert src is not None, name
        ds = pydicom.dcmread(src)
        assert ds.file_meta.TransferSyntaxUID.is_compressed
        # two of them are the same image: each gets its own SOP Instance UID (pixels untouched)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.save_as(study / f"{ds.SOPInstanceUID}.dcm")
        expected[str(ds.SOPInstanceUID)] = ds.pixel_array
    n, out = push_to_storescp(tmp_path, study, (only,) if only else ())
    assert n == len(COMPRESSED)
    got = {str(ds.SOPInstanceUID): ds for ds in map(pydicom.dcmread, out.iterdir())}
    assert set(got) == set(expected)
    for uid, ds in got.items():
        ts = ds.file_meta.TransferSyntaxUID
        assert ts in UncompressedTransferSyntaxes and (ts == ImplicitVRLittleEndian or not only)
        assert (ds.pixel_array == expected[uid]).all(), uid


def test_push_keeps_the_stored_syntax_where_the_pacs_accepts_it(tmp_path: Path) -> None:
    """`+xa`: the PACS takes JPEG 2000 as it is; nothing is decompressed."""
    from pydicom.data import get_testdata_file

    src = get_testdata_file("JPEG2000.dcm")
    assert src is not None
    (tmp_path / "study").mkdir()
    shutil.copy(src, tmp_path / "study" / "x.dcm")
    n, out = push_to_storescp(tmp_path, tmp_path / "study")
    [got] = list(out.iterdir())
    assert n == 1
    assert read_dataset_bytes(got) == read_dataset_bytes(Path(src))
