"""Configuration: the embedded default, sizes, listeners, and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from relay import config as c


def test_embedded_default_matches_contract() -> None:
    cfg = c.Config()
    assert cfg.data_dir == Path("var/relay")
    assert cfg.smtp.listen == ("127.0.0.1:2525",)
    assert cfg.imap.listen == ("127.0.0.1:1143",)
    assert cfg.pop3.listen == ("127.0.0.1:1110",)
    assert cfg.metrics.listen == "127.0.0.1:9325"
    assert cfg.smtp.max_message_size == 4 * 1024**3
    assert cfg.quota.default_bytes == 20 * 1024**3
    assert cfg.quota.default_messages == 0
    assert cfg.auth.plaintext == "loopback"
    assert cfg.backpressure.soft_backlog.resolve(1000) == 250
    assert cfg.backpressure.pace_factor == 2.0
    assert cfg.backpressure.pace_floor == 5 * 1024**2
    assert cfg.min_free_disk == 2 * cfg.smtp.max_message_size   # "auto"
    assert not cfg.tls.enabled


@pytest.mark.parametrize("text,expected", [
    ("4GiB", 4 * 1024**3), ("512 MB", 512 * 10**6), ("5MiB", 5 * 1024**2), (4096, 4096),
    ("1.5KiB", 1536), ("10", 10), ("2tb", 2 * 10**12),
])
def test_sizes(text: object, expected: int) -> None:
    assert c.parse_size(text, "k") == expected  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", ["4 GiBs", "-1", "lots", "", True, -5])
def test_bad_sizes_name_the_key(bad: object) -> None:
    with pytest.raises(c.ConfigError, match="smtp.max_message_size"):
        c.from_dict({"smtp": {"max_message_size": bad}})


def test_full_contract_example(tmp_path: Path) -> None:
    f = tmp_path / "relay.toml"
    f.write_text('''
data_dir = "data"
hostname = "relay.example.org"
[smtp]
listen = ["127.0.0.1:0", "[::1]:2526"]
max_message_size = "1GiB"
[imap]
listen = ["127.0.0.1:1143"]
[pop3]
listen = ["127.0.0.1:1110"]
[metrics]
listen = "127.0.0.1:9325"
[tls]
cert = "cert.pem"
key = "key.pem"
[auth]
plaintext = "never"
[quota]
default_bytes = "20GiB"
default_messages = 1000
[backpressure]
soft_backlog = "1GiB"
pace_factor = 1.5
pace_floor = "1MiB"
min_free_disk = "10GiB"
''')
    cfg = c.load(f)
    assert cfg.data_dir == tmp_path / "data"
    assert cfg.smtp.listen == ("127.0.0.1:0", "[::1]:2526")
    assert cfg.smtp.max_message_size == 1024**3
    assert cfg.tls.cert == tmp_path / "cert.pem" and cfg.tls.enabled
    assert cfg.auth.plaintext == "never"
    assert cfg.quota.default_messages == 1000
    assert cfg.backpressure.soft_backlog.resolve(10**12) == 1024**3
    assert cfg.min_free_disk == 10 * 1024**3
    assert cfg.source == f


@pytest.mark.parametrize("raw,needle", [
    ({"smtp": {"lisen": ["127.0.0.1:25"]}}, "unknown key 'lisen'"),
    ({"nonsense": 1}, "unknown key 'nonsense'"),
    ({"smtp": {"listen": ["127.0.0.1"]}}, "smtp.listen"),
    ({"smtp": {"listen": ["127.0.0.1:99999"]}}, "port out of range"),
    ({"auth": {"plaintext": "sometimes"}}, "auth.plaintext"),
    ({"backpressure": {"soft_backlog": "140%"}}, "backpressure.soft_backlog"),
    ({"backpressure": {"pace_factor": 0}}, "pace_factor"),
    ({"tls": {"cert": "c.pem"}}, "cert and key go together"),
    ({"smtp": "x"}, "[smtp]"),
    ({"smtp": {"max_recipients": "many"}}, "smtp.max_recipients"),
    # there is no relaying: no key may suggest that some setting allows it
    ({"smtp": {"require_auth_for_relay": False}}, "unknown key 'require_auth_for_relay'"),
])
def test_errors_name_the_key(raw: dict, needle: str) -> None:
    with pytest.raises(c.ConfigError) as e:
        c.from_dict(raw)
    assert needle in str(e.value)


def test_missing_and_broken_files(tmp_path: Path) -> None:
    with pytest.raises(c.ConfigError, match="no such file"):
        c.load(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[smtp\nlisten=")
    with pytest.raises(c.ConfigError, match="bad.toml"):
        c.load(bad)


def test_cli_reports_config_errors(tmp_path: Path) -> None:
    import subprocess
    import sys

    bad = tmp_path / "bad.toml"
    bad.write_text('[smtp]\nmax_message_size = "huge"\n')
    p = subprocess.run([sys.executable, "-m", "relay", "serve", "--config", str(bad)],
                       capture_output=True, text=True, timeout=60, check=False)
    assert p.returncode == 2
    assert "smtp.max_message_size" in p.stderr
