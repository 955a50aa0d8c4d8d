#!/usr/bin/env python3
"""PostgreSQL store vs Maildir (issue 14): ingest and fetch of one big message through a
`relay serve` node, both backends in one run.

For each backend: a node (`relay serve`, loopback), one account, then
  ingest  one SIZE message over SMTP (relay/clients/smtp.py, streaming): time to the 250
          (for PostgreSQL: committed, synchronous_commit on)
  fetch   the stored message by IMAP UID FETCH in ranges (relay/clients/imap.py) into a file
          (Maildir sends it with sendfile; PostgreSQL reads it by range from the database)
  RSS     the node's peak resident memory over both (VmHWM, reset after the first login)
Prints MB/s (10^6 bytes/s), the ratio PostgreSQL / Maildir (target >= 0.3) and the node RSS
(target <= 96 MiB). PostgreSQL is a real server started here (tests/pgutil.py: initdb in a
temp dir, fsync on; shared_buffers 256MB and max_wal_size 8GB as docs/cluster.md advises).

    python3 bench/bench_pg.py                   # 1 GiB
    python3 bench/bench_pg.py --size 256MiB
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from _common import start_relay, stop_relay  # noqa: E402
from bench_fetch import BIG, PASSWORD, make_message, reset_hwm, vm_hwm  # noqa: E402

from relay.clients.imap import ImapClient  # noqa: E402
from relay.clients.smtp import send_message  # noqa: E402
from relay.config import parse_size  # noqa: E402


def node_config(d: Path, dsn: str) -> Path:
    """A node on PostgreSQL (dsn), or on a Maildir store of its own (dsn "")."""
    d.mkdir(parents=True)
    cfg = d / "relay.toml"
    cfg.write_text(f'data_dir = "{d / "data"}"\nhostname = "relay.test"\n'
                   '[smtp]\nlisten = ["127.0.0.1:0"]\nmax_message_size = "8GiB"\n'
                   '[imap]\nlisten = ["127.0.0.1:0"]\n'
                   '[pop3]\nlisten = ["127.0.0.1:0"]\n[metrics]\nlisten = "127.0.0.1:0"\n'
                   + (f'[store]\nbackend = "postgresql"\ndsn = "{dsn}"\n' if dsn else ""))
    return cfg


def add_accounts(cfg: Path, addresses: list[str], password: str) -> None:
    """Through the store api of the node's backend (as `relay user add` does)."""
    from relay import config as configmod
    from relay.store.backends import admin_store

    async def main() -> None:
        async with admin_store(configmod.load(cfg)) as store:
            for a in addresses:
                await store.accounts.add(a, password)
    asyncio.run(main())


def run_node(cfg: Path, message: Path, out: Path) -> dict[str, float]:
    add_accounts(cfg, [BIG], PASSWORD)
    proc, bound = start_relay(cfg, cfg.parent / "data", [])
    try:
        smtp, imap = bound["smtp"][0], bound["imap"][0]
        with ImapClient(str(imap[0]), int(imap[1])) as c:      # the first login's argon2: not measured
            c.login(BIG, PASSWORD)
            c.logout()
        reset_hwm(proc.pid)
        t = time.perf_counter()
        send_message(str(smtp[0]), int(smtp[1]), "ct@hospital.test", [BIG], message)
        ingest = time.perf_counter() - t
        with ImapClient(str(imap[0]), int(imap[1])) as c:
            c.login(BIG, PASSWORD)
            c.select()
            [uid] = c.uid_search("ALL")
            t = time.perf_counter()
            n = c.fetch_to_file(uid, out)
            fetch = time.perf_counter() - t
            c.logout()
        rss = vm_hwm(proc.pid) / 2**20
        with open(message, "rb") as a, open(out, "rb") as b:      # byte-exact after the trace headers
            b.seek(n - message.stat().st_size)
            while block := a.read(1 << 20):
                assert b.read(len(block)) == block, "fetched message differs"
    finally:
        stop_relay(proc)
    return {"ingest": ingest, "fetch": fetch, "rss": rss, "stored": n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=lambda s: parse_size(s, "--size"), default=1 << 30)
    args = ap.parse_args()
    from pgutil import PgServer

    with PgServer.create(shared_buffers="256MB", wal_buffers="64MB", max_wal_size="8GB",
                         checkpoint_timeout="30min") as pg, \
            tempfile.TemporaryDirectory(prefix="bench-pg-") as tmp:
        message = Path(tmp) / "message.eml"
        size = make_message(message, args.size)
        print(f"one {size / 2**20:.0f} MiB message through a relay node: SMTP to the 250, IMAP FETCH")
        res = {}
        for backend in ("maildir", "postgresql"):
            dsn = pg.create_database("relay") if backend == "postgresql" else ""
            r = res[backend] = run_node(node_config(Path(tmp) / backend, dsn), message, Path(tmp) / "out")
            mb = r["stored"] / 1e6
            print(f"{backend:<11} ingest {mb / r['ingest']:7.0f} MB/s   fetch {mb / r['fetch']:7.0f} MB/s   "
                  f"node peak RSS {r['rss']:5.1f} MiB")
        m, p = res["maildir"], res["postgresql"]
        print(f"ratio postgresql/maildir: ingest {m['ingest'] / p['ingest']:.2f}x, fetch {m['fetch'] / p['fetch']:.2f}x"
              f" (target >= 0.3x); PostgreSQL node RSS {p['rss']:.1f} MiB (target <= 96)")


if __name__ == "__main__":
    main()
