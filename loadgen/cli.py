"""`loadgen` command line: `loadgen model` (the traffic model, nothing sent) and `loadgen run`."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from loadgen.profile import ProfileError, load_profile, shipped
from loadgen.report import fmt_bytes as _fmt_bytes
from relay.cli import hostport_type, size_type


def cmd_model(args: argparse.Namespace) -> int:
    from loadgen import model

    profile = load_profile(args.profile, args.pgp_share).scaled(args.participants_scale)
    m = model.build(profile, args.seed)
    s = m.summary()
    if args.json:
        print(json.dumps(s, indent=2))
        return 0
    print(f"{s['profile']}: {s['description']}")
    print(f"participants {s['participants']} ({s['gateways']} gateways, {s['mail_clients']} mail clients); seed {s['seed']}")
    print(f"month: {_fmt_bytes(s['bytes_per_month'])} in {s['studies_per_month']} studies, "
          f"{s['messages_per_month']} messages; largest study {_fmt_bytes(s['largest_study_bytes'])}")
    print(f"bandwidth: mean {s['mean_mbit_per_s']:.2f} Mbit/s, busiest hour {s['peak_hour_mbit_per_s']:.2f} Mbit/s")
    print("modality  studies  bytes")
    for name, v in s["by_modality"].items():
        print(f"  {name:<7} {v['studies']:>7}  {_fmt_bytes(v['bytes'])}")
    peak = max(s["bytes_by_hour_of_day"]) or 1
    print("hour of day (share of the month's bytes)")
    for h, b in enumerate(s["bytes_by_hour_of_day"]):
        print(f"  {h:02d}h {'#' * round(40 * b / peak):<40} {100 * b / max(1, s['bytes_per_month']):4.1f}%")
    print("weekday: " + "  ".join(f"{d} {_fmt_bytes(b)}" for d, b in s["bytes_by_weekday"].items()))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from loadgen import run

    try:
        return run.main(args)
    except run.StartError as e:
        print(f"loadgen: {e}", file=sys.stderr)
        return 1


def _positive(value: str) -> float:
    x = float(value)
    if not x > 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return x


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loadgen", description=(
        "Replay a DICOM e-mail network's traffic (a TOML profile) against SMTP + IMAP/POP3 "
        "servers, verify every message and write a capacity report."))
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--profile", required=True, metavar="NAME",
                       help=f"shipped profile ({', '.join(shipped())}) or a path to a .toml file")
        p.add_argument("--seed", type=int, default=None, help="override the profile's seed")
        p.add_argument("--participants-scale", type=_positive, default=1.0, metavar="X",
                       help="X times the participants of every group, volume in proportion (default 1)")
        p.add_argument("--pgp-share", type=float, default=None, metavar="X",
                       help="override the profile's [messages] pgp_share: this share (0..1) of the "
                            "studies goes PGP/MIME-encrypted")

    pm = sub.add_parser("model", help="print the profile's traffic model; sends nothing")
    common(pm)
    pm.add_argument("--json", action="store_true", help="one JSON object with every figure")
    pm.set_defaults(func=cmd_model)

    pr = sub.add_parser("run", help="replay the traffic and verify it; exit 0 only when nothing "
                                    "was lost, duplicated or corrupted")
    common(pr)
    pr.add_argument("--period", choices=("month", "week", "day", "hour"), default="month",
                    help="the whole month, or its busiest week, day or hour (default month)")
    pr.add_argument("--speedup", type=_positive, default=None, metavar="X",
                    help="simulated seconds per wall second (default: the period in 9.5 minutes, so that "
                         "with the drain a run takes about 10)")
    pr.add_argument("--scale", type=_positive, default=1.0, metavar="X",
                    help="byte scale: every message is X times its modelled size (default 1.0)")
    pr.add_argument("--report", default=None, metavar="DIR",
                    help="report directory (default ./loadgen-report-<profile>-<time>)")
    pr.add_argument("--smtp", type=hostport_type, metavar="HOST:PORT",
                    help="SMTP server to send to (without: start a relay of our own)")
    pr.add_argument("--imap", type=hostport_type, metavar="HOST:PORT",
                    help="IMAP server for the participants that receive by IMAP")
    pr.add_argument("--pop3", type=hostport_type, metavar="HOST:PORT",
                    help="POP3 server for the participants that receive by POP3 "
                         "(given alone: every participant receives by POP3)")
    pr.add_argument("--password", default=None, metavar="TEXT",
                    help="the password of every participant (external servers)")
    pr.add_argument("--credentials", default=None, metavar="FILE",
                    help="file of 'address password' lines (external servers)")
    pr.add_argument("--tls", action="store_true", help="STARTTLS on every connection (external servers)")
    pr.add_argument("--work-dir", default=None, metavar="DIR",
                    help="where the message pool, downloads (and our own relay's data) go "
                         "(default: a temporary directory, removed at the end)")
    pr.add_argument("--drain-timeout", type=_positive, default=120.0, metavar="SECONDS",
                    help="after the last send, how long receivers may take to drain (default 120)")
    pr.add_argument("--quota", type=size_type, default=None, metavar="SIZE",
                    help="our own relay: every mailbox's byte quota (e.g. \"500MB\"; default the "
                         "relay's 20 GiB); a full mailbox defers its senders with 452 4.2.2")
    pr.add_argument("--no-progress", action="store_true", help="no live display")
    pr.set_defaults(func=cmd_run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ProfileError as e:
        print(f"loadgen: profile error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
