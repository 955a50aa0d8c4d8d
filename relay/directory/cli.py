"""`relay participant ...` and `relay directory ...` (see relay/cli.py).

They work with or without a running server: changes go to the database (the serial moves);
a running server notices within a second and pushes the new document, a stopped one pushes it
at its next start (docs/directory.md, "Pushes").
"""

from __future__ import annotations

import argparse
import datetime
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from relay import config as configmod
from relay.directory.errors import DirectoryError
from relay.directory.registry import ROLES, Participant

if TYPE_CHECKING:
    from relay.directory.keys import KeyInfo


@contextmanager
def _open(args: argparse.Namespace) -> Iterator[Any]:
    from relay.directory.core import Directory
    from relay.store import Store

    cfg = configmod.load(args.config)
    store = Store.open(cfg)
    d = Directory(cfg, store)
    try:
        yield d
    finally:
        d.close()
        store.close()


def _fail(msg: str) -> int:
    print(f"relay: {msg}", file=sys.stderr)
    return 1


def _command(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Bad input (DirectoryError, store errors, unreadable files) -> one line on stderr, exit 1."""
    def run(args: argparse.Namespace) -> int:
        from relay.store.api import StoreError

        try:
            return fn(args)
        except (DirectoryError, StoreError) as e:
            return _fail(str(e) or type(e).__name__)
        except OSError as e:
            return _fail(f"{e.filename or ''}: {e.strerror or e}")
        except configmod.ConfigError:
            raise                                   # relay.cli: one line, exit 2
        except Exception as e:  # noqa: BLE001  (never a traceback for an admin command)
            return _fail(f"unexpected {type(e).__name__}: {e} (nothing was changed unless the "
                         "line above says so; report it with the command you ran)")
    return run


def _read_key(path: str, expect: str | None = None) -> KeyInfo:
    """Read and check a key file; with `expect` (--fingerprint, as given on a second channel:
    spaces and case do not matter), its fingerprint must be that one."""
    from relay.directory.keys import MAX_KEY_FILE, check_public_key

    p = Path(path)
    with p.open("rb") as f:
        data = f.read(MAX_KEY_FILE + 1)
    try:
        key = check_public_key(data)
    except DirectoryError as e:
        raise DirectoryError(f"{path}: {e}") from None
    if expect is not None and "".join(expect.split()).upper() != key.fingerprint:
        raise DirectoryError(f"{path}: the key's fingerprint is {key.fingerprint}, not the "
                             f"--fingerprint {expect}: not the key you were told")
    return key


def _password(args: argparse.Namespace) -> str | None:
    if not getattr(args, "password_stdin", False):
        return None
    pw = sys.stdin.readline().rstrip("\r\n")
    if not pw:
        raise DirectoryError("--password-stdin: empty password")
    return pw


def _size(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return configmod.parse_size(value, "--quota-bytes")
    except configmod.ConfigError as e:
        raise DirectoryError(str(e)) from None


def _fields(args: argparse.Namespace) -> dict[str, Any]:
    return {k: getattr(args, k) for k in ("name", "org", "role", "contact") if getattr(args, k) is not None}


@_command
def _add(args: argparse.Namespace) -> int:
    key = _read_key(args.key, args.fingerprint)          # checked before anything is created
    password = _password(args)
    with _open(args) as d:
        p = d.add(args.address, key, password=password, quota_bytes=_size(args.quota_bytes),
                  adopt=args.adopt, push=not args.no_push, **_fields(args))
        print(f"added {p.address} ({p.fingerprint}); directory serial {d.registry.serial()}")
    if password is None and not args.adopt:
        # the account exists, but no password is set: its gateway cannot log in yet
        print(f"relay: warning: {args.address} has no password and cannot log in; set one with "
              f"`relay user passwd {args.address}` (or add with --password-stdin)", file=sys.stderr)
    return 0


def _show_lines(d: Any, p: Participant) -> Iterator[str]:
    yield f"address:     {p.address}"
    yield f"name:        {p.name}"
    yield f"org:         {p.org}"
    yield f"role:        {p.role}"
    yield f"contact:     {p.contact}"
    yield f"status:      {p.status}"
    yield f"push:        {'yes' if p.push else 'no (opted out)'}"
    yield f"fingerprint: {p.fingerprint}"
    yield f"key expires: {p.key_expires or 'never'}"
    yield f"quota bytes: {d.quota_of(p.address)}"
    yield f"since:       {datetime.datetime.fromtimestamp(p.created, datetime.UTC):%Y-%m-%d %H:%M:%SZ}"


@_command
def _show(args: argparse.Namespace) -> int:
    with _open(args) as d:
        p = d.registry.get(args.address)
        if p is None:
            return _fail(f"{args.address} is not a participant")
        print("\n".join(_show_lines(d, p)))
        if args.key:
            print(p.public_key)
    return 0


@_command
def _list(args: argparse.Namespace) -> int:
    with _open(args) as d:
        rows = [("ADDRESS", "STATUS", "ROLE", "FINGERPRINT", "KEY EXPIRES", "PUSH", "NAME", "ORG")]
        for p in d.registry.list():
            rows.append((p.address, p.status, p.role, p.fingerprint, p.key_expires or "never",
                         "yes" if p.push else "no", p.name, p.org))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        for r in rows:
            print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        print(f"{len(rows) - 1} participant(s); directory serial {d.registry.serial()}")
    return 0


@_command
def _update(args: argparse.Namespace) -> int:
    if args.fingerprint and not args.key:
        raise DirectoryError("--fingerprint checks the key given with --key")
    key = _read_key(args.key, args.fingerprint) if args.key else None
    password = _password(args)
    with _open(args) as d:
        before = d.registry.serial()
        push = None if args.push is None else args.push == "yes"
        d.update(args.address, key=key, quota_bytes=_size(args.quota_bytes), password=password,
                 push=push, **_fields(args))
        after = d.registry.serial()
        print(f"updated {args.address}; directory serial {after}" if after != before
              else f"{args.address}: nothing changed; directory serial {after}")
    return 0


def _set_status(status: str) -> Callable[[argparse.Namespace], int]:
    @_command
    def run(args: argparse.Namespace) -> int:
        with _open(args) as d:
            d.update(args.address, status=status)
            print(f"{args.address} is {status}; directory serial {d.registry.serial()}")
        return 0
    return run


@_command
def _remove(args: argparse.Namespace) -> int:
    with _open(args) as d:
        d.remove(args.address, keep_mail=args.keep_mail)
        kept = " (account and mail kept)" if args.keep_mail else " (account and mail removed)"
        print(f"removed {args.address}{kept}; directory serial {d.registry.serial()}")
    return 0


@_command
def _export(args: argparse.Namespace) -> int:
    from relay.directory.document import export

    with _open(args) as d:
        if d.address is None:
            return _fail("no participants yet and no [directory] address: nothing to export")
        d.ensure_account()
        j, s = export(d.signed(), Path(args.dir))
        print(f"wrote {j} and {s} (serial {d.signed().serial})")
    return 0


def grouped(fpr: str) -> str:
    """A fingerprint as read out on the phone: ten groups of four (gpg's layout)."""
    groups = [fpr[i:i + 4] for i in range(0, len(fpr), 4)]
    return " ".join(groups[:5]) + "  " + " ".join(groups[5:])


@_command
def _key(args: argparse.Namespace) -> int:
    """The armored key on stdout (`> directory.asc`); its fingerprint on stderr for the phone
    check (docs/gateway.md step 2), or alone on stdout with --fingerprint."""
    with _open(args) as d:
        if args.fingerprint:
            print(grouped(d.key.fingerprint))
            return 0
        sys.stdout.write(d.key.public_armored().rstrip("\n") + "\n")
        print(f"fingerprint: {grouped(d.key.fingerprint)} (read it to each gateway's "
              "administrator on a second channel)", file=sys.stderr)
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("participant", help="participants: accounts with their OpenPGP keys")
    ps = p.add_subparsers(dest="participant_command", metavar="ACTION", required=True,
                          parser_class=type(p))

    def text_options(q: argparse.ArgumentParser) -> None:
        q.add_argument("--name", help="display name of the gateway or site")
        q.add_argument("--org", help="organisation")
        q.add_argument("--role", choices=ROLES, help="role in the network (default: hospital)")
        q.add_argument("--contact", help="who to call: e-mail, phone")
        q.add_argument("--password-stdin", action="store_true",
                       help="read the account's password from the first line of stdin")
        q.add_argument("--quota-bytes", metavar="SIZE", help="mailbox quota, e.g. 50GiB")
        q.add_argument("--fingerprint", metavar="FPR",
                       help="the key's fingerprint as told by its owner on another channel: "
                            "refuse a key file that is not that key")

    q = ps.add_parser("add", help="add a participant and create its account")
    q.add_argument("address")
    q.add_argument("--key", required=True, metavar="FILE", help="armored OpenPGP public key")
    text_options(q)
    q.add_argument("--no-push", action="store_true", help="do not push directory updates to it")
    q.add_argument("--adopt", action="store_true",
                   help="the account exists already (relay user add): make it a participant")
    q.set_defaults(func=_add)

    q = ps.add_parser("show", help="one participant's record")
    q.add_argument("address")
    q.add_argument("--key", action="store_true", help="also print the armored public key")
    q.set_defaults(func=_show)

    q = ps.add_parser("list", help="all participants, as a table")
    q.set_defaults(func=_list)

    q = ps.add_parser("update", help="change fields, rotate the key (--key), opt in/out of pushes")
    q.add_argument("address")
    q.add_argument("--key", metavar="FILE", help="new armored OpenPGP public key")
    text_options(q)
    q.add_argument("--push", choices=("yes", "no"), help="receive directory updates by e-mail")
    q.set_defaults(func=_update)

    for name, status, text in (("suspend", "suspended", "leave out of the directory, no answers"),
                               ("resume", "active", "make a suspended participant active again")):
        q = ps.add_parser(name, help=text)
        q.add_argument("address")
        q.set_defaults(func=_set_status(status))

    q = ps.add_parser("remove", help="remove a participant and its account")
    q.add_argument("address")
    q.add_argument("--keep-mail", action="store_true",
                   help="keep the account and its mailbox; only the participant record goes")
    q.set_defaults(func=_remove)

    p = sub.add_parser("directory", help="the signed participant directory")
    ds = p.add_subparsers(dest="directory_command", metavar="ACTION", required=True,
                          parser_class=type(p))
    q = ds.add_parser("export", help="write DIR/directory.json and DIR/directory.json.asc")
    q.add_argument("dir", metavar="DIR")
    q.set_defaults(func=_export)
    q = ds.add_parser("key", help="print the directory's armored public key (its fingerprint on stderr)")
    q.add_argument("--fingerprint", action="store_true", help="print only the fingerprint")
    q.set_defaults(func=_key)
