"""The PACS link (pynetdicom).

Storage SCP (`relay gateway pacs-listen`): a PACS pushes a study with C-STORE; datasets are
written to disk as received (pynetdicom's chunked receive: never decoded, never in memory),
grouped by StudyInstanceUID, and a study is sent once no instance of it has arrived for
`quiet_period` seconds and the associations that brought it are closed (a PACS that pauses
between two images of one association does not get its study cut in two). An association
held open without new images holds its studies back for at most HOLD_OPEN x quiet_period.

Storage SCU: pushes an imported study folder to the receiver's PACS (`pacs = "HOST:PORT"`),
each file sent as stored, in its own transfer syntax (no re-encoding) where the PACS accepts
it. For every SOP class an uncompressed context (explicit, then implicit VR little endian) is
proposed beside the file's own; a PACS that refuses the compressed syntax gets the object
decompressed (pydicom's pixel handlers: RLE natively, JPEG/JPEG-LS through pylibjpeg-libjpeg,
JPEG 2000 through pylibjpeg-openjpeg; docs/decisions.md "PACS fallback").
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom
from pynetdicom import AE, _config, evt
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from relay.config import parse_hostport
from relay.gateway.config import GatewayConfig
from relay.gateway.core import GatewayError
from relay.log import get_logger

log = get_logger("gateway.pacs")
logging.getLogger("pynetdicom").setLevel(logging.WARNING)

# the received dataset goes to a file in DICOM File Format instead of memory (pynetdicom 2.0)
_config.STORE_RECV_CHUNKED_DATASET = True

_ALL_TS = [
    pydicom.uid.ExplicitVRLittleEndian, pydicom.uid.ImplicitVRLittleEndian,
    pydicom.uid.DeflatedExplicitVRLittleEndian, pydicom.uid.ExplicitVRBigEndian,
    *pydicom.uid.JPEGTransferSyntaxes, *pydicom.uid.JPEGLSTransferSyntaxes,
    *pydicom.uid.JPEG2000TransferSyntaxes, *pydicom.uid.RLETransferSyntaxes,
]


HOLD_OPEN = 10       # x quiet_period: longest an idle open association delays its studies

# the fallback every PACS must take (PS3.5 10.1: implicit VR little endian is the default
# transfer syntax; explicit VR little endian is the one nearly all propose first)
UNCOMPRESSED_TS = [pydicom.uid.ExplicitVRLittleEndian, pydicom.uid.ImplicitVRLittleEndian]
MAX_CONTEXTS = 128   # PS3.8 9.3.2.2: presentation context IDs are odd numbers 1..255
# converting an object means holding its decoded pixels in memory: one bigger than this is
# not converted (an error for the administrator) rather than taking the machine's memory
MAX_CONVERT_BYTES = 2 * 1024**3
# PS3.4 B.2.3: 0xB000, 0xB006, 0xB007 are warnings ("stored, with coercion"): stored
STORED = {0x0000, 0xB000, 0xB006, 0xB007}


class StorageScp:
    """C-STORE receiver. `on_study(folder)` is called (in the watcher thread) for each study
    that has been quiet for `quiet_period` seconds; the folder is removed afterwards if it
    returns normally."""

    def __init__(self, cfg: GatewayConfig, on_study: Callable[[Path], None],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.cfg = cfg
        self.on_study = on_study
        self.clock = clock
        self.spool = cfg.state_dir / "pacs-in"
        self.spool.mkdir(parents=True, exist_ok=True)
        self._last: dict[str, float] = {}
        self._open: dict[str, set[int]] = {}      # study -> ids of open associations sending it
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.server: Any = None
        self.port = 0
        # studies left from a previous run are sent after a quiet period too
        for d in self.spool.iterdir():
            if d.is_dir():
                self._last[d.name] = clock()

    def _on_store(self, event: Any) -> int:
        src = Path(event.dataset_path)
        try:
            ds = pydicom.dcmread(src, stop_before_pixels=True,
                                 specific_tags=["StudyInstanceUID", "SOPInstanceUID"])
            study, sop = str(ds.StudyInstanceUID), str(ds.SOPInstanceUID)
        except (pydicom.errors.InvalidDicomError, AttributeError, OSError) as e:
            log.warning("c_store_refused", error=str(e))
            return 0xC210         # cannot understand
        with self._lock:
            folder = self.spool / study
            folder.mkdir(exist_ok=True)
            shutil.move(str(src), folder / f"{sop}.dcm")
            self._last[study] = self.clock()
            self._open.setdefault(study, set()).add(id(event.assoc))
        return 0x0000

    def _on_close(self, event: Any) -> None:
        """The association ended (released, aborted, connection lost): its studies' quiet
        period starts now."""
        a = id(event.assoc)
        with self._lock:
            for study, assocs in list(self._open.items()):
                if a in assocs:
                    assocs.discard(a)
                    if study in self._last:            # not forwarded yet
                        self._last[study] = self.clock()
                    if not assocs:
                        del self._open[study]

    def start(self) -> int:
        host, port = parse_hostport(self.cfg.dicom_listen, "dicom_listen")
        ae = AE(ae_title=self.cfg.ae_title)
        ae.maximum_pdu_size = 0
        for cx in AllStoragePresentationContexts:
            assert cx.abstract_syntax is not None
            ae.add_supported_context(cx.abstract_syntax, _ALL_TS)
        ae.add_supported_context(Verification)
        self.server = ae.start_server((host, port), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, self._on_store),
                                                    (evt.EVT_CONN_CLOSE, self._on_close)])
        self.port = self.server.server_address[1]
        threading.Thread(target=self._watch, name="pacs-quiet", daemon=True).start()
        log.info("pacs_listening", ae_title=self.cfg.ae_title, host=host, port=self.port)
        return int(self.port)

    def due(self) -> list[str]:
        now = self.clock()
        quiet, held = self.cfg.quiet_period, self.cfg.quiet_period * HOLD_OPEN
        with self._lock:
            return [s for s, t in self._last.items()
                    if now - t >= (held if self._open.get(s) else quiet)]

    def flush_due(self) -> None:
        for study in self.due():
            folder = self.spool / study
            try:
                self.on_study(folder)
            except Exception as e:  # noqa: BLE001  (kept and retried after the next quiet period)
                log.error("study_forward_failed", study=study, error=str(e))
                with self._lock:
                    self._last[study] = self.clock()
                continue
            with self._lock:
                if self._last.get(study, 0) <= self.clock() - self.cfg.quiet_period:
                    shutil.rmtree(folder, ignore_errors=True)
                    self._last.pop(study, None)
                    self._open.pop(study, None)

    def _watch(self) -> None:
        while not self._stop.wait(min(1.0, max(0.05, self.cfg.quiet_period / 4))):
            self.flush_due()

    def stop(self) -> None:
        self._stop.set()
        if self.server is not None:
            self.server.shutdown()


def push_study(cfg: GatewayConfig, folder: Path) -> int:
    """C-STORE every file of folder to cfg.pacs; returns the count. Raises GatewayError.
    Files go in their own transfer syntax where the PACS accepted it, else converted to an
    accepted uncompressed one (decompressed if need be)."""
    host, port = parse_hostport(cfg.pacs, "pacs")
    files = sorted(p for p in folder.iterdir() if p.suffix == ".dcm")
    own: dict[tuple[str, str], None] = {}
    for f in files:
        meta = pydicom.filereader.read_file_meta_info(f)
        own[(str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID))] = None
    classes = list(dict.fromkeys(c for c, _ in own))
    fallback = [c for c in classes if any(ts not in UNCOMPRESSED_TS for cc, ts in own if cc == c)]
    if len(own) + len(fallback) > MAX_CONTEXTS:
        raise GatewayError(f"{folder.name}: more than {MAX_CONTEXTS} SOP class/transfer syntax pairs")
    ae = AE(ae_title=cfg.ae_title)
    for sop_class, ts in own:
        ae.add_requested_context(sop_class, ts)
    for sop_class in fallback:          # a second context: whichever uncompressed one it takes
        ae.add_requested_context(sop_class, UNCOMPRESSED_TS)
    assoc = ae.associate(host, port, ae_title=cfg.pacs_ae)
    if not assoc.is_established:
        raise GatewayError(f"PACS {cfg.pacs_ae}@{cfg.pacs}: association refused or not reachable")
    accepted: dict[str, set[str]] = {}
    for cx in assoc.accepted_contexts:
        accepted.setdefault(str(cx.abstract_syntax), set()).update(map(str, cx.transfer_syntax))
    converted = 0
    try:
        for f in files:
            meta = pydicom.filereader.read_file_meta_info(f)
            sop_class, ts = str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID)
            took = accepted.get(sop_class, set())
            if ts in took:
                status = assoc.send_c_store(f)
            else:
                target = next((t for t in UNCOMPRESSED_TS if t in took), None)
                if target is None:
                    raise GatewayError(f"PACS {cfg.pacs_ae} accepts neither {_ts_name(ts)} nor an "
                                       f"uncompressed transfer syntax for SOP class {sop_class} ({f.name})")
                status = assoc.send_c_store(_converted(f, target))
                converted += 1
            if not status or status.Status not in STORED:
                raise GatewayError(f"PACS refused {f.name}: status {getattr(status, 'Status', None)}")
    finally:
        assoc.release()
    if converted:
        log.info("pacs_fallback", study=folder.name, files=converted,
                 reason="the PACS did not accept the stored transfer syntax")
    log.info("study_pushed", study=folder.name, files=len(files), pacs=cfg.pacs, converted=converted)
    return len(files)


def _ts_name(uid: str) -> str:
    return pydicom.uid.UID(uid).name or uid


def _converted(path: Path, target: str) -> pydicom.Dataset:
    """The object in `target` (uncompressed): pixel data decoded if compressed."""
    ds = pydicom.dcmread(path)
    ts = ds.file_meta.TransferSyntaxUID
    if ts.is_compressed:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        size = int(ds.Rows) * int(ds.Columns) * int(ds.SamplesPerPixel) * frames * int(ds.BitsAllocated) // 8
        if size > MAX_CONVERT_BYTES:
            raise GatewayError(f"{path.name}: {size} bytes of pixels to decompress for the PACS, more "
                               f"than {MAX_CONVERT_BYTES}; let the PACS accept {_ts_name(ts)}")
        try:
            # the same object in another transfer syntax keeps its SOP Instance UID (PS3.5
            # 10: a transfer syntax is an encoding, not new content; pydicom would make a new one)
            ds.decompress(generate_instance_uid=False)
        except (RuntimeError, NotImplementedError, ValueError) as e:
            raise GatewayError(f"{path.name}: cannot decompress {_ts_name(ts)} for the PACS ({e})") from None
    uid = pydicom.uid.UID(target)
    ds.file_meta.TransferSyntaxUID = uid
    ds.set_original_encoding(uid.is_implicit_VR, uid.is_little_endian)     # encoded anew in `uid`
    return ds
