"""The directory's e-mail side, without I/O: read a request (bounded), decide whether it may
be answered (RFC 3834), parse its command, and build replies and pushes as message bytes.

Commands (Subject, else the first non-empty line of a text/plain body), case-insensitive:
    GET                 -> the signed document (multipart/mixed, two attachments)
    GET SINCE <serial>  -> the same if the serial moved past <serial>, else "unchanged"
    KEY <address>       -> that participant's armored key (application/pgp-keys)
"""

from __future__ import annotations

import base64
import binascii
import email.policy
import email.utils
import quopri
import re
from dataclasses import dataclass
from email.message import EmailMessage
from email.parser import BytesHeaderParser
from pathlib import Path

# A request is a few hundred bytes. The header block is read up to 64 KiB (RFC 5322 sets no
# limit on the header section; 64 KiB holds hundreds of Received lines), the body only up to
# 4 KiB: a command is on its first line. Whatever follows is never read.
MAX_HEAD = 64 * 1024
MAX_BODY_PEEK = 4 * 1024
# RFC 5322 2.1.1: lines of at most 998 characters; a command line is far shorter.
MAX_COMMAND = 998

_POLICY = email.policy.SMTP.clone(max_line_length=78)
_COMMAND_RE = re.compile(r"^(GET)(?:\s+SINCE\s+(\d{1,18}))?$|^(KEY)\s+(\S+)$", re.IGNORECASE)
# RFC 3834 section 2 and common practice: senders that are machines, never to be answered.
_MACHINE_LOCAL = re.compile(r"^(mailer-daemon|postmaster|owner-.*|.*-request|.*-owner|"
                            r"listserv|majordomo|no-?reply)$", re.IGNORECASE)

HELP = ("Commands (in the Subject, or the first line of a plain-text body):\r\n"
        "  GET                 the signed participant directory\r\n"
        "  GET SINCE <serial>  the same, only if it changed after <serial>\r\n"
        "  KEY <address>       one participant's OpenPGP public key\r\n")


class RequestError(ValueError):
    """A request that cannot be read (header block too large, not a message)."""


@dataclass(frozen=True)
class Command:
    verb: str                        # "GET" | "KEY" | "HELP" (anything unknown)
    since: int | None = None
    address: str | None = None
    text: str = ""                   # the command as written (for Re: and the log)


@dataclass(frozen=True)
class Request:
    sender: str | None               # envelope sender (first Return-Path); None = null sender
    message_id: str | None
    references: str | None
    subject: str
    auto: str | None                 # why this is machine mail (never answered), or None
    command: Command


def parse_command(text: str) -> Command | None:
    t = " ".join(text.split())[:MAX_COMMAND]
    m = _COMMAND_RE.match(t)
    if not m:
        return None
    if m.group(1):
        return Command("GET", since=int(m.group(2)) if m.group(2) else None, text=t.upper())
    return Command("KEY", address=m.group(4).strip("<>").lower(), text=f"KEY {m.group(4)}")


def auto_reason(headers: email.message.Message, sender: str | None) -> str | None:
    """RFC 3834 section 2: do not answer automatic mail. The reason, or None for a person."""
    if not sender:
        return "null sender"
    auto = str(headers.get("Auto-Submitted", "no")).split(";")[0].strip().lower()
    if auto != "no":
        return f"Auto-Submitted: {auto}"
    precedence = str(headers.get("Precedence", "")).strip().lower()
    if precedence in ("bulk", "list", "junk"):
        return f"Precedence: {precedence}"
    for name in headers:
        if name.lower().startswith("list-"):
            return f"{name} header"
    if any(name.lower() in ("x-auto-response-suppress", "x-autoreply") for name in headers):
        return "auto-response header"
    if _MACHINE_LOCAL.match(sender.rsplit("@", 1)[0]):
        return f"machine sender {sender}"
    return None


def _split_head(data: bytes) -> tuple[bytes, bytes]:
    for sep in (b"\r\n\r\n", b"\n\n"):
        i = data.find(sep)
        if i >= 0:
            return data[:i + len(sep)], data[i + len(sep):]
    if len(data) >= MAX_HEAD:
        raise RequestError(f"header block larger than {MAX_HEAD} bytes")
    return data, b""          # a message without a body


def _first_body_line(headers: email.message.Message, body: bytes) -> str:
    ctype = headers.get_content_type() if headers.get("Content-Type") else "text/plain"
    if ctype != "text/plain":
        return ""
    cte = str(headers.get("Content-Transfer-Encoding", "7bit")).strip().lower()
    if cte == "quoted-printable":
        body = quopri.decodestring(body)
    elif cte == "base64":
        compact = b"".join(body.split())
        try:
            body = base64.b64decode(compact[:len(compact) // 4 * 4])
        except (binascii.Error, ValueError):
            return ""
    charset = headers.get_content_charset() or "utf-8"
    try:
        text = body.decode(charset, "replace")
    except LookupError:
        text = body.decode("utf-8", "replace")
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return ""


def _address(value: str | None) -> str | None:
    if value is None:
        return None
    addr = email.utils.parseaddr(str(value))[1].strip().lower()
    return addr or None


def parse_request(data: bytes) -> Request:
    """A stored request (trace headers first), of which only the first MAX_HEAD +
    MAX_BODY_PEEK bytes are given. Raises RequestError, and nothing else, on any input."""
    try:
        return _parse_request(data)
    except RequestError:
        raise
    except (ValueError, LookupError, AttributeError, TypeError) as e:
        # the stdlib's header parsing trips over some malformed fields (`Message-ID: <@`
        # raises IndexError): unreadable, never an error that stops the directory
        raise RequestError(f"malformed header ({type(e).__name__}: {e})"[:200]) from None


def _parse_request(data: bytes) -> Request:
    head, body = _split_head(data[:MAX_HEAD + MAX_BODY_PEEK])
    if len(head) > MAX_HEAD:
        raise RequestError(f"header block larger than {MAX_HEAD} bytes")
    headers = BytesHeaderParser(policy=email.policy.default).parsebytes(head)
    return_paths = headers.get_all("Return-Path") or []
    sender = _address(str(return_paths[0])) if return_paths else _address(headers.get("From"))
    try:
        subject = str(headers.get("Subject", "")).strip()
    except (ValueError, TypeError):         # undecodable encoded-words
        subject = ""
    command = parse_command(subject)
    if command is None:
        command = parse_command(_first_body_line(headers, body[:MAX_BODY_PEEK]))
    if command is None:
        command = Command("HELP", text=subject[:80])
    msgid = headers.get("Message-ID")
    refs = headers.get("References")
    return Request(sender=sender, message_id=str(msgid).strip() if msgid else None,
                   references=" ".join(str(refs).split()) if refs else None, subject=subject,
                   auto=auto_reason(headers, sender), command=command)


def read_request(path: Path) -> Request:
    """Read at most MAX_HEAD + MAX_BODY_PEEK bytes of a stored message and parse it."""
    with open(path, "rb") as f:
        data = f.read(MAX_HEAD + MAX_BODY_PEEK)
    return parse_request(data)


# --- building messages -----------------------------------------------------------------------

def _base(from_addr: str, to: str, subject: str, hostname: str, auto: str,
          serial: int | None) -> EmailMessage:
    msg = EmailMessage(policy=_POLICY)
    msg["From"] = email.utils.formataddr(("Participant directory", from_addr))
    msg["To"] = to
    msg["Subject"] = subject
    msg["Date"] = email.utils.formatdate(usegmt=True)
    msg["Message-ID"] = email.utils.make_msgid("directory", domain=hostname)
    msg["Auto-Submitted"] = auto              # RFC 3834 section 5
    if serial is not None:
        msg["X-Relay-Directory-Serial"] = str(serial)
    return msg


def _attach_document(msg: EmailMessage, text: str, doc: bytes, sig: bytes) -> None:
    msg.set_content(text)
    # base64 keeps the signed bytes exact (no line-ending or trailing-space rewriting on the way)
    msg.add_attachment(doc, maintype="application", subtype="json", filename="directory.json")
    msg.add_attachment(sig, maintype="application", subtype="pgp-signature",
                       filename="directory.json.asc")


def reply(req: Request, from_addr: str, hostname: str, text: str, serial: int | None = None,
          document: tuple[bytes, bytes] | None = None,
          key: tuple[str, str] | None = None) -> bytes:
    """The auto-reply to `req`: plain text, plus the signed document or a key when given."""
    assert req.sender is not None
    msg = _base(from_addr, req.sender, f"Re: {req.command.text or 'directory'}", hostname,
                "auto-replied", serial)
    if req.message_id:
        msg["In-Reply-To"] = req.message_id
        msg["References"] = f"{req.references} {req.message_id}" if req.references else req.message_id
    if document is not None:
        _attach_document(msg, text, *document)
    elif key is not None:
        address, armored = key
        msg.set_content(text)
        msg.add_attachment(armored.encode("ascii"), maintype="application", subtype="pgp-keys",
                           filename=f"{address}.asc")
    else:
        msg.set_content(text)
    return msg.as_bytes()


def push(from_addr: str, hostname: str, serial: int, doc: bytes, sig: bytes) -> bytes:
    """The message pushed to every participant when the directory changed."""
    msg = _base(from_addr, "participants:;", f"Directory update: serial {serial}", hostname,
                "auto-generated", serial)
    _attach_document(msg, f"The participant directory changed: serial {serial}.\r\n"
                          "Verify directory.json.asc with the pinned directory key before use.\r\n",
                     doc, sig)
    return msg.as_bytes()
