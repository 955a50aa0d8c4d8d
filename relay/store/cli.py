"""`relay user ...` and `relay quota ...` (see relay/cli.py). Admin commands open the store
directly; they work while the server runs (sqlite WAL + busy timeout)."""

from __future__ import annotations

import argparse
import getpass
import sys
from collections.abc import Callable

from relay import config as configmod
from relay.config import ConfigError, format_size, parse_size
from relay.store.core import Store
from relay.store.errors import StoreError


def _size(value: str) -> int:
    try:
        return parse_size(value, "--quota-bytes")
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


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


def _quota_text(store: Store, address: str) -> tuple[str, str]:
    u = store.usage(address)
    return format_size(u.quota_bytes), (str(u.quota_messages) if u.quota_messages else "unlimited")


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
        qm = str(u.quota_messages) if u.quota_messages else "unlimited"
        pw = "" if a.has_password else "  (no password)"
        print(f"{a.address}  {format_size(u.bytes)} / {format_size(u.quota_bytes)}  "
              f"{u.messages} / {qm} messages{pw}")
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


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    user = sub.add_parser("user", help="accounts: add, list, del, passwd")
    us = user.add_subparsers(dest="user_command", metavar="ACTION", parser_class=type(user))
    us.required = True

    p = us.add_parser("add", help="add an account (its Maildir is created)")
    p.add_argument("address")
    p.add_argument("--quota-bytes", type=_size, metavar="SIZE", help="e.g. 20GiB (default: [quota] default_bytes)")
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
