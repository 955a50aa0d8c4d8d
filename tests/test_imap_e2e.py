"""IMAP end to end: messages arrive by SMTP (smtplib), receivers use imaplib, curl and our
own client (relay.clients.imap) over loopback."""

from __future__ import annotations

import base64
import imaplib
import os
import re
import smtplib
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from relay.clients.imap import ImapClient, ImapError
from tests.test_imap_session import Raw
from tests.tlsutil import client_context, make_cert

pytestmark = pytest.mark.e2e

ALICE = "alice@example.test"
DICOM = b"DICM" + os.urandom(3000)


def multipart() -> bytes:
    b64 = base64.encodebytes(DICOM).replace(b"\n", b"\r\n")
    return (b"From: CT <ct@a.test>\r\nTo: alice@example.test\r\nSubject: study 7\r\n"
            b"Date: Mon, 4 Mar 2024 10:00:00 +0000\r\nMessage-ID: <s7@a.test>\r\nMIME-Version: 1.0\r\n"
            b"Content-Type: multipart/mixed; boundary=\"b1\"\r\n\r\n--b1\r\n"
            b"Content-Type: text/plain\r\n\r\nreport text\r\n--b1\r\n"
            b"Content-Type: application/dicom\r\nContent-Transfer-Encoding: base64\r\n\r\n"
            + b64 + b"--b1--\r\n")


def send(relay: Any, body: bytes, to: str = ALICE) -> None:
    with smtplib.SMTP("127.0.0.1", relay.smtp_port, timeout=30) as s:
        s.sendmail("ct@a.test", [to], body)


def maildir(relay: Any, address: str = ALICE) -> Path:
    local, domain = address.split("@")
    return relay.data_dir / "mail" / domain / local


def stored(relay: Any) -> list[Path]:
    root = maildir(relay)
    return sorted(p for sub in ("new", "cur") for p in (root / sub).iterdir())


def file_of(relay: Any, uid: int) -> Path:
    path: Path = relay.call(lambda r: r.store.engine.mailbox(ALICE).path(uid))
    return path


@pytest.fixture
def mail(relay: Any) -> Any:
    send(relay, b"From: a@a.test\r\nSubject: one\r\n\r\nfirst body\r\n")
    send(relay, multipart())
    send(relay, b"From: b@a.test\r\nSubject: three\r\n\r\n" + b"x" * 20000 + b"\r\n")
    return relay


def login(relay: Any) -> imaplib.IMAP4:
    m = imaplib.IMAP4("127.0.0.1", relay.imap_port)
    m.login(ALICE, "secret")
    return m


def test_select_search_and_uids_are_stable(mail: Any) -> None:
    m = login(mail)
    typ, data = m.select("INBOX")
    assert (typ, data) == ("OK", [b"3"])
    uidvalidity = m.response("UIDVALIDITY")[1][0]
    assert m.uid("SEARCH", None, "ALL") == ("OK", [b"1 2 3"])
    assert m.search(None, "LARGER", "10000") == ("OK", [b"3"])
    assert m.search(None, "OR", "SMALLER", "2", "UID", "3") == ("OK", [b"3"])
    assert m.status("INBOX", "(MESSAGES UIDNEXT UIDVALIDITY UNSEEN)")[1][0] == (
        b"INBOX (MESSAGES 3 UIDNEXT 4 UIDVALIDITY %s UNSEEN 3)" % uidvalidity)
    m.logout()
    m = login(mail)
    m.select("inbox")
    assert m.response("UIDVALIDITY")[1][0] == uidvalidity
    assert m.uid("SEARCH", None, "UID", "2:*") == ("OK", [b"2 3"])
    today = time.strftime("%d-%b-%Y", time.gmtime())
    assert m.search(None, "SINCE", today, "UNSEEN", "NOT", "DELETED") == ("OK", [b"1 2 3"])
    assert m.search(None, "BEFORE", today) == ("OK", [b""])
    m.logout()


def test_fetch_every_item(mail: Any) -> None:
    m = login(mail)
    m.select()
    raw = file_of(mail, 2).read_bytes()
    head, _, text = raw.partition(b"\r\n\r\n")
    _, data = m.fetch("2", "(UID FLAGS INTERNALDATE RFC822.SIZE ENVELOPE BODYSTRUCTURE BODY)")
    line = data[0]
    assert isinstance(line, bytes)
    assert b"UID 2 FLAGS () INTERNALDATE \"" in line
    assert b"RFC822.SIZE %d" % len(raw) in line
    assert b'ENVELOPE ("Mon, 4 Mar 2024 10:00:00 +0000" "study 7" (("CT" NIL "ct" "a.test"))' in line
    assert b'BODYSTRUCTURE (("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 11 1 NIL NIL NIL NIL)' \
           b'("application" "dicom" NIL NIL NIL "base64" ' in line
    assert b' "mixed" ("boundary" "b1") NIL NIL NIL) BODY (("text" "plain"' in line

    def body(item: str, num: str = "2") -> bytes:
        typ, data = m.fetch(num, f"({item})")
        assert typ == "OK", data
        part = data[0]
        assert isinstance(part, tuple), data
        return part[1]

    assert body("BODY.PEEK[]") == raw
    assert body("BODY.PEEK[HEADER]") == head + b"\r\n\r\n"
    assert body("BODY.PEEK[TEXT]") == text
    assert body("BODY.PEEK[HEADER.FIELDS (Subject From)]") == b"From: CT <ct@a.test>\r\nSubject: study 7\r\n\r\n"
    assert b"Subject" not in body("BODY.PEEK[HEADER.FIELDS.NOT (Subject)]")
    assert body("BODY.PEEK[1]") == b"report text"
    assert body("BODY.PEEK[1.MIME]") == b"Content-Type: text/plain\r\n\r\n"
    assert base64.b64decode(body("BODY.PEEK[2]")) == DICOM
    assert body("BODY.PEEK[]<10.20>") == raw[10:30]
    assert body(f"BODY.PEEK[]<{len(raw) - 5}.100>") == raw[-5:]
    assert m.fetch("2", "(BODY.PEEK[]<999999.10>)")[1][0][1] == b""  # type: ignore[index]
    assert body("RFC822.HEADER") == head + b"\r\n\r\n"
    assert m.fetch("2", "FLAGS")[1] == [b"2 (FLAGS ())"]           # nothing so far set \Seen
    assert body("RFC822.TEXT", "1") == b"first body\r\n"
    assert body("BODY[TEXT]", "3").startswith(b"xxxx")
    assert body("RFC822") == raw
    assert m.fetch("1:3", "FLAGS")[1] == [b"1 (FLAGS (\\Seen))", b"2 (FLAGS (\\Seen))", b"3 (FLAGS (\\Seen))"]
    assert m.fetch("2", "(BODY[9])")[1][0] == b"2 (BODY[9] NIL)"
    assert m.fetch("1:*", "FAST")[0] == "OK"
    m.logout()


def test_store_flags_in_maildir_names_and_expunge_removes_files(mail: Any) -> None:
    m = login(mail)
    m.select()
    _, data = m.store("1:2", "+FLAGS", "(\\Flagged \\Answered)")
    assert data == [b"1 (FLAGS (\\Flagged \\Answered))", b"2 (FLAGS (\\Flagged \\Answered))"]
    names = [p.name for p in stored(mail)]
    assert sum(n.endswith(":2,FR") for n in names) == 2, names
    assert m.uid("STORE", "2", "-FLAGS.SILENT", "(\\Answered)") == ("OK", [None])
    assert m.store("3", "FLAGS", "(\\Seen \\Deleted)")[1] == [b"3 (FLAGS (\\Seen \\Deleted))"]
    assert sorted(n.split(":2,")[1] for n in (p.name for p in stored(mail))) == ["F", "FR", "ST"]
    other = login(mail)
    other.select()
    assert m.uid("SEARCH", None, "DELETED") == ("OK", [b"3"])
    before = stored(mail)
    assert m.expunge() == ("OK", [b"3"])
    after = stored(mail)
    assert len(after) == 2 and not any(p.name.endswith(",ST") for p in after)
    assert {p.name for p in before} - {p.name for p in after}
    assert other.noop()[0] == "OK"
    assert other.response("EXPUNGE") == ("EXPUNGE", [b"3"])
    m.store("1", "+FLAGS.SILENT", "(\\Seen)")
    assert other.noop()[0] == "OK"
    assert other.response("FETCH") == ("FETCH", [b"1 (FLAGS (\\Flagged \\Answered \\Seen) UID 1)"])
    assert m.store("1", "+FLAGS", "(\\Deleted)")[0] == "OK"
    assert m.store("2", "+FLAGS", "(\\Deleted)")[0] == "OK"
    assert m.uid("EXPUNGE", "2")[0] == "OK"                       # UIDPLUS: only UID 2
    assert [p.name.split(":2,")[1] for p in stored(mail)] == ["FRST"]
    assert m.close()[0] == "OK"                                   # CLOSE expunges the rest
    assert stored(mail) == []
    assert mail.call(lambda r: r.store.ledger.usage(ALICE)).messages == 0
    m.logout()
    other.logout()


def test_examine_is_read_only(mail: Any) -> None:
    m = login(mail)
    assert m.select("INBOX", readonly=True)[0] == "OK"
    assert m.store("1", "+FLAGS", "(\\Deleted)")[0] == "NO"
    m.fetch("1", "(BODY[])")
    assert m.fetch("1", "FLAGS")[1] == [b"1 (FLAGS ())"]
    assert m.unselect()[0] == "OK"
    m.logout()


def test_selected_state_bad_input(mail: Any) -> None:
    c = Raw(mail.imap_port)
    assert c.cmd(b"a LOGIN alice@example.test secret")[-1].startswith(b"a OK")
    assert c.cmd(b"b SELECT INBOX")[-1] == b"b OK [READ-WRITE] SELECT completed"
    assert c.cmd(b"c FETCH 1:x FLAGS")[-1].startswith(b"c BAD")
    assert c.cmd(b"d FETCH 9 FLAGS")[-1].startswith(b"d BAD")
    assert c.cmd(b"e FETCH 1 (FLAGS BODY[FOO])")[-1].startswith(b"e BAD")
    assert c.cmd(b"f SEARCH SINCE 31-Feb-2020")[-1].startswith(b"f BAD")
    assert c.cmd(b"g UID STORE 1 XFLAGS (\\Seen)")[-1].startswith(b"g BAD")
    assert c.cmd(b"h COPY 1 INBOX") == [b"h NO [CANNOT] COPY is not supported: only INBOX exists"]
    assert c.cmd(b"i UID MOVE 1 Trash") == [b"i NO [CANNOT] MOVE is not supported: only INBOX exists"]
    assert c.cmd(b"j UID FETCH 100:200 FLAGS") == [b"j OK FETCH completed"]
    assert c.cmd(b"k UID FETCH 2 (FLAGS)") == [b"* 2 FETCH (UID 2 FLAGS ())", b"k OK FETCH completed"]
    assert c.cmd(b"l GETQUOTAROOT INBOX")[1].startswith(b'* QUOTA "" (STORAGE ')
    assert c.cmd(b'm GETQUOTA "x"') == [b"m NO [NONEXISTENT] No such quota root"]


def test_a_user_sees_only_their_own_mailbox(mail: Any) -> None:
    m = imaplib.IMAP4("127.0.0.1", mail.imap_port)
    m.login("bob@example.test", "secret")
    assert m.select()[1] == [b"0"]
    assert m.select('"../alice"')[0] == "NO"
    m.logout()


def test_idle_sees_exists_within_a_second_of_delivery(relay: Any) -> None:
    with ImapClient("127.0.0.1", relay.imap_port) as c:
        c.login(ALICE, "secret")
        assert c.select() == 0
        delivered: list[float] = []

        def deliver() -> None:
            time.sleep(0.3)
            send(relay, b"Subject: push\r\n\r\nnew\r\n")
            delivered.append(time.monotonic())

        t = threading.Thread(target=deliver)
        t.start()
        assert c.wait_exists(timeout=10) == 1
        seen = time.monotonic()
        t.join()
        assert seen - delivered[0] < 1.0
        assert c.wait_exists(timeout=0.3) is None                  # nothing new: times out
        assert c.uid_search() == [1]


def test_client_resumes_a_dropped_download(relay: Any, tmp_path: Path) -> None:
    payload = os.urandom(3 * 1024 * 1024)
    send(relay, b"Subject: big\r\nContent-Type: application/dicom\r\nContent-Transfer-Encoding: base64\r\n\r\n"
         + base64.encodebytes(payload).replace(b"\n", b"\r\n"))
    original = stored(relay)[0].read_bytes()
    target = tmp_path / "download.eml"
    # a receiver reads part of the literal, then the connection breaks
    c = Raw(relay.imap_port)
    c.cmd(b"a LOGIN alice@example.test secret")
    c.cmd(b"b SELECT INBOX")
    c.send(b"c UID FETCH 1 (BODY.PEEK[])\r\n")
    head = c.line()
    assert re.fullmatch(rb"\* 1 FETCH \(UID 1 BODY\[\] \{%d\}" % len(original), head)
    got = c.buf
    while len(got) < 1_500_000:
        got += c.sock.recv(65536)
    c.sock.close()
    target.write_bytes(got[:1_234_567])
    with ImapClient("127.0.0.1", relay.imap_port) as cl:
        cl.login(ALICE, "secret")
        cl.select()
        size = cl.fetch_to_file(1, target, offset=target.stat().st_size, chunk=700_000)
        assert size == len(original)
        assert cl.fetch_to_file(1, tmp_path / "whole.eml") == len(original)
        with pytest.raises(ImapError):
            cl.fetch_to_file(99, tmp_path / "none.eml")
        assert cl.sizes() == {1: len(original)}
        cl.delete([1])
        assert cl.uid_search() == []
        cl.logout()
    assert target.read_bytes() == original
    assert (tmp_path / "whole.eml").read_bytes() == original
    assert stored(relay) == []


def test_fetch_over_tls_streams_the_same_bytes(relay_factory: Any, tmp_path: Path) -> None:
    cert, key = make_cert(tmp_path / "tls")
    r = relay_factory(tls={"cert": str(cert), "key": str(key)}, imap={"listen_tls": ["127.0.0.1:0"]})
    r.add_user(ALICE, "secret")
    send(r, b"Subject: tls\r\n\r\n" + os.urandom(2_500_000).hex().encode() + b"\r\n")
    original = stored(r)[0].read_bytes()
    ctx = client_context(cert)
    with ImapClient("127.0.0.1", r.port("imap_tls"), ssl_context=ctx) as c:
        c.login(ALICE, "secret")
        c.select()
        assert c.fetch_to_file(1, tmp_path / "a.eml") == len(original)
    with ImapClient("127.0.0.1", r.imap_port, ssl_context=ctx, starttls=True) as c:
        c.login(ALICE, "secret")
        c.select()
        assert c.fetch_to_file(1, tmp_path / "b.eml", chunk=1_000_000) == len(original)
    assert (tmp_path / "a.eml").read_bytes() == original
    assert (tmp_path / "b.eml").read_bytes() == original


def test_curl_lists_and_fetches(mail: Any) -> None:
    base = f"imap://127.0.0.1:{mail.imap_port}"
    auth = ["--user", f"{ALICE}:secret", "--max-time", "20", "-s", "-S"]
    listing = subprocess.run(["curl", *auth, base + "/"], capture_output=True, check=True, timeout=30)
    assert b'* LIST (\\HasNoChildren) "/" INBOX' in listing.stdout
    msg = subprocess.run(["curl", *auth, base + "/INBOX;UID=2"], capture_output=True, check=True, timeout=30)
    assert msg.stdout == file_of(mail, 2).read_bytes()
    part = subprocess.run(["curl", *auth, base + "/INBOX;UID=2;SECTION=1"], capture_output=True,
                          check=True, timeout=30)
    assert part.stdout == b"report text"
    search = subprocess.run(["curl", *auth, base + "/INBOX?SUBJECT%20x", "-X", "UID SEARCH LARGER 10000"],
                            capture_output=True, check=True, timeout=30)
    assert b"* SEARCH 3" in search.stdout


def test_socket_closed_mid_fetch_leaves_the_server_healthy(mail: Any) -> None:
    s = socket.create_connection(("127.0.0.1", mail.imap_port))
    s.sendall(b"a LOGIN alice@example.test secret\r\nb SELECT INBOX\r\nc FETCH 1:* (BODY.PEEK[])\r\n")
    s.recv(100)
    s.close()
    m = login(mail)
    m.select()
    assert m.fetch("1", "(BODY.PEEK[TEXT])")[1][0][1] == b"first body\r\n"  # type: ignore[index]
    m.logout()


def test_partial_fetch_at_the_end_of_a_3_gb_message(relay: Any, tmp_path: Path) -> None:
    """A sparse 3 GiB message (no disk written) put into the Maildir from outside: the size
    beyond 2**31 is reported, and a partial FETCH of its last MiB is exact."""
    size = 3 * 1024**3
    tail = os.urandom(1024 * 1024)
    name = f"1700000000.M1P1Q1.relay.test,S={size}"
    tmp = maildir(relay) / "tmp" / name
    with open(tmp, "wb") as f:
        f.write(b"Subject: sparse\r\n\r\n")
        f.truncate(size - len(tail))
        f.seek(size - len(tail))
        f.write(tail)
    os.rename(tmp, maildir(relay) / "new" / name)
    with ImapClient("127.0.0.1", relay.imap_port) as c:
        c.login(ALICE, "secret")
        c.select()
        assert c.sizes() == {1: size}
        out = tmp_path / "tail"
        out.write_bytes(b"")
        with open(out, "r+b") as f:                 # a sparse head, as a resumed download has it
            f.truncate(size - len(tail))
        assert c.fetch_to_file(1, out, offset=size - len(tail)) == size
        with open(out, "rb") as f:
            f.seek(size - len(tail))
            assert f.read() == tail
        lines = c.command(b"UID FETCH 1 (BODY.PEEK[HEADER] BODY.PEEK[]<%d.10>)" % (size - 10))
        assert b"BODY[HEADER] {19}\r\nSubject: sparse\r\n\r\n" in lines[0]
        assert lines[0].endswith(b"BODY[]<%d> {10}\r\n" % (size - 10) + tail[-10:] + b")\r\n")


def test_idle_reports_expunge_by_another_session(mail: Any) -> None:
    c = Raw(mail.imap_port)
    c.cmd(b"a LOGIN alice@example.test secret")
    c.cmd(b"b SELECT INBOX")
    c.send(b"c IDLE\r\n")
    assert c.line() == b"+ idling"
    m = login(mail)
    m.select()
    m.store("2", "+FLAGS", "(\\Deleted)")
    m.expunge()
    assert c.line() == b"* 2 EXPUNGE"
    send(mail, b"Subject: after\r\n\r\nx\r\n")
    assert c.line() == b"* 3 EXISTS"
    assert c.cmd(b"DONE", b"c") == [b"c OK IDLE terminated"]
    assert c.cmd(b"d UID SEARCH ALL") == [b"* SEARCH 1 3 4", b"d OK SEARCH completed"]
    m.logout()


def test_quota_from_the_ledger(relay: Any) -> None:
    relay.add_user("carol@example.test", "secret", quota_bytes=10 * 1024 * 1024, quota_messages=5)
    send(relay, b"Subject: q\r\n\r\n" + b"q" * 3000 + b"\r\n", to="carol@example.test")
    c = Raw(relay.imap_port)
    c.cmd(b"a LOGIN carol@example.test secret")
    assert c.cmd(b"b GETQUOTAROOT INBOX") == [b'* QUOTAROOT INBOX ""', b'* QUOTA "" (STORAGE 4 10240 MESSAGE 1 5)',
                                             b"b OK GETQUOTAROOT completed"]
    assert c.cmd(b'c GETQUOTA ""')[0] == b'* QUOTA "" (STORAGE 4 10240 MESSAGE 1 5)'
    assert c.cmd(b"d GETQUOTAROOT Trash") == [b"d NO [NONEXISTENT] Only INBOX exists"]


def test_statistics_count_whole_fetches(mail: Any, tmp_path: Path) -> None:
    size = file_of(mail, 3).stat().st_size
    with ImapClient("127.0.0.1", mail.imap_port) as c:
        c.login(ALICE, "secret")
        c.select()
        c.fetch_to_file(3, tmp_path / "m", chunk=7000)          # partial ranges; the last one completes
        c.command(b"UID FETCH 1 (BODY.PEEK[HEADER])")            # not a whole message
    st = mail.call(lambda r: r.imap_stats.statistics())
    assert st.messages_fetched == 1 and st.fetched_bytes >= size
    assert st.logins == 1 and st.login_failures == 0
    assert sum(st.fetch_duration.counts) == 1


def test_a_client_that_stops_reading_is_dropped_after_the_idle_timeout(relay_factory: Any) -> None:
    r = relay_factory(imap={"idle_timeout": 1})
    r.add_user(ALICE, "secret")
    send(r, b"Subject: big\r\n\r\n" + (b"z" * 998 + b"\r\n") * 20000)
    c = Raw(r.imap_port)
    c.cmd(b"a LOGIN alice@example.test secret")
    c.cmd(b"b SELECT INBOX")
    c.send(b"c FETCH 1 (BODY.PEEK[])\r\n")
    time.sleep(2.5)                              # the reader stalls longer than the timeout
    got = len(c.buf)
    try:
        while data := c.sock.recv(1 << 20):
            got += len(data)
    except ConnectionResetError:
        pass
    assert got < 20_000_000                      # the server gave up and closed
    m = login(r)                                 # and it serves others as before
    assert m.select()[1] == [b"1"]
    m.logout()


def test_new_mail_is_visible_to_search_and_fetch_without_noop(mail: Any) -> None:
    """A poller that stays selected and only searches sees new mail (no NOOP needed); a
    sequence-number command gets EXISTS but never an EXPUNGE that would shift its numbers."""
    c = Raw(mail.imap_port)
    c.cmd(b"a LOGIN alice@example.test secret")
    c.cmd(b"b SELECT INBOX")
    send(mail, b"Subject: four\r\n\r\nx\r\n")
    assert c.cmd(b"c UID SEARCH ALL") == [b"* 4 EXISTS", b"* SEARCH 1 2 3 4", b"c OK SEARCH completed"]
    assert c.cmd(b"d UID SEARCH ALL") == [b"* SEARCH 1 2 3 4", b"d OK SEARCH completed"]
    m = login(mail)                                  # another session removes message 1 ...
    m.select()
    m.store("1", "+FLAGS", "(\\Deleted)")
    m.expunge()
    m.logout()
    send(mail, b"Subject: five\r\n\r\ny\r\n")        # ... and a fifth message arrives
    assert c.cmd(b"e FETCH 4 (UID)") == [b"* 5 EXISTS", b"* 4 FETCH (UID 4)", b"e OK FETCH completed"]
    assert c.cmd(b"f NOOP") == [b"* 1 EXPUNGE", b"f OK NOOP completed"]
    assert c.cmd(b"g SEARCH ALL") == [b"* SEARCH 1 2 3 4", b"g OK SEARCH completed"]


def test_a_receiver_dropped_mid_fetch_is_a_dropped_session_not_an_error(relay: Any) -> None:
    """A gateway killed (TCP RST) in the middle of a literal: the session ends as "dropped",
    not as "error" with a traceback; over a small receive window the server is in its
    drain/pread path when the reset arrives."""
    send(relay, b"Subject: big\r\n\r\n" + (b"z" * 998 + b"\r\n") * 20_000)
    for _ in range(2):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.settimeout(10)
        s.connect(("127.0.0.1", relay.imap_port))
        s.sendall(b"a LOGIN alice@example.test secret\r\nb SELECT INBOX\r\nc FETCH 1 (BODY.PEEK[])\r\n")
        got = 0
        while got < 200_000:
            got += len(s.recv(65536))
        time.sleep(0.2)                                   # the server waits for the socket
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()
    deadline = time.monotonic() + 5
    while relay.call(lambda r: r.sessions.statistics().total.get(("imap", "dropped"), 0)) < 2:
        assert time.monotonic() < deadline, relay.call(lambda r: r.sessions.statistics())
        time.sleep(0.02)
    assert ("imap", "error") not in relay.call(lambda r: r.sessions.statistics()).total
    assert relay.call(lambda r: r.imap_stats.statistics().messages_fetched) == 0


def test_literals_go_by_sendfile_and_a_partial_reads_only_its_range(relay: Any, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Item 4: on plain TCP the literal goes from the file to the socket by os.sendfile (zero
    copy; a 64 KiB pread only when the socket is full), and the last MiB of a 3 GiB multipart
    message costs about a MiB of file reads: no MIME scan of 3 GiB for a BODY[] partial. (The
    relay runs in this process, so the os calls it makes can be counted.)"""
    size = 3 * 1024**3
    tail = os.urandom(1024 * 1024 - 12) + b"\r\n--b1--\r\n"
    name = f"1700000000.M2P2Q2.relay.test,S={size}"
    tmp = maildir(relay) / "tmp" / name
    with open(tmp, "wb") as f:
        f.write(b"Subject: sparse\r\nContent-Type: multipart/mixed; boundary=b1\r\n\r\n--b1\r\n\r\n")
        f.truncate(size - len(tail))
        f.seek(size - len(tail))
        f.write(tail)
    os.rename(tmp, maildir(relay) / "new" / name)
    counted = {"sendfile": 0, "pread": 0}
    real_sendfile, real_pread = os.sendfile, os.pread

    def sendfile(out_fd: int, in_fd: int, offset: int | None, count: int) -> int:
        n = real_sendfile(out_fd, in_fd, offset, count)
        counted["sendfile"] += n
        return n

    def pread(fd: int, n: int, offset: int) -> bytes:
        data = real_pread(fd, n, offset)
        counted["pread"] += len(data)
        return data

    with ImapClient("127.0.0.1", relay.imap_port) as c:
        c.login(ALICE, "secret")
        c.select()
        monkeypatch.setattr(os, "sendfile", sendfile)
        monkeypatch.setattr(os, "pread", pread)
        out = tmp_path / "tail"
        assert c.fetch_to_file(1, out, offset=size - len(tail)) == size
        monkeypatch.undo()
    with open(out, "rb") as f:
        f.seek(size - len(tail))
        assert f.read() == tail
    assert counted["sendfile"] + counted["pread"] <= len(tail) + 256 * 1024
    assert counted["sendfile"] >= len(tail) // 2, counted


def test_store_adds_to_the_current_flags_not_to_a_stale_view(mail: Any) -> None:
    """+FLAGS/-FLAGS change the flags the message has now: a \\Seen set by another session
    (or by a Maildir reader) since this session last looked is not lost."""
    a, b = login(mail), login(mail)
    a.select()
    b.select()
    assert b.store("1", "+FLAGS", "(\\Seen)")[0] == "OK"
    assert a.store("1", "+FLAGS", "(\\Flagged)")[1] == [b"1 (FLAGS (\\Flagged \\Seen))"]
    assert b.store("1", "-FLAGS", "(\\Seen)")[0] == "OK"
    assert a.store("1", "-FLAGS", "(\\Answered)")[1] == [b"1 (FLAGS (\\Flagged))"]
    assert b.store("2", "+FLAGS", "(\\Deleted)")[0] == "OK"
    a.fetch("2", "(BODY[TEXT])")                     # sets \Seen, keeps the \Deleted it did not see
    assert sorted(p.name.split(":2,")[1] for p in stored(mail) if ":2," in p.name) == ["F", "ST"]
    assert b.noop()[0] == "OK"
    assert b.response("FETCH") == ("FETCH", [b"2 (FLAGS (\\Seen \\Deleted) UID 2)"])
    a.logout()
    b.logout()


def test_expunge_and_close_go_by_the_current_deleted_flag(mail: Any) -> None:
    """EXPUNGE/CLOSE remove what carries \\Deleted now: a mark another session set is
    honoured, a mark another session cleared (an undelete) is not acted upon."""
    a, b = login(mail), login(mail)
    a.select()
    b.select()
    assert a.store("1", "+FLAGS", "(\\Deleted)")[0] == "OK"
    assert b.store("1", "-FLAGS", "(\\Deleted)")[0] == "OK"        # undeleted meanwhile
    assert b.store("2", "+FLAGS", "(\\Deleted)")[0] == "OK"        # deleted by the other
    assert a.expunge() == ("OK", [b"2"])
    assert a.uid("SEARCH", "ALL") == ("OK", [b"1 3"])
    assert b.store("3", "+FLAGS", "(\\Deleted)")[0] == "OK"
    assert a.close()[0] == "OK"
    assert len(stored(mail)) == 1
    a.logout()
    b.logout()


def test_uid_search_sees_flags_another_session_changed(mail: Any) -> None:
    """A poller's UID SEARCH UNSEEN answers from the flags as they are now (with the
    untagged FETCH FLAGS announcing the change), not from its session's first view."""
    c = Raw(mail.imap_port)
    c.cmd(b"a LOGIN alice@example.test secret")
    c.cmd(b"b SELECT INBOX")
    assert c.cmd(b"c UID SEARCH UNSEEN") == [b"* SEARCH 1 2 3", b"c OK SEARCH completed"]
    m = login(mail)
    m.select()
    m.store("2", "+FLAGS", "(\\Seen)")
    m.logout()
    assert c.cmd(b"d UID SEARCH UNSEEN") == [b"* 2 FETCH (FLAGS (\\Seen) UID 2)", b"* SEARCH 1 3",
                                             b"d OK SEARCH completed"]


def fill_maildir(relay: Any, n: int) -> None:
    """n small messages put into the Maildir from outside (the store indexes them)."""
    body = b"Subject: x\r\n\r\nx\r\n"
    for i in range(n):
        (maildir(relay) / "new" / f"{1700000000 + i}.M{i}P1Q1.relay.test,S={len(body)}").write_bytes(body)


def write_buffers(relay: Any, cls: type) -> list[int]:
    """The transport write buffer of every live session of `cls` (the relay runs in-process)."""
    import gc

    return relay.call(lambda r: [o.writer.transport.get_write_buffer_size()  # type: ignore[no-any-return]
                                 for o in gc.get_objects() if isinstance(o, cls)])


def test_pipelined_commands_from_a_client_that_reads_nothing_stay_bounded(relay: Any) -> None:
    """20,000 pipelined `UID SEARCH ALL` on 1,000 messages (~5 KB answer per 18-byte command):
    the server stops at its write bound instead of answering a whole 64 KiB read (~15 MB)."""
    from relay.server.imap import WRITE_HIGH_WATER, ImapSession

    fill_maildir(relay, 1000)
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", relay.imap_port))
    s.sendall(b"a LOGIN alice@example.test secret\r\nb SELECT INBOX\r\n" + b"c UID SEARCH ALL\r\n" * 20000)
    peak = 0
    for _ in range(15):                                    # bounded: ~1.5 s of samples
        time.sleep(0.1)
        peak = max([peak, *write_buffers(relay, ImapSession)])
    s.close()
    assert WRITE_HIGH_WATER // 2 < peak < WRITE_HIGH_WATER + 256 * 1024, peak


def test_shutdown_says_bye_at_once_to_a_session_in_idle(relay: Any) -> None:
    """A gateway waiting in IDLE holds nothing: stop() answers it BYE without waiting for the
    grace period."""
    import asyncio

    c = Raw(relay.imap_port)
    c.cmd(b"a LOGIN alice@example.test secret")
    c.cmd(b"b SELECT INBOX")
    c.send(b"c IDLE\r\n")
    assert c.line() == b"+ idling"
    t0 = time.monotonic()
    stopping = asyncio.run_coroutine_threadsafe(relay.relay.stop(grace=30), relay.loop)
    assert c.line().startswith(b"* BYE")
    stopping.result(10)
    assert time.monotonic() - t0 < 5                          # not the 30 s grace
