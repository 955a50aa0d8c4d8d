"""`relay user ...` round trips through real processes (python -m relay, and the console script)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from relay import config as configmod
from relay.store import Store


@pytest.fixture
def conf(tmp_path: Path) -> Path:
    f = tmp_path / "relay.toml"
    f.write_text('data_dir = "data"\nhostname = "relay.test"\n[quota]\ndefault_bytes = "1GiB"\n')
    return f


def relay(conf: Path, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "relay", *args, "--config", str(conf)],
                          input=stdin, capture_output=True, text=True, timeout=60, check=False)


def open_store(conf: Path) -> Store:
    return Store.open(configmod.load(conf))


def test_add_list_passwd_del_round_trip(conf: Path) -> None:
    r = relay(conf, "user", "add", "Alice@Example.Test", "--password-stdin", stdin="s3cret\n")
    assert r.returncode == 0, r.stderr
    assert "alice@example.test" in r.stdout
    r = relay(conf, "user", "add", "scanner@example.test", "--quota-bytes", "2GiB", "--quota-messages", "10")
    assert r.returncode == 0 and "no password" in r.stdout
    r = relay(conf, "user", "list")
    assert r.returncode == 0
    lines = r.stdout.splitlines()
    assert lines[0].startswith("alice@example.test") and "1.0 GiB" in lines[0] and "unlimited" in lines[0]
    assert lines[1].startswith("scanner@example.test") and "2.0 GiB" in lines[1] and "/ 10 messages" in lines[1]
    s = open_store(conf)
    assert s.accounts.verify("alice@example.test", "s3cret")
    assert (s.data_dir / "mail" / "example.test" / "scanner" / "new").is_dir()
    r = relay(conf, "user", "passwd", "alice@example.test", "--password-stdin", stdin="n3w\n")
    assert r.returncode == 0, r.stderr
    assert s.accounts.verify("alice@example.test", "n3w")                   # at once, same Store
    assert not s.accounts.verify("alice@example.test", "s3cret")
    r = relay(conf, "user", "del", "alice@example.test")
    assert r.returncode == 0
    assert s.accounts.get("alice@example.test") is None
    assert not (s.data_dir / "mail" / "example.test" / "alice").exists()
    s.close()


@pytest.mark.parametrize("args, stdin, message", [
    (("user", "add", "not-an-address"), "", "not an e-mail address"),
    (("user", "add", "a@example.test", "--password-stdin"), "\n", "empty password"),
    (("user", "add", "a@example.test", "--quota-bytes", "lots"), "", "not a size"),
    (("user", "add", "a@example.test", "--quota-messages", "-3"), "", "non-negative"),
    (("user", "del", "nobody@example.test"), "", "no such account"),
    (("user", "passwd", "nobody@example.test", "--password-stdin"), "pw\n", "no such account"),
])
def test_errors_exit_nonzero_with_a_clear_message(conf: Path, args: tuple[str, ...], stdin: str,
                                                  message: str) -> None:
    r = relay(conf, *args, stdin=stdin)
    assert r.returncode in (1, 2)             # 2: argparse usage errors
    assert message in r.stderr
    assert "Traceback" not in r.stderr


def test_duplicate_address_exits_1(conf: Path) -> None:
    assert relay(conf, "user", "add", "a@example.test").returncode == 0
    r = relay(conf, "user", "add", "A@EXAMPLE.test")
    assert r.returncode == 1 and "exists" in r.stderr


def test_passwd_prompt_twice_must_match(conf: Path) -> None:
    assert relay(conf, "user", "add", "a@example.test").returncode == 0
    # without a terminal, getpass reads the two answers from stdin
    r = relay(conf, "user", "passwd", "a@example.test", stdin="one\ntwo\n")
    assert r.returncode == 1 and "do not match" in r.stderr
    r = relay(conf, "user", "passwd", "a@example.test", stdin="same\nsame\n")
    assert r.returncode == 0, r.stderr
    s = open_store(conf)
    assert s.accounts.verify("a@example.test", "same")
    s.close()


def test_cli_while_a_store_is_open_takes_effect_at_once(conf: Path) -> None:
    server = open_store(conf)                 # as the running server holds it
    assert not server.is_local_domain("clinic.test")
    assert relay(conf, "user", "add", "x@clinic.test", "--password-stdin", stdin="pw\n").returncode == 0
    assert server.is_local_domain("clinic.test")
    assert server.accounts.get("x@clinic.test") is not None
    assert server.accounts.verify("x@clinic.test", "pw")
    server.close()


def test_console_script(conf: Path) -> None:
    exe = shutil.which("relay")
    assert exe, "the `relay` console script is installed by `pip install -e .` (.ci/run)"
    r = subprocess.run([exe, "--config", str(conf), "user", "add", "c@example.test"],
                       capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([exe, "user", "list", "--config", str(conf)], capture_output=True, text=True,
                       timeout=60, check=True)
    assert r.stdout.startswith("c@example.test")


def test_user_added_by_the_cli_receives_mail_from_the_running_server(relay_factory: Any) -> None:
    import smtplib

    r = relay_factory()
    conf = r.data_dir.parent / "live.toml"
    conf.write_text(f'data_dir = "{r.data_dir}"\nhostname = "relay.test"\n')
    with smtplib.SMTP("127.0.0.1", r.smtp_port, timeout=30) as s:
        s.ehlo("gw.test")
        s.mail("gw@hospital.test")
        assert s.rcpt("new@clinic.test")[0] == 550              # domain not served yet
        s.rset()
        assert relay(conf, "user", "add", "new@clinic.test", "--password-stdin", stdin="pw\n").returncode == 0
        assert s.sendmail("gw@hospital.test", ["new@clinic.test"], b"Subject: hi\r\n\r\nhello\r\n") == {}
    assert r.call(lambda relay: relay.store.mailbox("new@clinic.test").messages())[0].uid == 1
    assert r.call(lambda relay: relay.store.accounts.verify("new@clinic.test", "pw"))
    assert relay(conf, "user", "passwd", "new@clinic.test", "--password-stdin", stdin="pw2\n").returncode == 0
    assert not r.call(lambda relay: relay.store.accounts.verify("new@clinic.test", "pw"))
    r = relay(conf, "user", "del", "new@clinic.test")
    assert r.returncode == 0
