"""`relay user ...` and `relay quota ...` (see relay/cli.py). Admin commands act on the
configured backend ([store] backend) through relay.store.api; they work while the server runs
(Maildir: sqlite WAL + busy timeout; PostgreSQL: like any other node)."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import sys
import time
from collections.abc import Awaitable, Callable

from relay import config as configmod
from relay.cli import size_type
from relay.config import format_size
from relay.store.api import MessageStore, NoSuchAccount, Usage
from relay.store.backends import admin_store, never_fetched, recalc
from relay.store.errors import StoreError


def _count(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {value!r}")
    return n


def _fail(msg: str) -> int:
    print(f"relay: {msg}", file=sys.stderr)
    return 1


StoreCommand = Callable[[argparse.Namespace, MessageStore], Awaitable[int]]


def _with_store(fn: StoreCommand) -> Callable[[argparse.Namespace], int]:
    """Run fn on the configured backend ([store] backend), through relay.store.api."""
    def run(args: argparse.Namespace) -> int:
        cfg = configmod.load(args.config)

        async def main() -> int:
            try:
                async with admin_store(cfg) as store:
                    return await fn(args, store)
            except StoreError as e:
                return _fail(str(e))
        return asyncio.run(main())
    return run


def _read_password(from_stdin: bool) -> str:
    """One line from stdin (--password-stdin), or a twice-asked prompt on the terminal."""
    if from_stdin:
        pw = sys.stdin.readline().rstrip("\r\n")
    else:
        pw = getpass.getpass("New password: ")
        if getpass.getpass("Repeat password: ") != pw:
            raise StoreError("the passwords do not match")
    if not pw:
        raise StoreError("empty password")
    return pw


def _limits(u: Usage) -> tuple[str, str]:
    """(byte quota, message quota) as text; 0 = unlimited."""
    return (format_size(u.quota_bytes) if u.quota_bytes else "unlimited",
            str(u.quota_messages) if u.quota_messages else "unlimited")


async def _quota_text(store: MessageStore, address: str) -> tuple[str, str]:
    return _limits(await store.ledger.usage(address))


async def _require(store: MessageStore, address: str) -> str:
    acct = await store.accounts.get(address)
    if acct is None:
        raise NoSuchAccount(f"{address}: no such account")
    return acct.address


async def _user_add(args: argparse.Namespace, store: MessageStore) -> int:
    password = _read_password(True) if args.password_stdin else None
    acct = await store.accounts.add(args.address, password, quota_bytes=args.quota_bytes,
                                    quota_messages=args.quota_messages)
    qb, qm = await _quota_text(store, acct.address)
    note = "" if password else " (no password: receives mail, cannot log in; set one with `relay user passwd`)"
    print(f"added {acct.address} quota {qb}, {qm} messages{note}")
    return 0


async def _user_list(args: argparse.Namespace, store: MessageStore) -> int:
    for a in await store.accounts.list():
        u = await store.ledger.usage(a.address)
        qb, qm = _limits(u)
        pw = "" if a.has_password else "  (no password)"
        print(f"{a.address}  {format_size(u.bytes)} / {qb}  {u.messages} / {qm} messages{pw}")
    return 0


async def _user_del(args: argparse.Namespace, store: MessageStore) -> int:
    await store.accounts.delete(args.address)
    print(f"deleted {args.address}")
    return 0


async def _user_passwd(args: argparse.Namespace, store: MessageStore) -> int:
    addr = await _require(store, args.address)
    await store.accounts.set_password(addr, _read_password(args.password_stdin))
    print(f"password changed for {addr}")
    return 0


def _age(seconds: float) -> str:
    s = int(seconds)
    if s < 120:
        return f"{s} s"
    if s < 7200:
        return f"{s // 60} min"
    if s < 172800:
        return f"{s // 3600} h {s % 3600 // 60} min"
    return f"{s // 86400} d {s % 86400 // 3600} h"


def _percent(used: int, quota: int) -> str:
    return f" ({100 * used / quota:.0f}%)" if quota else ""


async def _user_show(args: argparse.Namespace, store: MessageStore) -> int:
    addr = await _require(store, args.address)
    acct = await store.accounts.get(addr)
    assert acct is not None
    messages = await store.mailbox(addr).messages()      # a Maildir changed behind our back is read again
    u = await store.ledger.usage(addr)
    unfetched = await never_fetched(store, addr)
    oldest = min((m.internaldate for m in messages), default=None)
    mb = store.statistics().mailboxes.get(addr)
    qb, qm = _limits(u)
    print(f"address:   {addr}{'' if acct.has_password else '  (no password: cannot log in)'}")
    print(f"quota:     {qb}, {qm} messages"
          f"{'' if acct.quota_bytes is None and acct.quota_messages is None else '  (account override)'}")
    print(f"usage:     {format_size(u.bytes)}{_percent(u.bytes, u.quota_bytes)}, "
          f"{u.messages} messages{_percent(u.messages, u.quota_messages)}")
    print(f"backlog:   {u.messages} messages waiting, {unfetched} never fetched, "
          f"oldest {_age(time.time() - oldest) if oldest is not None else '-'}")
    last = f"{_age(time.time() - mb.last_poll)} ago" if mb is not None and mb.last_poll else "never"
    print(f"last poll: {last}")
    return 0


async def _user_quota(args: argparse.Namespace, store: MessageStore) -> int:
    if args.quota_bytes is None and args.quota_messages is None:
        return _fail("give --quota-bytes and/or --quota-messages")
    acct = await store.accounts.set_quota(args.address, args.quota_bytes, args.quota_messages)
    qb, qm = await _quota_text(store, acct.address)
    print(f"{acct.address} quota {qb}, {qm} messages")
    return 0


async def _quota_recalc(args: argparse.Namespace, store: MessageStore) -> int:
    changed = await recalc(store, args.address)
    for addr, old, new in changed:
        print(f"{addr}: {format_size(old[0])}, {old[1]} messages -> {format_size(new[0])}, {new[1]} messages")
    if not changed:
        print("ledger matches the stored messages")
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    user = sub.add_parser("user", help="accounts: add, list, del, passwd, show, quota")
    us = user.add_subparsers(dest="user_command", metavar="ACTION", parser_class=type(user))
    us.required = True

    p = us.add_parser("add", help="add an account (its Maildir is created)")
    p.add_argument("address")
    p.add_argument("--quota-bytes", type=size_type, metavar="SIZE", help="e.g. 20GiB (default: [quota] default_bytes)")
    p.add_argument("--quota-messages", type=_count, metavar="N", help="0 = unlimited (default: [quota] default_messages)")
    p.add_argument("--password-stdin", action="store_true", help="read the password from the first line of stdin")
    p.set_defaults(func=_with_store(_user_add))

    p = us.add_parser("list", help="list accounts with usage and quota")
    p.set_defaults(func=_with_store(_user_list))

    p = us.add_parser("del", help="delete an account and its Maildir")
    p.add_argument("address")
    p.set_defaults(func=_with_store(_user_del))

    p = us.add_parser("passwd", help="set an account's password")
    p.add_argument("address")
    p.add_argument("--password-stdin", action="store_true", help="read the password from the first line of stdin")
    p.set_defaults(func=_with_store(_user_passwd))

    p = us.add_parser("show", help="quota, usage, backlog and last poll of an account")
    p.add_argument("address")
    p.set_defaults(func=_with_store(_user_show))

    p = us.add_parser("quota", help="set an account's quota override")
    p.add_argument("address")
    p.add_argument("--quota-bytes", type=size_type, metavar="SIZE")
    p.add_argument("--quota-messages", type=_count, metavar="N", help="0 = unlimited")
    p.set_defaults(func=_with_store(_user_quota))

    quota = sub.add_parser("quota", help="the quota ledger")
    qs = quota.add_subparsers(dest="quota_command", metavar="ACTION", parser_class=type(quota))
    qs.required = True
    p = qs.add_parser("recalc", help="rebuild the ledger from the stored messages (Maildir: and the index from the Maildirs; safe while the server runs)")
    p.add_argument("address", nargs="?")
    p.set_defaults(func=_with_store(_quota_recalc))
