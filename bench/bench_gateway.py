#!/usr/bin/env python3
"""Gateway benchmark (issue 8, item 6): one big study through the whole path, MB/s per stage
and the peak memory of each gateway process, side by side with the machine's raw limits
measured in the same run.

One run:
  setup    `relay serve` (subprocess) on free loopback ports, two participants and the signed
           directory made with the relay's own CLI, gateway keys made with gpg (bench fixtures)
  send     `relay gateway send`: mime (base64 into application/dicom parts), encrypt (gpg
           sign+encrypt, armored, via python-gnupg), send (SMTP, BDAT when offered; split into
           message/partial of split_size)
  receive  `relay gateway receive --once` (IMAP): fetch (partial FETCH into files),
           reassemble, decrypt (gpg decrypt+verify), import (base64 decode, DICOM check, fsync)
  MDN      `relay gateway receive --once` at the sender: the study shows as confirmed
  raw      cp of the study (disk read+write), a loopback socket into a file (sendfile), and
           gpg itself (`gpg --sign --encrypt --armor` / `--decrypt` on the same MIME entity)
  memory   each gateway process's peak RSS (/usr/bin/time %M), next to the study size

MB/s = 10^6 bytes of DICOM per second of that stage. Not a test; run it by hand:

    python3 bench/bench_gateway.py                  # 1 GB study (4 multi-frame CT objects)
    python3 bench/bench_gateway.py --size 200MB --split-size 64MiB

Everything lives in a temporary directory that is removed at the end (--keep to keep it).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from relay.config import parse_size
from relay.gateway.pgp import generate_key
from relay.gateway.synthetic import synthetic_study

CT, RAD = "ct@bench.test", "rad@bench.test"
PASSWORD = "bench-password"         # benchmark fixture only
MB = 1e6


def relay_cmd(*args: str, stdin: str | None = None, timed: bool = False) -> tuple[str, str, int]:
    """Run `relay ...`; with timed, under /usr/bin/time and return the peak RSS in KiB."""
    cmd = [sys.executable, "-m", "relay", *args]
    if timed:
        cmd = ["/usr/bin/time", "-f", "MAXRSS_KB=%M", *cmd]
    r = subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=3600, check=False)
    if r.returncode not in (0,):
        raise SystemExit(f"relay {' '.join(args)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    m = re.search(r"MAXRSS_KB=(\d+)", r.stderr)
    return r.stdout, r.stderr, int(m.group(1)) if m else 0


def seconds(out: str) -> dict[str, float]:
    found: dict[str, float] = {}
    for line in out.splitlines():
        if line.strip().startswith("seconds:"):
            for k, v in re.findall(r"(\w+)=([\d.]+)", line):
                found[k] = found.get(k, 0.0) + float(v)
    return found


def raw_loopback(path: Path, dst: Path) -> float:
    """Seconds to push `path` through a loopback socket into `dst` (sendfile -> recv_into)."""
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]

    def serve() -> None:
        conn, _ = srv.accept()
        with conn, open(path, "rb") as f:
            conn.sendfile(f)
    t = threading.Thread(target=serve)
    t.start()
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", port)) as c, open(dst, "wb") as out:
        buf = bytearray(1 << 20)
        view = memoryview(buf)
        while n := c.recv_into(buf):
            out.write(view[:n])
    took = time.monotonic() - start
    t.join()
    srv.close()
    dst.unlink()
    return took


def tree_digest(folder: Path) -> dict[str, str]:
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h = hashlib.sha256()
            with open(p, "rb") as f:
                while b := f.read(1 << 20):
                    h.update(b)
            out[h.hexdigest()] = p.name
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1GB", help="DICOM bytes in the study (default 1GB)")
    ap.add_argument("--files", type=int, default=4, help="objects in the study (default 4)")
    ap.add_argument("--split-size", default="64MiB", help="message/partial size (default 64MiB)")
    ap.add_argument("--dir", default=None, help="work directory (default: a new temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    a = ap.parse_args()
    size = parse_size(a.size, "--size")
    base = Path(tempfile.mkdtemp(prefix="bench-gw-", dir=a.dir))
    serve = None
    try:
        # --- the relay -----------------------------------------------------------------------
        (base / "relay.toml").write_text(
            f'data_dir = "{base / "relay"}"\nhostname = "relay.bench.test"\n'
            '[smtp]\nlisten = ["127.0.0.1:0"]\nmax_message_size = "8GiB"\n'
            '[imap]\nlisten = ["127.0.0.1:0"]\n[pop3]\nlisten = ["127.0.0.1:0"]\n'
            '[metrics]\nlisten = "127.0.0.1:0"\n[quota]\ndefault_bytes = "64GiB"\n')
        serve = subprocess.Popen([sys.executable, "-m", "relay", "serve", "--config", str(base / "relay.toml")],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        lj = base / "relay" / "run" / "listeners.json"
        deadline = time.monotonic() + 60
        while not lj.exists():
            if time.monotonic() > deadline or serve.poll() is not None:
                raise SystemExit("relay serve did not start")
            time.sleep(0.1)
        ports = json.loads(lj.read_text())
        smtp, imap = ports["smtp"][0][1], ports["imap"][0][1]
        keys = {}
        for addr in (CT, RAD):
            sec, pub = generate_key(base / "keys" / addr.split("@")[0], f"bench gateway <{addr}>")
            keys[addr] = sec
            (base / f"{addr}.pub").write_text(pub)
            relay_cmd("participant", "add", addr, "--key", str(base / f"{addr}.pub"), "--password-stdin",
                      "--config", str(base / "relay.toml"), stdin=PASSWORD + "\n")
        relay_cmd("directory", "export", str(base / "dir"), "--config", str(base / "relay.toml"))
        (base / "directory.asc").write_text(relay_cmd("directory", "key", "--config", str(base / "relay.toml"))[0])
        cfgs = {}
        for addr in (CT, RAD):
            d = base / addr.split("@")[0]
            d.mkdir()
            (d / "gateway.sec.asc").write_text(keys[addr])      # bench fixture key
            (d / "gw.toml").write_text(
                f'address = "{addr}"\npassword = "{PASSWORD}"\nsecret_key = "gateway.sec.asc"\n'
                f'smtp = "127.0.0.1:{smtp}"\nimap = "127.0.0.1:{imap}"\n'
                f'directory = "{base / "dir" / "directory.json"}"\ndirectory_key = "{base / "directory.asc"}"\n'
                f'split_size = "{a.split_size}"\n')
            cfgs[addr] = d / "gw.toml"
        # the directory pushes at setup are drained first, so that receive measures the study
        relay_cmd("gateway", "receive", "--once", "--config", str(cfgs[RAD]))
        relay_cmd("gateway", "receive", "--once", "--config", str(cfgs[CT]))

        # --- the study -----------------------------------------------------------------------
        frame = 512 * 512 * 2
        frames = max(1, size // (a.files * frame))
        t = time.monotonic()
        files = synthetic_study(base / "study", n=a.files, rows=512, cols=512, frames=frames)
        dicom_bytes = sum(f.stat().st_size for f in files)
        print(f"study: {a.files} objects, {dicom_bytes / MB:.0f} MB ({time.monotonic() - t:.1f} s to make)")

        # --- raw limits, same run ---------------------------------------------------------------
        t = time.monotonic()
        shutil.copytree(base / "study", base / "copy")
        os.sync()
        raw_disk = dicom_bytes / MB / (time.monotonic() - t)
        shutil.rmtree(base / "copy")
        raw_net = files[0].stat().st_size / MB / raw_loopback(files[0], base / "loop")
        from relay.gateway import dicommime
        from relay.gateway.pgp import Keyring
        insts = next(iter(dicommime.group_studies(files).values()))
        dicommime.write_study(insts, base / "entity")
        ring = Keyring(base / "rawgpg", base / "ct" / "gateway.sec.asc")
        rad_fpr = ring.import_public((base / f"{RAD}.pub").read_text())[0]
        gpg = ["gpg", "--homedir", str(ring.home), "--batch", "--yes", "--trust-model", "always",
               "--compress-level", "0"]           # as the gateway's default compress_level
        t = time.monotonic()
        subprocess.run([*gpg, "--armor", "--sign", "--encrypt", "-r", rad_fpr, "-o", str(base / "raw.asc"),
                        str(base / "entity")], check=True, capture_output=True)
        raw_gpg_enc = dicom_bytes / MB / (time.monotonic() - t)
        ring.close()
        rad_ring = Keyring(base / "rawgpg-rad", base / "rad" / "gateway.sec.asc")
        rad_ring.import_public((base / f"{CT}.pub").read_text())
        t = time.monotonic()
        subprocess.run(["gpg", "--homedir", str(rad_ring.home), "--batch", "--yes", "-o", str(base / "raw.out"),
                        "--decrypt", str(base / "raw.asc")], check=True, capture_output=True)
        raw_gpg_dec = dicom_bytes / MB / (time.monotonic() - t)
        rad_ring.close()
        for p in (base / "entity", base / "raw.asc", base / "raw.out"):
            p.unlink()

        # --- the path ------------------------------------------------------------------------
        t = time.monotonic()
        out, err, rss_send = relay_cmd("gateway", "send", "--config", str(cfgs[CT]), "--to", RAD,
                                       str(base / "study"), timed=True)
        wall_send = time.monotonic() - t
        s_send = seconds(out)
        parts = re.search(r"(\d+) message\(s\)", out)
        t = time.monotonic()
        out, err, rss_recv = relay_cmd("gateway", "receive", "--once", "--config", str(cfgs[RAD]), timed=True)
        wall_recv = time.monotonic() - t
        s_recv = seconds(out)
        if "imported 1 study" not in out:
            raise SystemExit(f"receive did not import the study:\n{out}\n{err}")
        _, _, rss_mdn = relay_cmd("gateway", "receive", "--once", "--config", str(cfgs[CT]), timed=True)
        status = relay_cmd("gateway", "status", "--config", str(cfgs[CT]))[0]
        same = sorted(tree_digest(base / "study")) == sorted(tree_digest(base / "rad" / "received"))

        # --- report --------------------------------------------------------------------------
        def rate(sec: float) -> float:
            return dicom_bytes / MB / sec if sec else float("nan")
        rows = [
            ("mime (base64 parts)", s_send.get("mime", 0), raw_disk, "disk copy"),
            ("encrypt (gpg sign+encrypt, armored)", s_send.get("encrypt", 0), raw_gpg_enc, "gpg CLI"),
            ("send (SMTP)", s_send.get("send", 0), raw_net, "loopback"),
            ("fetch (IMAP partial FETCH)", s_recv.get("fetch", 0), raw_net, "loopback"),
            ("reassemble (message/partial)", s_recv.get("reassemble", 0), raw_disk, "disk copy"),
            ("decrypt (gpg decrypt+verify)", s_recv.get("decrypt", 0), raw_gpg_dec, "gpg CLI"),
            ("import (decode, DICOM check, fsync)", s_recv.get("import", 0), raw_disk, "disk copy"),
        ]
        print(f"\n{'stage':<38} {'s':>7} {'MB/s':>8} {'raw MB/s':>9}  ratio  (raw)")
        for name, sec, raw, what in rows:
            r = rate(sec)
            print(f"{name:<38} {sec:7.2f} {r:8.1f} {raw:9.1f}  {r / raw:5.2f}  ({what})")
        print(f"{'send command, wall':<38} {wall_send:7.2f} {rate(wall_send):8.1f}")
        print(f"{'receive command, wall':<38} {wall_recv:7.2f} {rate(wall_recv):8.1f}")
        print(f"\nparts: {parts.group(1) if parts else '?'} x {a.split_size}")
        print(f"peak RSS: send {rss_send / 1024:.0f} MiB, receive {rss_recv / 1024:.0f} MiB, "
              f"MDN receive {rss_mdn / 1024:.0f} MiB (study {dicom_bytes / 2**20:.0f} MiB; "
              f"ratio send {rss_send * 1024 / dicom_bytes:.3f}, receive {rss_recv * 1024 / dicom_bytes:.3f})")
        print(f"byte-identical after import: {same}; MDN: "
              f"{'confirmed' if 'all sent studies are confirmed' in status else 'NOT confirmed'}")
        return 0 if same and "all sent studies are confirmed" in status else 1
    finally:
        if serve is not None:
            serve.terminate()
            serve.wait(30)
        for d in [*base.glob("*/state/gnupg"), *base.glob("rawgpg*"), *base.glob("keys/*")]:
            subprocess.run(["gpgconf", "--homedir", str(d), "--kill", "gpg-agent"], capture_output=True, check=False)
        if a.keep:
            print(f"kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
