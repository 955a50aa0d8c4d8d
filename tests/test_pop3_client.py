"""relay.clients.pop3 against a scripted loopback server that cuts its replies into awkward
pieces (terminators and stuffed dots split across reads): what the client sends, and what it
makes of what it gets."""

from __future__ import annotations

import base64
import socket
import threading
import time
from pathlib import Path

import pytest

from relay.clients.pop3 import Pop3Client, Pop3Error


class Scripted:
    """Serves one connection: for each expected command line, sends the reply in pieces."""

    def __init__(self, greeting: bytes, script: list[tuple[bytes, bytes]], piece: int = 3) -> None:
        self.srv = socket.create_server(("127.0.0.1", 0))
        self.port = self.srv.getsockname()[1]
        self.received: list[bytes] = []
        self.greeting, self.script, self.piece = greeting, script, piece
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _send(self, conn: socket.socket, data: bytes) -> None:
        for i in range(0, len(data), self.piece):
            conn.sendall(data[i:i + self.piece])
            time.sleep(0.0005)

    def _run(self) -> None:
        conn, _ = self.srv.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        f = conn.makefile("rb")
        self._send(conn, self.greeting)
        for _expected, reply in self.script:
            line = f.readline()
            self.received.append(line)
            self._send(conn, reply)
        f.readline()
        conn.close()
        self.srv.close()


def test_listing_and_retr_split_everywhere(tmp_path: Path) -> None:
    tmp_file = tmp_path / "m.eml"
    message = b"Subject: x\r\n\r\n.a\r\n..b\r\n.\r\nend\r\n"
    stuffed = b"Subject: x\r\n\r\n..a\r\n...b\r\n..\r\nend\r\n"
    s = Scripted(b"+OK hi\r\n", [
        (b"UIDL", b"+OK\r\n1 0000000100000009\r\n2 0000000200000009\r\n.\r\n"),
        (b"LIST", b"+OK 2 messages\r\n1 33\r\n2 0\r\n.\r\n"),
        (b"RETR 1", b"+OK 33 octets\r\n" + stuffed + b".\r\n"),
        (b"RETR 2", b"+OK 0 octets\r\n.\r\n"),
        (b"STAT", b"+OK 2 33\r\n"),
    ], piece=2)
    with Pop3Client("127.0.0.1", s.port) as c:
        assert c.uidl() == {1: "0000000100000009", 2: "0000000200000009"}
        assert c.list() == {1: 33, 2: 0}
        assert c.retr_to_file(1, tmp_file) == len(message)
        assert tmp_file.read_bytes() == message
        assert c.retr(2) == b""
        assert c.stat() == (2, 33)                   # nothing left over from the RETRs
    assert s.received[:5] == [b"UIDL\r\n", b"LIST\r\n", b"RETR 1\r\n", b"RETR 2\r\n", b"STAT\r\n"]


def test_err_carries_resp_code_and_long_plain_uses_continuation() -> None:
    password = "p" * 300                              # AUTH PLAIN line would exceed 255 octets
    token = base64.b64encode(f"\0u@x.test\0{password}".encode())
    s = Scripted(b"+OK hi\r\n", [
        (b"AUTH PLAIN", b"+ \r\n"),
        (token, b"-ERR [IN-USE] locked\r\n"),
    ])
    with Pop3Client("127.0.0.1", s.port) as c, pytest.raises(Pop3Error) as e:
        c.login("u@x.test", password, method="plain")
    assert e.value.code == "IN-USE"
    assert s.received == [b"AUTH PLAIN\r\n", token + b"\r\n"]


def test_pipelined_poll() -> None:
    s = Scripted(b"+OK hi\r\n", [
        (b"STAT", b"+OK 2 10\r\n"),
        (b"UIDL", b"+OK\r\n1 a\r\n2 b\r\n.\r\n"),
    ], piece=1)
    with Pop3Client("127.0.0.1", s.port) as c:
        assert c.poll() == (2, 10, {1: "a", 2: "b"})
