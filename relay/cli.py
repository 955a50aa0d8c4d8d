"""`relay` command line. Each area registers its own subcommands:

    relay.server.cli     serve, status
    relay.store.cli      user ..., quota ...
    relay.store.postgresql.cli  store migrate ...
    relay.directory.cli  participant ..., directory ...
    relay.gateway.cli    gateway ...

A module's `register(subparsers)` adds parsers whose `func(args) -> int` does the work.
Every subcommand takes --config FILE (added here, on every parser).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import Any

from relay import __version__
from relay.config import ConfigError, parse_hostport, parse_size

AREAS = ("relay.server.cli", "relay.store.cli", "relay.store.postgresql.cli", "relay.directory.cli",
         "relay.gateway.cli")


def size_type(value: str) -> int:
    """argparse type for sizes ("4GiB", "500MB", 4096), parsed like the config's."""
    try:
        return parse_size(value, "size")
    except ConfigError as e:                  # argparse names the option: drop our key
        raise argparse.ArgumentTypeError(str(e).partition(": ")[2]) from None


def hostport_type(value: str) -> tuple[str, int]:
    """argparse type for "HOST:PORT" ("[::1]:25" too), parsed like the config's listeners."""
    try:
        return parse_hostport(value, "address")
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e).partition(": ")[2]) from None


class _Parser(argparse.ArgumentParser):
    """Adds --config to every (sub)parser, so `relay user add --config F` and
    `relay --config F user add` both work."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS,
                          help="TOML configuration file (default: the embedded default)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="relay", description="Central mail server for DICOM e-mail networks.")
    parser.add_argument("--version", action="version", version=f"relay {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name in AREAS:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "config"):
        args.config = None
    try:
        rc = args.func(args)
    except ConfigError as e:
        print(f"relay: configuration error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
