"""`relay gateway receive`: mailbox -> disk -> reassemble -> decrypt+verify -> DICOM check ->
inbox/<StudyInstanceUID>/ (and the PACS) -> delete from the mailbox -> MDN to the sender.

Order matters: a message leaves the mailbox only once its result (imported files, or the
quarantine folder with the reason) is on disk, and the MDN goes out only after that.
Refused messages go to quarantine/<id>/ with `message.eml` (or the parts) and `reason.txt`.
"""

from __future__ import annotations

import contextlib
import email.utils
import errno
import hashlib
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from email.message import Message
from pathlib import Path

from relay.gateway import dicommime, message, transport
from relay.gateway.core import Gateway, remove_tree
from relay.gateway.mime import MimeError, read_headers
from relay.gateway.peers import DirectoryError
from relay.gateway.pgp import status_of
from relay.gateway.state import is_negative
from relay.log import get_logger

log = get_logger("gateway.receive")

# quarantine reasons (the first line of reason.txt)
NOT_ENCRYPTED = "not-encrypted"
UNSIGNED = "unsigned"
UNKNOWN_KEY = "unknown-key"
WRONG_KEY = "wrong-key"
BAD_SIGNATURE = "bad-signature"
UNDECRYPTABLE = "undecryptable"
UNKNOWN_SENDER = "unknown-sender"
INCOMPLETE = "incomplete"
NOT_DICOM = "not-dicom"
MALFORMED = "malformed"
EXPIRED_KEY = "expired-key"
REPLAY = "replay"
DIRECTORY_REFUSED = "directory-refused"
MDN_UNVERIFIED = "mdn-unverified"

# No negative MDN for these: a replay's original was answered already (and the replayer chose
# the new Message-ID); the others never get one as the message asked for none we can trust
NO_NEGATIVE_MDN = {REPLAY, DIRECTORY_REFUSED, MDN_UNVERIFIED}

MDN_GIVE_UP = 7 * 24 * 3600.0   # a receipt the relay refused for a week is dropped (logged)
MAX_DIRECTORY_MESSAGE = 64 * 1024**2   # a directory document is far smaller (take_directory's bound)
MAX_GET_IDS = 16                # Message-IDs of our latest directory GETs (replies name one)


@dataclass
class Summary:
    imported: list[str] = field(default_factory=list)        # study UIDs
    quarantined: list[tuple[str, str]] = field(default_factory=list)   # (folder, reason)
    mdns: int = 0
    parts_held: int = 0
    directory_updates: int = 0
    directory_replies: int = 0
    bytes_fetched: int = 0
    failed: int = 0             # messages left in the mailbox after an error (retried)
    mdns_sent: int = 0
    seconds: dict[str, float] = field(default_factory=dict)   # fetch, decrypt, import

    earlier_imported: int = 0   # trimmed off `imported` by a long-running receiver
    earlier_quarantined: int = 0

    @property
    def n_imported(self) -> int:
        return self.earlier_imported + len(self.imported)

    @property
    def n_quarantined(self) -> int:
        return self.earlier_quarantined + len(self.quarantined)

    def trim(self, keep: int = 1000) -> None:
        """Keep the last `keep` names of each list (a receiver runs for months)."""
        if len(self.imported) > keep:
            self.earlier_imported += len(self.imported) - keep
            del self.imported[:-keep]
        if len(self.quarantined) > keep:
            self.earlier_quarantined += len(self.quarantined) - keep
            del self.quarantined[:-keep]

    def add_time(self, stage: str, t0: float) -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + time.monotonic() - t0


class Quarantined(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def _addr(value: str | None) -> str:
    return email.utils.parseaddr(value or "")[1].lower()


class Receiver:
    def __init__(self, gw: Gateway, source: transport.MailSource,
                 pacs_push: Callable[[Path], str | None] | None = None,
                 directory_only: bool = False) -> None:
        """`pacs_push(folder)` returns None when the PACS took the study, else why not.
        `directory_only`: handle only the directory's replies (`relay gateway directory`);
        studies and receipts stay in the mailbox for `receive`."""
        self.gw = gw
        self.cfg = gw.cfg
        self.source = source
        self.pacs_push = pacs_push
        self.summary = Summary()
        self.waiting = False
        self.directory_only = directory_only
        self.downloads = self.cfg.state_dir / "downloads"
        self.downloads.mkdir(parents=True, exist_ok=True)

    # --- the loop --------------------------------------------------------------------------

    def run_once(self) -> Summary:
        self.send_mdns()                # owed from an earlier round (relay was down, a crash)
        held = self.gw.state.held_keys()
        waiting = self.source.messages()
        self.drop_stale_downloads({key for key, _ in waiting})
        for key, size in waiting:
            if key in held or (self.directory_only and size > MAX_DIRECTORY_MESSAGE):
                continue
            try:
                self.handle(key, size)
            except (OSError, transport.TransportError) as e:
                # temporary: the message stays in the mailbox and is retried next round
                self.summary.failed += 1
                log.error("receive_failed", key=key, error=str(e))
            except (MimeError, ValueError) as e:
                # not quarantined (handle() quarantines what it can): never fatal for the loop
                self.summary.failed += 1
                log.error("receive_failed", key=key, error=f"{type(e).__name__}: {e}", exc_info=e)
        if not self.directory_only:
            self.expire_partials()
            self.warn_unconfirmed()
            self.send_mdns()            # the negative ones of messages quarantined this round
        return self.summary

    def warn_unconfirmed(self) -> None:
        """Log each sent study still without an MDN after `unconfirmed_after` seconds, once
        (`relay gateway status` lists them as OVERDUE)."""
        for s in self.gw.state.overdue(self.cfg.unconfirmed_after):
            log.warning("study_unconfirmed", study=s.study_uid, to=s.recipient, message_id=s.message_id,
                        hours=round((time.time() - s.sent_at) / 3600, 1))
            self.gw.state.mark_warned(s.message_id)

    def run_forever(self, stop: Callable[[], bool] = lambda: False) -> None:
        """Handle mail as it comes: IMAP IDLE (re-issued every idle_timeout, RFC 2177: before
        29 min) or POP3 polls; reconnects when the relay goes away. `self.waiting` is True
        while blocked in IDLE/sleep, so a signal handler may interrupt there safely."""
        while not stop():
            try:
                self.run_once()
                self.summary.trim()
                if stop():
                    break
                self.waiting = True
                try:
                    self.source.wait(self.cfg.idle_timeout if self.cfg.pop3 == "" else self.cfg.poll_interval)
                finally:
                    self.waiting = False
            except (transport.TransportError, OSError) as e:
                log.error("mailbox_unreachable", error=str(e))
                self.waiting = True
                try:
                    time.sleep(min(30.0, self.cfg.poll_interval))
                finally:
                    self.waiting = False
                with contextlib.suppress(transport.TransportError, OSError):
                    self.source.close()
                with contextlib.suppress(transport.TransportError, OSError):
                    self.source = transport.open_source(self.cfg)

    def drop_stale_downloads(self, waiting: set[str]) -> None:
        """Forget downloads (and their files) of messages no longer in the mailbox: removed by
        another client, or keys of an old UIDVALIDITY. Held message/partial parts are the
        partial sets' business (expire_partials)."""
        for key, path, state in self.gw.state.downloads():
            if key not in waiting and state != "held":
                path.unlink(missing_ok=True)
                self.gw.state.drop_download(key)
                log.info("download_dropped", key=key, reason="no longer in the mailbox")

    # --- one mailbox message --------------------------------------------------------------

    def download(self, key: str, size: int) -> Path:
        name = hashlib.sha256(key.encode()).hexdigest()[:24] + ".eml"
        path = self.downloads / name
        rec = self.gw.state.download(key)
        offset = path.stat().st_size if rec is not None and path.exists() else 0
        if offset != size:
            self.gw.state.set_download(key, path, size, "downloading")
            t = time.monotonic()
            if offset > size:
                offset = 0
            if offset:
                log.info("download_resumed", key=key, offset=offset, size=size)
            self.source.fetch(key, path, offset)
            self.summary.add_time("fetch", t)
            self.summary.bytes_fetched += size - offset
        if path.stat().st_size != size:
            raise transport.TransportError(f"{key}: fetched {path.stat().st_size} of {size} bytes")
        self.gw.state.set_download(key, path, size, "done")
        return path

    def handle(self, key: str, size: int) -> None:
        path = self.download(key, size)
        try:
            self._handle(key, path)
        except (MimeError, ValueError) as e:
            # a message that cannot be taken apart: quarantined, never fatal (a receiver that
            # stopped on it would stop on it again at every start)
            if not path.exists():
                raise
            if self.directory_only:
                return          # `receive` quarantines it; `directory` only looks for answers
            self.quarantine([path], [key], MALFORMED, f"{type(e).__name__}: {e}")

    def _handle(self, key: str, path: Path) -> None:
        with open(path, "rb") as fp:
            head, _ = read_headers(fp)
        sender = _addr(head.get("From"))
        from_directory = (sender == self.cfg.directory_mailbox.lower()
                          and head.get_content_type() != "multipart/encrypted")
        if self.directory_only and not from_directory:
            return          # left in the mailbox (and its download on disk) for `receive`
        try:
            info = message.partial_info(head)
        except MimeError as e:
            self.quarantine([path], [key], MALFORMED, str(e))
            return
        if info is not None:
            self.hold_partial(key, path, info, sender)
            return
        mdn = None
        try:
            mdn = message.parse_mdn(path, self.gw.ring)
        except MimeError as e:
            self.quarantine([path], [key], MALFORMED, str(e))
            return
        if mdn is not None:
            refused = self.take_mdn(mdn, sender)
            if refused:
                self.quarantine([path], [key], MDN_UNVERIFIED, refused, sender=sender,
                                message_id=(head.get("Message-ID") or "").strip())
                return
            self.finish([key], [path])
            return
        if from_directory:
            # a service reply (signed document, "unchanged", a key): never a study. (An
            # encrypted message From: the directory is no reply: it is checked as a study and
            # quarantined, not dropped.) From: is not authenticated: a plain message that is
            # neither a signed document nor a reply to one of our GETs is quarantined.
            try:
                taken = self.take_directory(path)
            except DirectoryError as e:
                self.summary.directory_replies += 1
                self.quarantine([path], [key], DIRECTORY_REFUSED, str(e), sender=sender,
                                message_id=(head.get("Message-ID") or "").strip())
                return
            if not taken:
                if not self.answers_our_get(head):
                    self.quarantine([path], [key], NOT_ENCRYPTED,
                                    f"a plain message From: {sender} that is neither a signed "
                                    "directory document nor a reply to this gateway's GET",
                                    sender=sender, message_id=(head.get("Message-ID") or "").strip())
                    return
                log.info("directory_reply", subject=head.get("Subject", ""))
            self.summary.directory_replies += 1
            self.finish([key], [path])
            return
        self.process(path, [key], [path])

    def answers_our_get(self, head: Message) -> bool:
        refs = f"{head.get('In-Reply-To', '')} {head.get('References', '')}".split()
        return bool(set(refs) & set(self.gw.state.get_meta("directory_get_ids").split()))

    def note_get(self, message_id: str) -> None:
        """Remember a GET we sent: its replies name it in In-Reply-To."""
        ids = self.gw.state.get_meta("directory_get_ids").split() + [message_id]
        self.gw.state.set_meta("directory_get_ids", " ".join(ids[-MAX_GET_IDS:]))

    def finish(self, keys: list[str], files: list[Path]) -> None:
        """Done with these mailbox messages: delete them there, then forget the local copies."""
        self.source.delete(keys)
        for k in keys:
            self.gw.state.drop_download(k)
        for f in files:
            f.unlink(missing_ok=True)

    # --- MDNs and directory documents ------------------------------------------------------

    def take_mdn(self, mdn: message.Mdn, sender: str) -> str:
        """Confirm the sent study an MDN names. Returns why it is refused ("" if taken): a
        receipt not signed by its sender's directory key confirms nothing (forgeable)."""
        peer = self.gw.directory.peer(sender)
        signed_ok = peer is not None and mdn.signer == peer.fingerprint
        if not signed_ok and not self.cfg.accept_unsigned_mdn:
            log.warning("mdn_unverified", original_id=mdn.original_id, sender=sender,
                        signer=mdn.signer or "none")
            return (f"a receipt for {mdn.original_id} that is not signed by {sender}'s key in the "
                    f"directory (signer: {mdn.signer or 'none'}); it confirmed nothing")
        disposition = mdn.disposition + (f" (Error: {mdn.error})" if mdn.error else "")
        if not self.gw.state.confirm(mdn.original_id, sender, disposition):
            # a second receipt, or one for a study this gateway did not send: nothing to do
            log.warning("mdn_unmatched", original_id=mdn.original_id, sender=sender)
            return ""
        self.summary.mdns += 1
        if is_negative(mdn.disposition):
            log.warning("study_refused_by_receiver", original_id=mdn.original_id, sender=sender,
                        disposition=mdn.disposition, error=mdn.error)
        else:
            log.info("mdn_received", original_id=mdn.original_id, sender=sender, disposition=mdn.disposition)
        return ""

    def take_directory(self, path: Path) -> bool:
        """A signed directory document from the directory address (a GET reply or a push):
        True if it was one (adopted, or not newer than ours); raises DirectoryError if it is
        refused (bad signature, older serial)."""
        from relay.gateway.mime import MultipartReader, param
        found: dict[str, bytes] = {}
        with open(path, "rb") as fp:
            head, _ = read_headers(fp)
            boundary = param(head, "boundary")
            if head.get_content_type() != "multipart/mixed" or not boundary:
                return False
            if os.fstat(fp.fileno()).st_size > MAX_DIRECTORY_MESSAGE:
                return False
            for h, chunks in MultipartReader(fp, boundary).parts():
                name = param(h, "filename", "content-disposition") or param(h, "name") or ""
                body = b"".join(chunks)
                if (h.get("content-transfer-encoding") or "").strip().lower() == "base64":
                    import base64
                    body = base64.b64decode(body)
                found[name] = body
        if "directory.json" not in found or "directory.json.asc" not in found:
            return False
        try:
            self.gw.directory.accept(found["directory.json"], found["directory.json.asc"])
            self.summary.directory_updates += 1
        except DirectoryError as e:
            log.warning("directory_refused", reason=str(e))
            raise
        return True

    # --- message/partial -------------------------------------------------------------------

    def hold_partial(self, key: str, path: Path, info: message.PartialInfo, sender: str) -> None:
        # a set is keyed by sender and id: a stranger's part with the same id cannot join it
        pid = f"{sender} {info.id}"
        pdir = self.cfg.state_dir / "partials" / hashlib.sha256(pid.encode()).hexdigest()[:24]
        pdir.mkdir(parents=True, exist_ok=True)
        held = {n: k for n, _, _, k, _, _ in self.gw.state.partial_set(pid)}
        if held.get(info.number, key) != key:
            # the same part delivered twice: keep the first (replacing it would un-hold the
            # first copy's mailbox message, which would then be taken up again every round)
            log.info("partial_duplicate", id=info.id, number=info.number)
            self.finish([key], [path])
            return
        target = pdir / f"{info.number:05d}.eml"
        os.replace(path, target)
        self.gw.state.add_partial(pid, info.number, info.total, target, key, sender)
        self.gw.state.set_download(key, target, target.stat().st_size, "held")
        self.summary.parts_held += 1
        parts = self.gw.state.partial_set(pid)
        total = next((t for _, t, *_ in parts if t), None)
        if total is None or [n for n, *_ in parts] != list(range(1, total + 1)):
            log.info("partial_held", id=info.id, number=info.number, have=len(parts), total=total)
            return
        whole = pdir / "whole.eml"
        t = time.monotonic()
        keys = [k for _, _, _, k, _, _ in parts]
        try:
            message.reassemble([p for _, _, p, *_ in parts], whole)
        except (MimeError, ValueError) as e:
            self.quarantine([p for _, _, p, *_ in parts], keys, MALFORMED,
                            f"message/partial id {info.id}: cannot be reassembled: {e}", sender=sender)
            self.gw.state.drop_partials(pid)
            remove_tree(pdir)
            return
        self.summary.add_time("reassemble", t)
        for _, _, p, *_ in parts:
            p.unlink()          # whole.eml holds every byte of them (disk: one copy, not two)
        log.info("partial_complete", id=info.id, total=total)
        try:
            self.process(whole, keys, [whole])
        finally:
            self.gw.state.drop_partials(pid)
            remove_tree(pdir)

    def expire_partials(self) -> None:
        now = time.time()
        for pid in self.gw.state.partial_ids():
            parts = self.gw.state.partial_set(pid)
            if parts and now - min(at for *_, at in parts) > self.cfg.reassembly_timeout:
                total = next((t for _, t, *_ in parts if t), None)
                sender, _, orig_id = pid.partition(" ")
                # the MDN request is in part 1's enclosing header (RFC 2046 5.2.2.1)
                asked = False
                if parts[0][0] == 1:
                    with contextlib.suppress(OSError, MimeError), open(parts[0][2], "rb") as fp:
                        asked = bool(read_headers(fp)[0].get("Disposition-Notification-To"))
                detail = (f"message/partial id {orig_id}: have parts {[n for n, *_ in parts]} of "
                          f"{total or '?'} after {self.cfg.reassembly_timeout:.0f} s")
                self.quarantine([p for _, _, p, *_ in parts], [k for _, _, _, k, _, _ in parts],
                                INCOMPLETE, detail, sender=sender, message_id=orig_id, mdn_asked=asked)
                self.gw.state.drop_partials(pid)

    # --- the study message ------------------------------------------------------------------

    def process(self, path: Path, keys: list[str], files: list[Path]) -> None:
        try:
            with open(path, "rb") as fp:
                head, _ = read_headers(fp)
        except MimeError as e:
            self.quarantine(files, keys, MALFORMED, str(e))
            return
        mid = (head.get("Message-ID") or "").strip()
        sender = _addr(head.get("From"))
        if mid and self.gw.state.was_imported(mid):
            log.info("duplicate_dropped", message_id=mid, sender=sender)
            self.finish(keys, files)
            return
        asked = bool(head.get("Disposition-Notification-To"))
        work = self.gw.workdir("incoming")
        try:
            study_uid, count, sig_id, signer, pacs_error = self.verify_and_import(path, head, sender, work)
        except Quarantined as q:
            self.quarantine(files, keys, q.reason, q.detail, sender=sender, message_id=mid, mdn_asked=asked)
            return
        except (MimeError, ValueError) as e:           # anything the checks did not name
            self.quarantine(files, keys, MALFORMED, f"{type(e).__name__}: {e}", sender=sender,
                            message_id=mid, mdn_asked=asked)
            return
        finally:
            remove_tree(work)
        self.gw.state.add_received(mid, study_uid, sender, count, sig_id, signer)
        if asked and mid:
            # owed from now on; the disposition says whether the PACS has it too
            self.gw.state.add_pending_mdn(mid, sender, count, "processed/error" if pacs_error else None,
                                          f"imported, but the PACS did not take it: {pacs_error}"
                                          if pacs_error else None)
        self.finish(keys, files)
        self.summary.imported.append(study_uid)
        log.info("study_imported", study=study_uid, sender=sender, files=count, message_id=mid)
        self.send_mdns()

    def send_mdns(self) -> None:
        """Send the receipts owed. One the relay did not take (down, over quota) stays owed
        and is sent at the next round, or after a restart; given up after MDN_GIVE_UP."""
        owed = self.gw.state.pending_mdns()
        if not owed:
            return
        try:
            with transport.smtp_session(self.cfg) as smtp:
                for m in owed:
                    if time.time() - m.since > MDN_GIVE_UP:
                        log.error("mdn_given_up", message_id=m.message_id, to=m.recipient)
                        self.gw.state.drop_pending_mdn(m.message_id)
                        continue
                    if m.disposition.startswith("deleted"):
                        text = ("The study was refused and quarantined, not imported: "
                                f"{m.error}\r\nSend it again once the cause is fixed.")
                    else:
                        text = f"{m.files} DICOM objects of one study were verified and imported."
                        if m.error:
                            text += f"\r\n{m.error}"
                    mdn = message.build_mdn(self.cfg.address, m.recipient, m.message_id, text,
                                            self.gw.ring, m.disposition, m.error)
                    smtp.send(self.cfg.address, m.recipient, [mdn], size=len(mdn))
                    self.gw.state.drop_pending_mdn(m.message_id)
                    self.summary.mdns_sent += 1
        except transport.TransportError as e:
            # the studies are imported either way; the senders' status keeps them unconfirmed
            log.error("mdn_send_failed", owed=len(owed), error=str(e))

    def verify_and_import(self, path: Path, head: object, sender: str,
                          work: Path) -> tuple[str, int, str, str, str | None]:
        """Check, then import into the inbox and push to the PACS: (study, files, signature id,
        signer, why the PACS did not take it or None)."""
        peer = self.gw.directory.peer(sender)
        t = time.monotonic()
        try:
            message.extract_encrypted(path, work / "encrypted.asc")
        except MimeError as e:
            raise Quarantined(NOT_ENCRYPTED, str(e)) from None
        v = self.gw.ring.decrypt_verify(work / "encrypted.asc", work / "plain.mime")
        (work / "encrypted.asc").unlink()
        self.summary.add_time("decrypt", t)
        if v.bad_signature:          # decrypted, but the content is not what was signed
            raise Quarantined(BAD_SIGNATURE, "the signature does not verify\n" + v.status)
        if not v.decrypted:
            raise Quarantined(UNDECRYPTABLE, "not decryptable with this gateway's key\n" + v.status)
        if not v.signed:
            raise Quarantined(UNSIGNED, "encrypted but not signed\n" + v.status)
        if not v.good:
            if v.key_expired:
                why = self.gw.ring.judge(status_of(v))[1]
                raise Quarantined(EXPIRED_KEY, f"{why} (the sender needs a new key in the "
                                               "directory)\n" + v.status)
            if v.key_id and "BADSIG" not in v.status:
                raise Quarantined(UNKNOWN_KEY, f"signed by key {v.key_id}, not in the directory\n" + v.status)
            raise Quarantined(BAD_SIGNATURE, "the signature does not verify\n" + v.status)
        if peer is None:
            signer = self.gw.directory.by_fingerprint(v.signer)
            raise Quarantined(UNKNOWN_SENDER, f"sender {sender} is not in the directory (signed by "
                                              f"{signer.address if signer else v.signer})")
        if v.signer != peer.fingerprint:
            signer = self.gw.directory.by_fingerprint(v.signer)
            raise Quarantined(WRONG_KEY, f"From: {sender} but signed by {v.signer}"
                                         f" ({signer.address if signer else 'not in the directory'});"
                                         f" {sender}'s key is {peer.fingerprint}")
        st = status_of(v)
        if v.key_expired:
            log.info("signature_predates_key_end", sender=sender, note=self.gw.ring.judge(st)[1])
        seen = self.gw.state.signature_seen(st.sig_id, v.signer) if st.sig_id else None
        if seen is not None:
            raise Quarantined(REPLAY, f"the same signed content (signature {st.sig_id}) was imported "
                                      f"already as {seen[0]} (study {seen[1]})")
        t = time.monotonic()
        try:
            files = dicommime.extract_study(work / "plain.mime", work / "files")
        except dicommime.NotDicom as e:
            raise Quarantined(NOT_DICOM, str(e)) from None
        except MimeError as e:
            raise Quarantined(MALFORMED, str(e)) from None
        studies = {f.instance.study_uid for f in files}
        if len(studies) != 1:
            raise Quarantined(MALFORMED, f"one message must carry one study, found {len(studies)}")
        study_uid = studies.pop()
        dest = self.cfg.inbox / study_uid
        dest.mkdir(parents=True, exist_ok=True)
        for f in files:
            _move_durably(f.path, dest / f"{f.instance.sop_uid}.dcm")
        _fsync_dir(dest)
        self.summary.add_time("import", t)
        pacs_error = self.pacs_push(dest) if self.pacs_push is not None else None
        return study_uid, len(files), st.sig_id, v.signer, pacs_error

    # --- quarantine --------------------------------------------------------------------------

    def quarantine(self, files: list[Path], keys: list[str], reason: str, detail: str,
                   sender: str = "", message_id: str = "", mdn_asked: bool = False) -> None:
        """Move the message(s) to quarantine/<time>-<id>/ with reason.txt, delete them from the
        mailbox. With `mdn_asked`, a negative MDN (RFC 8098 `deleted/error`) is owed to the
        sender if it is an active participant of the directory (never to a stranger: no
        backscatter to a forged From:)."""
        qdir = self.cfg.quarantine / f"{time.strftime('%Y%m%dT%H%M%S')}-{hashlib.sha256(repr(keys).encode()).hexdigest()[:10]}"
        qdir.mkdir(parents=True, exist_ok=True)
        names = ["message.eml"] if len(files) == 1 else [f.name for f in files]
        for f, name in zip(files, names, strict=True):
            if f.exists():
                shutil.move(str(f), qdir / name)
        (qdir / "reason.txt").write_text(
            f"{reason}\n{detail}\nfrom: {sender}\nmessage-id: {message_id}\nmailbox: {' '.join(keys)}\n"
            f"time: {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}\n", encoding="utf-8")
        _fsync_dir(qdir)
        if (mdn_asked and message_id and reason not in NO_NEGATIVE_MDN and sender
                and self.gw.directory.peer(sender) is not None):
            self.gw.state.add_pending_mdn(message_id, sender, 0, "deleted/error",
                                          f"{reason}: {detail.splitlines()[0] if detail else ''}")
        self.finish(keys, [])
        self.summary.quarantined.append((qdir.name, reason))
        log.warning("quarantined", reason=reason, folder=str(qdir), sender=sender, message_id=message_id,
                    detail=detail.splitlines()[0] if detail else "")


def _move_durably(src: Path, dst: Path) -> None:
    """Rename into place; across file systems (inbox on another disk) copy, fsync, then rename."""
    try:
        os.replace(src, dst)
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise
        tmp = dst.with_name(dst.name + ".tmp")
        with open(src, "rb") as i, open(tmp, "wb") as o:
            shutil.copyfileobj(i, o, 1024 * 1024)
            o.flush()
            os.fsync(o.fileno())
        os.replace(tmp, dst)
        src.unlink()


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
