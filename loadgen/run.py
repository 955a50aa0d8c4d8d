"""`loadgen run` (being built: the profile is checked first, before anything is sent)."""

from __future__ import annotations

import argparse
import sys

from loadgen import model
from loadgen.profile import load_profile


def main(args: argparse.Namespace) -> int:
    profile = load_profile(args.profile).scaled(args.participants_scale)
    model.build(profile, args.seed)
    print("loadgen run: not implemented yet", file=sys.stderr)
    return 1
