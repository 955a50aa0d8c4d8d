"""TOML configuration -> one typed, frozen Config, passed explicitly.

Every key is optional; `Config()` is the embedded default of ../shared/CONTRACT.md.
Sizes are integers (bytes) or strings like "4GiB", "512 MB", "25%" (percent only where
the key says so). Unknown keys are an error that names the key: a typo must not silently
fall back to a default.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A configuration file that cannot be used; the message names the key."""


_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
    "t": 1000**4, "tb": 1000**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(value: float | str, key: str = "size") -> int:
    """Parse 4096, "4GiB", "512 MB" into bytes. Raises ConfigError naming `key`."""
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected a size, got {value!r}")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ConfigError(f"{key}: must not be negative")
        return int(value)
    m = _SIZE_RE.match(str(value))
    if not m or m.group(2).lower() not in _UNITS:
        raise ConfigError(f"{key}: not a size: {value!r} (use e.g. 4096, \"64MiB\", \"4GiB\")")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def format_size(n: float, si: bool = False) -> str:
    """1536 -> "1.5 KiB"; with si=True powers of 1000: 1500 -> "1.5 kB" (traffic figures)."""
    step, units = (1000, ("B", "kB", "MB", "GB", "TB")) if si else (1024, ("B", "KiB", "MiB", "GiB", "TiB"))
    for unit in units:
        if abs(n) < step or unit == units[-1]:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= step
    raise AssertionError


@dataclass(frozen=True)
class SizeOrPercent:
    """A size in bytes, or a percentage of something decided by the user of the key."""
    bytes: int | None = None
    percent: float | None = None

    def resolve(self, of: int) -> int:
        if self.percent is not None:
            return int(of * self.percent / 100)
        assert self.bytes is not None
        return self.bytes


def parse_size_or_percent(value: Any, key: str) -> SizeOrPercent:
    if isinstance(value, str) and value.strip().endswith("%"):
        try:
            pct = float(value.strip()[:-1])
        except ValueError:
            raise ConfigError(f"{key}: not a percentage: {value!r}") from None
        if not 0 <= pct <= 100:
            raise ConfigError(f"{key}: percentage must be within 0..100")
        return SizeOrPercent(percent=pct)
    return SizeOrPercent(bytes=parse_size(value, key))


def parse_hostport(value: str, key: str) -> tuple[str, int]:
    """"127.0.0.1:2525", "[::1]:2525", ":2525" (all addresses) -> (host, port)."""
    if not isinstance(value, str):
        raise ConfigError(f"{key}: expected \"HOST:PORT\", got {value!r}")
    m = re.match(r"^(?:\[([^\]]+)\]|([^:\[\]]*)):(\d{1,5})$", value.strip())
    if not m:
        raise ConfigError(f"{key}: expected \"HOST:PORT\", got {value!r}")
    host = m.group(1) if m.group(1) is not None else m.group(2)
    port = int(m.group(3))
    if port > 65535:
        raise ConfigError(f"{key}: port out of range: {port}")
    return host, port


@dataclass(frozen=True)
class SmtpConfig:
    listen: tuple[str, ...] = ("127.0.0.1:2525",)
    max_message_size: int = 4 * 1024**3
    max_recipients: int = 100                 # RFC 5321 4.5.3.1.8: at least 100
    # an idle session costs ~10 KiB (no receive buffer of its own: docs/decisions.md,
    # bench/bench_flood.py), so 1000 idle sessions fit in ~10 MiB; Postfix's default of 50
    # per client (half its process limit) keeps one address from taking them all
    max_sessions: int = 1000                  # in total; beyond: 421 4.7.0
    max_sessions_per_client: int = 50         # per client IP; beyond: 421 4.7.0
    command_timeout: float = 300.0            # RFC 5321 4.5.3.2.7: server waits >= 5 min for
                                              # a whole command line (not reset by each byte)
    data_timeout: float = 300.0               # DATA/BDAT: a stall this long ends the session
    min_data_rate: int = 500                  # bytes/s during DATA/BDAT: each chunk extends the
                                              # deadline by size/rate (Postfix smtpd_min_data_rate)
    stress_threshold: float = 0.75            # stress mode above this share of max_sessions
    stress_command_timeout: float = 10.0      # command timeout before MAIL under stress
                                              # (Postfix: smtpd_timeout = ${stress?10}${stress:300})
    max_errors: int = 20                      # bad commands before 421 4.7.0 and close
    postmaster: str = ""                      # RFC 5321 4.5.1: where <postmaster> and
                                              # postmaster@<served domain> go; "" = the oldest
                                              # account (the first one created: the admin's)


@dataclass(frozen=True)
class ImapConfig:
    listen: tuple[str, ...] = ("127.0.0.1:1143",)
    listen_tls: tuple[str, ...] = ()          # implicit TLS (993 style)
    idle_timeout: float = 1800.0              # RFC 9051 5.4: autologout >= 30 min
    max_literal: int = 64 * 1024              # APPEND is refused, so literals carry only
                                              # short strings (LOGIN, SEARCH): 64 KiB is ample
    max_sessions: int = 500                   # in total; beyond: * BYE [UNAVAILABLE]
    max_sessions_per_client: int = 200        # per client IP (loadgen/NAT: many users, one IP)
    max_line: int = 64 * 1024                 # command line bound (without literals)
    login_timeout: float = 180.0              # from connect to login, not reset by each byte
                                              # (Dovecot: 3 min for a login process client)
    stress_threshold: float = 0.75            # stress mode above this share of max_sessions
    stress_login_timeout: float = 10.0        # login timeout under stress


@dataclass(frozen=True)
class Pop3Config:
    listen: tuple[str, ...] = ("127.0.0.1:1110",)
    listen_tls: tuple[str, ...] = ()          # implicit TLS (995 style)
    idle_timeout: float = 600.0               # RFC 1939 3: autologout >= 10 min
    max_sessions: int = 500                   # in total; beyond: -ERR [SYS/TEMP]
    max_sessions_per_client: int = 200        # per client IP
    login_timeout: float = 180.0              # from connect to login, not reset by each byte
    stress_threshold: float = 0.75            # stress mode above this share of max_sessions
    stress_login_timeout: float = 10.0        # login timeout under stress


@dataclass(frozen=True)
class MetricsConfig:
    listen: str = "127.0.0.1:9325"
    per_mailbox: bool = True                  # per-mailbox labels; bound: one series set per account


@dataclass(frozen=True)
class TlsConfig:
    cert: Path | None = None
    key: Path | None = None

    @property
    def enabled(self) -> bool:
        return self.cert is not None and self.key is not None


@dataclass(frozen=True)
class AuthConfig:
    plaintext: str = "loopback"               # "loopback" | "never" | "always"
    # failed logins (SMTP AUTH, IMAP, POP3) delay the next attempt from the same client
    # address and for the same account: failure_delay, doubled per failure up to
    # failure_delay_max (Dovecot auth_penalty: 2 s .. 15 s); forgotten after 15 min
    failure_delay: float = 2.0
    failure_delay_max: float = 15.0


@dataclass(frozen=True)
class QuotaConfig:
    default_bytes: int = 20 * 1024**3
    default_messages: int = 0                 # 0 = no limit


@dataclass(frozen=True)
class BackpressureConfig:
    soft_backlog: SizeOrPercent = SizeOrPercent(percent=25.0)
    pace_factor: float = 2.0
    pace_floor: int = 5 * 1024**2
    min_free_disk: int | None = None          # None = auto: 2 x max_message_size
    drain_halflife: float = 60.0              # seconds; smoothing of the drain-rate EWMA
    disk_reserve: int = 8 * 1024**2           # kept in data_dir/run for deletions on a full
                                              # disk (relay/policy/reserve.py); 0 = none


@dataclass(frozen=True)
class LogConfig:
    format: str = "text"                      # "text" (key=value) | "json"
    level: str = "INFO"


@dataclass(frozen=True)
class DirectoryConfig:
    address: str = ""                         # "" = directory@<domain of the first participant>
    http_listen: str = ""                     # "" = served on the metrics listener


@dataclass(frozen=True)
class StoreConfig:
    backend: str = "maildir"                  # "maildir" (embedded default) | "postgresql" (nodes share it)
    dsn: str = ""                             # postgresql: a libpq connection string; several hosts
                                              # with target_session_attrs=read-write find the primary


@dataclass(frozen=True)
class Config:
    data_dir: Path = Path("var/relay")
    hostname: str = "relay.example.org"
    grace_period: float = 30.0                # SIGTERM: how long sessions may finish
    smtp: SmtpConfig = field(default_factory=SmtpConfig)
    imap: ImapConfig = field(default_factory=ImapConfig)
    pop3: Pop3Config = field(default_factory=Pop3Config)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    tls: TlsConfig = field(default_factory=TlsConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    quota: QuotaConfig = field(default_factory=QuotaConfig)
    backpressure: BackpressureConfig = field(default_factory=BackpressureConfig)
    log: LogConfig = field(default_factory=LogConfig)
    directory: DirectoryConfig = field(default_factory=DirectoryConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    source: Path | None = None                # the file this came from, if any

    @property
    def min_free_disk(self) -> int:
        mfd = self.backpressure.min_free_disk
        return 2 * self.smtp.max_message_size if mfd is None else mfd

    def replace(self, **changes: Any) -> Config:
        return dataclasses.replace(self, **changes)


# --- loading -------------------------------------------------------------------------------

_SIZE_KEYS = {
    ("smtp", "max_message_size"), ("imap", "max_literal"), ("imap", "max_line"),
    ("quota", "default_bytes"), ("backpressure", "pace_floor"), ("backpressure", "disk_reserve"),
}
_LISTEN_LISTS = {("smtp", "listen"), ("imap", "listen"), ("imap", "listen_tls"),
                 ("pop3", "listen"), ("pop3", "listen_tls")}
_LISTEN_ONE = {("metrics", "listen"),
               ("directory", "http_listen")}   # directory: checked like metrics.listen
_CHOICES = {("auth", "plaintext"): ("loopback", "never", "always"),
            ("log", "format"): ("text", "json"),
            ("store", "backend"): ("maildir", "postgresql")}


def _convert(section: str, key: str, value: Any, default: Any, base: Path) -> Any:
    name = f"{section}.{key}" if section else key
    if (section, key) in _SIZE_KEYS:
        return parse_size(value, name)
    if (section, key) in _LISTEN_LISTS:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list):
            raise ConfigError(f"{name}: expected a list of \"HOST:PORT\"")
        for item in items:
            parse_hostport(item, name)
        return tuple(items)
    if (section, key) in _LISTEN_ONE:
        if value != "":
            parse_hostport(value, name)
        return value
    if (section, key) in _CHOICES and value not in _CHOICES[(section, key)]:
        raise ConfigError(f"{name}: must be one of {', '.join(_CHOICES[(section, key)])}")
    if (section, key) == ("backpressure", "soft_backlog"):
        return parse_size_or_percent(value, name)
    if (section, key) == ("backpressure", "min_free_disk"):
        return None if value == "auto" else parse_size(value, name)
    if (section, key) in {("tls", "cert"), ("tls", "key")}:
        p = Path(value)
        return p if p.is_absolute() else base / p
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{name}: expected true or false")
        return value
    if isinstance(default, float):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
            raise ConfigError(f"{name}: expected a non-negative number")
        return float(value)
    if isinstance(default, int):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ConfigError(f"{name}: expected a non-negative integer")
        return value
    if isinstance(default, str):
        if not isinstance(value, str):
            raise ConfigError(f"{name}: expected a string")
        return value
    raise ConfigError(f"{name}: unsupported value {value!r}")


def _section(cls: type, section: str, raw: Any, base: Path) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"[{section}]: expected a table")
    defaults = cls()
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        if key not in known:
            raise ConfigError(f"[{section}]: unknown key {key!r} (known: {', '.join(sorted(known))})")
        kwargs[key] = _convert(section, key, value, getattr(defaults, key), base)
    return cls(**kwargs)


_SECTIONS: dict[str, type] = {
    "smtp": SmtpConfig, "imap": ImapConfig, "pop3": Pop3Config, "metrics": MetricsConfig,
    "tls": TlsConfig, "auth": AuthConfig, "quota": QuotaConfig,
    "backpressure": BackpressureConfig, "log": LogConfig, "directory": DirectoryConfig,
    "store": StoreConfig,
}


def from_dict(raw: dict[str, Any], base: Path = Path(".")) -> Config:
    """Build a Config from parsed TOML. Relative data_dir and TLS paths resolve against `base`
    (the directory of the config file)."""
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if key in _SECTIONS:
            kwargs[key] = _section(_SECTIONS[key], key, value, base)
        elif key == "data_dir":
            if not isinstance(value, str):
                raise ConfigError("data_dir: expected a path string")
            p = Path(value)
            kwargs[key] = p if p.is_absolute() else base / p
        elif key == "hostname":
            if not isinstance(value, str) or not re.match(r"^[A-Za-z0-9.-]+$", value):
                raise ConfigError("hostname: expected a domain name")
            kwargs[key] = value
        elif key == "grace_period":
            kwargs[key] = _convert("", key, value, 30.0, base)
        else:
            raise ConfigError(f"unknown key {key!r} at the top level")
    cfg = Config(**kwargs)
    if cfg.tls.cert is not None and cfg.tls.key is None or cfg.tls.key is not None and cfg.tls.cert is None:
        raise ConfigError("[tls]: cert and key go together")
    for section in ("smtp", "imap", "pop3"):
        if getattr(cfg, section).stress_threshold > 1:
            raise ConfigError(f"{section}.stress_threshold: a share of max_sessions, 0..1 (0 = no stress mode)")
    if cfg.backpressure.pace_factor <= 0:
        raise ConfigError("backpressure.pace_factor: must be > 0")
    if cfg.store.backend == "postgresql" and not cfg.store.dsn:
        raise ConfigError('[store]: backend = "postgresql" needs dsn = "postgresql://USER@HOST1,HOST2/DB'
                          '?target_session_attrs=read-write"')
    return cfg


def read_toml(path: Path) -> dict[str, Any]:
    """A TOML file as a dict; a missing or malformed file is a ConfigError naming it."""
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: {e}") from None


def load(path: str | Path | None) -> Config:
    """Load a TOML file; None gives the embedded default."""
    if path is None:
        return Config()
    p = Path(path)
    return dataclasses.replace(from_dict(read_toml(p), p.resolve().parent), source=p)
