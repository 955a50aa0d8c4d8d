#!/usr/bin/env python3
"""Does numpy earn its place as a runtime dependency? (issue 11; docs/decisions.md, "Gateway
throughput (issue 15)").

The gateway's only use of numpy is putting CRLFs into base64 (relay/gateway/mime.py
_b64_lines: 76-character lines inside, 64-character armor lines outside). This measures
  1. the line breaking alone, MB/s of input: numpy's reshape against the best standard-library
     ways (b"\\r\\n".join of slices, base64.encodebytes, a b2a_base64 call per line);
  2. the gateway's send data path (DICOM files -> MIME -> gpg -> armor -> message file, real
     gpg) with each, as CPU seconds of this process and of gpg, median of --runs.

    python3 bench/bench_b64_lines.py                 # 300 MB study, 3 runs each (~1-2 min)
"""

from __future__ import annotations

import argparse
import base64
import binascii
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from relay.config import parse_size
from relay.gateway import dicommime, mime
from relay.gateway import message as M
from relay.gateway.pgp import Keyring, generate_key
from relay.gateway.synthetic import synthetic_study

NUMPY_LINES = mime._b64_lines


def join_lines(data: bytes, line: int = mime.B64_LINE) -> bytes:
    width = line // 3 * 4
    enc = binascii.b2a_base64(data, newline=False)
    return b"\r\n".join([enc[i:i + width] for i in range(0, len(enc), width)]) + b"\r\n" if enc else b""


def encodebytes_lines(data: bytes, line: int = mime.B64_LINE) -> bytes:
    assert line == mime.B64_LINE        # encodebytes knows only 76-character lines
    return base64.encodebytes(data).replace(b"\n", b"\r\n")


def per_line(data: bytes, line: int = mime.B64_LINE) -> bytes:
    b2a = binascii.b2a_base64
    return b"".join([b2a(data[i:i + line], newline=False) + b"\r\n" for i in range(0, len(data), line)])


WAYS = {"numpy reshape": NUMPY_LINES, "stdlib join of slices": join_lines,
        "stdlib encodebytes": encodebytes_lines, "stdlib b2a per line": per_line}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="300MB", help="DICOM bytes of the study (default 300MB)")
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    size = parse_size(a.size, "--size")

    data = os.urandom(mime.B64_BLOCK * 64)
    ref = NUMPY_LINES(data[:mime.B64_BLOCK])
    print(f"line breaking alone, {len(data) / 1e6:.0f} MB in blocks of {mime.B64_BLOCK} (best of {a.runs}):")
    for name, way in WAYS.items():
        assert way(data[:mime.B64_BLOCK]) == ref, name
        best = min(_cpu(lambda w=way: [w(data[i:i + mime.B64_BLOCK]) for i in range(0, len(data), mime.B64_BLOCK)])
                   for _ in range(a.runs))
        print(f"  {name:<24} {len(data) / 1e6 / best:6.0f} MB/s")

    base = Path(tempfile.mkdtemp(prefix="bench-b64-"))
    try:
        sec, _ = generate_key(base / "key", "bench <b64@bench.test>")
        (base / "sec.asc").write_text(sec)              # bench fixture key
        ring = Keyring(base / "ring", base / "sec.asc")
        files = synthetic_study(base / "study", n=4, rows=512, cols=512, frames=max(1, size // (4 * 512 * 512 * 2)))
        insts = next(iter(dicommime.group_studies(files).values()))
        dicom = sum(f.stat().st_size for f in files)
        got: dict[str, list[tuple[float, float, float]]] = {}
        for _ in range(a.runs):
            for name in ("numpy reshape", "stdlib join of slices"):
                mime._b64_lines = WAYS[name]            # type: ignore[assignment]
                c0, t = os.times(), time.monotonic()
                M.build_encrypted(dicommime.study_chunks(insts), base / "msg", ring, ring.fingerprint,
                                  "a@bench.test", "b@bench.test", "<1@bench.test>")
                c1, wall = os.times(), time.monotonic() - t
                got.setdefault(name, []).append((c1.user - c0.user + c1.system - c0.system,
                                                 c1.children_user - c0.children_user
                                                 + c1.children_system - c0.children_system, wall))
        mime._b64_lines = NUMPY_LINES
        print(f"\nsend data path, {dicom / 1e6:.0f} MB study -> {(base / 'msg').stat().st_size / 1e6:.0f} MB message"
              f" (median of {a.runs}):")
        for name, v in got.items():
            py, gpg, wall = (statistics.median(x[i] for x in v) for i in range(3))
            print(f"  {name:<24} this process {py:5.2f} CPU s, gpg {gpg:5.2f} CPU s, total {py + gpg:5.2f},"
                  f" wall {wall:5.2f} s")
        ring.close()
        return 0
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _cpu(f: object) -> float:
    assert callable(f)
    t = time.process_time()
    f()
    return time.process_time() - t


if __name__ == "__main__":
    sys.exit(main())
