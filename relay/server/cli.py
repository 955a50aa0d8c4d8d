"""`relay serve` (and `relay status`, filled in by the operations work)."""

from __future__ import annotations

import argparse
import json

from relay import config as configmod
from relay import log as logmod


def _serve(args: argparse.Namespace) -> int:
    import uvloop

    from relay.server.app import serve

    cfg = configmod.load(args.config)
    logmod.setup(cfg.log.format, cfg.log.level)
    return uvloop.run(serve(cfg))


def _status(args: argparse.Namespace) -> int:
    import sys

    from relay import status

    cfg = configmod.load(args.config)
    try:
        data = status.summary(status.fetch(status.metrics_url(cfg)))
    except status.StatusError as e:
        print(f"relay status: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        from rich.console import Console

        console = Console()
        if not console.is_terminal:       # piped: full lines for grep, not 80 columns
            console = Console(width=200)
        console.print(status.render(data))
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("serve", help="run the relay (SMTP, IMAP, POP3, metrics)")
    p.set_defaults(func=_serve)
    p = sub.add_parser("status", help="summary of the running relay: mailboxes, backlogs, "
                       "quotas, last polls, sessions (read from its metrics endpoint)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=_status)
