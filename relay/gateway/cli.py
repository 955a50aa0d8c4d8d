"""`relay gateway send|receive|status|directory|pacs-listen|pacs-push` (docs/gateway.md)."""

from __future__ import annotations

import argparse
import functools
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from relay import log as logmod


class CliError(Exception):
    """A one-line error for the administrator (printed as `relay gateway CMD: ...`, exit 1)."""


def _hint(e: BaseException) -> str:
    """What the administrator reads for an error no command caught itself: the message plus
    what to do. Anything unexpected is still one line (never a traceback), with -v for the log."""
    from relay.gateway.core import GatewayError
    from relay.gateway.dicommime import NotDicom
    from relay.gateway.mime import MimeError
    from relay.gateway.peers import DirectoryError
    from relay.gateway.pgp import PgpError
    from relay.gateway.transport import TransportError

    if isinstance(e, NotDicom):
        return (str(e).replace(" Use force=True to force reading.", "")
                + " (nothing was sent: name only DICOM files or folders)")
    if isinstance(e, (CliError, GatewayError, DirectoryError)):
        return str(e)
    if isinstance(e, TransportError):
        text = str(e)
        if "STARTTLS" in text:
            return (f"{text} (the relay offers no STARTTLS: ask its operator to set [tls] cert/key, "
                    "or set starttls = false for a relay on this machine)")
        if "uthenticat" in text or " 535" in text:
            return f"{text} (check password / password_file; the relay operator sets it with relay user passwd)"
        return f"{text} (is the relay up, and are smtp / imap / pop3 in the configuration right?)"
    if isinstance(e, PgpError):
        return f"{e} (check secret_key and passphrase_file; `gpg --list-packets` shows what a key file holds)"
    if isinstance(e, MimeError):
        return f"broken MIME: {e}"
    if isinstance(e, OSError):
        name = f"{e.filename}: " if getattr(e, "filename", None) else ""
        return f"{name}{e.strerror or e} (check the path and its permissions)"
    return (f"unexpected {type(e).__name__}: {e} (nothing accepted was lost; report it with the "
            "command you ran)")


def _one_line_errors(name: str, fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Every `relay gateway` command: an error is one line on stderr and exit 1, never a
    traceback (a configuration error is relay.cli's: exit 2)."""
    @functools.wraps(fn)
    def run(args: argparse.Namespace) -> int:
        from relay.config import ConfigError
        try:
            return fn(args)
        except (ConfigError, KeyboardInterrupt, SystemExit):
            raise
        except Exception as e:  # noqa: BLE001  (the one place that turns errors into a line)
            logmod.get_logger("gateway.cli").debug("command_failed", command=name, exc_info=e)
            print(f"relay gateway {name}: {' '.join(_hint(e).split())}", file=sys.stderr)
            return 1
    return run


def _gateway(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from relay.config import ConfigError
    from relay.gateway.config import load
    from relay.gateway.core import Gateway
    from relay.gateway.pgp import PgpError

    if not args.config:
        raise ConfigError("relay gateway needs --config GW.toml (the gateway's own file)")
    logmod.setup("text", "DEBUG" if getattr(args, "verbose", False) else "INFO")
    cfg = load(args.config)
    for key in ("secret_key", "directory_key", "password_file", "passphrase_file", "tls_ca"):
        path = getattr(cfg, key)
        if path is not None and not path.is_file():
            raise ConfigError(f"{key}: {path}: no such file")
    try:
        return Gateway(cfg)
    except PgpError as e:
        raise ConfigError(f"secret_key: {e}") from None


def _send(args: argparse.Namespace) -> int:
    from relay.gateway import send
    from relay.gateway.core import GatewayError
    from relay.gateway.dicommime import NotDicom
    from relay.gateway.pgp import PgpError
    from relay.gateway.transport import TransportError

    with _gateway(args) as gw:
        try:
            reports = send.send_paths(gw, args.to, args.paths)
        except (GatewayError, NotDicom, PgpError, TransportError, FileNotFoundError) as e:
            print(f"relay gateway send: {_hint(e)}", file=sys.stderr)
            return 1
        for r in reports:
            print(f"sent study {r.study_uid} to {args.to}: {r.files} files, {r.dicom_bytes} bytes, "
                  f"{r.parts} message(s) by {r.method}, message-id {r.message_id}")
            print("  seconds: " + " ".join(f"{k}={v:.3f}" for k, v in r.seconds.items())
                  + f" message_bytes={r.message_bytes}")
    return 0


def _receiver(gw, pacs: bool = True, directory_only: bool = False):  # type: ignore[no-untyped-def]
    from relay.gateway import transport
    from relay.gateway.receive import Receiver

    push = None
    if pacs and gw.cfg.pacs:
        from relay.gateway.pacs import push_study

        def push(folder: Path) -> str | None:
            try:
                push_study(gw.cfg, folder)
            except Exception as e:  # noqa: BLE001  (imported already; the PACS push is retried by hand)
                logmod.get_logger("gateway.pacs").error("pacs_push_failed", study=folder.name, error=str(e))
                return str(e)
            if not gw.cfg.keep_after_store:
                import shutil
                shutil.rmtree(folder, ignore_errors=True)
            return None
    return Receiver(gw, transport.open_source(gw.cfg), push, directory_only=directory_only)


def _print_summary(s) -> None:  # type: ignore[no-untyped-def]
    print(f"imported {s.n_imported} stud{'y' if s.n_imported == 1 else 'ies'}, "
          f"quarantined {s.n_quarantined}, MDNs {s.mdns}, receipts sent {s.mdns_sent}, parts held {s.parts_held}, "
          f"directory updates {s.directory_updates}"
          + (f", failed {s.failed} (left in the mailbox, retried)" if s.failed else ""))
    if s.earlier_imported or s.earlier_quarantined:
        print(f"  (the last {len(s.imported)} imported and {len(s.quarantined)} quarantined are listed)")
    for study in s.imported:
        print(f"  imported {study}")
    if s.seconds:
        print("  seconds: " + " ".join(f"{k}={v:.3f}" for k, v in s.seconds.items())
              + f" bytes_fetched={s.bytes_fetched}")
    for folder, reason in s.quarantined:
        print(f"  quarantined {folder}: {reason}")


class _Stop(BaseException):
    """SIGTERM/SIGINT while the receiver waits for mail."""


def _receive(args: argparse.Namespace) -> int:
    from relay.gateway.transport import TransportError

    with _gateway(args) as gw:
        try:
            rc = _receiver(gw)
        except TransportError as e:
            print(f"relay gateway receive: {_hint(e)}", file=sys.stderr)
            return 1
        try:
            if args.once:
                try:
                    s = rc.run_once()
                except (TransportError, OSError) as e:      # the relay went away mid-round
                    _print_summary(rc.summary)
                    print(f"relay gateway receive: {_hint(e)}", file=sys.stderr)
                    return 1
                _print_summary(s)
                return 1 if s.quarantined or s.failed else 0
            stop = threading.Event()

            def on_signal(*_: object) -> None:
                stop.set()
                if rc.waiting:          # blocked in IDLE or a poll sleep: leave at once
                    raise _Stop

            signal.signal(signal.SIGTERM, on_signal)
            signal.signal(signal.SIGINT, on_signal)
            try:
                rc.run_forever(stop.is_set)
            except _Stop:
                pass
            _print_summary(rc.summary)
            return 0
        finally:
            rc.source.close()


def _status(args: argparse.Namespace) -> int:
    """Sent studies: UNCONFIRMED (no MDN yet), OVERDUE (none after `unconfirmed_after`),
    REFUSED (a negative MDN), confirmed. Exit 1 when any is OVERDUE or REFUSED (for a check
    script), else 0."""
    with _gateway(args) as gw:
        now = time.time()
        rows = [r for r in gw.state.sent() if args.all or r.confirmed_at is None or r.refused]
        if not rows:
            print("all sent studies are confirmed" if not args.all else "nothing sent yet")
        attention = 0
        for r in rows:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.sent_at))
            if r.refused:
                state = "REFUSED"
            elif r.confirmed_at:
                state = f"confirmed {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(r.confirmed_at))}"
            else:
                state = "OVERDUE" if now - r.sent_at > gw.cfg.unconfirmed_after else "UNCONFIRMED"
            attention += state in ("REFUSED", "OVERDUE")
            print(f"{when}  {state:<30} {r.recipient:<28} {r.files:>5} files  {r.study_uid}  {r.message_id}"
                  + (f"\n    {r.disposition}" if r.refused or (args.all and r.disposition
                                                             and r.disposition != "processed"
                                                             and r.confirmed_at) else ""))
        if attention:
            print(f"{attention} stud{'y needs' if attention == 1 else 'ies need'} attention: OVERDUE = no "
                  f"receipt after {gw.cfg.unconfirmed_after / 3600:g} h (ask the receiving site; send it "
                  "again), REFUSED = the receiver quarantined it (the line below it says why)")
    return 1 if attention else 0


def _directory(args: argparse.Namespace) -> int:
    from relay.gateway import transport
    from relay.gateway.peers import DirectoryError
    from relay.gateway.receive import DIRECTORY_REFUSED

    with _gateway(args) as gw:
        before = gw.directory.serial
        if args.file:
            data = Path(args.file).read_bytes()
            sig = Path(args.file + ".asc").read_bytes()
            try:
                gw.directory.accept(data, sig)
            except DirectoryError as e:
                print(f"relay gateway directory: refused: {e}", file=sys.stderr)
                return 1
        else:
            from relay.gateway.message import envelope_headers
            from relay.gateway.mime import new_message_id

            # the command in the Subject too: the directory reads the Subject first (docs/directory.md)
            cmd = f"GET SINCE {before}" if before >= 0 else "GET"
            mid = new_message_id(gw.cfg.domain)
            raw = (envelope_headers(gw.cfg.address, gw.cfg.directory_mailbox, mid, cmd)
                   + f"Content-Type: text/plain\r\n\r\n{cmd}\r\n".encode())
            # studies and receipts waiting in the mailbox are left to `receive`
            rc = _receiver(gw, pacs=False, directory_only=True)
            rc.note_get(mid)
            try:
                with transport.smtp_session(gw.cfg) as smtp:
                    smtp.send(gw.cfg.address, gw.cfg.directory_mailbox, [raw], size=len(raw))
            except transport.TransportError as e:
                rc.source.close()
                if "RCPT" not in str(e):
                    raise
                raise CliError(f"{e} (is `{gw.cfg.directory_mailbox}` the directory's address on this "
                               "relay? ask the relay operator and set directory_address)") from None
            try:
                deadline = time.monotonic() + args.wait
                while rc.summary.directory_replies == 0 and time.monotonic() < deadline:
                    rc.run_once()
                    if rc.summary.directory_replies == 0:
                        time.sleep(0.2)
            finally:
                rc.source.close()
            if rc.summary.directory_replies == 0:
                print(f"relay gateway directory: no answer from {gw.cfg.directory_mailbox} within "
                      f"{args.wait:g} s (is this gateway an active participant?)", file=sys.stderr)
                return 1
            refused = [folder for folder, reason in rc.summary.quarantined if reason == DIRECTORY_REFUSED]
            if refused and gw.directory.serial <= before:
                raise CliError(f"the answer was refused and quarantined ({refused[-1]}: reason.txt says "
                               "why); compare directory_key with the operator's fingerprint")
        print(f"directory serial {gw.directory.serial} (was {before}), "
              f"{len(gw.directory.peers)} participants")
        for peer, left in gw.directory.expiring():
            when = time.strftime("%Y-%m-%d", time.gmtime(peer.expires or 0))
            state = "EXPIRED" if left <= 0 else f"expires in {left / 86400:.0f} days"
            print(f"  key of {peer.address} {state} ({when}): the relay operator rotates it"
                  " (relay participant update --key)")
        return 0 if gw.directory.serial >= 0 else 1


def _pacs_listen(args: argparse.Namespace) -> int:
    from relay.gateway import send
    from relay.gateway.pacs import StorageScp

    with _gateway(args) as gw:
        to = args.to or gw.cfg.send_to
        if not to:
            print("relay gateway pacs-listen: no recipient (--to or send_to in the config)", file=sys.stderr)
            return 2

        def forward(folder: Path) -> None:
            for r in send.send_paths(gw, to, [folder]):
                print(f"sent study {r.study_uid} to {to}: {r.files} files", flush=True)

        scp = StorageScp(gw.cfg, forward)
        scp.start()
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        signal.signal(signal.SIGINT, lambda *_: stop.set())
        stop.wait()
        scp.stop()
    return 0


def _pacs_push(args: argparse.Namespace) -> int:
    from relay.gateway.core import GatewayError
    from relay.gateway.pacs import push_study

    with _gateway(args) as gw:
        if not Path(args.folder).is_dir():
            raise CliError(f"{args.folder}: no such study folder (they are {gw.cfg.inbox}/<StudyInstanceUID>)")
        if not gw.cfg.pacs:
            raise CliError("no PACS configured: set pacs = \"HOST:PORT\" and pacs_ae in the configuration")
        try:
            n = push_study(gw.cfg, Path(args.folder))
        except GatewayError as e:
            print(f"relay gateway pacs-push: {e}", file=sys.stderr)
            return 1
    print(f"pushed {n} files to {gw.cfg.pacs_ae}@{gw.cfg.pacs}")
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    g = sub.add_parser("gateway", help="the DICOM e-mail gateway (send, receive, status, PACS link)")
    gsub = g.add_subparsers(dest="gateway_command", metavar="COMMAND", parser_class=type(g))
    gsub.required = True

    p = gsub.add_parser("send", help="send DICOM files or folders, one message per study")
    p.add_argument("--to", required=True, metavar="ADDRESS", help="the receiving gateway's address")
    p.add_argument("paths", nargs="+", metavar="PATH", help="DICOM files or folders")
    p.set_defaults(func=_send)

    p = gsub.add_parser("receive", help="fetch, verify, decrypt and import studies; send MDNs")
    p.add_argument("--once", action="store_true", help="handle what is waiting and exit")
    p.set_defaults(func=_receive)

    p = gsub.add_parser("status", help="sent studies still waiting for their MDN")
    p.add_argument("--all", action="store_true", help="confirmed ones too")
    p.set_defaults(func=_status)

    p = gsub.add_parser("directory", help="fetch the signed directory by e-mail (or adopt a file)")
    p.add_argument("--file", metavar="JSON", help="adopt this directory.json (+ .asc beside it)")
    p.add_argument("--wait", type=float, default=60.0, metavar="S", help="how long to wait for the reply")
    p.set_defaults(func=_directory)

    p = gsub.add_parser("pacs-listen", help="DICOM Storage SCP: forward studies pushed by a PACS")
    p.add_argument("--to", metavar="ADDRESS", help="recipient (default: send_to from the config)")
    p.set_defaults(func=_pacs_listen)

    p = gsub.add_parser("pacs-push", help="C-STORE a received study folder to the PACS")
    p.add_argument("folder", metavar="FOLDER")
    p.set_defaults(func=_pacs_push)

    for name, parser in gsub.choices.items():
        parser.set_defaults(func=_one_line_errors(name, parser.get_default("func")))
