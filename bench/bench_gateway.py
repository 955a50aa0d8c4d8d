#!/usr/bin/env python3
"""Gateway benchmark (issue 15, item 5): a study through `relay gateway send` and `receive`,
side by side with the gpg CLI on the same DICOM bytes in the same run, plus what compression
and a binary inner encoding would save on smooth CT-like pixel data.

Each run (a new study each time, --runs of them, medians reported):
  gpg CLI    `gpg -e -s -a -z 0` on the study's DICOM bytes (the files concatenated), then
             `gpg -d` of that: the reference the gateway is held to
  send       `relay gateway send`: DICOM files -> MIME (base64) -> gpg's stdin; gpg's binary
             output -> armor -> the message file (stage "encrypt"), then SMTP (stage "send")
  receive    `relay gateway receive --once` (IMAP): fetch, reassemble message/partial, then
             de-armor -> gpg -> MIME decode -> DICOM files (stage "decrypt"), import
  MDN        `relay gateway receive --once` at the sender: the study shows as confirmed
Ratio = gpg CLI seconds / gateway seconds (>= 0.8 is the target): for the data path (the
stages gpg's work sits in: encrypt; decrypt+import) and for the whole command (with SMTP/IMAP,
message/partial and process start). CPU = user+sys of the command and its gpg children.
Peak RSS: /usr/bin/time %M of each command.

Then the compression/encoding table on the first --table-size of the study: the MIME entity
(base64 or binary parts) through `gpg -e -s -a` with zlib/bzip2 levels; wire = the armored
message's bytes (CRLF) / DICOM bytes; CPU = gpg's user+sys to encrypt / to decrypt.

The pixel data is a smooth CT-like phantom (body, fat, lungs, spine, 20 HU noise; zlib-1 takes
it to ~0.52, pydicom's real CT_small.dcm to 0.64): compression figures on random bytes would
say nothing. Not a test; run it by hand (needs the `bench` extra: numpy):

    python3 bench/bench_gateway.py                      # 300 MB study, 3 runs (~3 min)
    python3 bench/bench_gateway.py --size 1GB --runs 3  # the 1 GB case of issue 15 (~10 min)

Everything lives in a temporary directory that is removed at the end (--keep to keep it).
"""

from __future__ import annotations

import argparse
import bz2
import hashlib
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from relay.config import parse_size
from relay.gateway import dicommime
from relay.gateway.pgp import generate_key
from relay.gateway.synthetic import synthetic_study

CT, RAD = "ct@bench.test", "rad@bench.test"
PASSWORD = "bench-password"         # benchmark fixture only
MB = 1e6


TIME_FMT = "BENCH_TIME wall=%e cpu_user=%U cpu_sys=%S maxrss_kb=%M"


def timed(cmd: list[str], stdin: str | None = None) -> tuple[subprocess.CompletedProcess[str], dict[str, float]]:
    """Run cmd under /usr/bin/time: (the result, {wall, cpu, rss_mib})."""
    r = subprocess.run(["/usr/bin/time", "-f", TIME_FMT, *cmd], input=stdin, capture_output=True,
                       text=True, timeout=3600, check=False)
    m = re.search(r"BENCH_TIME wall=([\d.]+) cpu_user=([\d.]+) cpu_sys=([\d.]+) maxrss_kb=(\d+)", r.stderr)
    t = ({"wall": float(m.group(1)), "cpu": float(m.group(2)) + float(m.group(3)),
          "rss_mib": int(m.group(4)) / 1024} if m else {})
    return r, t


def relay_cmd(*args: str, stdin: str | None = None, ok: tuple[int, ...] = (0,)) -> tuple[str, dict[str, float]]:
    """Run `relay ...` under /usr/bin/time: (stdout, {wall, cpu, rss_mib})."""
    r, t = timed([sys.executable, "-m", "relay", *args], stdin)
    if r.returncode not in ok:
        raise SystemExit(f"relay {' '.join(args)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r.stdout, t


def gpg_cmd(home: Path, *args: str) -> dict[str, float]:
    r, t = timed(["gpg", "--homedir", str(home), "--batch", "--yes", "--trust-model", "always", *args])
    if r.returncode != 0:
        raise SystemExit(f"gpg {' '.join(args)} failed: {r.stderr[-1000:]}")
    return t


STAGES = ("encrypt", "send", "fetch", "reassemble", "decrypt", "import")


def seconds(out: str) -> dict[str, float]:
    found: dict[str, float] = {}
    for line in out.splitlines():
        if line.strip().startswith("seconds:"):
            for k, v in re.findall(r"(\w+)=([\d.]+)", line):
                if k in STAGES:
                    found[k] = found.get(k, 0.0) + float(v)
    return found


_RNG = np.random.default_rng(15)


def ct_frame(z: int, rows: int = 512, cols: int = 512) -> bytes:
    """One CT-like slice, stored values = HU + 1024 in 12 of 16 bits: air, a body ellipse with
    smooth soft-tissue texture, a fat rim, two lungs, the spine, 20 HU noise in the body."""
    y, x = np.mgrid[0:rows, 0:cols].astype(np.float32)
    cy, cx = rows / 2, cols / 2
    r = ((x - cx) / (0.46 * cols)) ** 2 + ((y - cy) / (0.36 * rows)) ** 2
    hu = np.full((rows, cols), -1000, np.float32)
    body = r < 1
    hu[body] = 40 + 15 * np.sin(x[body] / 17 + z / 5) * np.cos(y[body] / 23)
    hu[body & (r > 0.85)] = -100
    lungs = (((x - cx * 0.6) / (0.13 * cols)) ** 2 + ((y - cy) / (0.22 * rows)) ** 2 < 1) | \
            (((x - cx * 1.4) / (0.13 * cols)) ** 2 + ((y - cy) / (0.22 * rows)) ** 2 < 1)
    hu[lungs] = -850
    hu[((x - cx) ** 2 + (y - cy * 1.45) ** 2) < (0.05 * cols) ** 2] = 700
    noise = _RNG.normal(0, 20, (rows, cols)).astype(np.float32)
    hu[body] += noise[body]
    hu[~body] += noise[~body] / 4
    return np.clip(hu + 1024, 0, 4095).astype("<u2").tobytes()


def ct_study(folder: Path, n: int, frames: int) -> list[Path]:
    """n multi-frame objects of one new study with the phantom's pixel data."""
    return synthetic_study(folder, n=n, rows=512, cols=512, frames=frames,
                           pixels=lambda i: b"".join(ct_frame(i * frames + z) for z in range(frames)))


def concat(files: list[Path], out: Path) -> None:
    with open(out, "wb") as o:
        for f in files:
            with open(f, "rb") as src:
                shutil.copyfileobj(src, o, 1 << 20)


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


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def table(base: Path, files: list[Path], home_enc: Path, home_dec: Path, rcpt: str, limit: int) -> None:
    """What compression and a binary inner encoding would save: gpg over the MIME entity of the
    first `limit` bytes of the study (whole frames of the first object)."""
    from pydicom import dcmread
    src = files[0]
    part = base / "table" / src.name
    part.parent.mkdir()
    ds = dcmread(src)
    frame = int(ds.Rows) * int(ds.Columns) * 2
    keep = max(1, min(int(ds.NumberOfFrames), limit // frame))
    ds.NumberOfFrames = keep
    ds.PixelData = ds.PixelData[:keep * frame]
    ds.save_as(part, enforce_file_format=True)
    dicom_bytes = part.stat().st_size
    insts = next(iter(dicommime.group_studies([part]).values()))
    real = Path(__import__("pydicom.data", fromlist=["x"]).get_testdata_file("CT_small.dcm", download=False))
    rb = real.read_bytes()
    print(f"\ncompression/encoding on {dicom_bytes / MB:.0f} MB of the phantom study (zlib-1 of its"
          f" DICOM bytes: {len(zlib.compress(part.read_bytes(), 1)) / dicom_bytes:.2f}; pydicom's real"
          f" CT_small.dcm: zlib-1 {len(zlib.compress(rb, 1)) / len(rb):.2f}, zlib-6"
          f" {len(zlib.compress(rb, 6)) / len(rb):.2f}, bzip2-9 {len(bz2.compress(rb, 9)) / len(rb):.2f})")
    print(f"{'inner':<7} {'gpg compression':<16} {'wire/DICOM':>10} {'enc CPU s':>9} {'enc MB/s':>8}"
          f" {'dec CPU s':>9} {'dec MB/s':>8}")
    for enc in dicommime.INNER_ENCODINGS:
        entity = base / "table" / f"entity.{enc}"
        dicommime.write_study(insts, entity, enc)
        for algo, level in (("none", 0), ("zlib", 1), ("zlib", 6), ("bzip2", 1), ("bzip2", 9)):
            out = base / "table" / "out.asc"
            args = ["-z", str(level)] + (["--compress-algo", algo] if level else [])
            te = gpg_cmd(home_enc, "-e", "-s", "-a", *args, "-r", rcpt, "-o", str(out), str(entity))
            with open(out, "rb") as f:
                wire = sum(len(line) + 1 for line in f)      # CRLF on the wire
            td = gpg_cmd(home_dec, "-o", "/dev/null", "-d", str(out))
            name = "none (-z 0)" if not level else f"{algo} -z {level}"
            print(f"{enc:<7} {name:<16} {wire / dicom_bytes:10.2f} {te['cpu']:9.2f}"
                  f" {dicom_bytes / MB / te['cpu']:8.0f} {td['cpu']:9.2f} {dicom_bytes / MB / td['cpu']:8.0f}")
        entity.unlink()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="300MB", help="DICOM bytes per study (default 300MB)")
    ap.add_argument("--files", type=int, default=4, help="objects in the study (default 4)")
    ap.add_argument("--runs", type=int, default=3, help="studies sent, for the medians (default 3)")
    ap.add_argument("--split-size", default="64MiB", help="message/partial size (default 64MiB)")
    ap.add_argument("--table-size", default="48MB", help="DICOM bytes for the compression table (0: none)")
    ap.add_argument("--inner-encoding", default="base64", choices=dicommime.INNER_ENCODINGS,
                    help="the gateways' inner_encoding (default base64)")
    ap.add_argument("--compress-level", type=int, default=0, help="the gateways' compress_level (default 0)")
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
                f'split_size = "{a.split_size}"\ninner_encoding = "{a.inner_encoding}"\n'
                f"compress_level = {a.compress_level}\n")
            cfgs[addr] = d / "gw.toml"
        # the directory pushes at setup are drained first, so that receive measures the study
        # (a push older than the document exported last is quarantined: exit 1)
        relay_cmd("gateway", "receive", "--once", "--config", str(cfgs[RAD]), ok=(0, 1))
        relay_cmd("gateway", "receive", "--once", "--config", str(cfgs[CT]), ok=(0, 1))
        # the gpg CLI's keyrings: the same keys as the two gateways
        homes = {}
        for addr, peer in ((CT, RAD), (RAD, CT)):
            h = base / "cli" / addr.split("@")[0]
            h.mkdir(parents=True, mode=0o700)
            subprocess.run(["gpg", "--homedir", str(h), "--batch", "--import"], input=keys[addr].encode()
                           + (base / f"{peer}.pub").read_bytes(), capture_output=True, check=True)
            homes[addr] = h
        rad_fpr = subprocess.run(["gpg", "--homedir", str(homes[CT]), "--with-colons", "--list-keys", RAD],
                                 capture_output=True, text=True, check=True).stdout
        rad_fpr = re.findall(r"^fpr:+([0-9A-F]{40}):", rad_fpr, re.M)[0]

        # --- the runs ------------------------------------------------------------------------
        frame = 512 * 512 * 2
        frames = max(1, size // (a.files * frame))
        rows: dict[str, list[float]] = {}

        def add(key: str, value: float) -> None:
            rows.setdefault(key, []).append(value)
        ok = True
        files: list[Path] = []
        dicom_bytes = 0
        for run in range(1, a.runs + 1):
            t = time.monotonic()
            files = ct_study(base / f"study{run}", a.files, frames)
            dicom_bytes = sum(f.stat().st_size for f in files)
            print(f"run {run}: {a.files} objects, {dicom_bytes / MB:.0f} MB ({time.monotonic() - t:.1f} s to make)",
                  flush=True)
            concat(files, base / "raw.dcm")
            g = gpg_cmd(homes[CT], "-e", "-s", "-a", "-z", "0", "-r", rad_fpr, "-o", str(base / "raw.asc"),
                        str(base / "raw.dcm"))
            for k in ("wall", "cpu", "rss_mib"):
                add(f"gpg_enc_{k}", g[k])
            out, t_send = relay_cmd("gateway", "send", "--config", str(cfgs[CT]), "--to", RAD, str(base / f"study{run}"))
            for k, v in seconds(out).items():
                add(f"send_{k}", v)
            for k in ("wall", "cpu", "rss_mib"):
                add(f"send_cmd_{k}", t_send[k])
            parts = re.search(r"(\d+) message\(s\)", out)
            wire = re.search(r"message_bytes=(\d+)", out)
            add("wire", int(wire.group(1)) / dicom_bytes if wire else float("nan"))
            g = gpg_cmd(homes[RAD], "-o", str(base / "raw.out"), "-d", str(base / "raw.asc"))
            for k in ("wall", "cpu", "rss_mib"):
                add(f"gpg_dec_{k}", g[k])
            for p in ("raw.dcm", "raw.asc", "raw.out"):
                (base / p).unlink()
            out, t_recv = relay_cmd("gateway", "receive", "--once", "--config", str(cfgs[RAD]))
            for k, v in seconds(out).items():
                add(f"recv_{k}", v)
            for k in ("wall", "cpu", "rss_mib"):
                add(f"recv_cmd_{k}", t_recv[k])
            if "imported 1 study" not in out:
                raise SystemExit(f"receive did not import the study:\n{out}")
            _, t_mdn = relay_cmd("gateway", "receive", "--once", "--config", str(cfgs[CT]), ok=(0, 1))
            add("mdn_cmd_rss_mib", t_mdn["rss_mib"])
            status = relay_cmd("gateway", "status", "--config", str(cfgs[CT]))[0]
            same = sorted(tree_digest(base / f"study{run}")) == sorted(tree_digest(base / "rad" / "received"))
            confirmed = "all sent studies are confirmed" in status
            ok = ok and same and confirmed
            print(f"  byte-identical after import: {same}; MDN: {'confirmed' if confirmed else 'NOT confirmed'};"
                  f" parts: {parts.group(1) if parts else '?'} x {a.split_size}", flush=True)
            if run < a.runs:
                shutil.rmtree(base / f"study{run}")
            shutil.rmtree(base / "rad" / "received", ignore_errors=True)

        # --- report (medians) ------------------------------------------------------------------
        m = {k: median(v) for k, v in rows.items()}

        def mbs(sec: float) -> float:
            return dicom_bytes / MB / sec if sec else float("nan")
        print(f"\nmedians of {a.runs} run(s), {dicom_bytes / MB:.0f} MB of DICOM, inner encoding "
              f"{a.inner_encoding}, compress_level {a.compress_level} (gpg CLI: -z 0);"
              f" MB/s = 10^6 DICOM bytes/s; ratio = gpg CLI s / gateway s")
        print(f"{'':<44} {'gateway s':>9} {'MB/s':>7} {'gpg s':>7} {'MB/s':>7} {'ratio':>6}")
        lines = [
            ("send, data path (encrypt: MIME+gpg+armor)", m.get("send_encrypt", 0), m["gpg_enc_wall"]),
            ("send, command wall (+SMTP, start-up)", m["send_cmd_wall"], m["gpg_enc_wall"]),
            ("send, command CPU (with gpg)", m["send_cmd_cpu"], m["gpg_enc_cpu"]),
            ("receive, data path (decrypt + import)", m.get("recv_decrypt", 0) + m.get("recv_import", 0),
             m["gpg_dec_wall"]),
            ("receive, command wall (+IMAP, reassembly)", m["recv_cmd_wall"], m["gpg_dec_wall"]),
            ("receive, command CPU (with gpg)", m["recv_cmd_cpu"], m["gpg_dec_cpu"]),
        ]
        for name, mine, ref in lines:
            print(f"{name:<44} {mine:9.2f} {mbs(mine):7.1f} {ref:7.2f} {mbs(ref):7.1f} {ref / mine:6.2f}")
        stages = "  ".join(f"{k.split('_', 1)[1]} {v:.2f} s" for k, v in m.items()
                           if k.startswith(("send_", "recv_")) and "_cmd_" not in k)
        print(f"stages: {stages}; on the wire: {m['wire']:.2f} x the DICOM bytes")
        print(f"peak RSS: send {m['send_cmd_rss_mib']:.0f} MiB, receive {m['recv_cmd_rss_mib']:.0f} MiB, "
              f"MDN receive {m['mdn_cmd_rss_mib']:.0f} MiB, gpg CLI {m['gpg_enc_rss_mib']:.0f}/"
              f"{m['gpg_dec_rss_mib']:.0f} MiB (study {dicom_bytes / 2**20:.0f} MiB)")
        if parse_size(a.table_size, "--table-size"):
            table(base, files, homes[CT], homes[RAD], rad_fpr, parse_size(a.table_size, "--table-size"))
        return 0 if ok else 1
    finally:
        if serve is not None:
            serve.terminate()
            serve.wait(30)
        for d in [*base.glob("*/state/gnupg"), *base.glob("cli/*"), *base.glob("keys/*")]:
            subprocess.run(["gpgconf", "--homedir", str(d), "--kill", "gpg-agent"], capture_output=True, check=False)
        if a.keep:
            print(f"kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
