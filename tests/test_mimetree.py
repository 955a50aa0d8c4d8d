"""relay.mimetree: part offsets, line counts, ENVELOPE/BODYSTRUCTURE, malformed input."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import pytest

from relay import mimetree
from relay.protocol.imap import render

DICOM = b"DICM" + bytes(range(256)) * 40


def crlf(s: str) -> bytes:
    return s.replace("\n", "\r\n").encode()


def nested_message() -> tuple[bytes, dict[str, bytes]]:
    b64 = base64.encodebytes(DICOM).replace(b"\n", b"\r\n")
    inner = crlf("From: Inner <inner@example.test>\nSubject: inner\n\nhello inner\nline2\n")
    text_body = crlf("Dear colleague,\nthe study follows.\n")
    head = crlf(
        "Return-Path: <ct@a.test>\n"
        "From: \"CT Scanner\" <ct@a.test>\n"
        "To: pacs@b.test, Other <o@b.test>\n"
        "Subject: Study 1.2.3\n"
        "Date: Mon, 4 Mar 2024 10:00:00 +0000\n"
        "Message-ID: <m1@a.test>\n"
        "MIME-Version: 1.0\n"
        "Content-Type: multipart/mixed; boundary=\"outer\"\n"
        "\n"
        "preamble\n"
        "--outer\n"
        "Content-Type: text/plain; charset=utf-8\n"
        "\n")
    msg = (head + text_body + crlf(
        "\n--outer\n"
        "Content-Type: multipart/alternative; boundary=inner\n"
        "\n"
        "--inner\n"
        "Content-Type: application/dicom; name=\"a.dcm\"\n"
        "Content-Transfer-Encoding: base64\n"
        "Content-Disposition: attachment; filename=\"a.dcm\"\n"
        "\n") + b64 + crlf(
        "\n--inner--\n"
        "\n--outer\n"
        "Content-Type: message/rfc822\n"
        "\n") + inner + crlf("\n--outer--\nepilogue\n"))
    return msg, {"text": text_body, "b64": b64, "inner": inner}


@pytest.fixture
def msgfile(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    data, parts = nested_message()
    path = tmp_path / "1700000000.M1P1Q1.relay.test,S=1:2,S"
    path.write_bytes(data)
    return path, parts


def read(path: Path, off: int, size: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(off)
        return f.read(size)


def test_nested_parts_offsets(msgfile: tuple[Path, dict[str, bytes]]) -> None:
    path, parts = msgfile
    root = mimetree.parse(path)
    assert (root.maintype, root.subtype) == ("multipart", "mixed")
    assert len(root.children) == 3
    text = mimetree.find_part(root, (1,))
    assert text is not None and read(path, text.body_offset, text.body_size) == parts["text"]
    assert text.body_lines == 2
    dcm = mimetree.find_part(root, (2, 1))
    assert dcm is not None and (dcm.maintype, dcm.subtype) == ("application", "dicom")
    body = read(path, dcm.body_offset, dcm.body_size)
    assert base64.b64decode(body) == DICOM
    assert read(path, dcm.header_offset, dcm.header_size).startswith(b"Content-Type: application/dicom")
    assert read(path, dcm.header_offset, dcm.header_size).endswith(b"\r\n\r\n")
    rfc822 = mimetree.find_part(root, (3,))
    assert rfc822 is not None and rfc822.message is not None
    assert read(path, rfc822.body_offset, rfc822.body_size) == parts["inner"]
    inner_body = mimetree.find_part(root, (3, 1))
    assert inner_body is not None and read(path, inner_body.body_offset, inner_body.body_size) == b"hello inner\r\nline2\r\n"
    assert mimetree.find_part(root, (4,)) is None
    assert mimetree.find_part(root, (1, 2)) is None


def test_envelope(msgfile: tuple[Path, dict[str, bytes]]) -> None:
    root = mimetree.parse(msgfile[0])
    env = render(mimetree.envelope(root))
    assert env == (b'("Mon, 4 Mar 2024 10:00:00 +0000" "Study 1.2.3" (("CT Scanner" NIL "ct" "a.test")) '
                   b'(("CT Scanner" NIL "ct" "a.test")) (("CT Scanner" NIL "ct" "a.test")) '
                   b'((NIL NIL "pacs" "b.test") ("Other" NIL "o" "b.test")) NIL NIL NIL "<m1@a.test>")')


def test_bodystructure(msgfile: tuple[Path, dict[str, bytes]]) -> None:
    root = mimetree.parse(msgfile[0])
    bs = mimetree.bodystructure(root)
    b64 = msgfile[1]["b64"]
    assert bs.startswith(b'(("text" "plain" ("charset" "utf-8") NIL NIL "7bit" 37 2 NIL NIL NIL NIL)'
                         b'(("application" "dicom" ("name" "a.dcm") NIL NIL "base64" %d NIL '
                         b'("attachment" ("filename" "a.dcm")) NIL NIL) "alternative" ("boundary" "inner") NIL NIL NIL)'
                         % len(b64))
    assert b'("message" "rfc822" NIL NIL NIL "7bit" ' in bs
    assert bs.endswith(b' "mixed" ("boundary" "outer") NIL NIL NIL)')
    body = mimetree.bodystructure(root, extended=False)
    assert body.endswith(b' "mixed")') and b"attachment" not in body
    assert bs.count(b"(") == bs.count(b")")


def test_single_part_message(tmp_path: Path) -> None:
    path = tmp_path / "m"
    path.write_bytes(b"Subject: x\r\n\r\nline1\r\nline2\r\n")
    root = mimetree.parse(path)
    assert mimetree.bodystructure(root) == b'("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 14 2 NIL NIL NIL NIL)'
    assert mimetree.find_part(root, (1,)) is root
    assert mimetree.find_part(root, (2,)) is None


def test_header_fields(msgfile: tuple[Path, dict[str, bytes]]) -> None:
    path = msgfile[0]
    root = mimetree.parse(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        got = mimetree.header_fields(fd, root, ("subject", "FROM"), exclude=False)
        assert got == b'From: "CT Scanner" <ct@a.test>\r\nSubject: Study 1.2.3\r\n\r\n'
        rest = mimetree.header_fields(fd, root, ("Subject", "From", "To", "Date", "Message-ID", "MIME-Version",
                                                 "Content-Type"), exclude=True)
        assert rest == b"Return-Path: <ct@a.test>\r\n\r\n"
    finally:
        os.close(fd)


def test_cache_survives_flag_rename(msgfile: tuple[Path, dict[str, bytes]]) -> None:
    path = msgfile[0]
    t1 = mimetree.tree(path)
    renamed = path.with_name(path.name.replace(":2,S", ":2,ST"))
    path.rename(renamed)
    assert mimetree.tree(renamed) is t1


@pytest.mark.parametrize("data", [
    b"",
    b"\r\n",
    b"no header end at all",
    b"Content-Type: multipart/mixed; boundary=x\r\n\r\n--x\r\nabc",             # no closing delimiter
    b"Content-Type: multipart/mixed; boundary=x\r\n\r\nno delimiters here\r\n",
    b"Content-Type: multipart/mixed\r\n\r\n--x\r\n\r\nbody\r\n--x--\r\n",          # no boundary param
    b"Content-Type: multipart/mixed; boundary=x\r\n\r\n--xy\r\n\r\nA\r\n--x\r\n\r\nB\r\n--x--\r\n",
    b"Content-Type: message/rfc822\r\n\r\n",
    b"Content-Type: ;;;garbage\r\n\r\nbody",
    b"Content-Type: text/plain; charset*=utf-8''%E2%82%AC\r\nContent-Disposition: ;\r\n\r\nx",
    b"Content-Type: multipart/mixed; boundary=a\r\n\r\n" + b"--a\r\nContent-Type: multipart/mixed; boundary=a\r\n\r\n" * 40,
    bytes(range(256)) * 10,
])
def test_malformed_does_not_crash(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "bad"
    path.write_bytes(data)
    root = mimetree.parse(path)
    bs = mimetree.bodystructure(root)
    assert bs.startswith(b"(") and bs.endswith(b")")
    render(mimetree.envelope(root))
    assert root.body_offset + root.body_size <= len(data)


def test_longer_boundary_is_not_a_delimiter(tmp_path: Path) -> None:
    path = tmp_path / "m"
    path.write_bytes(b"Content-Type: multipart/mixed; boundary=x\r\n\r\n--xy\r\n\r\nA\r\n--x\r\n\r\nB\r\n--x--\r\n")
    root = mimetree.parse(path)
    assert len(root.children) == 1
    assert read(path, root.children[0].body_offset, root.children[0].body_size) == b"B"


def test_large_part_scanned_in_chunks(tmp_path: Path) -> None:
    """A boundary across a 1 MiB chunk edge is still found; the big part is never read whole."""
    big = b"A" * (mimetree.CHUNK - 40) + b"\r\n"
    path = tmp_path / "m"
    path.write_bytes(b"Content-Type: multipart/mixed; boundary=edge\r\n\r\n--edge\r\n"
                     b"Content-Type: application/dicom\r\n\r\n" + big + b"\r\n--edge\r\n\r\nsecond\r\n--edge--\r\n")
    root = mimetree.parse(path)
    assert [c.subtype for c in root.children] == ["dicom", "plain"]
    assert root.children[0].body_size == len(big)
    assert read(path, root.children[1].body_offset, root.children[1].body_size) == b"second"


def test_memory_does_not_follow_the_number_of_delimiter_lines(tmp_path: Path) -> None:
    """A (hostile) message with 400,000 delimiter lines: parts stop at MAX_PARTS and the scan
    keeps no list of every delimiter it finds."""
    import tracemalloc

    path = tmp_path / "m"
    with open(path, "wb") as f:
        f.write(b"Content-Type: multipart/mixed; boundary=b\r\n\r\n")
        f.write(b"--b\r\n\r\nx\r\n" * 400_000 + b"--b--\r\n")
    tracemalloc.start()
    try:
        root = mimetree.parse(path, lines=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(root.children) <= mimetree.MAX_PARTS
    assert peak < 8 * 1024 * 1024, peak
