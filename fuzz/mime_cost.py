"""CPU cost of hostile messages in the MIME scanner (the figures of docs/decisions.md, issue 12).

    python fuzz/mime_cost.py

For each shape: the time to build the tree (relay.mimetree.parse, with line counts) and to render
ENVELOPE and BODYSTRUCTURE, as one FETCH of the message would, in this process.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from relay import mimetree  # noqa: E402
from relay.protocol.imap import render  # noqa: E402


def shapes() -> dict[str, bytes]:
    rfc822 = b"From: leaf@x.test\r\n\r\nleaf\r\n"
    for i in range(3000):
        rfc822 = b"From: (c) a@b.test\r\nContent-Type: message/rfc822\r\n\r\n" + rfc822
    fat_part = b"--z\r\n" + b"a: b\r\n" * 20000 + b"\r\nx\r\n"
    return {
        "From: with 3000 nested '('": b"From: " + b"(" * 3000 + b"\r\n\r\nx",
        "To: with 5000 nested groups": b"To: " + b"a:" * 5000 + b"\r\n\r\nx",
        "message/rfc822 nested 3000 deep": rfc822,
        "20000 parts": (b"Content-Type: multipart/mixed; boundary=z\r\n\r\n"
                        + b"--z\r\nContent-Type: text/plain\r\n\r\npart\r\n" * 20000 + b"--z--\r\n"),
        "1 MiB header of short fields": b"a: b\r\n" * 170000 + b"\r\nx",
        "200 parts with 120 KiB headers (24 MB)": (b"Content-Type: multipart/mixed; boundary=z\r\n\r\n"
                                                   + fat_part * 200 + b"--z--\r\n"),
    }


def main() -> None:
    path = os.path.join(tempfile.mkdtemp(prefix="relay-mime-cost-"), "m")
    for name, data in shapes().items():
        with open(path, "wb") as f:
            f.write(data)
        t0 = time.perf_counter()
        try:                            # an older tree may raise: say so, go on with the next
            root = mimetree.parse(path)
            t1 = time.perf_counter()
            env = render(mimetree.envelope(root))
            bs = mimetree.bodystructure(root)
            t2 = time.perf_counter()
        except Exception as e:  # noqa: BLE001 - reported, this is a measuring script
            print(f"{name:42s} {len(data) / 1e6:7.2f} MB  raised {type(e).__name__}")
            continue
        print(f"{name:42s} {len(data) / 1e6:7.2f} MB  tree {t1 - t0:6.3f} s  "
              f"ENVELOPE+BODYSTRUCTURE {t2 - t1:6.3f} s  ({len(env) + len(bs)} octets)")
    os.unlink(path)


if __name__ == "__main__":
    main()
