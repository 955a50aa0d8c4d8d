"""Real PostgreSQL servers for tests and benchmarks: initdb into a temp dir as an unprivileged
user, listen on 127.0.0.1 and a free port, unix socket in the temp dir, fsync on.

    with PgServer.create() as pg:          # a primary
        standby = pg.standby()             # pg_basebackup -R, streaming, started
        pg.make_synchronous()              # synchronous_standby_names = '*': COMMIT waits for it
        pg.stop(); standby.promote()

The pytest fixtures at the bottom are imported by the tests that need them
(`from pgutil import pg_server, pg_dsn`): one server per test module (session scope would be
per worker anyway with --dist loadfile), one fresh database per test.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

SUPERUSER = "relay"                # initdb -U: the tests' role (trust auth, loopback only)
START_TIMEOUT = 60                 # seconds for pg_ctl -w on a loaded 2-core machine
_RUN_AS = "postgres"               # initdb refuses root: as root, servers run as this user


def pg_bindir() -> Path:
    """Debian's newest PostgreSQL (or $RELAY_PG_BIN)."""
    env = os.environ.get("RELAY_PG_BIN")
    if env:
        return Path(env)
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                   key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0)
    if not found:
        raise RuntimeError("PostgreSQL server binaries not found: apt-get install postgresql "
                           "(or set RELAY_PG_BIN to the directory holding initdb)")
    return found[-1].parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _owner_kwargs() -> dict[str, str]:
    return {"user": _RUN_AS, "group": _RUN_AS} if os.geteuid() == 0 else {}


def _chown(path: Path) -> None:
    if os.geteuid() == 0:
        shutil.chown(path, _RUN_AS, _RUN_AS)


def _alive(pid: int) -> bool:
    """Running (a zombie is not: the container's init may never reap the postmaster)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


class PgServer:
    """One PostgreSQL server (a primary or a standby) in its own directory."""

    _names = itertools.count()

    def __init__(self, root: Path, name: str, port: int, *, owns_root: bool = False) -> None:
        self.root, self.name, self.port = root, name, port
        self.dir = root / name
        self.data = self.dir / "data"
        self.log = self.dir / "server.log"
        self._owns_root = owns_root
        self._standbys: list[PgServer] = []
        self._proc: subprocess.Popen[bytes] | None = None

    # --- creation ----------------------------------------------------------------------

    @classmethod
    def create(cls, root: Path | None = None, name: str = "primary", **settings: str) -> PgServer:
        """initdb + start a new primary (in a new temp dir unless `root` is given); `settings`
        go into postgresql.conf (e.g. shared_buffers="256MB")."""
        owns = root is None
        if root is None:
            root = Path(tempfile.mkdtemp(prefix="relay-pg-"))
            os.chmod(root, 0o755)
            _chown(root)
        srv = cls(root, name, free_port(), owns_root=owns)
        srv.dir.mkdir()
        _chown(srv.dir)
        subprocess.run([str(pg_bindir() / "initdb"), "-D", str(srv.data), "-U", SUPERUSER, "--auth=trust",
                        "-E", "UTF8", "--locale=C", "--no-instructions"],
                       check=True, capture_output=True, **_owner_kwargs())
        with open(srv.data / "postgresql.conf", "a") as f:
            f.write(srv._conf() + "".join(f"{k} = '{v}'\n" for k, v in settings.items()))
        srv.start()
        return srv

    def _conf(self) -> str:
        return (f"\n# relay tests\nlisten_addresses = '127.0.0.1'\nport = {self.port}\n"
                f"unix_socket_directories = '{self.dir}'\n"
                "fsync = on\nsynchronous_commit = on\nwal_level = replica\nmax_wal_senders = 8\n"
                "hot_standby = on\nshared_buffers = 32MB\nmax_connections = 100\n"
                "wal_keep_size = 256MB\n")

    def standby(self, name: str | None = None) -> PgServer:
        """A streaming standby of this server (pg_basebackup -R), started."""
        sb = PgServer(self.root, name or f"standby{next(self._names)}", free_port())
        sb.dir.mkdir()
        _chown(sb.dir)
        subprocess.run([str(pg_bindir() / "pg_basebackup"), "-d",
                        f"host=127.0.0.1 port={self.port} user={SUPERUSER} application_name={sb.name}",
                        "-D", str(sb.data), "-R", "-X", "stream", "-c", "fast"],
                       check=True, capture_output=True, **_owner_kwargs())
        with open(sb.data / "postgresql.conf", "a") as f:
            f.write(sb._conf())
        sb.start()
        self._standbys.append(sb)
        return sb

    def make_synchronous(self, names: str = "*") -> None:
        """COMMIT returns only once a standby has flushed it (committed on two machines)."""
        self.sql(f"ALTER SYSTEM SET synchronous_standby_names = '{names}'")
        self.sql("SELECT pg_reload_conf()")
        deadline = time.monotonic() + START_TIMEOUT
        while self.sql("SELECT count(*) FROM pg_stat_replication WHERE sync_state = 'sync'") == "0":
            if time.monotonic() > deadline:
                raise TimeoutError(f"no synchronous standby on {self.name}")
            time.sleep(0.05)

    # --- life ----------------------------------------------------------------------------

    def _ctl(self, *args: str) -> None:
        subprocess.run([str(pg_bindir() / "pg_ctl"), "-D", str(self.data), *args],
                       check=True, capture_output=True, timeout=START_TIMEOUT + 10, **_owner_kwargs())

    def start(self) -> None:
        """Run the postmaster as our child (so that kill() leaves no zombie behind: the
        container's init may reap nothing) and wait until it accepts connections."""
        pidfile = self.data / "postmaster.pid"
        if pidfile.exists() and self.pid() is None:
            pidfile.unlink()       # left by kill()
        with open(self.log, "ab") as log:
            self._proc = subprocess.Popen([str(pg_bindir() / "postgres"), "-D", str(self.data)],
                                          stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          start_new_session=True, **_owner_kwargs())
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError(f"postgres {self.name} exited {self._proc.returncode}: "
                                   + self.log.read_text(errors="replace")[-2000:])
            if subprocess.run([str(pg_bindir() / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(self.port)],
                              check=False).returncode == 0:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"postgres {self.name} not ready in {START_TIMEOUT} s")
            time.sleep(0.05)

    def stop(self, mode: str = "fast") -> None:
        """pg_ctl stop (-m smart|fast|immediate); no error if it is not running."""
        if self.running():
            self._ctl("-m", mode, "-w", "-t", str(START_TIMEOUT), "stop")
        if self._proc is not None:
            self._proc.wait(START_TIMEOUT)

    def kill(self) -> None:
        """SIGKILL the postmaster and wait for its backends to go (a crashed machine)."""
        pid = self.pid()
        if pid is None:
            return
        children = [int(c) for c in subprocess.run(["pgrep", "-P", str(pid)], capture_output=True,
                                                    text=True).stdout.split()]
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + START_TIMEOUT
        if self._proc is not None:
            self._proc.wait(START_TIMEOUT)
        while time.monotonic() < deadline and any(_alive(p) for p in [pid, *children]):
            time.sleep(0.05)

    def promote(self) -> None:
        self._ctl("-w", "-t", str(START_TIMEOUT), "promote")

    def pid(self) -> int | None:
        try:
            pid = int((self.data / "postmaster.pid").read_text().split("\n", 1)[0])
        except (FileNotFoundError, ValueError):
            return None
        return pid if _alive(pid) else None

    def running(self) -> bool:
        return self.pid() is not None

    def destroy(self) -> None:
        for sb in self._standbys:
            sb.stop("immediate")
        self.stop("immediate")
        if self._owns_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> PgServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy()

    # --- use -----------------------------------------------------------------------------

    def dsn(self, dbname: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{dbname}"

    def sql(self, statement: str, dbname: str = "postgres") -> str:
        """Run one statement with psql; its unaligned output (tuples only)."""
        r = subprocess.run([str(pg_bindir() / "psql"), "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1",
                            "-d", self.dsn(dbname), "-c", statement],
                           capture_output=True, text=True, timeout=START_TIMEOUT)
        if r.returncode:
            raise RuntimeError(f"psql {statement!r}: {r.stderr.strip()}")
        return r.stdout.strip()

    def create_database(self, name: str | None = None) -> str:
        """A new empty database; its DSN."""
        name = name or f"t{os.getpid()}_{next(self._names)}"
        self.sql(f'CREATE DATABASE "{name}"')
        return self.dsn(name)

    def drop_database(self, dsn: str) -> None:
        name = dsn.rsplit("/", 1)[1].split("?", 1)[0]
        with contextlib.suppress(RuntimeError):
            self.sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def wait_replayed(self, standby: PgServer, timeout: float = 30.0) -> None:
        """Until `standby` has replayed everything this primary has written so far."""
        lsn = self.sql("SELECT pg_current_wal_lsn()")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if standby.sql(f"SELECT pg_last_wal_replay_lsn() >= '{lsn}'::pg_lsn") == "t":
                return
            time.sleep(0.05)
        raise TimeoutError(f"{standby.name} did not replay up to {lsn} in {timeout} s")


def cluster_dsn(servers: list[PgServer], dbname: str) -> str:
    """One libpq DSN naming every server; libpq connects to whichever is the primary."""
    hosts = ",".join(f"127.0.0.1:{s.port}" for s in servers)
    return f"postgresql://{SUPERUSER}@{hosts}/{dbname}?target_session_attrs=read-write&connect_timeout=3"


# --- pytest fixtures -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pg_server() -> Iterator[PgServer]:
    """A running primary for the whole test module."""
    with PgServer.create() as srv:
        yield srv


@pytest.fixture
def pg_dsn(pg_server: PgServer) -> Iterator[str]:
    """A fresh, empty database on the module's server; dropped afterwards."""
    dsn = pg_server.create_database()
    yield dsn
    pg_server.drop_database(dsn)


@pytest.fixture
def pg_pair() -> Iterator[tuple[PgServer, PgServer]]:
    """A primary and a synchronous streaming standby (COMMIT = on two machines); the test
    may stop, kill or promote either."""
    with PgServer.create() as primary:
        standby = primary.standby()
        primary.make_synchronous()
        yield primary, standby


# --- a store node in a process of its own (for kill -9) ----------------------------------------

def numbered_message(i: int, size: int) -> bytes:
    """Message number i: a header naming i, then `size` bytes anyone can recompute from i."""
    import random
    head = f"Subject: message {i}\r\nX-Seq: {i}\r\n\r\n".encode()
    return head + random.Random(i).randbytes(size)


def seq_of(stored: bytes) -> int:
    """The i of numbered_message(i, ...) inside a stored message (after the trace headers)."""
    at = stored.index(b"X-Seq: ") + 7
    return int(stored[at:stored.index(b"\r\n", at)])


def _node_main(argv: list[str]) -> None:
    """pgutil.py DSN DATA_DIR ADDRESS FIRST COUNT SIZE: deliver messages FIRST.. through the
    PostgreSQL store, printing "ACK i" after each commit (what an SMTP server's 250 is)."""
    import asyncio
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import make_config

    from relay.store.api import Envelope
    from relay.store.postgresql.store import PgStore

    dsn, data_dir, address, first, count, size = argv
    store = PgStore(make_config(Path(data_dir)), dsn)

    async def main() -> None:
        await store.open()
        print("READY", store.node_id, flush=True)
        for i in range(int(first), int(first) + int(count)):
            msg = numbered_message(i, int(size))
            d = store.begin_delivery(Envelope("node@example.org"))
            await d.add_recipient(address, len(msg))
            await d.start()
            for off in range(0, len(msg), 65536):
                d.write(msg[off:off + 65536])
                if not d.writable:
                    await d.wait_writable()
            await d.commit()
            print("ACK", i, flush=True)
        await store.close()

    asyncio.run(main())


if __name__ == "__main__":
    import sys
    _node_main(sys.argv[1:])
