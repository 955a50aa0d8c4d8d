"""`relay user ...` and `relay quota ...` (see relay/cli.py). Admin commands open the store
directly; they work while the server runs (sqlite WAL + busy timeout)."""

from __future__ import annotations

import argparse
import getpass
import sys
import time
from collections.abc import Callable

from relay import config as configmod
from relay.cli import size_type
from relay.config import format_size
from relay.store.api import Usage
from relay.store.errors import StoreError
from relay.store.maildir import admin
from relay.store.maildir.core import Store


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


def _with_store(fn: Callable[[argparse.Namespace, Store], int]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        cfg = configmod.load(args.config)
        try:
            store = Store.open(cfg)
        except StoreError as e:
            return _fail(str(e))
        try:
            return fn(args, store)
        except StoreError as e:
            return _fail(str(e))
        finally:
            store.close()
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


def _quota_text(store: Store, address: str) -> tuple[str, str]:
    return _limits(store.usage(address))


def _user_add(args: argparse.Namespace, store: Store) -> int:
    password = _read_password(True) if args.password_stdin else None
    acct = store.accounts.add(args.address, password, quota_bytes=args.quota_bytes,
                              quota_messages=args.quota_messages)
    qb, qm = _quota_text(store, acct.address)
    note = "" if password else " (no password: receives mail, cannot log in; set one with `relay user passwd`)"
    print(f"added {acct.address} quota {qb}, {qm} messages{note}")
    return 0


def _user_list(args: argparse.Namespace, store: Store) -> int:
    for a in store.accounts.list():
        u = store.usage(a.address)
        qb, qm = _limits(u)
        pw = "" if a.has_password else "  (no password)"
        print(f"{a.address}  {format_size(u.bytes)} / {qb}  {u.messages} / {qm} messages{pw}")
    return 0


def _user_del(args: argparse.Namespace, store: Store) -> int:
    store.accounts.delete(args.address)
    print(f"deleted {args.address}")
    return 0


def _user_passwd(args: argparse.Namespace, store: Store) -> int:
    addr = store.accounts.require(args.address)
    store.accounts.set_password(addr, _read_password(args.password_stdin))
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


def _user_show(args: argparse.Namespace, store: Store) -> int:
    addr = store.accounts.require(args.address)
    acct = store.accounts.get(addr)
    assert acct is not None
    store.mailbox(addr).refresh()
    u = store.usage(addr)
    mb = store.statistics().mailboxes[addr]
    unfetched = store.db.one("SELECT COUNT(*) FROM messages WHERE address=? AND first_fetch IS NULL", (addr,))
    qb, qm = _limits(u)
    print(f"address:   {addr}{'' if acct.has_password else '  (no password: cannot log in)'}")
    print(f"quota:     {qb}, {qm} messages"
          f"{'' if acct.quota_bytes is None and acct.quota_messages is None else '  (account override)'}")
    print(f"usage:     {format_size(u.bytes)}{_percent(u.bytes, u.quota_bytes)}, "
          f"{u.messages} messages{_percent(u.messages, u.quota_messages)}")
    print(f"backlog:   {u.messages} messages waiting, {unfetched[0] if unfetched else 0} never fetched, "
          f"oldest {_age(mb.oldest_age_seconds) if u.messages else '-'}")
    last = f"{_age(time.time() - mb.last_poll)} ago" if mb.last_poll else "never"
    print(f"last poll: {last}")
    return 0


def _user_quota(args: argparse.Namespace, store: Store) -> int:
    if args.quota_bytes is None and args.quota_messages is None:
        return _fail("give --quota-bytes and/or --quota-messages")
    acct = store.accounts.set_quota(args.address, args.quota_bytes, args.quota_messages)
    qb, qm = _quota_text(store, acct.address)
    print(f"{acct.address} quota {qb}, {qm} messages")
    return 0


def _quota_recalc(args: argparse.Namespace, store: Store) -> int:
    changed = admin.recalc(store, args.address)
    for addr, old, new in changed:
        print(f"{addr}: {format_size(old[0])}, {old[1]} messages -> {format_size(new[0])}, {new[1]} messages")
    if not changed:
        print("ledger matches the Maildirs")
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
    p = qs.add_parser("recalc", help="rebuild index and ledger from the Maildirs (safe while the server runs)")
    p.add_argument("address", nargs="?")
    p.set_defaults(func=_with_store(_quota_recalc))
