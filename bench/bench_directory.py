#!/usr/bin/env python3
"""Directory benchmark (not a test): the figures behind docs/decisions.md "Directory".

  (a) directory key candidates with pgpy: Ed25519 vs RSA 3072 - key generation, signing a
      40 KB document, verifying, signature size (medians; the raw alternative side by side);
  (b) check_public_key per participant key;
  (c) a document of N participants (default 200): size, build + sign, verify_document.

    python3 bench/bench_directory.py [--participants 200]

Everything lives in a temporary directory that is removed at the end.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

warnings.simplefilter("ignore")
import pgpy  # type: ignore[import-untyped]
from pgpy.constants import EllipticCurveOID, HashAlgorithm, KeyFlags, PubKeyAlgorithm  # type: ignore[import-untyped]


def key_candidates() -> None:
    data = b"x" * 40_000
    rows = {}
    for name, alg, size, n in (("ed25519", PubKeyAlgorithm.EdDSA, EllipticCurveOID.Ed25519, 20),
                               ("rsa3072", PubKeyAlgorithm.RSAEncryptOrSign, 3072, 10)):
        gen, sign, verify = [], [], []
        for _ in range(n):
            t = time.perf_counter()
            k = pgpy.PGPKey.new(alg, size)
            k.add_uid(pgpy.PGPUID.new("d", email="d@x.test"), usage={KeyFlags.Sign},
                      hashes=[HashAlgorithm.SHA512])
            gen.append(time.perf_counter() - t)
            t = time.perf_counter()
            sig = k.sign(data)
            sign.append(time.perf_counter() - t)
            t = time.perf_counter()
            assert k.pubkey.verify(data, sig)
            verify.append(time.perf_counter() - t)
        rows[name] = (statistics.median(gen), max(gen), statistics.median(sign),
                      statistics.median(verify), len(bytes(sig)))
    ed = rows["ed25519"]
    for name, (g, gmax, s, v, n) in rows.items():
        print(f"{name:8} keygen {g * 1e3:8.1f} ms (max {gmax * 1e3:.0f})  sign {s * 1e3:7.1f} ms  "
              f"verify {v * 1e3:5.1f} ms  signature {n} B  | sign x{s / ed[2]:.0f} of ed25519")


def documents(n: int, tmp: Path) -> None:
    from conftest import make_config
    from test_directory_keys import make_key, public

    from relay.directory import verify_document
    from relay.directory.core import Directory
    from relay.directory.keys import check_public_key
    from relay.store import Store

    cfg = make_config(tmp)
    store = Store.open(cfg)
    d = Directory(cfg, store)
    keys = [public(make_key(f"gw{i}@x.test")) for i in range(n)]
    t = time.perf_counter()
    infos = [check_public_key(k) for k in keys]
    per_key = (time.perf_counter() - t) / n
    for i, info in enumerate(infos):
        d.registry.add(f"gw{i}@x.test", info)
    d.signed()                                   # the key is made here, not measured
    d._signed = None
    t = time.perf_counter()
    s = d.signed()
    build = time.perf_counter() - t
    t = time.perf_counter()
    verify_document(s.json, s.signature, d.key.public_armored())
    verify = time.perf_counter() - t
    print(f"check_public_key {per_key * 1e3:.1f} ms/key; {n}-participant document {len(s.json)} B, "
          f"build + sign {build * 1e3:.0f} ms, verify_document {verify * 1e3:.0f} ms")
    d.close()
    store.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--participants", type=int, default=200)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-directory-"))
    try:
        key_candidates()
        documents(args.participants, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
