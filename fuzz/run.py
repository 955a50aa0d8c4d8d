"""Coverage-guided fuzzing of one target with atheris (libFuzzer): `pip install -e '.[fuzz]'`.

    python fuzz/run.py smtp -runs=2000000            # or imap, pop3, mime
    python fuzz/run.py imap -max_total_time=3600 /tmp/imap-work   # new inputs there
    python fuzz/run.py imap crash-<sha1>                           # replay a finding

The seed corpus is fuzz/corpus/<target>/ (real client sessions, see fuzz/README.md), always
read last; new inputs that reach new code go into the first directory argument, by default
fuzz/work/<target>/ (ignored by git). A crash is written to ./crash-<sha1> and stops the run;
turn it into a pure-bytes regression test in tests/test_hostile_input.py.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import atheris

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

with atheris.instrument_imports():
    from fuzz.targets import TARGETS


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.exit(f"usage: {sys.argv[0]} {{{','.join(TARGETS)}}} [libFuzzer options] [corpus dirs]")
    name = sys.argv[1]
    args = [sys.argv[0], *sys.argv[2:]]
    paths = [a for a in args[1:] if not a.startswith("-")]
    if not any(os.path.isfile(p) for p in paths):         # not replaying crash files
        if not paths:
            work = HERE / "work" / name                   # new inputs go here (not in git)
            work.mkdir(parents=True, exist_ok=True)
            args.append(str(work))
        args.append(str(HERE / "corpus" / name))          # the seeds, read only
    atheris.Setup(args, TARGETS[name])
    atheris.Fuzz()


if __name__ == "__main__":
    main()
