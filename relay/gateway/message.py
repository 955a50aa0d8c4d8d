"""The gateway's messages, built and taken apart in files:

- PGP/MIME (RFC 3156): multipart/encrypted with the two parts (application/pgp-encrypted
  "Version: 1", application/octet-stream with the armored OpenPGP message). Signing and
  encryption are combined in one OpenPGP message (RFC 3156 6.2).
- message/partial (RFC 2046 5.2.2): split above a size at line boundaries; reassembly with the
  header merge of 5.2.2.1.
- MDN (RFC 8098): multipart/report; report-type=disposition-notification.
"""

from __future__ import annotations

import email.policy
import email.utils
import io
import re
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import Message
from email.parser import BytesHeaderParser
from pathlib import Path

from relay.gateway.mime import (
    BLOCK,
    MimeError,
    MultipartReader,
    copy_crlf,
    header_block,
    new_boundary,
    new_message_id,
    param,
    read_headers,
)
from relay.gateway.pgp import Keyring

SUBJECT = "DICOM"           # no patient data in clear-text headers
MAX_PARTS = 10000           # bound on message/partial `total` we accept


def _hdr(name: str, value: str) -> bytes:
    return f"{name}: {value}\r\n".encode()


def envelope_headers(sender: str, to: str, message_id: str, subject: str = SUBJECT) -> bytes:
    return (_hdr("From", sender) + _hdr("To", to) + _hdr("Date", email.utils.formatdate())
            + _hdr("Subject", subject) + _hdr("Message-ID", message_id) + _hdr("MIME-Version", "1.0"))


def build_encrypted(entity: Path, out: Path, ring: Keyring, recipient_fpr: str, sender: str,
                    to: str, message_id: str, consume: bool = False) -> int:
    """Sign+encrypt the MIME entity in `entity` and write the whole RFC 5322 message to `out`.
    Returns its size. The armored ciphertext is written by gpg into a scratch file beside `out`
    and copied in with CRLF line ends. `consume`: remove `entity` once encrypted (disk)."""
    scratch = out.with_name(out.name + ".asc")
    try:
        ring.encrypt_sign(entity, scratch, recipient_fpr)
        if consume:
            entity.unlink()
        boundary = new_boundary()
        with open(out, "wb") as o, open(scratch, "rb") as asc:
            o.write(envelope_headers(sender, to, message_id)
                    + _hdr("Disposition-Notification-To", sender)
                    + _hdr("Content-Type", f'multipart/encrypted; protocol="application/pgp-encrypted";'
                                           f' boundary="{boundary}"')
                    + b"\r\nThis is an OpenPGP/MIME encrypted message (RFC 3156).\r\n"
                    + f"--{boundary}\r\n".encode()
                    + b"Content-Type: application/pgp-encrypted\r\n"
                    + b"Content-Description: PGP/MIME version identification\r\n\r\nVersion: 1\r\n\r\n"
                    + f"--{boundary}\r\n".encode()
                    + b'Content-Type: application/octet-stream; name="encrypted.asc"\r\n'
                    + b'Content-Disposition: inline; filename="encrypted.asc"\r\n\r\n')
            copy_crlf(asc, o)
            o.write(f"\r\n--{boundary}--\r\n".encode())
            return o.tell()
    finally:
        scratch.unlink(missing_ok=True)


def extract_encrypted(msg_path: Path, out: Path) -> Message:
    """The armored part of a PGP/MIME message into `out`. Returns the message headers.
    Raises MimeError if it is not multipart/encrypted per RFC 3156."""
    with open(msg_path, "rb") as fp:
        head, _ = read_headers(fp)
        if head.get_content_type() != "multipart/encrypted":
            raise MimeError(f"not encrypted: {head.get_content_type()}")
        if (param(head, "protocol") or "").lower() != "application/pgp-encrypted":
            raise MimeError("multipart/encrypted without protocol=application/pgp-encrypted")
        boundary = param(head, "boundary")
        if not boundary:
            raise MimeError("multipart/encrypted without a boundary")
        parts = MultipartReader(fp, boundary).parts()
        for n, (h, chunks) in enumerate(parts, 1):
            if n == 1:
                if h.get_content_type() != "application/pgp-encrypted":
                    raise MimeError("first part is not application/pgp-encrypted")
                if b"Version: 1" not in b"".join(chunks):
                    raise MimeError("no 'Version: 1' in the control part")
            elif n == 2:
                if h.get_content_type() != "application/octet-stream":
                    raise MimeError("second part is not application/octet-stream")
                with open(out, "wb") as o:
                    o.writelines(chunks)
                return head
        raise MimeError("multipart/encrypted with fewer than two parts")


# --- message/partial -------------------------------------------------------------------------

@dataclass(frozen=True)
class PartRange:
    number: int
    total: int
    offset: int
    length: int
    headers: bytes       # the enclosing header block of this partial message, with the empty line


def plan_split(msg_path: Path, split_size: int, sender: str, to: str, orig_id: str,
               domain: str) -> list[PartRange]:
    """Cut the message in msg_path into message/partial ranges no bigger than split_size each
    (headers included), at line ends. A message that fits is one range without new headers."""
    size = msg_path.stat().st_size
    if size <= split_size:
        return [PartRange(1, 1, 0, size, b"")]
    room = split_size - 2048           # the enclosing headers take well under 2 KiB
    cuts = [0]
    with open(msg_path, "rb") as fp:
        while size - cuts[-1] > room:
            probe = cuts[-1] + room
            fp.seek(max(cuts[-1], probe - 4096))
            window = fp.read(probe - fp.tell())
            i = window.rfind(b"\n")
            cuts.append(probe - len(window) + i + 1 if i >= 0 else probe)
    cuts.append(size)
    total = len(cuts) - 1
    ranges = []
    for n in range(1, total + 1):
        # RFC 2046 5.2.2.1: of the enclosing fields only part 1's survive reassembly, so the
        # MDN request (RFC 8098 2.1) goes there, once, not into every part
        headers = (envelope_headers(sender, to, new_message_id(domain))
                   + (_hdr("Disposition-Notification-To", sender) if n == 1 else b"")
                   + _hdr("Content-Type", f'message/partial; id="{orig_id}"; number={n}; total={total}')
                   + b"\r\n")
        ranges.append(PartRange(n, total, cuts[n - 1], cuts[n] - cuts[n - 1], headers))
    return ranges


def iter_range(path: Path, r: PartRange) -> Iterator[bytes]:
    """The bytes of one message to send: the part's headers, then its range of the file."""
    if r.headers:
        yield r.headers
    with open(path, "rb") as fp:
        fp.seek(r.offset)
        left = r.length
        while left:
            data = fp.read(min(BLOCK * 4, left))
            if not data:
                raise MimeError(f"{path} shrank while sending")
            left -= len(data)
            yield data


@dataclass(frozen=True)
class PartialInfo:
    id: str
    number: int
    total: int | None


def partial_info(head: Message) -> PartialInfo | None:
    if head.get_content_type() != "message/partial":
        return None
    pid = param(head, "id")
    try:
        number = int(param(head, "number") or "")
        total_s = param(head, "total")
        total = int(total_s) if total_s else None
    except ValueError:
        raise MimeError("message/partial with a non-numeric number/total") from None
    if not pid or number < 1 or (total is not None and not number <= total <= MAX_PARTS):
        raise MimeError("message/partial without a valid id/number/total")
    return PartialInfo(pid, number, total)


_MERGED_FROM_ENCLOSED = re.compile(rb"^(content-|subject:|message-id:|encrypted:|mime-version:)", re.IGNORECASE)


def _fields(block: bytes) -> list[bytes]:
    """Split a header block into fields (each with its folded continuation lines)."""
    fields: list[bytes] = []
    for line in block.split(b"\n"):
        line = line.rstrip(b"\r")
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += b"\r\n" + line
        elif line:
            fields.append(line)
    return fields


def reassemble(parts: list[Path], out: Path) -> None:
    """RFC 2046 5.2.2.1: parts (stored message/partial messages, in number order) -> out."""
    with open(out, "wb") as o:
        with open(parts[0], "rb") as fp:
            enclosing = _fields(header_block(fp))     # leaves fp at part 1's body
            enclosed = _fields(header_block(fp))      # the original message's header block
            inner_body = fp.tell()
        keep = [f for f in enclosing if not _MERGED_FROM_ENCLOSED.match(f)]
        add = [f for f in enclosed if _MERGED_FROM_ENCLOSED.match(f)]
        o.write(b"".join(f + b"\r\n" for f in keep + add) + b"\r\n")
        for i, p in enumerate(parts):
            with open(p, "rb") as fp:
                if i == 0:
                    fp.seek(inner_body)
                else:
                    read_headers(fp)
                while data := fp.read(BLOCK):
                    o.write(data)


# --- MDN (RFC 8098) --------------------------------------------------------------------------

MAX_MDN = 1024 * 1024        # an MDN is a few KiB; we read no more than this of one


MDN_MODE = "automatic-action/MDN-sent-automatically"     # RFC 8098 3.2.6.1: no human involved
MAX_ERROR_FIELD = 900        # the Error: text, so that its line stays within RFC 5322 2.1.1's 998


def build_mdn(reporter: str, to: str, original_id: str, text: str, ring: Keyring | None = None,
              disposition: str = "processed", error: str = "") -> bytes:
    """The MDN message. `disposition` is the RFC 8098 3.2.6 type with its modifier:
    `processed` (imported), `processed/error` (imported, but e.g. the PACS refused it),
    `deleted/error` (refused and quarantined, never imported); `error` goes into the Error:
    field (3.2.8). With `ring`, the report is signed as RFC 3156 multipart/signed, so the
    sender can tell a real receipt from a forged one (the relay does not bind From: to the
    authenticated account)."""
    if ";" not in disposition:
        disposition = f"{MDN_MODE}; {disposition}"
    boundary = new_boundary()
    domain = reporter.rpartition("@")[2]
    report = (_hdr("Content-Type", f"multipart/report; report-type=disposition-notification;"
                                   f' boundary="{boundary}"')
              + b"\r\n"
              + f"--{boundary}\r\n".encode()
              + b"Content-Type: text/plain; charset=utf-8\r\n\r\n" + text.encode() + b"\r\n"
              + f"--{boundary}\r\n".encode()
              + b"Content-Type: message/disposition-notification\r\n\r\n"
              + _hdr("Reporting-UA", f"{socket.gethostname()}; relay-gateway")
              + _hdr("Final-Recipient", f"rfc822;{reporter}")
              + _hdr("Original-Message-ID", original_id)
              + _hdr("Disposition", disposition)
              + (_hdr("Error", " ".join(error.split())[:MAX_ERROR_FIELD]) if error else b"")
              + f"\r\n--{boundary}--\r\n".encode())
    head = (envelope_headers(reporter, to, new_message_id(domain), "Disposition notification")
            + _hdr("In-Reply-To", original_id) + _hdr("References", original_id)
            + _hdr("Auto-Submitted", "auto-replied"))
    if ring is None:
        return head + report
    signature, micalg = ring.sign_bytes(report)
    outer = new_boundary()
    return (head + _hdr("Content-Type", f'multipart/signed; micalg={micalg};'
                                        f' protocol="application/pgp-signature"; boundary="{outer}"')
            + b"\r\n" + f"--{outer}\r\n".encode() + report
            + f"\r\n--{outer}\r\n".encode()
            + b'Content-Type: application/pgp-signature; name="signature.asc"\r\n\r\n'
            + signature.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
            + f"\r\n--{outer}--\r\n".encode())


@dataclass(frozen=True)
class Mdn:
    original_id: str
    disposition: str
    reporter: str
    signer: str = ""         # VALIDSIG fingerprint of a signed MDN, "" if unsigned/invalid
    error: str = ""          # RFC 8098 3.2.8 Error: field (with the `error` modifier)


def _signed_parts(raw: bytes, boundary: str) -> tuple[bytes, bytes]:
    """RFC 3156 5: the signed entity (exact bytes; the CRLF before a delimiter belongs to it)
    and the signature part's body."""
    delim = b"--" + boundary.encode()
    start = raw.find(delim + b"\r\n")
    if start < 0:
        raise MimeError("multipart/signed without its first part")
    start += len(delim) + 2
    end = raw.find(b"\r\n" + delim, start)
    if end < 0:
        raise MimeError("multipart/signed without a second part")
    sig_part = raw[end + 2 + len(delim):]
    sig_start = sig_part.find(b"\r\n\r\n")
    sig_end = sig_part.find(b"\r\n" + delim)
    if sig_start < 0 or sig_end < 0:
        raise MimeError("multipart/signed with a broken signature part")
    return raw[start:end], sig_part[sig_start + 4:sig_end]


def parse_mdn(msg_path: Path, ring: Keyring | None = None) -> Mdn | None:
    """The disposition notification in a multipart/report (plain, or inside an RFC 3156
    multipart/signed, verified with `ring`), or None if the message is not an MDN."""
    with open(msg_path, "rb") as fp:
        head, _ = read_headers(fp)
        signer = ""
        reporter = email.utils.parseaddr(head.get("From", ""))[1].lower()
        ctype = head.get_content_type()
        if ctype == "multipart/signed":
            boundary = param(head, "boundary")
            if not boundary or msg_path.stat().st_size > MAX_MDN:
                return None
            entity, signature = _signed_parts(fp.read(MAX_MDN), boundary)
            inner = BytesHeaderParser(policy=email.policy.compat32).parsebytes(entity.split(b"\r\n\r\n")[0])
            if inner.get_content_type() != "multipart/report":
                return None
            if ring is not None:
                signer = ring.verify_bytes(entity, signature)
            fp = io.BytesIO(entity)  # type: ignore[assignment]
            head, _ = read_headers(fp)
        if head.get_content_type() != "multipart/report" or \
                (param(head, "report-type") or "").lower() != "disposition-notification":
            return None
        boundary = param(head, "boundary")
        if not boundary or msg_path.stat().st_size > MAX_MDN:
            raise MimeError("malformed MDN")
        for h, chunks in MultipartReader(fp, boundary).parts():
            if h.get_content_type() == "message/disposition-notification":
                fields = BytesHeaderParser().parsebytes(b"".join(chunks).lstrip(b"\r\n"))
                oid = (fields.get("Original-Message-ID") or "").strip()
                if not oid:
                    raise MimeError("MDN without Original-Message-ID")
                return Mdn(oid, (fields.get("Disposition") or "").strip(), reporter, signer,
                           " ".join(str(fields.get("Error") or "").split()))
    raise MimeError("multipart/report without a disposition-notification part")
