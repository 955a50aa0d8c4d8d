"""`relay gateway send`: files/folders -> studies -> MIME -> sign+encrypt -> split -> SMTP.

Every stage works file to file under <state_dir>/outgoing/<job>/ (removed afterwards): the
study is never in memory. Each sent study is recorded until its MDN arrives.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from relay.gateway import dicommime, message, transport
from relay.gateway.core import Gateway, GatewayError, remove_tree
from relay.gateway.mime import new_message_id
from relay.log import get_logger

log = get_logger("gateway.send")


@dataclass
class SendReport:
    study_uid: str
    message_id: str
    files: int
    dicom_bytes: int
    message_bytes: int
    parts: int
    seconds: dict[str, float] = field(default_factory=dict)   # mime, encrypt, send
    method: str = ""                                           # BDAT or DATA


def check_own_key(gw: Gateway) -> None:
    """gpg cannot sign with an expired or revoked key (python-gnupg then dies writing to it):
    say so before any work, with what to do."""
    ends = gw.ring.own_key_expiry()
    if ends is not None and ends <= time.time():
        what = "has been revoked" if ends == 0 else \
            f"expired on {time.strftime('%Y-%m-%d %H:%M', time.gmtime(ends))} UTC"
        raise GatewayError(f"this gateway's own key {gw.ring.fingerprint} {what}: nothing can be "
                           "signed with it; make a new key (docs/gateway.md, step 1), have the relay "
                           "operator register it (relay participant update --key) and set secret_key")


def send_study(gw: Gateway, to: str, instances: list[dicommime.Instance]) -> SendReport:
    check_own_key(gw)
    peer = gw.directory.peer(to)
    if peer is None:
        raise GatewayError(f"{to} is not an active participant in the directory "
                           f"(serial {gw.directory.serial}); refresh it with `relay gateway directory`")
    left = peer.expires_in()
    if left is not None and left <= 0:
        raise GatewayError(f"the key of {to} ({peer.fingerprint}) has expired: nothing can be "
                           "encrypted to it until the relay operator registers its new key")
    cfg = gw.cfg
    study_uid = instances[0].study_uid
    mid = new_message_id(cfg.domain)
    work = gw.workdir("outgoing")
    rep = SendReport(study_uid, mid, len(instances), sum(i.size for i in instances), 0, 0)
    try:
        t = time.monotonic()
        dicommime.write_study(instances, work / "study.mime")
        rep.seconds["mime"] = time.monotonic() - t
        t = time.monotonic()
        rep.message_bytes = message.build_encrypted(work / "study.mime", work / "message.eml", gw.ring,
                                                    peer.fingerprint, cfg.address, peer.address, mid,
                                                    consume=True)
        rep.seconds["encrypt"] = time.monotonic() - t
        ranges = message.plan_split(work / "message.eml", cfg.split_size, cfg.address, peer.address,
                                    mid, cfg.domain)
        rep.parts = len(ranges)
        t = time.monotonic()
        # recorded before the first byte leaves: a fast receiver's MDN may come back before
        # this process has closed its SMTP session, and must find the study to confirm
        gw.state.add_sent(mid, study_uid, peer.address, rep.files, rep.dicom_bytes, rep.parts)
        try:
            with transport.smtp_session(cfg) as smtp:
                for r in ranges:
                    rep.method = smtp.send(cfg.address, peer.address,
                                           message.iter_range(work / "message.eml", r),
                                           size=len(r.headers) + r.length)
        except BaseException:
            gw.state.forget_sent(mid)       # not sent (or not all parts): send it again
            raise
        rep.seconds["send"] = time.monotonic() - t
        log.info("study_sent", study=study_uid, to=peer.address, message_id=mid, files=rep.files,
                 bytes=rep.message_bytes, parts=rep.parts)
        return rep
    finally:
        remove_tree(work)


def send_paths(gw: Gateway, to: str, paths: Iterable[str | Path]) -> list[SendReport]:
    studies = dicommime.group_studies(dicommime.find_files(paths))
    if not studies:
        raise GatewayError("no DICOM files found")
    return [send_study(gw, to, insts) for insts in studies.values()]
