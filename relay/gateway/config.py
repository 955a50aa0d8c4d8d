"""The gateway's own TOML file (docs/gateway.md, "All configuration keys") -> a frozen GatewayConfig.

Relative paths resolve against the directory of the config file. Unknown keys are an error
that names the key, like relay.config.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from relay.config import ConfigError, parse_hostport, parse_size, read_toml


@dataclass(frozen=True)
class GatewayConfig:
    address: str = ""                       # this gateway's account on the relay
    password: str = ""
    password_file: Path | None = None       # alternative to password (first line)
    secret_key: Path | None = None          # armored OpenPGP secret key of this gateway
    passphrase_file: Path | None = None     # only if the secret key is protected
    smtp: str = "127.0.0.1:2525"
    imap: str = "127.0.0.1:1143"
    pop3: str = ""                          # receive by POP3 instead of IMAP when set
    starttls: bool = False                  # STARTTLS to the relay (needed off loopback: the
                                            # relay refuses plaintext AUTH there by default)
    tls_ca: Path | None = None              # CA file for the relay's certificate (else system CAs)
    inbox: Path = Path("received")          # verified DICOM files, one folder per study
    quarantine: Path = Path("quarantine")   # everything refused, with the reason beside it
    state_dir: Path = Path("state")         # state DB, GNUPGHOME, downloads, partials
    directory: Path | None = None           # local copy of directory.json (+ .asc beside it)
    directory_key: Path | None = None       # pinned armored public key of the directory
    directory_address: str = ""             # "" = directory@<domain of address>
    split_size: int = 64 * 1024**2          # message/partial above this (RFC 2046 5.2.2)
    compress_level: int = 0                 # gpg -z: 0 = none (100 MB: 2.1 s vs 13.5 s at zlib 6)
    reassembly_timeout: float = 24 * 3600.0  # incomplete partial sets -> quarantine after this
    idle_timeout: float = 25 * 60.0         # re-issue IDLE before 29 min (RFC 2177)
    poll_interval: float = 60.0             # POP3 receive loop
    # PACS link (pynetdicom)
    ae_title: str = "RELAYGW"               # our AE title (SCP and SCU)
    dicom_listen: str = "127.0.0.1:11112"   # Storage SCP for `pacs-listen`
    quiet_period: float = 10.0              # SCP: a study is complete after this many idle s
    send_to: str = ""                       # SCP: where received studies go (an address)
    pacs: str = ""                          # receiver: C-STORE imported studies to HOST:PORT
    pacs_ae: str = "PACS"                   # the PACS's AE title
    keep_after_store: bool = True           # keep inbox/<study> after a successful C-STORE
    accept_unsigned_mdn: bool = False       # our MDNs are signed; others' may not be (forgeable)
    unconfirmed_after: float = 4 * 3600.0   # a sent study without MDN after this long: OVERDUE in
                                            # `status`, `study_unconfirmed` in the log (a receiver
                                            # polls within minutes; 4 h leaves room for a 1 GB study
                                            # on a slow line and a receiver restarted once)
    source: Path | None = None

    @property
    def domain(self) -> str:
        return self.address.rpartition("@")[2]

    @property
    def directory_mailbox(self) -> str:
        return self.directory_address or f"directory@{self.domain}"

    def get_password(self) -> str:
        if self.password_file is not None:
            return self.password_file.read_text(encoding="utf-8").splitlines()[0]
        return self.password

    def get_passphrase(self) -> str | None:
        if self.passphrase_file is None:
            return None
        return self.passphrase_file.read_text(encoding="utf-8").splitlines()[0]

    @property
    def smtp_addr(self) -> tuple[str, int]:
        return parse_hostport(self.smtp, "smtp")

    def replace(self, **changes: Any) -> GatewayConfig:
        return dataclasses.replace(self, **changes)


_PATHS = {"tls_ca", "password_file", "secret_key", "passphrase_file", "inbox", "quarantine", "state_dir",
          "directory", "directory_key"}
_HOSTPORTS = {"smtp", "imap", "pop3", "dicom_listen", "pacs"}


def from_dict(raw: dict[str, Any], base: Path = Path(".")) -> GatewayConfig:
    defaults = GatewayConfig()
    known = {f.name for f in dataclasses.fields(GatewayConfig)} - {"source"}
    kw: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in known:
            raise ConfigError(f"unknown gateway key {key!r} (known: {', '.join(sorted(known))})")
        default = getattr(defaults, key)
        if key in _PATHS:
            if not isinstance(value, str):
                raise ConfigError(f"{key}: expected a path string")
            p = Path(value)
            kw[key] = p if p.is_absolute() else base / p
        elif key == "split_size":
            kw[key] = parse_size(value, key)
            if kw[key] < 64 * 1024:
                raise ConfigError("split_size: must be at least 64KiB")
        elif isinstance(default, bool):
            if not isinstance(value, bool):
                raise ConfigError(f"{key}: expected true or false")
            kw[key] = value
        elif key == "compress_level":
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 9:
                raise ConfigError("compress_level: expected 0..9 (gpg --compress-level)")
            kw[key] = value
        elif isinstance(default, float):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"{key}: expected a non-negative number")
            kw[key] = float(value)
        else:
            if not isinstance(value, str):
                raise ConfigError(f"{key}: expected a string")
            if key in _HOSTPORTS and value:
                parse_hostport(value, key)
            kw[key] = value
    for key in ("inbox", "quarantine", "state_dir"):
        kw.setdefault(key, base / getattr(defaults, key))
    cfg = GatewayConfig(**kw)
    if "@" not in cfg.address:
        raise ConfigError("address: expected the gateway's account, e.g. \"ct@hospital.test\"")
    if cfg.secret_key is None:
        raise ConfigError("secret_key: required (armored OpenPGP secret key of this gateway)")
    if cfg.directory_key is None:
        raise ConfigError("directory_key: required (the pinned armored key of the directory)")
    return cfg


def load(path: str | Path) -> GatewayConfig:
    p = Path(path)
    return dataclasses.replace(from_dict(read_toml(p), p.resolve().parent), source=p)
