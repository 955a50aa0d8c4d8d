"""`relay participant ...` and `relay directory ...` round trips, bad input, and the exported
document checked by stock gpg (and refused by it after tampering)."""

from __future__ import annotations

import datetime
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_directory_keys import gpg, make_key, public, write_key

from relay.cli import main
from relay.config import Config
from relay.store import Store


@pytest.fixture
def cfg(tmp_path: Path) -> Path:
    path = tmp_path / "relay.toml"
    path.write_text(f'data_dir = "{tmp_path / "data"}"\nhostname = "relay.test"\n')
    return path


def run(cfg: Path, capsys: pytest.CaptureFixture[str], *argv: str, stdin: str = "") -> tuple[int, str, str]:
    capsys.readouterr()
    old = sys.stdin
    sys.stdin = io.StringIO(stdin)
    try:
        rc = main([*argv, "--config", str(cfg)])
    finally:
        sys.stdin = old
    out, err = capsys.readouterr()
    return rc, out, err


def test_round_trip(cfg: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key_file, key = write_key(tmp_path / "ct.asc", "ct@hospital.test")
    fpr = str(key.fingerprint).replace(" ", "")
    rc, out, err = run(cfg, capsys, "participant", "add", "CT@Hospital.test", "--key", str(key_file),
                       "--name", "CT Nord", "--org", "Klinikum Müller", "--role", "hospital",
                       "--contact", "pacs@hospital.test", "--password-stdin", "--quota-bytes", "2GiB",
                       stdin="s3cret\n")
    assert (rc, err) == (0, "") and f"added ct@hospital.test ({fpr}); directory serial 1" in out
    assert (tmp_path / "data" / "mail" / "hospital.test" / "ct" / "new").is_dir()   # its mailbox
    store = Store.open(Config(data_dir=tmp_path / "data"))
    try:
        assert store.accounts.verify("ct@hospital.test", "s3cret")
        assert store.accounts.get("ct@hospital.test").quota_bytes == 2 * 1024**3   # type: ignore[union-attr]
        assert store.accounts.get("directory@hospital.test") is not None   # the directory's own
    finally:
        store.close()
    rc, out, _ = run(cfg, capsys, "participant", "show", "ct@hospital.test")
    assert rc == 0 and "org:         Klinikum Müller" in out and f"fingerprint: {fpr}" in out
    assert "quota bytes: 2147483648" in out and "push:        yes" in out
    rc, out, _ = run(cfg, capsys, "participant", "show", "ct@hospital.test", "--key")
    assert "-----BEGIN PGP PUBLIC KEY BLOCK-----" in out

    mr_file, mr = write_key(tmp_path / "mr.asc", "mr@praxis.test")
    spaced = " ".join(str(mr.fingerprint).lower().split())      # as read out on the phone
    assert run(cfg, capsys, "participant", "add", "mr@praxis.test", "--key", str(mr_file),
               "--role", "practice", "--fingerprint", spaced)[0] == 0
    rc, out, _ = run(cfg, capsys, "participant", "list")
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["ADDRESS", "STATUS", "ROLE", "FINGERPRINT"]
    assert [ln.split()[0] for ln in lines[1:3]] == ["ct@hospital.test", "mr@praxis.test"]
    assert lines[-1] == "2 participant(s); directory serial 2"

    new_file, new = write_key(tmp_path / "ct2.asc", "ct@hospital.test",
                              expires=datetime.timedelta(days=400))
    rc, out, _ = run(cfg, capsys, "participant", "update", "ct@hospital.test", "--key", str(new_file),
                     "--push", "no", "--role", "teleradiology-centre")
    assert rc == 0 and "directory serial 3" in out
    rc, out, _ = run(cfg, capsys, "participant", "update", "ct@hospital.test", "--role", "teleradiology-centre")
    assert rc == 0 and "nothing changed; directory serial 3" in out
    rc, out, _ = run(cfg, capsys, "participant", "show", "ct@hospital.test")
    assert str(new.fingerprint).replace(" ", "") in out and "push:        no" in out
    assert "role:        teleradiology-centre" in out and "key expires: 20" in out

    assert run(cfg, capsys, "participant", "suspend", "mr@praxis.test")[1].startswith("mr@praxis.test is suspended")
    export = tmp_path / "export"
    assert run(cfg, capsys, "directory", "export", str(export))[0] == 0
    doc = json.loads((export / "directory.json").read_bytes())
    assert doc["serial"] == 4 and [p["address"] for p in doc["participants"]] == ["ct@hospital.test"]
    assert doc["participants"][0]["quota_bytes"] == 2 * 1024**3
    assert run(cfg, capsys, "participant", "resume", "mr@praxis.test")[0] == 0

    rc, out, _ = run(cfg, capsys, "participant", "remove", "mr@praxis.test", "--keep-mail")
    assert rc == 0 and "account and mail kept" in out and "serial 6" in out
    assert run(cfg, capsys, "participant", "remove", "ct@hospital.test")[0] == 0
    store = Store.open(Config(data_dir=tmp_path / "data"))
    try:
        assert store.accounts.get("mr@praxis.test") is not None
        assert store.accounts.get("ct@hospital.test") is None
    finally:
        store.close()


def test_bad_input_exits_1_with_a_clear_error(cfg: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    ago = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=30)
    files = {
        "secret": (tmp_path / "s.asc", str(make_key("a@x.test"))),
        "junk": (tmp_path / "j.asc", "this is not a key\n"),
        "revoked": (tmp_path / "r.asc", public(make_key("a@x.test", revoke=True))),
        "expired": (tmp_path / "e.asc", public(make_key("a@x.test", created=ago,
                                                        expires=datetime.timedelta(days=1)))),
        "signonly": (tmp_path / "o.asc", public(make_key("a@x.test", encrypt=False))),
    }
    for path, text in files.values():
        path.write_text(text)
    expect = {"secret": "SECRET key", "junk": "malformed key", "revoked": "revoked key",
              "expired": "expired key", "signonly": "no valid encryption-capable subkey"}
    for name, (path, _) in files.items():
        rc, out, err = run(cfg, capsys, "participant", "add", "a@x.test", "--key", str(path))
        assert rc == 1 and out == "" and expect[name] in err and err.startswith(f"relay: {path}:"), name
    rc, _, err = run(cfg, capsys, "participant", "add", "a@x.test", "--key", str(tmp_path / "missing.asc"))
    assert rc == 1 and "No such file" in err

    good, _ = write_key(tmp_path / "g.asc", "a@x.test")
    assert run(cfg, capsys, "participant", "add", "a@x.test", "--key", str(good))[0] == 0
    cases = [
        (["participant", "add", "A@X.TEST", "--key", str(good)], "already a participant"),
        (["participant", "add", "b@x.test", "--key", str(good)], "already belongs to a@x.test"),
        (["participant", "add", "directory@x.test", "--key", str(write_key(tmp_path / "d.asc", "d@x.test")[0])],
         "the directory's own address"),
        (["participant", "add", "not-an-address", "--key", str(write_key(tmp_path / "n.asc", "n@x.test")[0])],
         "not a plain e-mail address"),
        (["participant", "add", "f@x.test", "--key", str(write_key(tmp_path / "f.asc", "f@x.test")[0]),
          "--fingerprint", "0" * 40], "not the key you were told"),
        (["participant", "update", "a@x.test", "--fingerprint", "0" * 40], "checks the key given with --key"),
        (["participant", "show", "nobody@x.test"], "not a participant"),
        (["participant", "update", "nobody@x.test", "--name", "x"], "not a participant"),
        (["participant", "update", "a@x.test", "--quota-bytes", "lots"], "not a size"),
        (["participant", "update", "a@x.test", "--name", "two\nlines"], "control characters"),
        (["participant", "suspend", "nobody@x.test"], "not a participant"),
        (["participant", "remove", "nobody@x.test"], "not a participant"),
    ]
    for argv, message in cases:
        rc, _, err = run(cfg, capsys, *argv)
        assert rc == 1 and message in err, (argv, err)
    # an account made by `relay user add` is adopted only on request
    store = Store.open(Config(data_dir=tmp_path / "data"))
    store.accounts.add("u@x.test")
    store.close()
    ukey, _ = write_key(tmp_path / "u.asc", "u@x.test")
    rc, _, err = run(cfg, capsys, "participant", "add", "u@x.test", "--key", str(ukey))
    assert rc == 1 and "--adopt" in err
    assert run(cfg, capsys, "participant", "add", "u@x.test", "--key", str(ukey), "--adopt")[0] == 0
    assert run(cfg, capsys, "participant", "list")[1].splitlines()[-1] == "2 participant(s); directory serial 2"
    with pytest.raises(SystemExit):          # argparse: bad role is a usage error (exit 2)
        run(cfg, capsys, "participant", "update", "a@x.test", "--role", "clinic")


def test_exported_document_verifies_with_gpg_and_fails_after_tampering(cfg: Path, tmp_path: Path) -> None:
    """The real commands, as an operator runs them."""
    def relay(*argv: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([sys.executable, "-m", "relay", *argv, "--config", str(cfg)],
                              capture_output=True, timeout=60, check=False,
                              cwd=Path(__file__).resolve().parents[1])
    key_file, _ = write_key(tmp_path / "ct.asc", "ct@hospital.test")
    assert relay("participant", "add", "ct@hospital.test", "--key", str(key_file)).returncode == 0
    out = tmp_path / "out"
    assert relay("directory", "export", str(out)).returncode == 0
    pub = relay("directory", "key").stdout
    assert pub.startswith(b"-----BEGIN PGP PUBLIC KEY BLOCK-----")
    home = tmp_path / "gnupg"
    assert gpg(home, "--import", input=pub).returncode == 0
    ok = gpg(home, "--status-fd", "1", "--verify", str(out / "directory.json.asc"), str(out / "directory.json"))
    assert ok.returncode == 0 and b"GOODSIG" in ok.stdout
    doc = (out / "directory.json").read_bytes()
    (out / "directory.json").write_bytes(doc.replace(b'"serial":1', b'"serial":9'))
    bad = gpg(home, "--status-fd", "1", "--verify", str(out / "directory.json.asc"), str(out / "directory.json"))
    assert bad.returncode != 0 and b"BADSIG" in bad.stdout
    # the key is never in the export, and lives 0600 under the data dir
    assert sorted(p.name for p in out.iterdir()) == ["directory.json", "directory.json.asc"]
    assert oct((tmp_path / "data" / "directory" / "directory.sec.asc").stat().st_mode & 0o777) == "0o600"
