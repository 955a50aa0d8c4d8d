"""The lock files against pyproject.toml and against what pip really installs.

requirements-dev.lock (runtime + the test and bench extras) is what .ci/run installs;
requirements.lock (runtime only, the same versions) is what the image installs. Both are written
by .ci/lock. Offline: every pin is exact, within pyproject's ranges, and the two files agree.
Online (the package index, as CI has): pip, in a fresh virtualenv, resolves the very install
commands of .ci/run and of the Dockerfile; the set it would install must be the lock, and every
requirement of every package in it must be pinned in range. This is the test that fails when a
dependency floats (a lock missing a package, or CI installing unlocked versions)."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path
from typing import Any

import pytest
from opsutil import ROOT, instructions, run
from packaging.requirements import Requirement
from packaging.utils import NormalizedName, canonicalize_name
from packaging.version import Version

RUNTIME_LOCK = ROOT / "requirements.lock"
DEV_LOCK = ROOT / "requirements-dev.lock"
CI_RUN = ROOT / ".ci" / "run"
PIN = re.compile(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)")
RESOLVE_TIMEOUT = 300        # s per pip resolution: index round trips on a loaded machine

Pins = dict[NormalizedName, Version]


def read_lock(path: Path) -> Pins:
    pins: Pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = PIN.fullmatch(line)
        assert m, f"{path.name}: not an exact pin without markers: {line!r}"
        name = canonicalize_name(m.group(1))
        assert name not in pins, f"{path.name}: {name} pinned twice"
        pins[name] = Version(m.group(2))
    return pins


def project() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]  # type: ignore[no-any-return]


def in_range(req: Requirement, pins: Pins, where: str) -> None:
    name = canonicalize_name(req.name)
    assert name in pins, f"{req} is not in {where}"
    assert req.specifier.contains(pins[name], prereleases=True), f"{where} pins {name}=={pins[name]}, outside {req}"


def test_locks_are_exact_pins_and_agree() -> None:
    runtime, dev = read_lock(RUNTIME_LOCK), read_lock(DEV_LOCK)
    assert runtime and dev
    assert runtime.keys() <= dev.keys(), sorted(runtime.keys() - dev.keys())
    assert {n: v for n, v in dev.items() if n in runtime} == runtime
    assert canonicalize_name(project()["name"]) not in dev


def test_every_declared_dependency_is_pinned_within_its_range() -> None:
    runtime, dev = read_lock(RUNTIME_LOCK), read_lock(DEV_LOCK)
    proj = project()
    for raw in proj["dependencies"]:
        in_range(Requirement(raw), runtime, RUNTIME_LOCK.name)
        in_range(Requirement(raw), dev, DEV_LOCK.name)
    for extra, deps in proj["optional-dependencies"].items():
        for raw in deps:
            in_range(Requirement(raw), dev, f"{DEV_LOCK.name} (extra {extra})")
    # what the relay does not import at run time stays out of the image
    assert "aiosmtpd" in dev and "aiosmtpd" not in runtime
    assert "aiofiles" not in dev


def pip_command(line: str, marker: str) -> list[str]:
    """The arguments after `marker` (`... pip install`) on that line, shell-split."""
    head, found, args = line.partition(marker)
    assert found, line
    return shlex.split(args.split("&&")[0])


def ci_install_args() -> list[str]:
    (line,) = [ln for ln in CI_RUN.read_text().splitlines() if re.match(r"python -m pip install ", ln)]
    return pip_command(line, "pip install")


def image_install_args() -> list[str]:
    (args,) = [a for op, a in instructions() if op == "RUN" and "requirements.lock" in a]
    return pip_command(args, "/opt/relay/bin/pip install")


@pytest.fixture(scope="module")
def fresh_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A new virtualenv with nothing but pip (the one its Python bundles, as .ci/run's)."""
    venv = tmp_path_factory.mktemp("fresh") / "venv"
    p = run([sys.executable, "-m", "venv", str(venv)], timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    return venv / "bin" / "python"


def resolve(python: Path, args: list[str], report: Path) -> list[dict[str, Any]]:
    """What `pip install ARGS` would install into that virtualenv (pip's --dry-run --report)."""
    args = [a for a in args if a not in ("-q", "--quiet")]
    env = {k: v for k, v in os.environ.items() if k not in ("PIP_REQUIRE_VIRTUALENV", "VIRTUAL_ENV")}
    p = subprocess.run([str(python), "-m", "pip", "install", "--dry-run", "--quiet",
                        "--report", str(report), *args],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=RESOLVE_TIMEOUT, check=False)
    assert p.returncode == 0, f"pip could not resolve {args} (needs the package index):\n{p.stderr[-3000:]}"
    return json.loads(report.read_text())["install"]  # type: ignore[no-any-return]


def check_closed(items: list[dict[str, Any]], pins: Pins, where: str) -> None:
    """Every requirement of every package to be installed (with the extras it was asked for,
    markers evaluated here) is pinned in range: the lock covers the whole dependency tree."""
    for item in items:
        meta = item["metadata"]
        extras = {canonicalize_name(e) for e in item.get("requested_extras") or []}
        for raw in meta.get("requires_dist") or []:
            req = Requirement(raw)
            if req.marker and not any(req.marker.evaluate({"extra": e}) for e in extras | {""}):
                continue
            if canonicalize_name(req.name) == canonicalize_name(meta["name"]):
                continue          # a package's own extras (name[extra] requiring name[other])
            in_range(req, pins, f"{where} (required by {meta['name']})")


def resolved_pins(items: list[dict[str, Any]]) -> Pins:
    own = canonicalize_name(project()["name"])
    out = {canonicalize_name(i["metadata"]["name"]): Version(i["metadata"]["version"]) for i in items}
    out.pop(own, None)
    return out


def test_ci_install_in_a_fresh_virtualenv_is_exactly_the_dev_lock(fresh_python: Path, tmp_path: Path) -> None:
    args = ci_install_args()
    assert args[args.index("-c") + 1] == DEV_LOCK.name, args
    items = resolve(fresh_python, args, tmp_path / "report.json")
    pins = read_lock(DEV_LOCK)
    got = resolved_pins(items)
    assert {n: str(v) for n, v in got.items() if pins.get(n) != v} == {}, "resolved but not locked as such"
    assert sorted(pins.keys() - got.keys()) == [], "locked but not needed"
    assert canonicalize_name(project()["name"]) in {canonicalize_name(i["metadata"]["name"]) for i in items}
    check_closed(items, pins, DEV_LOCK.name)


def test_image_install_in_a_fresh_virtualenv_is_exactly_the_runtime_lock(fresh_python: Path, tmp_path: Path) -> None:
    args = image_install_args()
    assert args[args.index("-r") + 1] == RUNTIME_LOCK.name, args
    items = resolve(fresh_python, args, tmp_path / "report.json")
    pins = read_lock(RUNTIME_LOCK)
    assert resolved_pins(items) == pins
    # the project's runtime requirements, without extras, are inside it too
    for raw in project()["dependencies"]:
        in_range(Requirement(raw), pins, RUNTIME_LOCK.name)
    check_closed(items, pins, RUNTIME_LOCK.name)


def test_ci_run_not_as_root_names_the_missing_debian_packages() -> None:
    """Where dpkg knows none of DEBS and we are not root, .ci/run installs nothing and says in
    one line what to install. (A copy of the script in a folder anyone may read: as root, the
    test runs it as nobody.)"""
    with tempfile.TemporaryDirectory() as tmp:
        top = Path(tmp)
        top.chmod(0o755)
        (top / ".ci").mkdir()
        shutil.copy(CI_RUN, top / ".ci" / "run")
        fake = top / "bin"
        fake.mkdir()
        for tool, body in (("dpkg", "exit 1"), ("apt-get", "echo apt-get ran >&2")):
            (fake / tool).write_text(f"#!/bin/sh\n{body}\n")
            (fake / tool).chmod(0o755)
        cmd = ["bash", str(top / ".ci" / "run")]
        if os.geteuid() == 0:
            cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--", *cmd]
        p = run(cmd, env={"PATH": f"{fake}:/usr/bin:/bin", "HOME": tmp}, timeout=60)
    debs = re.search(r"^DEBS=\((.*)\)$", CI_RUN.read_text(), re.MULTILINE).group(1).split()  # type: ignore[union-attr]
    assert p.returncode != 0
    assert p.stdout == "" and "apt-get ran" not in p.stderr
    (line,) = p.stderr.splitlines()
    assert line.startswith(".ci/run: missing Debian packages; as root run: apt-get install "), line
    assert line.split("apt-get install ", 1)[1].split()[: len(debs)] == debs
