"""`relay` subcommands of this area (see relay/cli.py)."""

from __future__ import annotations

import argparse


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Add this area's subcommands. Filled in by the area's owner."""
