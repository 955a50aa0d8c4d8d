"""Shared fixtures: a real relay on loopback (free ports), in a thread with its own uvloop."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import uvloop

from relay import config as configmod
from relay.config import Config

# Test suites only (relay/store/accounts.py, docs/store.md): new password hashes use argon2's
# cheapest parameters, for the relays of this process and every `relay` subprocess a test
# starts. Verification is unchanged; each account costs microseconds instead of ~0.5 s.
os.environ.setdefault("RELAY_TEST_WEAK_KDF", "1")


def make_config(data_dir: Path, **sections: dict[str, Any]) -> Config:
    """A Config on free loopback ports. `sections` override TOML-style tables, e.g.
    make_config(tmp, smtp={"max_message_size": "1MiB"}, quota={"default_bytes": 1000})."""
    raw: dict[str, Any] = {
        "data_dir": str(data_dir),
        "hostname": "relay.test",
        "grace_period": 5,
        "smtp": {"listen": ["127.0.0.1:0"]},
        "imap": {"listen": ["127.0.0.1:0"]},
        "pop3": {"listen": ["127.0.0.1:0"]},
        "metrics": {"listen": "127.0.0.1:0"},
        # every test client comes from 127.0.0.1: a wrong password in one test must not
        # delay the logins of the next by seconds (tests/test_login_penalty.py checks the
        # real schedule)
        "auth": {"failure_delay": 0.01, "failure_delay_max": 0.05},
    }
    for name, table in sections.items():
        if isinstance(table, dict):
            raw.setdefault(name, {}).update(table)
        else:
            raw[name] = table
    return configmod.from_dict(raw, data_dir)


class RunningRelay:
    """A Relay serving in a background thread. `call(fn)` runs fn(relay) on its loop."""

    def __init__(self, config: Config) -> None:
        from relay.server.app import Relay

        self.config = config
        self.loop = uvloop.new_event_loop()
        self.relay: Any = None
        ready = threading.Event()
        self.error: BaseException | None = None

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            try:
                self.relay = Relay(config)
                self.loop.run_until_complete(self.relay.start())
            except BaseException as e:  # noqa: BLE001 - surfaced to the test below
                self.error = e
                ready.set()
                return
            ready.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, name="relay", daemon=True)
        self.thread.start()
        if not ready.wait(30):
            raise RuntimeError("relay did not start in 30 s")
        if self.error:
            raise self.error

    def port(self, key: str) -> int:
        return self.relay.bound[key][0][1]

    @property
    def smtp_port(self) -> int:
        return self.port("smtp")

    @property
    def imap_port(self) -> int:
        return self.port("imap")

    @property
    def pop3_port(self) -> int:
        return self.port("pop3")

    @property
    def metrics_port(self) -> int:
        return self.port("metrics")

    @property
    def data_dir(self) -> Path:
        return Path(self.config.data_dir)

    def call(self, fn: Callable[[Any], Any], timeout: float = 30) -> Any:
        """Run fn(relay) on the relay's loop; awaits it if it returns a coroutine."""
        async def wrapper() -> Any:
            r = fn(self.relay)
            if asyncio.iscoroutine(r):
                r = await r
            return r
        return asyncio.run_coroutine_threadsafe(wrapper(), self.loop).result(timeout)

    def add_user(self, address: str, password: str = "secret", **kw: Any) -> None:
        self.call(lambda r: r.store.accounts.add(address, password, **kw))

    def stop(self) -> None:
        if self.relay is not None and self.thread.is_alive():
            asyncio.run_coroutine_threadsafe(self.relay.stop(grace=2), self.loop).result(30)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)


@pytest.fixture
def relay_factory(tmp_path: Path) -> Iterator[Callable[..., RunningRelay]]:
    """relay_factory(**sections) -> RunningRelay; all are stopped at teardown."""
    started: list[RunningRelay] = []

    def make(data_dir: Path | None = None, **sections: Any) -> RunningRelay:
        cfg = make_config(data_dir or tmp_path / f"relay{len(started)}", **sections)
        r = RunningRelay(cfg)
        started.append(r)
        return r

    yield make
    for r in started:
        r.stop()


@pytest.fixture
def relay(relay_factory: Callable[..., RunningRelay]) -> RunningRelay:
    """A relay with two accounts: alice@example.test and bob@example.test (password 'secret')."""
    r = relay_factory()
    r.add_user("alice@example.test", "secret")
    r.add_user("bob@example.test", "secret")
    return r
