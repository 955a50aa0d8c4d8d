"""Listeners, TLS contexts and the registry of live sessions.

The registry is the one place that knows every session: it caps concurrency (total and per
client address, answered by the protocol with 421 4.7.0 / BYE / -ERR), counts sessions for
metrics, and lets shutdown wait for sessions in progress.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import ssl
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from relay.config import Config, parse_hostport
from relay.server.pressure import MIN_IDLE_TO_EVICT, stress_level

_sid_counter = itertools.count(1)
_sid_prefix = os.urandom(3).hex()


def new_session_id() -> str:
    """Short, unique within this process and across restarts (random prefix)."""
    return f"{_sid_prefix}{next(_sid_counter):06x}"


def make_server_ssl_context(config: Config) -> ssl.SSLContext | None:
    if not config.tls.enabled:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(config.tls.cert), str(config.tls.key))
    return ctx


@dataclass
class Session:
    registry: SessionRegistry
    protocol: str
    peer: str
    sid: str = field(default_factory=new_session_id)
    started: float = field(default_factory=time.monotonic)
    closer: Callable[[], Any] | None = None      # set by the server: closes the transport
    # set by a server whose idle sessions should not hold a shutdown: called when shutdown
    # starts; closes the session now if it is between messages, else after its message
    on_shutdown: Callable[[], Any] | None = None
    # set by the server while the session waits without a transaction (SMTP before MAIL) or
    # a login (IMAP, POP3): when it began waiting. None = busy or logged in. Under stress, a
    # full registry closes the session that has waited longest (`evict`) to admit a new one.
    idle_since: float | None = None
    evict: Callable[[], Any] | None = None        # say 421 / BYE / -ERR and close
    _done: bool = False

    def close(self, outcome: str = "ok") -> None:
        """Idempotent: counts the session's end once."""
        if not self._done:
            self._done = True
            self.registry._closed(self, outcome)


@dataclass(frozen=True)
class SessionStats:
    current: dict[str, int]                       # protocol -> live sessions
    total: dict[tuple[str, str], int]             # (protocol, outcome) -> ended sessions
    refused: dict[str, int]                       # protocol -> refused for limits
    stressed: dict[str, int]                      # protocol -> 1 while in stress mode
    evicted: dict[str, int]                       # protocol -> idle sessions closed under stress


class SessionRegistry:
    def __init__(self) -> None:
        self._live: dict[str, Session] = {}
        self._per_peer: Counter[tuple[str, str]] = Counter()
        self._per_proto: Counter[str] = Counter()
        self._total: Counter[tuple[str, str]] = Counter()
        self._refused: Counter[str] = Counter()
        self._evicted: Counter[str] = Counter()
        self._stress: dict[str, tuple[int, float]] = {}   # protocol -> (limit, threshold)
        self._empty = asyncio.Event()
        self._empty.set()
        self.accepting = True

    def open(self, protocol: str, peer: str, max_total: int = 0, max_per_peer: int = 0,
             stress_threshold: float = 0.0) -> Session | None:
        """A new session, or None when a limit (0 = none) or shutdown forbids it. With a
        stress threshold, a full protocol first closes its longest-waiting idle session."""
        self._stress[protocol] = (max_total, stress_threshold)
        if (not self.accepting
                or (max_per_peer and self._per_peer[(protocol, peer)] >= max_per_peer)
                or (max_total and self._per_proto[protocol] >= max_total
                    and not (stress_threshold and self._evict_one(protocol)))):
            self._refused[protocol] += 1
            return None
        s = Session(self, protocol, peer)
        self._live[s.sid] = s
        self._per_peer[(protocol, peer)] += 1
        self._per_proto[protocol] += 1
        self._empty.clear()
        return s

    def stressed(self, protocol: str) -> bool:
        """More live sessions than the stress threshold's share of the limit."""
        limit, threshold = self._stress.get(protocol, (0, 0.0))
        return stress_level(self._per_proto[protocol], limit, threshold)

    def _evict_one(self, protocol: str) -> bool:
        """Close the session of `protocol` that has waited longest without a transaction or
        login (at least MIN_IDLE_TO_EVICT); False when there is none."""
        cutoff = time.monotonic() - MIN_IDLE_TO_EVICT
        victim: Session | None = None
        for s in self._live.values():
            if (s.protocol == protocol and s.idle_since is not None and s.idle_since <= cutoff
                    and s.evict is not None and (victim is None or s.idle_since < victim.idle_since)):  # type: ignore[operator]
                victim = s
        if victim is None or victim.evict is None:
            return False
        self._evicted[protocol] += 1
        victim.evict()
        victim.close("evicted")
        return True

    def _closed(self, s: Session, outcome: str) -> None:
        self._live.pop(s.sid, None)
        self._per_peer[(s.protocol, s.peer)] -= 1
        if self._per_peer[(s.protocol, s.peer)] <= 0:
            del self._per_peer[(s.protocol, s.peer)]
        self._per_proto[s.protocol] -= 1
        self._total[(s.protocol, outcome)] += 1
        if not self._live:
            self._empty.set()

    def live(self) -> list[Session]:
        return list(self._live.values())

    async def wait_empty(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self._empty.wait(), timeout)
            return True
        except TimeoutError:
            return False

    def statistics(self) -> SessionStats:
        return SessionStats(current={p: n for p, n in self._per_proto.items() if n},
                            total=dict(self._total), refused=dict(self._refused),
                            stressed={p: int(self.stressed(p)) for p in self._stress},
                            evicted=dict(self._evicted))


async def create_servers(factory: Callable[[], asyncio.BaseProtocol], addrs: tuple[str, ...] | list[str],
                         key: str, ssl_ctx: ssl.SSLContext | None = None) -> list[asyncio.Server]:
    """Bind each "HOST:PORT" (port 0 = any free port)."""
    loop = asyncio.get_running_loop()
    servers = []
    for addr in addrs:
        host, port = parse_hostport(addr, key)
        servers.append(await loop.create_server(factory, host or None, port, ssl=ssl_ctx,
                                                reuse_address=True, backlog=256))
    return servers


async def create_stream_servers(handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Any],
                                addrs: tuple[str, ...] | list[str], key: str,
                                ssl_ctx: ssl.SSLContext | None, implicit_tls: bool,
                                read_limit: int = 64 * 1024) -> list[asyncio.Server]:
    """Line-oriented listeners (IMAP, POP3): each connection runs `handler(reader, writer)`.
    With implicit_tls the TLS handshake comes first and the key names the `_tls` listeners."""
    def factory() -> asyncio.BaseProtocol:
        return asyncio.StreamReaderProtocol(asyncio.StreamReader(limit=read_limit), handler)

    return await create_servers(factory, addrs, f"{key}.listen_tls" if implicit_tls else f"{key}.listen",
                                ssl_ctx if implicit_tls else None)


def bound_addresses(servers: list[asyncio.Server]) -> list[tuple[str, int]]:
    out = []
    for s in servers:
        for sock in s.sockets:
            name = sock.getsockname()
            out.append((name[0], name[1]))
    return out
