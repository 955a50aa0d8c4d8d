"""Record the seed corpus: real client sessions against a real relay, client bytes only.

    python fuzz/record_corpus.py            # rewrites fuzz/corpus/{smtp,imap,pop3,mime}/

A relay runs on loopback (the test suite's RunningRelay); a recording proxy sits in front of
each listener and keeps what the client sent, one file per connection. The clients are the
real ones: smtplib (EHLO, SIZE, PIPELINING of MAIL/RCPT, DATA, BDAT by hand, AUTH), imaplib
(LOGIN, SELECT, FETCH of every kind, SEARCH, STORE, EXPUNGE, IDLE), poplib (CAPA, STAT, UIDL,
LIST, TOP, RETR, DELE) and fetchmail (IMAP and POP3 polls). Each file is prefixed with the
read-size byte the targets expect (fuzz/targets.py). The MIME seeds are the messages delivered.
"""

from __future__ import annotations

import asyncio
import imaplib
import os
import poplib
import shutil
import smtplib
import socket
import subprocess
import sys
import tempfile
import threading
from email.message import EmailMessage
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
os.environ.setdefault("RELAY_TEST_WEAK_KDF", "1")

from conftest import RunningRelay, make_config  # noqa: E402

ALICE = "alice@example.test"
READ_SIZE = b"\xff"                   # the targets cut the rest into reads of 256 octets


class Recorder:
    """A loopback TCP proxy that keeps the client->server bytes of each connection."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.sessions: list[bytearray] = []
        self.loop = asyncio.new_event_loop()
        self.port = 0
        ready = threading.Event()

        async def start() -> None:
            server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
            self.port = server.sockets[0].getsockname()[1]
            ready.set()

        threading.Thread(target=lambda: (self.loop.run_until_complete(start()),
                                         self.loop.run_forever()), daemon=True).start()
        ready.wait(10)

    async def _handle(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        log = bytearray()
        self.sessions.append(log)
        sr, sw = await asyncio.open_connection("127.0.0.1", self.target_port)

        async def pump(r: asyncio.StreamReader, w: asyncio.StreamWriter, keep: bool) -> None:
            try:
                while data := await r.read(65536):
                    if keep:
                        log.extend(data)
                    w.write(data)
                    await w.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                w.close()

        await asyncio.gather(pump(cr, sw, True), pump(sr, cw, False))


def messages() -> list[bytes]:
    """Messages shaped like the network's traffic, plus MIME corners."""
    out = []
    m = EmailMessage()
    m["From"] = '"CT Scanner" <ct@example.test>'
    m["To"] = "Alice <alice@example.test>, bob@example.test"
    m["Subject"] = "Study 1.2.840.10008 (tr\u00e8s urgent)"
    m["Message-ID"] = "<s1@example.test>"
    m.set_content("Dear colleague,\n.the study follows.\n")
    m.add_attachment(b"DICM" + bytes(range(256)) * 8, maintype="application", subtype="dicom",
                     filename="a.dcm")
    inner = EmailMessage()
    inner["From"] = "inner@example.test"
    inner["Subject"] = "forwarded"
    inner.set_content("inner body\n")
    m.add_attachment(inner)
    out.append(m.as_bytes(policy=m.policy.clone(linesep="\r\n")))
    out.append(b"From: a@example.test\r\nTo: (comment) <b@example.test>, group: c@x.test;\r\n"
               b"Subject: =?utf-8?q?caf=C3=A9?=\r\n\r\nplain\r\n")
    out.append(b"Content-Type: multipart/digest; boundary=d\r\n\r\n--d\r\n\r\nFrom: x@y.test\r\n"
               b"\r\nx\r\n--d--\r\n")
    return out


def smtp_sessions(port: int, msgs: list[bytes]) -> None:
    for i, msg in enumerate(msgs):
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
            s.sendmail("ct@example.test", [ALICE], msg)
            if i == 0:
                s.noop()
                s.rset()
                s.helo("scanner.example.test")
                s.verify(ALICE)
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:      # BDAT by hand (CHUNKING)
        s.ehlo("modality.example.test")
        s.mail("ct@example.test", ["BODY=BINARYMIME", "SIZE=40"])
        s.rcpt(ALICE)
        one, two = b"Subject: bdat\r\n\r\nabcde", b"\r\n.\r\nx\r\nz"
        s.send(b"BDAT %d\r\n%sBDAT %d LAST\r\n%s" % (len(one), one, len(two), two))
        s.getreply()
        s.getreply()
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:      # a failed AUTH, then QUIT
        s.ehlo("client.example.test")
        try:
            s.login(ALICE, "wrong")
        except smtplib.SMTPException:
            pass


def imap_sessions(port: int) -> None:
    with imaplib.IMAP4("127.0.0.1", port) as c:
        c.capability()
        c.login(ALICE, "secret")
        c.list()
        c.status("INBOX", "(MESSAGES UIDNEXT UIDVALIDITY UNSEEN)")
        c.select("INBOX")
        c.fetch("1:*", "(UID FLAGS RFC822.SIZE INTERNALDATE)")
        c.fetch("1", "(ENVELOPE BODYSTRUCTURE)")
        c.fetch("1:2", "ALL")
        c.fetch("1", "FULL")
        c.fetch("1", "(BODY.PEEK[HEADER.FIELDS (FROM SUBJECT DATE)] BODY.PEEK[1.MIME] "
                     "BODY.PEEK[2]<0.100> BODY.PEEK[3.HEADER] BODY.PEEK[TEXT])")
        c.uid("FETCH", "1:*", "(BODY.PEEK[])")
        c.search(None, "UNSEEN")
        c.search(None, "OR", "SEEN", "(LARGER 100 SINCE 1-Jan-2020)", "NOT", "DELETED")
        c.uid("SEARCH", "UID", "1:*", "SMALLER", "100000")
        c.store("1", "+FLAGS", "(\\Seen \\Flagged)")
        c.uid("STORE", "2", "-FLAGS.SILENT", "(\\Seen)")
        c.store("3", "+FLAGS", "(\\Deleted)")
        c.expunge()
        c.noop()
        c.close()
        c.logout()


def pop3_sessions(port: int) -> None:
    p = poplib.POP3("127.0.0.1", port, timeout=30)
    p.capa()
    p.user(ALICE)
    p.pass_("secret")
    p.stat()
    p.list()
    p.uidl()
    p.uidl(1)
    p.top(1, 5)
    p.retr(1)
    p.dele(2)
    p.rset()
    p.noop()
    p.quit()


def fetchmail(protocol: str, port: int, tmp: Path) -> None:
    rc = tmp / f"fetchmailrc-{protocol}"
    out = tmp / f"out-{protocol}"
    out.mkdir()
    rc.write_text(f"set no bouncemail\npoll 127.0.0.1 protocol {protocol} port {port} "
                  f"auth password timeout 30\n"
                  f'  user "{ALICE}" there with password "secret" is "x" here\n'
                  f'  keep fetchall sslproto "" mda "cat > {out}/msg.$$"\n')
    rc.chmod(0o600)
    env = dict(os.environ, HOME=str(tmp), FETCHMAILHOME=str(tmp))
    subprocess.run(["fetchmail", "--nosyslog", "-f", str(rc), "--pidfile", str(tmp / "pid")],
                   env=env, timeout=90, check=False, capture_output=True)


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="relay-corpus-"))
    relay = RunningRelay(make_config(tmp / "data"))
    try:
        relay.add_user(ALICE, "secret")
        rec = {k: Recorder(getattr(relay, f"{k}_port")) for k in ("smtp", "imap", "pop3")}
        msgs = messages()
        smtp_sessions(rec["smtp"].port, msgs)
        imap_sessions(rec["imap"].port)
        pop3_sessions(rec["pop3"].port)
        if shutil.which("fetchmail"):
            fetchmail("IMAP", rec["imap"].port, tmp)
            fetchmail("POP3", rec["pop3"].port, tmp)
        socket.create_connection(("127.0.0.1", rec["pop3"].port)).close()   # settle the last
        for name, r in rec.items():
            d = HERE / "corpus" / name
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir(parents=True)
            for i, log in enumerate(r.sessions):
                if log:
                    (d / f"session-{i:02d}").write_bytes(READ_SIZE + bytes(log))
        d = HERE / "corpus" / "mime"
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        for i, msg in enumerate(msgs):
            (d / f"message-{i:02d}").write_bytes(msg)
        for name in ("smtp", "imap", "pop3", "mime"):
            print(name, len(list((HERE / "corpus" / name).iterdir())), "files")
    finally:
        relay.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
