"""The PACS link (pynetdicom).

Storage SCP (`relay gateway pacs-listen`): a PACS pushes a study with C-STORE; datasets are
written to disk as received (pynetdicom's chunked receive: never decoded, never in memory),
grouped by StudyInstanceUID, and a study is sent once no instance of it has arrived for
`quiet_period` seconds and the associations that brought it are closed (a PACS that pauses
between two images of one association does not get its study cut in two). An association
held open without new images holds its studies back for at most HOLD_OPEN x quiet_period.

Storage SCU: pushes an imported study folder to the receiver's PACS (`pacs = "HOST:PORT"`),
each file sent as stored, in its own transfer syntax (no re-encoding).
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
    """C-STORE every file of folder to cfg.pacs; returns the count. Raises GatewayError."""
    host, port = parse_hostport(cfg.pacs, "pacs")
    files = sorted(p for p in folder.iterdir() if p.suffix == ".dcm")
    contexts: dict[tuple[str, str], None] = {}
    for f in files:
        meta = pydicom.filereader.read_file_meta_info(f)
        contexts[(str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID))] = None
    if len(contexts) > 128:
        raise GatewayError(f"{folder.name}: more than 128 SOP class/transfer syntax pairs")
    ae = AE(ae_title=cfg.ae_title)
    for sop_class, ts in contexts:
        ae.add_requested_context(sop_class, ts)
    assoc = ae.associate(host, port, ae_title=cfg.pacs_ae)
    if not assoc.is_established:
        raise GatewayError(f"PACS {cfg.pacs_ae}@{cfg.pacs}: association refused or not reachable")
    try:
        for f in files:
            status = assoc.send_c_store(f)
            if not status or status.Status != 0x0000:
                raise GatewayError(f"PACS refused {f.name}: status {getattr(status, 'Status', None)}")
    finally:
        assoc.release()
    log.info("study_pushed", study=folder.name, files=len(files), pacs=cfg.pacs)
    return len(files)
