"""The directory's e-mail commands, RFC 3834 checks and reply building: pure bytes, no server."""

from __future__ import annotations

import email
import email.policy
from pathlib import Path

import pytest

from relay.directory.mail import (
    MAX_BODY_PEEK,
    MAX_HEAD,
    Command,
    RequestError,
    parse_command,
    parse_request,
    push,
    read_request,
    reply,
)


def msg(headers: str, body: str = "", sender: str = "ct@hospital.test") -> bytes:
    trace = f"Return-Path: <{sender}>\r\nReceived: from gw (127.0.0.1) by relay.test\r\n"
    return (trace + headers.replace("\n", "\r\n") + "\r\n" + body.replace("\n", "\r\n")).encode()


@pytest.mark.parametrize("text, expected", [
    ("GET", Command("GET", text="GET")),
    ("  get  ", Command("GET", text="GET")),
    ("Get since 41", Command("GET", since=41, text="GET SINCE 41")),
    ("GET SINCE\t7", Command("GET", since=7, text="GET SINCE 7")),
    ("KEY CT@Hospital.test", Command("KEY", address="ct@hospital.test", text="KEY CT@Hospital.test")),
    ("key <mr@x.test>", Command("KEY", address="mr@x.test", text="KEY <mr@x.test>")),
    ("GET SINCE", None), ("GET SINCE x", None), ("GET SINCE -1", None), ("KEY", None),
    ("Re: GET", None), ("PUT", None), ("", None), ("GET " + "1" * 30, None),
])
def test_parse_command(text: str, expected: Command | None) -> None:
    assert parse_command(text) == expected


def test_subject_wins_then_first_body_line() -> None:
    r = parse_request(msg("From: a <ct@hospital.test>\nSubject: GET SINCE 3\nMessage-ID: <m1@h>\n",
                          "KEY x@y.test\n"))
    assert r.command.verb == "GET" and r.command.since == 3
    assert (r.sender, r.message_id, r.auto) == ("ct@hospital.test", "<m1@h>", None)
    r = parse_request(msg("Subject: please\n", "\n\n  key mr@x.test  \nmore\n"))
    assert r.command == Command("KEY", address="mr@x.test", text="KEY mr@x.test")
    r = parse_request(msg("Subject: hello\n", "what is this?\n"))
    assert r.command.verb == "HELP"


def test_body_command_in_quoted_printable_and_base64() -> None:
    r = parse_request(msg("Subject:\nContent-Type: text/plain; charset=utf-8\n"
                          "Content-Transfer-Encoding: quoted-printable\n", "GET=20SINCE=2012\n"))
    assert r.command.since == 12
    r = parse_request(msg("Content-Type: text/plain\nContent-Transfer-Encoding: base64\n",
                          "R0VUCg==\n"))
    assert r.command.verb == "GET"
    r = parse_request(msg("Content-Type: application/octet-stream\n", "GET\n"))
    assert r.command.verb == "HELP"          # only text/plain bodies carry commands


def test_envelope_sender_is_the_first_return_path() -> None:
    """A Return-Path the client wrote into its own header comes after ours and is ignored."""
    r = parse_request(msg("Return-Path: <victim@x.test>\nSubject: GET\n", sender="ct@hospital.test"))
    assert r.sender == "ct@hospital.test"


@pytest.mark.parametrize("headers, sender, reason", [
    ("Auto-Submitted: auto-replied\n", "a@x.test", "Auto-Submitted: auto-replied"),
    ("Auto-Submitted: Auto-Generated; owner-email=x\n", "a@x.test", "Auto-Submitted: auto-generated"),
    ("Precedence: bulk\n", "a@x.test", "Precedence: bulk"),
    ("Precedence: list\n", "a@x.test", "Precedence: list"),
    ("List-Id: <l.x.test>\n", "a@x.test", "List-Id header"),
    ("List-Unsubscribe: <mailto:u@x.test>\n", "a@x.test", "List-Unsubscribe header"),
    ("X-Auto-Response-Suppress: All\n", "a@x.test", "auto-response header"),
    ("", "MAILER-DAEMON@x.test", "machine sender"),
    ("", "owner-list@x.test", "machine sender"),
    ("", "", "null sender"),
])
def test_automatic_mail_is_recognised(headers: str, sender: str, reason: str) -> None:
    r = parse_request(msg("Subject: GET\n" + headers, sender=sender))
    assert r.auto is not None and r.auto.startswith(reason)


def test_auto_submitted_no_is_a_person() -> None:
    assert parse_request(msg("Subject: GET\nAuto-Submitted: no\n")).auto is None


def test_oversized_header_block_is_refused_and_reading_is_bounded(tmp_path: Path) -> None:
    pad = b"".join(b"X-Pad: %070d\r\n" % i for i in range(MAX_HEAD // 70 + 10))
    with pytest.raises(RequestError, match="header block larger"):
        parse_request(b"Return-Path: <a@x.test>\r\n" + pad + b"\r\nGET\r\n")
    # a big body after a small header: only the bounded prefix is read from the file
    f = tmp_path / "m"
    f.write_bytes(msg("Subject: GET\n", "x" * (8 * 1024 * 1024)))
    assert read_request(f).command.verb == "GET"
    assert MAX_HEAD + MAX_BODY_PEEK < 100 * 1024


def test_reply_headers_and_document_attachments() -> None:
    req = parse_request(msg("Subject: GET\nMessage-ID: <q1@gw>\nReferences: <q0@gw>\n"))
    doc, sig = '{"format":"relay-directory/1","name":"Müller"}'.encode(), b"-----BEGIN PGP SIGNATURE-----\n..."
    raw = reply(req, "directory@x.test", "relay.test", "the directory", serial=9, document=(doc, sig))
    assert b"\r\n" in raw and b"\n" not in raw.replace(b"\r\n", b"")
    m = email.message_from_bytes(raw, policy=email.policy.default)
    assert m["Auto-Submitted"] == "auto-replied" and m["In-Reply-To"] == "<q1@gw>"
    assert m["References"] == "<q0@gw> <q1@gw>" and m["To"] == "ct@hospital.test"
    assert m["Subject"] == "Re: GET" and m["X-Relay-Directory-Serial"] == "9"
    assert m.get_content_type() == "multipart/mixed"
    parts = {p.get_filename(): p for p in m.iter_attachments()}
    assert parts["directory.json"].get_content_type() == "application/json"
    assert parts["directory.json"].get_payload(decode=True) == doc
    assert parts["directory.json.asc"].get_content_type() == "application/pgp-signature"
    assert parts["directory.json.asc"].get_payload(decode=True) == sig


def test_key_reply_and_push() -> None:
    req = parse_request(msg("Subject: KEY mr@x.test\n"))
    raw = reply(req, "directory@x.test", "relay.test", "key", key=("mr@x.test", "-----BEGIN PGP"))
    m = email.message_from_bytes(raw, policy=email.policy.default)
    [att] = list(m.iter_attachments())
    assert att.get_content_type() == "application/pgp-keys" and att.get_filename() == "mr@x.test.asc"
    assert m["In-Reply-To"] is None            # the request had no Message-ID
    m = email.message_from_bytes(push("directory@x.test", "relay.test", 5, b"{}", b"sig"),
                                 policy=email.policy.default)
    assert m["Auto-Submitted"] == "auto-generated" and m["Subject"] == "Directory update: serial 5"
    assert [p.get_filename() for p in m.iter_attachments()] == ["directory.json", "directory.json.asc"]
