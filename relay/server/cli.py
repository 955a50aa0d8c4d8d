"""`relay serve` (and `relay status`, filled in by the operations work)."""

from __future__ import annotations

import argparse

from relay import config as configmod
from relay import log as logmod


def _serve(args: argparse.Namespace) -> int:
    import uvloop

    from relay.server.app import serve

    cfg = configmod.load(args.config)
    logmod.setup(cfg.log.format, cfg.log.level)
    return uvloop.run(serve(cfg))


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = sub.add_parser("serve", help="run the relay (SMTP, IMAP, POP3, metrics)")
    p.set_defaults(func=_serve)
