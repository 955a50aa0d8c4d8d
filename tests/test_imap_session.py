"""IMAP sessions over loopback without a mailbox: greeting, capabilities, login, STARTTLS,
LOGINDISABLED, bad input; raw sockets where the bytes matter, imaplib where a client does."""

from __future__ import annotations

import imaplib
import socket
import ssl
from pathlib import Path
from typing import Any

import pytest

from relay import __version__
from tests.tlsutil import client_context, make_cert

pytestmark = pytest.mark.e2e


class Raw:
    """A line-oriented raw IMAP connection for byte-exact tests."""

    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        self.sock = socket.create_connection((host, port), timeout=10)
        self.buf = b""
        self.greeting = self.line()

    def line(self) -> bytes:
        while b"\r\n" not in self.buf:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("closed")
            self.buf += data
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def cmd(self, data: bytes, tag: bytes | None = None) -> list[bytes]:
        """Send one tagged command; lines up to and including the tagged answer."""
        tag = tag or data.split(b" ", 1)[0]
        self.send(data if data.endswith(b"\r\n") else data + b"\r\n")
        out = []
        while True:
            line = self.line()
            out.append(line)
            if line.startswith(tag + b" "):
                return out


def test_greeting_and_capabilities(relay: Any) -> None:
    c = Raw(relay.imap_port)
    assert c.greeting.startswith(b"* OK [CAPABILITY IMAP4rev1 ")
    caps = c.cmd(b"a CAPABILITY")
    assert caps[-1] == b"a OK Capability completed"
    words = caps[0].split()
    for w in (b"SASL-IR", b"ID", b"ENABLE", b"IDLE", b"LITERAL+", b"AUTH=PLAIN"):
        assert w in words
    assert b"STARTTLS" not in words                       # no certificate configured
    assert b"UIDPLUS" not in words                        # only after login
    assert c.cmd(b"b LOGOUT") == [b"* BYE Logging out", b"b OK Logout completed"]


def test_login_and_states(relay: Any) -> None:
    c = Raw(relay.imap_port)
    assert c.cmd(b"a SELECT INBOX")[-1] == b"a BAD Log in first"
    assert c.cmd(b"b LOGIN alice@example.test wrong")[-1] == b"b NO [AUTHENTICATIONFAILED] Authentication failed"
    assert c.cmd(b"c LOGIN nobody@example.test secret")[-1].startswith(b"c NO [AUTHENTICATIONFAILED]")
    assert c.cmd(b"d LOGIN notanaddress secret")[-1].startswith(b"d NO [AUTHENTICATIONFAILED]")
    ok = c.cmd(b'e LOGIN "alice@example.test" {6+}\r\nsecret')[-1]
    assert ok.startswith(b"e OK [CAPABILITY ") and b"UIDPLUS" in ok and b"QUOTA=RES-STORAGE" in ok
    assert c.cmd(b"f LOGIN alice@example.test secret")[-1] == b"f BAD Already authenticated"
    assert c.cmd(b"g FETCH 1 FLAGS")[-1] == b"g BAD No mailbox selected"
    assert c.cmd(b"h FROB")[-1] == b"h BAD Unknown command"
    assert c.cmd(b'i SELECT "../bob"') == [b"i NO [NONEXISTENT] Only INBOX exists"]
    assert c.cmd(b"j CREATE foo") == [b"j NO [CANNOT] Only INBOX exists here"]
    assert c.cmd(b'k LIST "" "*"') == [b'* LIST (\\HasNoChildren) "/" INBOX', b"k OK LIST completed"]
    assert c.cmd(b'l LIST "" ""') == [b'* LIST (\\Noselect) "/" ""', b"l OK LIST completed"]
    assert c.cmd(b'm LIST "" "Sent*"') == [b"m OK LIST completed"]
    assert c.cmd(b'n LSUB "" "%"') == [b'* LSUB () "/" INBOX', b"n OK LSUB completed"]
    assert c.cmd(b"o NAMESPACE") == [b'* NAMESPACE (("" "/")) NIL NIL', b"o OK NAMESPACE completed"]
    assert c.cmd(b'p ID ("name" "test")')[0] == b'* ID ("name" "relay" "version" "%s")' % __version__.encode()
    assert c.cmd(b"q ENABLE CONDSTORE") == [b"* ENABLED", b"q OK ENABLE completed"]
    assert c.cmd(b"r APPEND INBOX {3}")[-1].startswith(b"r NO [CANNOT] APPEND")
    assert c.cmd(b"s NOOP") == [b"s OK NOOP completed"]


def test_authenticate_plain_with_and_without_initial_response(relay: Any) -> None:
    c = Raw(relay.imap_port)
    assert c.cmd(b"a AUTHENTICATE PLAIN AGFsaWNlQGV4YW1wbGUudGVzdABzZWNyZXQ=")[-1].startswith(b"a OK")
    c = Raw(relay.imap_port)
    c.send(b"b AUTHENTICATE PLAIN\r\n")
    assert c.line() == b"+ "
    assert c.cmd(b"AGJvYkBleGFtcGxlLnRlc3QAc2VjcmV0\r\n", b"b")[-1].startswith(b"b OK")
    c = Raw(relay.imap_port)
    c.send(b"c AUTHENTICATE PLAIN\r\n")
    assert c.line() == b"+ "
    assert c.cmd(b"*\r\n", b"c") == [b"c BAD Authentication cancelled"]
    assert c.cmd(b"d AUTHENTICATE PLAIN !!notbase64")[-1].startswith(b"d BAD Invalid SASL PLAIN")
    assert c.cmd(b"e AUTHENTICATE CRAM-MD5")[-1] == b"e NO Unsupported authentication mechanism"


def test_imaplib_login(relay: Any) -> None:
    m = imaplib.IMAP4("127.0.0.1", relay.imap_port)
    assert m.login("alice@example.test", "secret")[0] == "OK"
    assert m.list()[1] == [b'(\\HasNoChildren) "/" INBOX']
    assert m.logout()[0] == "BYE"


def test_bad_input_keeps_the_session_usable(relay_factory: Any) -> None:
    r = relay_factory(imap={"max_line": 1000, "max_literal": 2000})
    r.add_user("alice@example.test", "secret")
    c = Raw(r.imap_port)
    assert c.cmd(b"a1 NOOP " + b"x" * 5000) == [b"a1 BAD [TOOBIG] Command line too long"]
    assert c.cmd(b"a2 LOGIN {99999}") == [b"a2 BAD [TOOBIG] Literal larger than 2000 octets"]
    assert c.cmd(b"a3 LOGIN {3000+}\r\n" + b"z" * 3000 + b" x")[-1].startswith(b"a3 BAD [TOOBIG]")
    assert c.cmd(b'a4 LOGIN "unterminated')[-1].startswith(b"a4 BAD Syntax error")
    assert c.cmd(b"a5 LOGIN onlyone")[-1].startswith(b"a5 BAD")
    assert c.cmd(b"NOTAG") == [b"NOTAG BAD Missing command"]
    c.send(b"+bad NOOP\r\n")
    assert c.line() == b"* BAD Missing or invalid tag"
    assert c.cmd(b"a6 LOGIN alice@example.test secret")[-1].startswith(b"a6 OK")
    assert c.cmd(b"b5 NOOP") == [b"b5 OK NOOP completed"]


def test_idle_timeout_autologout(relay_factory: Any) -> None:
    r = relay_factory(imap={"idle_timeout": 0.5})
    c = Raw(r.imap_port)
    assert c.line() == b"* BYE Autologout; idle for too long"
    with pytest.raises(ConnectionError):
        c.line()


@pytest.fixture
def tls_relay(relay_factory: Any, tmp_path: Path) -> tuple[Any, ssl.SSLContext]:
    cert, key = make_cert(tmp_path / "tls")
    r = relay_factory(tls={"cert": str(cert), "key": str(key)}, auth={"plaintext": "never"},
                      imap={"listen_tls": ["127.0.0.1:0"]})
    r.add_user("alice@example.test", "secret")
    return r, client_context(cert)


def test_logindisabled_then_starttls(tls_relay: tuple[Any, ssl.SSLContext]) -> None:
    r, ctx = tls_relay
    c = Raw(r.imap_port)
    words = c.greeting.replace(b"]", b" ").split()
    assert b"LOGINDISABLED" in words and b"STARTTLS" in words and b"AUTH=PLAIN" not in words
    assert c.cmd(b"a LOGIN alice@example.test secret") == [b"a NO [PRIVACYREQUIRED] Use STARTTLS or TLS first"]
    assert c.cmd(b"b AUTHENTICATE PLAIN AGFsaWNlQGV4YW1wbGUudGVzdABzZWNyZXQ=")[-1].startswith(b"b NO [PRIVACYREQUIRED]")
    m = imaplib.IMAP4("127.0.0.1", r.imap_port)
    m.starttls(ssl_context=ctx)
    caps = m.capability()[1][0].split()
    assert b"AUTH=PLAIN" in caps and b"LOGINDISABLED" not in caps and b"STARTTLS" not in caps
    assert m.login("alice@example.test", "secret")[0] == "OK"
    m.logout()


def test_starttls_refuses_pipelined_plaintext(tls_relay: tuple[Any, ssl.SSLContext]) -> None:
    r, _ = tls_relay
    c = Raw(r.imap_port)
    c.send(b"a STARTTLS\r\nb LOGIN alice@example.test secret\r\n")
    assert c.line() == b"a BAD Nothing may follow STARTTLS before the handshake"


def test_implicit_tls_listener(tls_relay: tuple[Any, ssl.SSLContext]) -> None:
    r, ctx = tls_relay
    m = imaplib.IMAP4_SSL("127.0.0.1", r.port("imap_tls"), ssl_context=ctx)
    assert b"STARTTLS" not in m.capability()[1][0].split()
    assert m.login("alice@example.test", "secret")[0] == "OK"
    m.logout()


def test_too_many_failed_logins_end_the_session(relay: Any) -> None:
    c = Raw(relay.imap_port)
    for i in range(4):
        assert c.cmd(b"a%d LOGIN nobody@example.test x" % i)[-1].startswith(b"a%d NO [AUTHENTICATIONFAILED]" % i)
    assert c.cmd(b"b LOGIN nobody@example.test x") == [b"b NO [AUTHENTICATIONFAILED] Authentication failed"]
    assert c.line() == b"* BYE Too many authentication failures"
    with pytest.raises(ConnectionError):
        c.line()


def test_shutdown_says_bye_to_idle_sessions(relay_factory: Any) -> None:
    r = relay_factory()
    c = Raw(r.imap_port)
    assert c.cmd(b"a NOOP") == [b"a OK NOOP completed"]
    r.stop()                                      # grace (2 s) passes, then sessions are closed
    assert c.line() == b"* BYE Server shutting down"
    with pytest.raises(ConnectionError):
        c.line()


def test_starttls_refuses_plaintext_waiting_behind_a_full_read(tls_relay: tuple[Any, ssl.SSLContext]) -> None:
    """STARTTLS as the last line of the server's 64 KiB read: the bytes behind it are still in
    the server's reader, not in the protocol's buffer, and are refused all the same."""
    from relay.server.imap import READ_SIZE

    r, _ = tls_relay
    c = Raw(r.imap_port)
    first = b"a NOOP " + b"x" * (READ_SIZE - len(b"a NOOP \r\nb STARTTLS\r\n")) + b"\r\n"
    c.send(first + b"b STARTTLS\r\n" + b"c LOGIN alice@example.test secret\r\n")
    assert c.line() == b"a OK NOOP completed"
    assert c.line() == b"b BAD Nothing may follow STARTTLS before the handshake"
    assert c.line() == b"* BYE Command injection refused"
    with pytest.raises(ConnectionError):
        c.line()
