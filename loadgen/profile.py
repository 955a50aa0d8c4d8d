"""Traffic profiles (TOML): participants, who sends to whom, study mix, schedule, splitting.

A profile with a mistake raises ProfileError naming the key and its place (file, table, line)
before anything is sent. Shipped profiles live in loadgen/profiles/NAME.toml; a path works too.
"""

from __future__ import annotations

import math
import re
import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from relay.config import ConfigError, parse_size

KINDS = ("gateway", "mail-client")
ROLES = ("hospital", "practice", "teleradiology-centre")
RECEIVE = ("imap-idle", "imap-poll", "pop3")


class ProfileError(ValueError):
    """A profile that cannot be used; the message names the key and where it is."""


@dataclass(frozen=True)
class Modality:
    name: str
    share: float             # relative share of studies
    median: int              # DICOM bytes of a study (lognormal median)
    sigma: float             # lognormal shape
    min: int
    max: int

    @property
    def mean(self) -> float:
        """Mean of the lognormal (ignoring the clip), for the model summary."""
        return self.median * math.exp(self.sigma ** 2 / 2)


@dataclass(frozen=True)
class Group:
    """`count` participants alike: addresses <group>NN@<domain> (or <group>@ when count = 1)."""
    group: str
    count: int
    kind: str
    role: str
    uplink: float            # bytes per second
    downlink: float          # bytes per second
    receive: str             # imap-idle | imap-poll | pop3
    poll_interval: float     # seconds (imap-poll, pop3)
    sends: float             # relative share of the network's studies, per participant
    sends_to: tuple[str, ...]
    receives: float          # relative weight of being chosen as a recipient, per participant
    modalities: tuple[str, ...]   # what this group sends; () = every modality

    def addresses(self, domain: str) -> list[str]:
        if self.count == 1:
            return [f"{self.group}@{domain}"]
        width = max(2, len(str(self.count)))
        return [f"{self.group}{i:0{width}d}@{domain}" for i in range(1, self.count + 1)]


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    domain: str
    volume_per_month: int    # e-mail bytes per month (base64 included), the whole network
    seed: int
    weekdays: tuple[float, ...]   # Monday .. Sunday
    hours: tuple[float, ...]      # 0 .. 23
    partial_above: int       # e-mail bytes: a study larger than this is split (message/partial)
    partial_size: int        # e-mail bytes per message/partial piece
    retry_after: float       # simulated seconds between retries of a deferred message (MTA queue)
    queue_lifetime: float    # simulated seconds a deferred message is retried before it expires
    pgp_share: float         # share of the studies (up to 256 MiB) sent PGP/MIME-encrypted
    modalities: tuple[Modality, ...]
    groups: tuple[Group, ...]
    source: str

    @property
    def participants(self) -> int:
        return sum(g.count for g in self.groups)

    def scaled(self, participants_scale: float) -> Profile:
        """The same network with `participants_scale` x the participants in every group, and
        the volume grown in proportion (each participant keeps its own traffic)."""
        if participants_scale == 1:
            return self
        if participants_scale <= 0:
            raise ProfileError("--participants-scale: must be > 0")
        import dataclasses
        groups = tuple(dataclasses.replace(g, count=max(1, round(g.count * participants_scale)))
                       for g in self.groups)
        ratio = sum(g.count for g in groups) / self.participants
        return dataclasses.replace(self, groups=groups,
                                   volume_per_month=int(self.volume_per_month * ratio))


# --- units ---------------------------------------------------------------------------------

_BW = {"bit": 1 / 8, "kbit": 1e3 / 8, "mbit": 1e6 / 8, "gbit": 1e9 / 8,
       "b/s": 1, "kb/s": 1e3, "mb/s": 1e6, "gb/s": 1e9}
_DUR = {"s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400}
_NUM_UNIT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z/]*)\s*$")


def parse_bandwidth(value: Any, key: str) -> float:
    """"100Mbit", "2.5 Mbit", "10MB/s" or a number of bytes per second -> bytes per second."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value <= 0:
            raise ProfileError(f"{key}: must be > 0")
        return float(value)
    m = _NUM_UNIT.match(str(value)) if isinstance(value, str) else None
    unit = m.group(2).lower() if m else ""
    if not m or unit not in _BW:
        raise ProfileError(f"{key}: not a bandwidth: {value!r} (use e.g. \"100Mbit\", \"10MB/s\")")
    bps = float(m.group(1)) * _BW[unit]
    if bps <= 0:
        raise ProfileError(f"{key}: must be > 0")
    return bps


def parse_duration(value: Any, key: str) -> float:
    """"30s", "5m", "1h", "1d" or a number of seconds -> seconds."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value < 0:
            raise ProfileError(f"{key}: must not be negative")
        return float(value)
    m = _NUM_UNIT.match(str(value)) if isinstance(value, str) else None
    if not m or m.group(2).lower() not in _DUR:
        raise ProfileError(f"{key}: not a duration: {value!r} (use e.g. \"30s\", \"5m\", \"1h\")")
    return float(m.group(1)) * _DUR[m.group(2).lower()]


# --- loading -------------------------------------------------------------------------------

def _line_of(text: str, table: str, occurrence: int, key: str | None) -> int | None:
    """1-based line of `key` inside the `occurrence`-th (0-based) [table] / [[table]] header,
    or of the header itself; None when not found (e.g. a key missing from the file)."""
    header = re.compile(r"^\s*\[\[?\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
    seen = -1
    inside = table == ""
    header_line = None
    for n, line in enumerate(text.splitlines(), 1):
        m = header.match(line)
        if m:
            inside = False
            if m.group(1) == table:
                seen += 1
                if seen == occurrence:
                    inside, header_line = True, n
            continue
        if inside and key is not None and re.match(rf"^\s*\"?{re.escape(key)}\"?\s*=", line):
            return n
    return header_line


class _Reader:
    """Reads one table, remembering which keys were used so that unknown ones are named."""

    def __init__(self, loader: _Loader, raw: Any, table: str, occurrence: int, label: str) -> None:
        self.loader, self.table, self.occurrence, self.label = loader, table, occurrence, label
        if not isinstance(raw, dict):
            raise loader.error(table, occurrence, None, f"{label}: expected a table")
        self.raw = raw
        self.used: set[str] = set()

    def where(self, key: str | None) -> str:
        return self.loader.where(self.table, self.occurrence, key, self.label)

    def fail(self, key: str | None, msg: str) -> ProfileError:
        return ProfileError(f"{self.where(key)}: {msg}")

    def get(self, key: str, default: Any = ..., conv: Any = None) -> Any:
        self.used.add(key)
        if key not in self.raw:
            if default is ...:
                raise self.fail(None, f"missing key {key!r}")
            if not isinstance(default, str) or conv is None:
                return default
        value = self.raw.get(key, default)
        if conv is None:
            return value
        try:
            return conv(value, key)
        except (ProfileError, ConfigError) as e:
            msg = str(e).removeprefix(f"{key}: ")
            raise self.fail(key, msg) from None

    def done(self, extra_tables: tuple[str, ...] = ()) -> None:
        for key in self.raw:
            if key not in self.used and key not in extra_tables:
                known = ", ".join(sorted(self.used))
                raise self.fail(key, f"unknown key {key!r} (known: {known})")


class _Loader:
    def __init__(self, text: str, source: str) -> None:
        self.text, self.source = text, source

    def where(self, table: str, occurrence: int, key: str | None, label: str) -> str:
        line = _line_of(self.text, table, occurrence, key)
        place = f"{self.source}:{line}" if line else self.source
        name = f"{label}.{key}" if key else label
        return f"{place}: {name}" if name else place

    def error(self, table: str, occurrence: int, key: str | None, msg: str) -> ProfileError:
        return ProfileError(f"{self.where(table, occurrence, key, '')}: {msg}")


def _str(v: Any, key: str) -> str:
    if not isinstance(v, str) or not v:
        raise ProfileError(f"{key}: expected a non-empty string")
    return v


def _number(lo: float, hi: float = math.inf, lo_open: bool = False) -> Any:
    def conv(v: Any, key: str) -> float:
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            raise ProfileError(f"{key}: expected a number")
        if v < lo or (lo_open and v == lo) or v > hi:
            rng = f"{'>' if lo_open else '>='} {lo:g}" + (f" and <= {hi:g}" if hi != math.inf else "")
            raise ProfileError(f"{key}: impossible value {v!r} (must be {rng})")
        return float(v)
    return conv


def _int_count(v: Any, key: str) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ProfileError(f"{key}: impossible value {v!r} (must be an integer >= 1)")
    return v


def _size(v: Any, key: str) -> int:
    n = parse_size(v, key)
    if n <= 0:
        raise ProfileError(f"{key}: impossible value {v!r} (must be > 0)")
    return n


def _choice(options: tuple[str, ...]) -> Any:
    def conv(v: Any, key: str) -> str:
        if v not in options:
            raise ProfileError(f"{key}: impossible value {v!r} (one of: {', '.join(options)})")
        return str(v)
    return conv


def _weights(n: int) -> Any:
    def conv(v: Any, key: str) -> tuple[float, ...]:
        if (not isinstance(v, list) or len(v) != n
                or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and x >= 0 for x in v)):
            raise ProfileError(f"{key}: expected {n} non-negative numbers")
        if sum(v) <= 0:
            raise ProfileError(f"{key}: impossible value: all weights are zero")
        return tuple(float(x) for x in v)
    return conv


def _names(v: Any, key: str) -> tuple[str, ...]:
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(x, str) and x for x in v):
        raise ProfileError(f"{key}: expected a list of names")
    return tuple(v)


def parse_profile(text: str, source: str = "<profile>") -> Profile:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ProfileError(f"{source}: {e}") from None
    ld = _Loader(text, source)
    top = _Reader(ld, raw, "", 0, "")
    name = top.get("name", conv=_str)
    description = top.get("description", "", conv=lambda v, k: str(v))
    domain = top.get("domain", conv=_str)
    if not re.match(r"^[A-Za-z0-9.-]+\.[A-Za-z0-9-]+$", domain):
        raise top.fail("domain", f"not a domain name: {domain!r}")
    volume = top.get("volume_per_month", conv=_size)
    seed = top.get("seed", 1, conv=lambda v, k: int(_number(0)(v, k)))

    sched = _Reader(ld, top.get("schedule"), "schedule", 0, "schedule")
    weekdays = sched.get("weekdays", conv=_weights(7))
    hours = sched.get("hours", conv=_weights(24))
    sched.done()

    msgs = _Reader(ld, top.get("messages", {}), "messages", 0, "messages")
    partial_above = msgs.get("partial_above", "1GB", conv=_size)
    partial_size = msgs.get("partial_size", "500MB", conv=_size)
    if partial_size > partial_above:
        raise msgs.fail("partial_size", "impossible value: larger than partial_above")
    retry_after = msgs.get("retry_after", "5m", conv=parse_duration)
    if retry_after <= 0:
        raise msgs.fail("retry_after", "impossible value: must be > 0")
    queue_lifetime = msgs.get("queue_lifetime", "5d", conv=parse_duration)   # Postfix's default
    if queue_lifetime < retry_after:
        raise msgs.fail("queue_lifetime", "impossible value: shorter than retry_after")
    pgp_share = msgs.get("pgp_share", 0.0, conv=_number(0, 1))
    msgs.done()

    mod_raw = top.get("modality")
    if not isinstance(mod_raw, dict) or not mod_raw:
        raise top.fail("modality", "expected at least one [modality.NAME] table")
    modalities = []
    for mname, mraw in mod_raw.items():
        r = _Reader(ld, mraw, f"modality.{mname}", 0, f"modality.{mname}")
        share = r.get("share", conv=_number(0, lo_open=True))
        median = r.get("median", conv=_size)
        sigma = r.get("sigma", 0.5, conv=_number(0, 3))
        lo = r.get("min", 1, conv=_size)
        hi = r.get("max", median * 20, conv=_size)
        if not lo <= median <= hi:
            raise r.fail("median", "impossible value: must lie within min .. max")
        r.done()
        modalities.append(Modality(mname, share, median, sigma, lo, hi))

    parts_raw = top.get("participants")
    if not isinstance(parts_raw, list) or not parts_raw:
        raise top.fail("participants", "expected at least one [[participants]] table")
    groups: list[Group] = []
    readers: list[_Reader] = []
    for i, praw in enumerate(parts_raw):
        label = f"participants[{i}]"
        if isinstance(praw, dict) and isinstance(praw.get("group"), str):
            label += f" ({praw['group']})"
        r = _Reader(ld, praw, "participants", i, label)
        group = r.get("group", conv=_str)
        if not re.match(r"^[a-z0-9][a-z0-9-]*$", group):
            raise r.fail("group", f"impossible value {group!r} (lower-case letters, digits, '-')")
        if any(g.group == group for g in groups):
            raise r.fail("group", f"group {group!r} is defined twice")
        receive = r.get("receive", "imap-idle", conv=_choice(RECEIVE))
        g = Group(
            group=group,
            count=r.get("count", 1, conv=_int_count),
            kind=r.get("kind", "gateway", conv=_choice(KINDS)),
            role=r.get("role", conv=_choice(ROLES)),
            uplink=r.get("uplink", conv=parse_bandwidth),
            downlink=r.get("downlink", conv=parse_bandwidth),
            receive=receive,
            poll_interval=r.get("poll_interval", "5m", conv=parse_duration),
            sends=r.get("sends", 1.0, conv=_number(0)),
            sends_to=r.get("sends_to", (), conv=_names),
            receives=r.get("receives", 1.0, conv=_number(0)),
            modalities=r.get("modalities", (), conv=_names),
        )
        if receive != "imap-idle" and g.poll_interval <= 0:
            raise r.fail("poll_interval", "impossible value: must be > 0 for polling receivers")
        r.done()
        groups.append(g)
        readers.append(r)
    top.done()

    names = {g.group: g for g in groups}
    mod_names = {m.name for m in modalities}
    for g, r in zip(groups, readers):
        for t in g.sends_to:
            if t not in names:
                raise r.fail("sends_to", f"unknown group {t!r} (groups: {', '.join(names)})")
        for m in g.modalities:
            if m not in mod_names:
                raise r.fail("modalities", f"unknown modality {m!r} (modalities: {', '.join(sorted(mod_names))})")
        if g.sends > 0:
            targets = sum(names[t].count for t in g.sends_to if names[t].receives > 0)
            if g.group in g.sends_to and g.receives > 0:
                targets -= 1                      # never to itself
            if targets <= 0:
                raise r.fail("sends_to", "a participant sending to nobody (sends > 0 but no recipient "
                                         "other than itself; set sends = 0 or name a group)")
    if not any(g.sends > 0 for g in groups):
        raise top.fail("participants", "nobody sends anything (every group has sends = 0)")
    return Profile(name, description, domain, volume, seed, weekdays, hours, partial_above,
                   partial_size, retry_after, queue_lifetime, pgp_share, tuple(modalities),
                   tuple(groups), source)


def shipped() -> list[str]:
    """Names of the profiles that ship with loadgen."""
    return sorted(p.name.removesuffix(".toml") for p in resources.files("loadgen.profiles").iterdir()
                  if p.name.endswith(".toml"))


def load_profile(name_or_path: str, pgp_share: float | None = None) -> Profile:
    """A shipped profile by name (`ruhr-pilot`) or a TOML file by path; `pgp_share` overrides
    the profile's [messages] pgp_share."""
    p = _load(name_or_path)
    if pgp_share is None:
        return p
    if not 0 <= pgp_share <= 1:
        raise ProfileError(f"--pgp-share: impossible value {pgp_share!r} (must be within 0 .. 1)")
    import dataclasses
    return dataclasses.replace(p, pgp_share=pgp_share)


def _load(name_or_path: str) -> Profile:
    p = Path(name_or_path)
    if p.suffix == ".toml" or "/" in name_or_path:
        try:
            return parse_profile(p.read_text(encoding="utf-8"), str(p))
        except FileNotFoundError:
            raise ProfileError(f"{p}: no such file") from None
    res = resources.files("loadgen.profiles") / f"{name_or_path}.toml"
    if not res.is_file():
        raise ProfileError(f"unknown profile {name_or_path!r} (shipped: {', '.join(shipped())}; "
                           f"or give a path to a .toml file)")
    return parse_profile(res.read_text(encoding="utf-8"), f"profiles/{name_or_path}.toml")
