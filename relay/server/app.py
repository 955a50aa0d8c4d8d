"""The running relay: owns the config, the store, the policy and every listener.

Every service the relay has is a typed attribute set here, in __init__ (relay/metrics.py
reads their statistics() by these names; tests/test_metrics.py checks that they exist)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from relay.config import Config
from relay.log import get_logger
from relay.policy.backpressure import Backpressure, statvfs_free
from relay.policy.penalty import LoginPenalty
from relay.policy.reserve import DiskReserve
from relay.server.imap import ImapCounters
from relay.server.listener import (
    SessionRegistry,
    bound_addresses,
    make_server_ssl_context,
)
from relay.server.pop3 import Pop3Service
from relay.server.pressure import ReadBuffers
from relay.server.smtp import SmtpCounters
from relay.store import passwords
from relay.store.api import MessageStore
from relay.store.backends import open_store

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from relay.directory import DirectoryService

log = get_logger("app")


class Relay:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.store: MessageStore = open_store(config)   # relay.store.api only; open() in start()
        self.sessions = SessionRegistry()
        self.ssl_ctx = make_server_ssl_context(config)
        self.policy: Any = Backpressure(config, self.store)   # disk, pacing (quotas: the ledger)
        # the one login throttle of SMTP AUTH, IMAP and POP3; argon2 on its own pool (issue 12)
        self.logins = LoginPenalty(config, self.store.accounts.verify)
        self.read_buffers = ReadBuffers()         # SMTP receive buffers, lent per read
        # room for deletions on a full disk (receivers must be able to drain it)
        self.reserve = DiskReserve(config.data_dir, config.backpressure.disk_reserve,
                                   config.min_free_disk, statvfs_free(config.data_dir))
        self.smtp_stats = SmtpCounters()                     # the SMTP listeners' figures
        self.imap_stats = ImapCounters()
        self.pop3 = Pop3Service()                            # POP3 figures and maildrop locks
        self.directory: DirectoryService | None = None       # made in start() (issue 7)
        self.metrics_registry: CollectorRegistry | None = None   # relay.metrics.install()
        # Read-only HTTP routes served on the metrics listener: path prefix ->
        # handler(path) -> (status, content_type, body). "/metrics" is the metrics module's.
        self.http_routes: dict[str, Any] = {}
        self.bound: dict[str, list[tuple[str, int]]] = {}
        self.started_at = time.time()
        self._servers: dict[str, list[asyncio.Server]] = {}
        self._stopping = False

    async def start(self) -> None:
        from relay.server import imap, pop3, smtp

        await self.store.open()                    # the backend's crash recovery
        self.reserve.start()
        from relay.directory import (
            DirectoryService,  # answers directory@, pushes changes, HTTP
        )

        self.directory = DirectoryService(self)
        await self.directory.start()
        c = self.config
        plan: list[tuple[str, Any, tuple[str, ...], bool]] = [
            ("smtp", smtp, c.smtp.listen, False),
            ("imap", imap, c.imap.listen, False),
            ("imap_tls", imap, c.imap.listen_tls, True),
            ("pop3", pop3, c.pop3.listen, False),
            ("pop3_tls", pop3, c.pop3.listen_tls, True),
        ]
        for key, module, addrs, implicit in plan:
            if not addrs:
                continue
            if implicit and self.ssl_ctx is None:
                raise SystemExit(f"{key}: implicit-TLS listeners need [tls] cert and key")
            servers = await module.start(self, addrs, self.ssl_ctx, implicit_tls=implicit)
            self._servers[key] = servers
            self.bound[key] = bound_addresses(servers)
        if c.metrics.listen:
            from relay import metrics
            from relay.server import http

            metrics.install(self)
            servers = await http.start(self.http_routes, [c.metrics.listen])
            self._servers["metrics"] = servers
            self.bound["metrics"] = bound_addresses(servers)
        log.info("listening", **{k: " ".join(f"{h}:{p}" for h, p in v) for k, v in self.bound.items()})

    async def stop(self, grace: float | None = None) -> None:
        """Stop accepting, let sessions in progress finish (bounded), then close them."""
        if self._stopping:
            return
        self._stopping = True
        grace = self.config.grace_period if grace is None else grace
        self.sessions.accepting = False
        for key, servers in self._servers.items():
            if key == "metrics":
                continue
            for s in servers:
                s.close()
        for session in self.sessions.live():
            if session.on_shutdown is not None:
                session.on_shutdown()
        live = len(self.sessions.live())
        log.info("stopping", live_sessions=live, grace=grace)
        if live and not await self.sessions.wait_empty(grace):
            for session in self.sessions.live():
                if session.closer is not None:
                    session.closer()
            await self.sessions.wait_empty(2.0)
        for s in self._servers.get("metrics", []):
            s.close()
        if self.directory is not None:
            await self.directory.stop()
        await self.store.close()
        log.info("stopped")

    def write_runfiles(self) -> None:
        run = Path(self.config.data_dir) / "run"
        run.mkdir(parents=True, exist_ok=True)
        (run / "listeners.json").write_text(json.dumps(self.bound))
        (run / "relay.pid").write_text(str(os.getpid()))


async def serve(config: Config) -> int:
    if passwords.weak_kdf():
        log.warning("weak-kdf", detail=f"{passwords.WEAK_KDF_ENV} is set: new password hashes use "
                    "argon2 test parameters; unset it outside test suites")
    relay = Relay(config)
    await relay.start()
    relay.write_runfiles()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await relay.stop()
    return 0
