"""The gateway's own configuration file: keys, defaults, paths, errors that name the key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from relay.config import ConfigError
from relay.gateway.config import from_dict, load

BASE = {"address": "ct@hospital.test", "secret_key": "gw.sec.asc", "directory_key": "dir.asc"}


def test_contract_keys_and_relative_paths(tmp_path: Path) -> None:
    f = tmp_path / "gw.toml"
    f.write_text('address = "ct@hospital.test"\npassword = "pw"\nsecret_key = "gateway.sec.asc"\n'
                 'smtp = "127.0.0.1:2525"\nimap = "127.0.0.1:1143"\ninbox = "received"\n'
                 'quarantine = "/var/q"\ndirectory_key = "directory.asc"\nsplit_size = "8MiB"\n')
    cfg = load(f)
    assert cfg.address == "ct@hospital.test" and cfg.get_password() == "pw"
    assert cfg.secret_key == tmp_path / "gateway.sec.asc"
    assert cfg.inbox == tmp_path / "received" and cfg.quarantine == Path("/var/q")
    assert cfg.state_dir == tmp_path / "state"
    assert cfg.split_size == 8 * 1024**2 and cfg.smtp_addr == ("127.0.0.1", 2525)
    assert cfg.directory_mailbox == "directory@hospital.test"
    assert cfg.compress_level == 0 and not cfg.accept_unsigned_mdn
    assert cfg.unconfirmed_after == 4 * 3600.0
    assert from_dict({**BASE, "unconfirmed_after": 600}, tmp_path).unconfirmed_after == 600.0


def test_password_file_first_line(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("s3cret\nignored\n")
    cfg = from_dict({**BASE, "password_file": "pw"}, tmp_path)
    assert cfg.get_password() == "s3cret"


@pytest.mark.parametrize(("raw", "names"), [
    ({**BASE, "adress": "x"}, "adress"),
    ({**BASE, "split_size": "1KiB"}, "split_size"),
    ({**BASE, "split_size": "huge"}, "split_size"),
    ({**BASE, "smtp": "nohostport"}, "smtp"),
    ({**BASE, "compress_level": 12}, "compress_level"),
    ({**BASE, "quiet_period": "soon"}, "quiet_period"),
    ({**BASE, "unconfirmed_after": -1}, "unconfirmed_after"),
    ({**BASE, "keep_after_store": "yes"}, "keep_after_store"),
    ({k: v for k, v in BASE.items() if k != "secret_key"}, "secret_key"),
    ({k: v for k, v in BASE.items() if k != "directory_key"}, "directory_key"),
    ({**BASE, "address": "no-at-sign"}, "address"),
])
def test_errors_name_the_key(raw: dict[str, object], names: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=names):
        from_dict(raw, tmp_path)


def test_cli_reports_configuration_errors(tmp_path: Path) -> None:
    f = tmp_path / "gw.toml"
    f.write_text('address = "ct@hospital.test"\nsecret_key = "k"\ndirectory_key = "d"\nsplitsize = 1\n')
    r = subprocess.run([sys.executable, "-m", "relay", "gateway", "status", "--config", str(f)],
                       capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 2 and "splitsize" in r.stderr
    r = subprocess.run([sys.executable, "-m", "relay", "gateway", "status"],
                       capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 2 and "--config" in r.stderr


def test_cli_reports_missing_and_unusable_key_files(tmp_path: Path) -> None:
    """An administrator's typo or a wrong file: one line naming the key, exit 2, no traceback."""
    f = tmp_path / "gw.toml"
    f.write_text('address = "ct@hospital.test"\npassword = "x"\nsecret_key = "gw.sec.asc"\n'
                 'directory_key = "directory.asc"\n')

    def status() -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "relay", "gateway", "status", "--config", str(f)],
                              capture_output=True, text=True, timeout=60, check=False)
    r = status()
    assert r.returncode == 2 and "secret_key" in r.stderr and "no such file" in r.stderr
    assert "Traceback" not in r.stderr
    (tmp_path / "gw.sec.asc").write_text("not a key\n")
    r = status()
    assert r.returncode == 2 and "directory_key" in r.stderr and "Traceback" not in r.stderr
    (tmp_path / "directory.asc").write_text("not a key either\n")
    r = status()
    assert r.returncode == 2 and "secret_key" in r.stderr and "no OpenPGP secret key" in r.stderr
    assert "Traceback" not in r.stderr
