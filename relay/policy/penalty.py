"""Login penalties: the one login throttle of SMTP AUTH, IMAP and POP3 (issue 12).

Dovecot's `auth_penalty` is the model. Every failed login counts against the client address
and against the account it named; the next attempt from that address or for that account
waits `failure_delay x 2^(failures - 1)` seconds, at most `failure_delay_max`, *before* the
password is checked. Attempts waiting at the same time take turns: each one reserves the next
slot, so 48 parallel connections from one address guess at the penalty rate, not 48 times
it, and argon2 (on its own small pool, relay/store/passwords.py) is never flooded. An attempt
whose turn is more than MAX_WAIT away is answered "try again later" unchecked, after
`failure_delay_max` (hammering gains nothing). A
successful login clears the address and the account. A session is closed after
MAX_FAILURES_PER_SESSION failures (SMTP 421 4.7.0, IMAP BYE, POP3 -ERR).

Failures are forgotten FORGET_AFTER seconds after the last one; the table is bounded (LRU).
Every failure is one log line ("login-failed": protocol, session, client, user, failures,
delay) and counted in relay_auth_failures_total{protocol}.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from relay.config import Config
from relay.log import get_logger
from relay.store.api import KdfBusy
from relay.store.errors import StoreError, StoreUnavailable

log = get_logger("auth")

# RFC 1939 8 and common practice: a session that failed this often is closed (a guesser must
# reconnect, and pays the connection limits too).
MAX_FAILURES_PER_SESSION = 5
# Dovecot keeps a penalty for an hour; a quarter of one is enough to make guessing slow and
# lets a user who mistyped a few times in the morning log in normally after a coffee.
FORGET_AFTER = 900.0
# Client addresses + accounts remembered at most (LRU): ~200 bytes each, ~20 MiB at worst.
MAX_TRACKED = 100_000
# Longer than this to wait for a turn: answer "try later" without checking (two maximum
# delays: a user behind the guesser's NAT still gets a turn soon).
MAX_WAIT = 30.0
# User names are keys: bound them (RFC 5321 4.5.3.1.3: a path is at most 256 octets).
MAX_USER_KEY = 256


class Verdict(enum.Enum):
    OK = "ok"
    FAILED = "failed"          # wrong credentials (or unknown account): count, answer "failed"
    BUSY = "busy"              # not checked: penalty queue or password hashing full; "try later"


@dataclass(frozen=True)
class LoginStats:
    failures: dict[str, int]   # protocol -> failed logins (relay_auth_failures_total)
    refused: dict[str, int]    # protocol -> answered "try later" unchecked (relay_auth_refused_total)
    delayed_seconds: float     # penalty waited before checks (relay_auth_penalty_seconds_total)
    tracked: int               # client addresses and accounts with failures now


class _Entry:
    __slots__ = ("failures", "last", "next_turn")

    def __init__(self) -> None:
        self.failures = 0
        self.last = 0.0
        self.next_turn = 0.0


Verifier = Callable[[str, str], Awaitable[bool]]


class LoginPenalty:
    def __init__(self, config: Config, verify: Verifier, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep) -> None:
        self.initial = config.auth.failure_delay
        self.maximum = max(config.auth.failure_delay_max, self.initial)
        self._verify = verify
        self.clock, self.sleep = clock, sleep
        self._entries: OrderedDict[tuple[str, str], _Entry] = OrderedDict()
        self._failures: Counter[str] = Counter()
        self._refused: Counter[str] = Counter()
        self._delayed = 0.0

    def delay(self, failures: int) -> float:
        """Seconds before the next attempt after `failures` failures."""
        if failures <= 0 or self.initial <= 0:
            return 0.0
        return float(min(self.maximum, self.initial * 2 ** min(failures - 1, 32)))

    def _keys(self, peer: str, user: str) -> list[tuple[str, str]]:
        return [("client", peer), ("user", user.strip().lower()[:MAX_USER_KEY])]

    def _entry(self, key: tuple[str, str], now: float, create: bool) -> _Entry | None:
        e = self._entries.get(key)
        if e is not None and now - e.last > FORGET_AFTER:
            del self._entries[key]
            e = None
        if e is None and create:
            e = self._entries[key] = _Entry()
            while len(self._entries) > MAX_TRACKED:
                self._entries.popitem(last=False)
        if e is not None:
            self._entries.move_to_end(key)
        return e

    def _turn(self, keys: list[tuple[str, str]]) -> float | None:
        """Reserve this attempt's turn: the time it may be checked, or None (too far away)."""
        now = self.clock()
        entries = [e for e in (self._entry(k, now, False) for k in keys) if e is not None and e.failures]
        start = max([now, *(e.next_turn for e in entries)])
        if start - now > MAX_WAIT:
            return None
        for e in entries:
            e.next_turn = start + self.delay(e.failures)
        return start - now

    async def verify(self, protocol: str, peer: str, user: str, password: str, sid: str = "") -> Verdict:
        """Wait this client's and account's turn, check the password, count the outcome."""
        keys = self._keys(peer, user)
        wait = self._turn(keys)
        if wait is None:                      # answered no sooner than a full penalty: a
            await self.sleep(self.maximum)    # guesser gains nothing from hammering
            return self._refuse(protocol, peer, user, sid, "penalty")
        if wait > 0:
            self._delayed += wait
            await self.sleep(wait)
        try:
            ok = await self._verify(user, password)
        except KdfBusy:                       # as above: not answered sooner than a penalty
            await self.sleep(self.maximum)
            return self._refuse(protocol, peer, user, sid, "kdf-busy")
        except StoreUnavailable:              # the store's database is away: "try later", not a failure
            return self._refuse(protocol, peer, user, sid, "store-unavailable")
        except StoreError as e:      # malformed address, account removed meanwhile: a failure
            log.info("login-error", protocol=protocol, sid=sid, error=type(e).__name__)
            ok = False
        now = self.clock()
        if ok:
            for k in keys:
                self._entries.pop(k, None)
            return Verdict.OK
        failures = 0
        for k in keys:
            entry = self._entry(k, now, True)
            assert entry is not None
            entry.failures += 1
            entry.last = now
            entry.next_turn = max(entry.next_turn, now + self.delay(entry.failures))
            failures = max(failures, entry.failures)
        self._failures[protocol] += 1
        log.info("login-failed", protocol=protocol, sid=sid, peer=peer, user=user[:100],
                 failures=failures, delay=self.delay(failures))
        return Verdict.FAILED

    def _refuse(self, protocol: str, peer: str, user: str, sid: str, reason: str) -> Verdict:
        self._refused[protocol] += 1
        log.info("login-refused", protocol=protocol, sid=sid, peer=peer, user=user[:100], reason=reason)
        return Verdict.BUSY

    def statistics(self) -> LoginStats:
        now = self.clock()
        tracked = sum(1 for e in self._entries.values() if e.failures and now - e.last <= FORGET_AFTER)
        return LoginStats(dict(self._failures), dict(self._refused), self._delayed, tracked)
