"""`relay store migrate --to postgresql --dsn DSN`: copy this relay's Maildir store into
PostgreSQL (relay/store/postgresql/importer.py; docs/cluster.md)."""

from __future__ import annotations

import argparse
import asyncio
import sys

from relay import config as configmod
from relay.store.errors import StoreError


def _migrate(args: argparse.Namespace) -> int:
    from relay.store.backends import open_store
    from relay.store.postgresql.importer import import_store, maildir_hashes
    from relay.store.postgresql.store import PgStore

    cfg = configmod.load(args.config)
    dsn = args.dsn or cfg.store.dsn
    if not dsn:
        print("relay: store migrate needs --dsn or [store] dsn (a libpq connection string)", file=sys.stderr)
        return 1
    if not (cfg.data_dir / "relay.db").exists():
        print(f"relay: {cfg.data_dir}: no Maildir store here (no relay.db): check --config / data_dir",
              file=sys.stderr)
        return 1

    async def main() -> int:
        src = open_store(cfg, "maildir")
        dst = PgStore(cfg, dsn)
        await src.open()
        try:
            await dst.open()
            try:
                r = await import_store(src, dst, maildir_hashes(cfg.data_dir), print)
            finally:
                await dst.close()
        finally:
            await src.close()
        print(f"{r.accounts} accounts created ({r.accounts_skipped} there already), {r.messages} messages copied "
              f"({r.messages_skipped} there already), {r.bodies} bodies, {r.bytes} bytes in {r.seconds:.1f} s")
        print('now set [store] backend = "postgresql" and dsn in the configuration of every node')
        return 0

    try:
        return asyncio.run(main())
    except StoreError as e:
        print(f"relay: {e}", file=sys.stderr)
        return 1


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    store = sub.add_parser("store", help="the store backend: migrate a Maildir store into PostgreSQL")
    ss = store.add_subparsers(dest="store_command", metavar="ACTION", parser_class=type(store))
    ss.required = True
    p = ss.add_parser("migrate", help="copy accounts and messages of the Maildir store into PostgreSQL "
                                      "(again after an interruption: what is there is skipped)")
    p.add_argument("--to", choices=["postgresql"], required=True)
    p.add_argument("--dsn", default="", help="libpq connection string (default: [store] dsn)")
    p.set_defaults(func=_migrate)
