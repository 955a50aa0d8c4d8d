"""Fuzz targets: any bytes through the SMTP, IMAP and POP3 protocol objects and the MIME scanner.

Each `*_one_input(data)` is the whole contract of one target: it must return normally for every
input. A raised exception is a finding (the protocol object let input escape as an exception,
or broke one of the invariants asserted here). The same functions run under atheris
(fuzz/run.py, coverage-guided, long runs) and under hypothesis in the normal test suite
(tests/test_hostile_input.py, a bounded deterministic run).

Input layout (all targets): the first byte picks how the rest is cut into reads (1 to 256
octets each, so that every state is also entered across a read boundary); the rest is what a
client sends. The MIME target takes the whole input as a stored message file.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterator

from relay import mimetree
from relay.protocol import imap as I
from relay.protocol import pop3 as P3
from relay.protocol import smtp as S

__all__ = ["smtp_one_input", "imap_one_input", "pop3_one_input", "mime_one_input", "TARGETS"]


def _reads(data: bytes) -> Iterator[bytes]:
    """The client bytes of `data` cut into reads; the first byte sets the read size."""
    if not data:
        return
    step = data[0] + 1
    body = data[1:]
    for i in range(0, len(body), step):
        yield body[i:i + step]


# --- SMTP ------------------------------------------------------------------------------------

_SMTP_REPLY = re.compile(rb"^[2-5][0-9][0-9][ -][^\r\n]*$")


def _smtp_answer(ev: object, n: int) -> S.Reply:
    """The server's decision for an event that needs one; varied by the event count."""
    if isinstance(ev, S.DataStart):
        return S.R_354 if n % 5 else S.Reply(451, "4.3.0", "try later")
    if isinstance(ev, (S.AuthPlain, S.AuthLogin)):
        return S.R_AUTH_OK if n % 3 == 0 else S.R_AUTH_FAILED
    if n % 7 == 0:
        return S.Reply(550, "5.1.1", "no")
    return S.R_OK


def smtp_one_input(data: bytes) -> None:
    conn = S.SmtpConnection("relay.test", max_size=4096, max_recipients=5, max_errors=50,
                            tls_available=True, auth_allowed=True)
    n = 0
    for chunk in _reads(data):
        conn.receive_data(chunk)
        while True:
            ev = conn.next_event()
            if ev is S.NEED_DATA:
                break
            n += 1
            if ev is S.PAUSED:
                conn.reply(_smtp_answer(conn._pending, n))
            elif isinstance(ev, S.StartTls):
                conn.tls_started()
            elif isinstance(ev, S.DataChunk):
                assert 0 < len(ev.data) <= len(chunk) + 2
        out = conn.data_to_send()
        for line in out.split(b"\r\n")[:-1]:
            assert _SMTP_REPLY.match(line), line
        if conn.closed:
            break


# --- IMAP ------------------------------------------------------------------------------------

def _imap_command(cmd: I.Command) -> None:
    """What the server does with a command's arguments before it touches the store: every
    failure must be ImapSyntaxError (answered BAD)."""
    args = cmd.args
    name = cmd.name
    if name == "FETCH":
        I.want_args(cmd, 2, 2)
        seq = I.parse_sequence_set(I.atom(args[0]))
        seq.select([1, 2, 3, 7])
        for att in I.parse_fetch_atts(args[1]):
            att.response_name()
    elif name == "SEARCH":
        rest = list(args)
        key = I.parse_search(rest)
        match = key.compile(3, 7)
        for n, uid in ((1, 1), (2, 5), (3, 7)):
            match(n, uid, "S", 86400.0 * 19000, 1000)
    elif name == "STORE":
        _, req = I.parse_store(args)
        req.apply("ST")
    elif name in ("COPY", "MOVE", "EXPUNGE") and args:
        I.parse_sequence_set(I.atom(args[0]))
    else:
        for a in args:
            if not isinstance(a, list):
                I.astring(a)


def imap_one_input(data: bytes) -> None:
    parser = I.ImapParser(max_line=64 * 1024, max_literal=4096)   # the server defaults/bounds
    states = (I.NOT_AUTH, I.AUTH, I.SELECTED)
    n = 0
    for chunk in _reads(data):
        parser.receive_data(chunk)
        while True:
            ev = parser.next_event()
            if ev is I.NEED_DATA:
                break
            n += 1
            if isinstance(ev, I.Reject):
                assert b"\r" not in ev.to_bytes()[:-2] and b"\n" not in ev.to_bytes()[:-2]
            elif isinstance(ev, I.Command):
                if n % 4 == 0:
                    parser.expect_line()
                I.check_state(ev, states[n % 3])
                try:
                    _imap_command(ev)
                except I.ImapSyntaxError as e:
                    I.tagged(ev.tag, "BAD", str(e))


# --- POP3 ------------------------------------------------------------------------------------

_MAILDROP = [P3.Message(1, 120), P3.Message(2, 0), P3.Message(5, 4096)]


def pop3_one_input(data: bytes) -> None:
    conn = P3.Pop3Connection("relay.test", tls_available=True, plaintext_allowed=True)
    n = 0
    for chunk in _reads(data):
        conn.receive_data(chunk)
        while True:
            ev = conn.next_event()
            if ev is P3.NEED_DATA:
                break
            n += 1
            if isinstance(ev, P3.Authenticate):
                conn.auth_succeeded(ev.user, 1, _MAILDROP) if n % 3 else conn.auth_failed("auth")
            elif isinstance(ev, P3.StartTls):
                conn.tls_started()
            elif isinstance(ev, P3.Quit):
                conn.update_done(0)
            elif isinstance(ev, P3.Retrieve):
                assert 1 <= ev.msgno <= len(_MAILDROP)
            elif isinstance(ev, P3.Respond):
                assert ev.data.startswith((b"+OK", b"-ERR", b"+ ")), ev.data
            if conn.state is P3.State.CLOSED:
                return


# --- MIME scanner and ENVELOPE / BODYSTRUCTURE -------------------------------------------------

_dir = tempfile.mkdtemp(prefix="relay-fuzz-")
_path = os.path.join(_dir, "1.M1P1.fuzz,S=0:2,")


def mime_one_input(data: bytes) -> None:
    with open(_path, "wb") as f:
        f.write(data)
    root = mimetree.parse(_path)
    I.render(mimetree.envelope(root))
    mimetree.bodystructure(root, extended=True)
    mimetree.bodystructure(root, extended=False)
    fd = os.open(_path, os.O_RDONLY)
    try:
        for numbers in ((1,), (2,), (1, 1), (2, 1, 1), (1, 2, 3, 1)):
            part = mimetree.find_part(root, numbers)
            if part is not None:
                mimetree.header_fields(fd, part, ("From", "Subject"), False)
                if part.message is not None:
                    I.render(mimetree.envelope(part.message))
    finally:
        os.close(fd)


TARGETS = {"smtp": smtp_one_input, "imap": imap_one_input, "pop3": pop3_one_input,
           "mime": mime_one_input}
