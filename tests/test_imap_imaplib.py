"""Every IMAP command of issue 3, item 1, driven by Python's imaplib (a real client) against a
relay on loopback: nested multiparts (BODY[n.m], n.MIME, n.HEADER/TEXT of message/rfc822,
HEADER.FIELDS, partials, ENVELOPE and BODYSTRUCTURE), 8-bit header bytes (server->client
literals), SEARCH combinations, STORE .SILENT, UID EXPUNGE, client->server literals
(synchronizing, LITERAL+ and LITERAL- sized) and the clear NOs of APPEND/COPY/CREATE."""

from __future__ import annotations

import base64
import imaplib
import re
import smtplib
import time
from typing import Any

import pytest

from tests.test_imap_session import Raw

pytestmark = pytest.mark.e2e

ALICE = "alice@example.test"
DICOM = bytes(range(256)) * 12
B64 = base64.encodebytes(DICOM).replace(b"\n", b"\r\n")

NESTED = (
    b"From: =?utf-8?q?Dr=2E_M=C3=BCller?= <mueller@ct.test>\r\n"
    b"To: alice@example.test, Bob Example <bob@example.test>\r\n"
    b"Subject: Befund M\xc3\xbcller \"CT\"\r\n"
    b"Date: Tue, 5 Mar 2024 08:30:00 +0100\r\n"
    b"Message-ID: <nested@ct.test>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: multipart/mixed; boundary=\"outer\"\r\n"
    b"\r\n"
    b"preamble\r\n"
    b"--outer\r\n"
    b"Content-Type: multipart/alternative; boundary=\"inner\"\r\n"
    b"\r\n"
    b"--inner\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"\r\n"
    b"plain text\r\n"
    b"--inner\r\n"
    b"Content-Type: text/html\r\n"
    b"\r\n"
    b"<p>html</p>\r\n"
    b"--inner--\r\n"
    b"--outer\r\n"
    b"Content-Type: message/rfc822\r\n"
    b"\r\n"
    b"From: x@y.test\r\n"
    b"Subject: forwarded\r\n"
    b"Content-Type: multipart/mixed; boundary=\"fwd\"\r\n"
    b"\r\n"
    b"--fwd\r\n"
    b"Content-Type: text/plain\r\n"
    b"\r\n"
    b"fwd text\r\n"
    b"--fwd\r\n"
    b"Content-Type: application/dicom\r\n"
    b"Content-Transfer-Encoding: base64\r\n"
    b"Content-Disposition: attachment; filename=\"ct.dcm\"\r\n"
    b"\r\n"
    b"RElDTQ==\r\n"
    b"--fwd--\r\n"
    b"--outer\r\n"
    b"Content-Type: application/dicom; name=\"a.dcm\"\r\n"
    b"Content-Transfer-Encoding: base64\r\n"
    b"\r\n"
    + B64 +
    b"--outer--\r\n"
    b"epilogue\r\n")

FORWARDED = NESTED[NESTED.index(b"From: x@y.test"):NESTED.index(b"\r\n--outer\r\nContent-Type: application")]

EIGHTBIT = (b"From: M\xc3\xbcller <m@ct.test>\r\nSubject: a long\r\n folded subject\r\n"
            b"Content-Type: application/dicom; name=\"M\xc3\xbcller.dcm\"\r\n"
            b"Content-Disposition: attachment; filename=\"M\xc3\xbcller.dcm\"\r\n\r\nRElDTQ==\r\n")


def send(relay: Any, body: bytes) -> None:
    with smtplib.SMTP("127.0.0.1", relay.smtp_port, timeout=30) as s:
        s.sendmail("ct@ct.test", [ALICE], body)


@pytest.fixture
def box(relay: Any) -> Any:
    send(relay, NESTED)
    send(relay, EIGHTBIT)
    send(relay, b"Subject: three\r\n\r\nthree\r\n")
    return relay


def login(relay: Any) -> imaplib.IMAP4:
    m = imaplib.IMAP4("127.0.0.1", relay.imap_port)
    m.login(ALICE, "secret")
    return m


def one(m: imaplib.IMAP4, num: str, item: str) -> Any:
    typ, data = m.fetch(num, item)
    assert typ == "OK", data
    return data


def sections(data: list[Any]) -> dict[bytes, bytes]:
    """imaplib FETCH data -> {b"BODY[1.1]": bytes, ...} for every literal item."""
    out = {}
    for d in data:
        if isinstance(d, tuple):
            m = re.search(rb"(BODY\[[^\]]*\](?:<\d+>)?) \{\d+\}$", d[0])
            assert m, d
            out[m.group(1)] = d[1]
    return out


def test_nested_multipart_sections_and_partials(box: Any) -> None:
    m = login(box)
    m.select()
    got = sections(one(m, "1", "(BODY.PEEK[1] BODY.PEEK[1.1] BODY.PEEK[1.2] BODY.PEEK[1.2.MIME] "
                                "BODY.PEEK[2] BODY.PEEK[2.MIME] BODY.PEEK[2.HEADER] BODY.PEEK[2.TEXT] "
                                "BODY.PEEK[2.1] BODY.PEEK[2.2] BODY.PEEK[2.2.MIME] BODY.PEEK[3])"))
    assert got[b"BODY[1]"] == (b"--inner\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nplain text\r\n"
                               b"--inner\r\nContent-Type: text/html\r\n\r\n<p>html</p>\r\n--inner--")
    assert got[b"BODY[1.1]"] == b"plain text"
    assert got[b"BODY[1.2]"] == b"<p>html</p>"
    assert got[b"BODY[1.2.MIME]"] == b"Content-Type: text/html\r\n\r\n"
    assert got[b"BODY[2]"] == FORWARDED                    # the whole encapsulated message
    assert got[b"BODY[2.MIME]"] == b"Content-Type: message/rfc822\r\n\r\n"
    head, _, text = FORWARDED.partition(b"\r\n\r\n")
    assert got[b"BODY[2.HEADER]"] == head + b"\r\n\r\n"
    assert got[b"BODY[2.TEXT]"] == text
    assert got[b"BODY[2.1]"] == b"fwd text"
    assert got[b"BODY[2.2]"] == b"RElDTQ=="
    assert got[b"BODY[2.2.MIME]"].startswith(b"Content-Type: application/dicom\r\n")
    assert base64.b64decode(got[b"BODY[3]"]) == DICOM
    got = sections(one(m, "1", "(BODY.PEEK[HEADER.FIELDS (Message-ID DATE)] "
                                "BODY.PEEK[2.HEADER.FIELDS (SUBJECT)] BODY.PEEK[2.HEADER.FIELDS.NOT (FROM CONTENT-TYPE)] "
                                "BODY.PEEK[1.1]<2.5> BODY.PEEK[3]<4000.1000> BODY.PEEK[2.TEXT]<0.5>)"))
    assert got[b"BODY[HEADER.FIELDS (Message-ID DATE)]"] == (
        b"Date: Tue, 5 Mar 2024 08:30:00 +0100\r\nMessage-ID: <nested@ct.test>\r\n\r\n")
    assert got[b"BODY[2.HEADER.FIELDS (SUBJECT)]"] == b"Subject: forwarded\r\n\r\n"
    assert got[b"BODY[2.HEADER.FIELDS.NOT (FROM CONTENT-TYPE)]"] == b"Subject: forwarded\r\n\r\n"
    assert got[b"BODY[1.1]<2>"] == b"ain t"
    assert got[b"BODY[3]<4000>"] == B64[:-2][4000:5000]          # its CRLF belongs to the delimiter
    assert got[b"BODY[2.TEXT]<0>"] == b"--fwd"
    assert one(m, "1", "(BODY.PEEK[4] BODY.PEEK[1.3])") == [b"1 (BODY[4] NIL BODY[1.3] NIL)"]
    assert one(m, "1", "FLAGS") == [b"1 (FLAGS ())"]         # PEEK left \Seen alone
    assert sections(one(m, "1", "(BODY[1.1])")) == {b"BODY[1.1]": b"plain text"}
    assert one(m, "1", "FLAGS") == [b"1 (FLAGS (\\Seen))"]
    m.logout()


def test_envelope_and_bodystructure_of_nested_multiparts(box: Any) -> None:
    m = login(box)
    m.select()
    data = one(m, "1", "(ENVELOPE)")
    assert data[0] == (b'1 (ENVELOPE ("Tue, 5 Mar 2024 08:30:00 +0100" {19}', b'Befund M\xc3\xbcller "CT"')
    assert data[1] == (b' (("=?utf-8?q?Dr=2E_M=C3=BCller?=" NIL "mueller" "ct.test"))' * 3
                       + b' ((NIL NIL "alice" "example.test") ("Bob Example" NIL "bob" "example.test"))'
                       + b' NIL NIL NIL "<nested@ct.test>"))')
    fwd_env = (b'(NIL "forwarded" ((NIL NIL "x" "y.test")) ((NIL NIL "x" "y.test")) ((NIL NIL "x" "y.test"))'
               b' NIL NIL NIL NIL NIL)')
    b64_size = len(B64) - 2
    assert one(m, "1", "(BODYSTRUCTURE)") == [
        b'1 (BODYSTRUCTURE ('
        b'(("text" "plain" ("charset" "utf-8") NIL NIL "7bit" 10 1 NIL NIL NIL NIL)'
        b'("text" "html" ("charset" "us-ascii") NIL NIL "7bit" 11 1 NIL NIL NIL NIL)'
        b' "alternative" ("boundary" "inner") NIL NIL NIL)'
        b'("message" "rfc822" NIL NIL NIL "7bit" %d ' % len(FORWARDED) + fwd_env +
        b' (("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 8 1 NIL NIL NIL NIL)'
        b'("application" "dicom" NIL NIL NIL "base64" 8 NIL ("attachment" ("filename" "ct.dcm")) NIL NIL)'
        b' "mixed" ("boundary" "fwd") NIL NIL NIL) 15 NIL NIL NIL NIL)'
        b'("application" "dicom" ("name" "a.dcm") NIL NIL "base64" %d NIL NIL NIL NIL)' % b64_size +
        b' "mixed" ("boundary" "outer") NIL NIL NIL))']
    assert one(m, "1", "(BODY)") == [
        b'1 (BODY ((("text" "plain" ("charset" "utf-8") NIL NIL "7bit" 10 1)'
        b'("text" "html" ("charset" "us-ascii") NIL NIL "7bit" 11 1) "alternative")'
        b'("message" "rfc822" NIL NIL NIL "7bit" %d ' % len(FORWARDED) + fwd_env +
        b' (("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 8 1)'
        b'("application" "dicom" NIL NIL NIL "base64" 8) "mixed") 15)'
        b'("application" "dicom" ("name" "a.dcm") NIL NIL "base64" %d) "mixed"))' % b64_size]
    m.logout()


def test_8bit_header_bytes_come_back_as_literals_and_folded_fields_unfolded(box: Any) -> None:
    """8-bit bytes in header fields are sent as they are stored (as literals), never as
    U+FFFD replacement characters; a folded Subject is unfolded into one quoted string."""
    m = login(box)
    m.select()
    data = one(m, "2", "(ENVELOPE BODYSTRUCTURE)")
    flat = b"".join(x for d in data for x in (d if isinstance(d, tuple) else (d,)))
    assert b"\xef\xbf\xbd" not in flat
    assert data[0] == (b'2 (ENVELOPE (NIL "a long folded subject" (({7}', b"M\xc3\xbcller")
    assert b'("name" {11}' in flat and flat.count(b"M\xc3\xbcller.dcm") == 2
    m.logout()


def test_search_combinations(box: Any) -> None:
    m = login(box)
    m.select()
    one(m, "1", "(BODY[TEXT])")                             # 1: \Seen
    m.store("2", "+FLAGS", "(\\Flagged)")                   # 2: \Flagged; 3: neither

    def s(*keys: str) -> tuple[str, list[Any]]:
        return m.search(None, *keys)

    assert s("ALL") == ("OK", [b"1 2 3"])
    assert s("OR", "SEEN", "FLAGGED") == ("OK", [b"1 2"])
    assert s("NOT", "(OR SEEN FLAGGED)") == ("OK", [b"3"])
    assert s("(OR SEEN FLAGGED)", "LARGER", "1000") == ("OK", [b"1"])
    assert s("OR", "(SEEN LARGER 1000)", "(UNSEEN SMALLER 1000 NOT FLAGGED)") == ("OK", [b"1 3"])
    assert s("UNSEEN", "UNFLAGGED", "UNDELETED", "UNANSWERED", "UNDRAFT") == ("OK", [b"3"])
    assert s("2:*") == ("OK", [b"2 3"])
    assert s("1,3") == ("OK", [b"1 3"])
    assert s("NOT", "2", "NOT", "SEEN") == ("OK", [b"3"])
    today = time.strftime("%d-%b-%Y", time.gmtime())
    tomorrow = time.strftime("%d-%b-%Y", time.gmtime(time.time() + 86400))
    assert s("SINCE", today, "BEFORE", tomorrow) == ("OK", [b"1 2 3"])
    assert s("ON", today, "FLAGGED") == ("OK", [b"2"])
    assert s("OR", "BEFORE", today, "SINCE", tomorrow) == ("OK", [b""])
    assert m.search("UTF-8", "ALL") == ("OK", [b"1 2 3"])
    for bad in (("SUBJECT", "x"), ("OR", "SEEN"), ("SINCE", "31-Feb-2024"), ("LARGER", "x"), ("1:x",)):
        with pytest.raises(imaplib.IMAP4.error):
            s(*bad)
    # once UID 1 is gone, sequence numbers and UIDs differ
    m.store("1", "+FLAGS", "(\\Deleted)")
    m.expunge()
    assert m.uid("SEARCH", "ALL") == ("OK", [b"2 3"])
    assert s("ALL") == ("OK", [b"1 2"])
    assert m.uid("SEARCH", "UID", "1,3:*") == ("OK", [b"3"])
    assert s("UID", "3") == ("OK", [b"2"])
    assert m.uid("SEARCH", "1") == ("OK", [b"2"])                # sequence number 1 is UID 2
    assert m.uid("SEARCH", "UID", "9:*") == ("OK", [b"3"])       # "*" is the highest UID
    assert m.uid("SEARCH", "FLAGGED", "UID", "2:3") == ("OK", [b"2"])
    m.logout()


def test_store_silent_uid_expunge_and_other_sessions(box: Any) -> None:
    m = login(box)
    m.select()
    assert m.store("3", "+FLAGS.SILENT", "(\\Answered)") == ("OK", [None])
    assert one(m, "3", "FLAGS") == [b"3 (FLAGS (\\Answered))"]
    assert m.store("3", "-FLAGS", "(\\Answered)") == ("OK", [b"3 (FLAGS ())"])
    m.store("2", "+FLAGS.SILENT", "(\\Flagged \\Draft)")
    assert m.store("2", "FLAGS.SILENT", "(\\Seen)") == ("OK", [None])     # replaces
    assert one(m, "2", "FLAGS") == [b"2 (FLAGS (\\Seen))"]
    assert m.uid("STORE", "1:*", "+FLAGS.SILENT", "(\\Deleted)") == ("OK", [None])
    other = login(box)
    other.select()
    assert m.uid("EXPUNGE", "3")[0] == "OK"                              # only UID 3
    assert m.response("EXPUNGE") == ("EXPUNGE", [b"3"])
    assert m.uid("SEARCH", "ALL") == ("OK", [b"1 2"])
    assert m.uid("EXPUNGE", "1:*")[0] == "OK"
    assert m.response("EXPUNGE") == ("EXPUNGE", [b"2", b"1"])            # highest first
    assert m.select() == ("OK", [b"0"])
    assert other.noop() == ("OK", [b"NOOP completed"])
    assert other.response("EXPUNGE") == ("EXPUNGE", [b"3", b"2", b"1"])
    assert box.call(lambda r: r.store.ledger.usage(ALICE)).messages == 0
    other.logout()
    m.logout()


def test_every_other_command_with_imaplib(box: Any) -> None:
    m = imaplib.IMAP4("127.0.0.1", box.imap_port)
    assert "IDLE" in m.capabilities and "LITERAL+" in m.capabilities
    assert m.authenticate("PLAIN", lambda _: b"\0alice@example.test\0secret")[0] == "OK"
    assert b"UIDPLUS" in m.capability()[1][0].split()
    assert m.noop()[0] == "OK"
    assert m.xatom("ID", '("name" "imaplib")')[0] == "OK"
    assert m.response("ID")[1][0].startswith(b'("name" "relay" "version" ')
    assert m.enable("CONDSTORE") == ("OK", [b"ENABLE completed"])        # nothing to enable
    assert m.namespace() == ("OK", [b'(("" "/")) NIL NIL'])
    assert m.list() == ("OK", [b'(\\HasNoChildren) "/" INBOX'])
    assert m.list('""', "%") == ("OK", [b'(\\HasNoChildren) "/" INBOX'])
    assert m.lsub() == ("OK", [b'() "/" INBOX'])
    assert m.subscribe("INBOX")[0] == "OK"
    assert m.status("INBOX", "(MESSAGES UNSEEN DELETED)") == ("OK", [b"INBOX (MESSAGES 3 UNSEEN 3 DELETED 0)"])
    assert m.status("Trash", "(MESSAGES)")[0] == "NO"
    assert m.create("Trash")[0] == "NO" and m.rename("INBOX", "X")[0] == "NO" and m.delete("X")[0] == "NO"
    append = m.append("INBOX", None, None, b"Subject: x\r\n\r\ny\r\n")
    assert append == ("NO", [b"[CANNOT] APPEND is not supported: INBOX is filled by SMTP"])
    assert m.select("INBOX", readonly=True) == ("OK", [b"3"])
    assert m.response("UIDVALIDITY")[1][0].isdigit() and m.response("UIDNEXT") == ("UIDNEXT", [b"4"])
    assert m.check()[0] == "OK"
    assert m.unselect()[0] == "OK"
    assert m.select() == ("OK", [b"3"])
    assert m.copy("1", "INBOX")[0] == "NO"
    assert m.store("1:*", "+FLAGS", "(\\Deleted)")[0] == "OK"
    assert m.close()[0] == "OK"                                   # CLOSE expunges
    assert m.select() == ("OK", [b"0"])
    assert m.logout()[0] == "BYE"


def test_client_literals_synchronizing_literal_plus_and_literal_minus(box: Any) -> None:
    """Synchronizing literals (imaplib), non-synchronizing ones of LITERAL- size (<= 4096)
    and beyond (LITERAL+, up to imap.max_literal): all arguments arrive intact."""
    m = imaplib.IMAP4("127.0.0.1", box.imap_port)
    m.literal = b"secret"
    assert m._simple_command("LOGIN", ALICE)[0] == "OK"         # LOGIN alice {6} + "+" + secret
    c = Raw(box.imap_port)
    assert c.cmd(b"a LOGIN {18+}\r\nalice@example.test {6+}\r\nsecret")[-1].startswith(b"a OK")
    assert c.cmd(b"b SELECT {5+}\r\nINBOX")[-1] == b"b OK [READ-WRITE] SELECT completed"
    big = b"x" * 5000                                            # beyond LITERAL-, within LITERAL+
    assert c.cmd(b'c ID ("name" {5000+}\r\n' + big + b")")[-1] == b"c OK ID completed"
    c.send(b'd STATUS {5}\r\n')
    assert c.line().startswith(b"+ ")
    assert c.cmd(b"INBOX (MESSAGES)", b"d") == [b"* STATUS INBOX (MESSAGES 3)", b"d OK STATUS completed"]
    assert c.cmd(b"e UID SEARCH CHARSET {5+}\r\nUTF-8 UID {3+}\r\n2:*") == [b"* SEARCH 2 3",
                                                                          b"e OK SEARCH completed"]
