"""The gateway's mail transport, on the project's own streaming clients (relay/clients/):
SMTP out (BDAT when offered, AUTH PLAIN when offered), IMAP (partial FETCH into a file,
resumable, IDLE) or POP3 in. Nothing here holds a message in memory.
"""

from __future__ import annotations

import contextlib
import ssl
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Protocol

from relay.clients.pop3 import Pop3Client
from relay.config import parse_hostport
from relay.gateway.config import GatewayConfig


class TransportError(RuntimeError):
    """The relay could not be reached or refused an operation (temporary: retried)."""


def tls_context(cfg: GatewayConfig) -> ssl.SSLContext | None:
    """STARTTLS on every connection to the relay when `starttls` is set; the relay's
    certificate is checked against the system CAs or `tls_ca`."""
    if not cfg.starttls:
        return None
    return ssl.create_default_context(cafile=str(cfg.tls_ca) if cfg.tls_ca else None)


class SmtpSession:
    def __init__(self, cfg: GatewayConfig) -> None:
        from relay.clients.smtp import SmtpClient, SmtpError
        self._error = SmtpError
        host, port = cfg.smtp_addr
        ctx = tls_context(cfg)
        try:
            self.client = SmtpClient(host, port, local_hostname=cfg.domain or "gateway.invalid",
                                     ssl_context=ctx)
            ext = self.client.ehlo()
            if ctx is not None:
                self.client.starttls()
                ext = self.client.extensions
            if "AUTH" in ext:
                self.client.login(cfg.address, cfg.get_password())
        except (OSError, SmtpError) as e:     # ssl.SSLError is an OSError
            raise TransportError(f"SMTP {cfg.smtp}: {e}") from None

    def send(self, sender: str, to: str, chunks: Iterable[bytes], size: int) -> str:
        """Send one message; returns the method used (BDAT or DATA)."""
        try:
            res = self.client.send(sender, [to], iter(chunks), size=size)
        except (OSError, self._error) as e:
            raise TransportError(f"SMTP: {e}") from None
        return res.method

    def close(self) -> None:
        with contextlib.suppress(OSError, self._error):     # the messages were taken already
            self.client.quit()


@contextlib.contextmanager
def smtp_session(cfg: GatewayConfig) -> Iterator[SmtpSession]:
    s = SmtpSession(cfg)
    try:
        yield s
    finally:
        s.close()


class MailSource(Protocol):
    def messages(self) -> list[tuple[str, int]]:
        """(key, size) of every message waiting, oldest first; keys are stable."""

    def fetch(self, key: str, path: Path, offset: int) -> None:
        """Append the message's bytes from `offset` on to `path` (resume)."""

    def delete(self, keys: list[str]) -> None:
        """Remove these messages from the mailbox (for good)."""

    def wait(self, timeout: float) -> None:
        """Block until new mail may have arrived, or timeout."""

    def close(self) -> None: ...


class ImapSource:
    """IMAP: keys are "imap:<uidvalidity>:<uid>"; fetch resumes with partial FETCH."""

    def __init__(self, cfg: GatewayConfig) -> None:
        from relay.clients.imap import ImapClient, ImapError
        self._errors = (OSError, ImapError)
        host, port = parse_hostport(cfg.imap, "imap")
        try:
            ctx = tls_context(cfg)
            self.c = ImapClient(host, port, ssl_context=ctx, starttls=ctx is not None)
            self.c.login(cfg.address, cfg.get_password())
            self.c.select("INBOX")
        except self._errors as e:
            raise TransportError(f"IMAP {cfg.imap}: {e}") from None
        self.uidvalidity = self.c.uidvalidity

    def _key(self, uid: int) -> str:
        return f"imap:{self.uidvalidity}:{uid}"

    def _uid(self, key: str) -> int:
        kind, uv, uid = key.split(":")
        if kind != "imap" or int(uv) != self.uidvalidity:
            raise TransportError(f"{key}: UIDVALIDITY changed to {self.uidvalidity}")
        return int(uid)

    def messages(self) -> list[tuple[str, int]]:
        try:
            self.c.noop()       # a server announces new mail (EXISTS) at NOOP, not before
            sizes = self.c.sizes(self.c.uid_search("ALL"))
        except self._errors as e:
            raise TransportError(f"IMAP: {e}") from None
        return [(self._key(uid), size) for uid, size in sorted(sizes.items())]

    def fetch(self, key: str, path: Path, offset: int) -> None:
        try:
            self.c.fetch_to_file(self._uid(key), path, offset=offset)
        except self._errors as e:
            raise TransportError(f"IMAP: {e}") from None

    def delete(self, keys: list[str]) -> None:
        # keys of another UIDVALIDITY name messages that are gone already (a quarantined
        # message/partial set may be older than the mailbox's current UIDVALIDITY)
        uids = [int(k.rsplit(":", 1)[1]) for k in keys if k.startswith(f"imap:{self.uidvalidity}:")]
        if not uids:
            return
        try:
            self.c.delete(uids)
        except self._errors as e:
            raise TransportError(f"IMAP: {e}") from None

    def wait(self, timeout: float) -> None:
        """IDLE (RFC 2177) until EXISTS or timeout (re-issued by the loop before 29 min)."""
        try:
            self.c.wait_exists(timeout)
        except self._errors as e:
            raise TransportError(f"IMAP: {e}") from None

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.c.logout()


class Pop3Source:
    """POP3: keys are "pop3:<UIDL>"; a broken RETR restarts (POP3 has no partial fetch)."""

    def __init__(self, cfg: GatewayConfig) -> None:
        self.cfg = cfg
        self.c = self._connect()
        self._deleted = False
        self._num: dict[str, int] = {}

    def _connect(self) -> Pop3Client:
        from relay.clients.pop3 import Pop3Error
        host, port = parse_hostport(self.cfg.pop3, "pop3")
        try:
            ctx = tls_context(self.cfg)
            c = Pop3Client(host, port, ssl_context=ctx, starttls=ctx is not None)
            c.login(self.cfg.address, self.cfg.get_password())
        except (OSError, Pop3Error) as e:
            raise TransportError(f"POP3 {self.cfg.pop3}: {e}") from None
        return c

    def messages(self) -> list[tuple[str, int]]:
        from relay.clients.pop3 import Pop3Error
        try:
            uidl = self.c.uidl()
            sizes = self.c.list()
        except Pop3Error as e:
            raise TransportError(f"POP3: {e}") from None
        self._num = {f"pop3:{u}": n for n, u in uidl.items()}
        return [(f"pop3:{uidl[n]}", sizes[n]) for n in sorted(uidl)]

    def fetch(self, key: str, path: Path, offset: int) -> None:
        from relay.clients.pop3 import Pop3Error
        try:
            self.c.retr_to_file(self._num[key], path)
        except Pop3Error as e:          # -ERR (message gone, server trouble): retried next round
            raise TransportError(f"POP3: {e}") from None

    def delete(self, keys: list[str]) -> None:
        # POP3 deletes at QUIT (RFC 1939 6): commit now, then start a new session
        from relay.clients.pop3 import Pop3Error
        keys = [k for k in keys if k in self._num]      # others left the mailbox already
        try:
            for k in keys:
                self.c.dele(self._num[k])
            if keys:
                self.c.quit()
        except Pop3Error as e:
            raise TransportError(f"POP3: {e}") from None
        if keys:
            self.c = self._connect()
            self.messages()

    def wait(self, timeout: float) -> None:
        self.close()
        time.sleep(timeout)
        self.c = self._connect()

    def close(self) -> None:
        from relay.clients.pop3 import Pop3Error
        with contextlib.suppress(OSError, Pop3Error):
            self.c.quit()


def open_source(cfg: GatewayConfig) -> MailSource:
    return Pop3Source(cfg) if cfg.pop3 else ImapSource(cfg)
