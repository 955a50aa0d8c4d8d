"""The traffic model: a month of studies drawn from a profile, deterministic for a seed.

A month is 30 days starting on a Monday at 00:00 (simulated time, seconds from its start).
Studies are drawn one after another (sender by `sends`, modality by `share` among what the
sender sends, size from the modality's clipped lognormal, time slot by weekday x hour weight,
recipient by `receives` among the sender's `sends_to`) until the month's e-mail volume is
reached: the last study is kept only when that brings the total closer to the target, so a
month is within half the largest study of `volume_per_month`.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from loadgen.profile import Group, Profile

DAY = 86400
MONTH_DAYS = 30
MONTH = MONTH_DAYS * DAY
PERIODS = {"month": MONTH, "week": 7 * DAY, "day": DAY, "hour": 3600}
WEEKDAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
PGP_MAX = 256 * 1024**2      # larger studies go in clear: the pre-encrypted pool stops here


def email_size(dicom_bytes: int) -> int:
    """E-mail bytes carrying `dicom_bytes` of DICOM: base64 in CRLF lines of 76 characters
    (57 bytes -> 78 bytes) plus about 2 KiB of headers and MIME part headers."""
    return math.ceil(dicom_bytes / 57) * 78 + 2048


@dataclass(frozen=True)
class Participant:
    address: str
    group: Group


@dataclass(frozen=True)
class Study:
    n: int                   # index in the month, in time order
    t: float                 # simulated seconds from the start of the month
    sender: str
    recipient: str
    modality: str
    dicom_bytes: int
    email_bytes: int         # the whole study as e-mail
    pieces: int              # 1, or the number of message/partial pieces
    pgp: bool = False        # sent PGP/MIME-encrypted (studies up to PGP_MAX only)


@dataclass
class Model:
    profile: Profile
    participants: list[Participant]
    studies: list[Study]                       # the month, in time order
    by_address: dict[str, Participant] = field(default_factory=dict)

    @property
    def bytes_per_month(self) -> int:
        return sum(s.email_bytes for s in self.studies)

    def window(self, period: str) -> tuple[float, float]:
        """(start, length) in simulated seconds: the whole month, or its busiest week
        (Monday to Sunday), busiest day or busiest hour by e-mail bytes."""
        if period not in PERIODS:
            raise ValueError(f"period: one of {', '.join(PERIODS)}")
        length = PERIODS[period]
        if period == "month":
            return 0.0, float(MONTH)
        step = 7 * DAY if period == "week" else length
        totals: dict[int, int] = defaultdict(int)
        for s in self.studies:
            totals[int(s.t // step)] += s.email_bytes
        slot = max(range(int(MONTH // step)), key=lambda i: (totals.get(i, 0), -i))
        return float(slot * step), float(length)

    def studies_in(self, period: str) -> tuple[float, float, list[Study]]:
        start, length = self.window(period)
        return start, length, [s for s in self.studies if start <= s.t < start + length]

    def summary(self) -> dict[str, Any]:
        """Every figure of the month, JSON-ready."""
        p = self.profile
        by_mod: dict[str, dict[str, float]] = {m.name: {"studies": 0, "bytes": 0} for m in p.modalities}
        by_hour = [0] * 24
        studies_by_hour = [0] * 24
        studies_by_weekday = [0] * 7
        by_weekday = [0] * 7
        by_day = [0] * MONTH_DAYS
        hourly: dict[int, int] = defaultdict(int)
        sent: dict[str, int] = defaultdict(int)
        received: dict[str, int] = defaultdict(int)
        for s in self.studies:
            by_mod[s.modality]["studies"] += 1
            by_mod[s.modality]["bytes"] += s.email_bytes
            h = int(s.t // 3600)
            by_hour[h % 24] += s.email_bytes
            studies_by_hour[h % 24] += 1
            studies_by_weekday[(h // 24) % 7] += 1
            by_weekday[(h // 24) % 7] += s.email_bytes
            by_day[h // 24] += s.email_bytes
            hourly[h] += s.email_bytes
            sent[s.sender] += s.email_bytes
            received[s.recipient] += s.email_bytes
        total = self.bytes_per_month
        peak_hour = max(hourly.values(), default=0)
        return {
            "profile": p.name,
            "description": p.description,
            "seed": p.seed,
            "participants": len(self.participants),
            "gateways": sum(1 for x in self.participants if x.group.kind == "gateway"),
            "mail_clients": sum(1 for x in self.participants if x.group.kind == "mail-client"),
            "groups": [{"group": g.group, "count": g.count, "kind": g.kind, "role": g.role,
                        "uplink_mbit": g.uplink * 8 / 1e6, "downlink_mbit": g.downlink * 8 / 1e6,
                        "receive": g.receive, "poll_interval_seconds": g.poll_interval,
                        "sends_to": list(g.sends_to)} for g in p.groups],
            "volume_per_month_target": p.volume_per_month,
            "bytes_per_month": total,
            "studies_per_month": len(self.studies),
            "messages_per_month": sum(s.pieces for s in self.studies),
            "pgp_share": p.pgp_share,
            "pgp_studies_per_month": sum(1 for s in self.studies if s.pgp),
            "largest_study_bytes": max((s.email_bytes for s in self.studies), default=0),
            "by_modality": by_mod,
            "bytes_by_hour_of_day": by_hour,
            "bytes_by_weekday": dict(zip(WEEKDAYS, by_weekday)),
            "studies_by_hour_of_day": studies_by_hour,
            "studies_by_weekday": dict(zip(WEEKDAYS, studies_by_weekday)),
            "bytes_by_day": by_day,
            "mean_mbit_per_s": total * 8 / MONTH / 1e6,
            "peak_hour_bytes": peak_hour,
            "peak_hour_mbit_per_s": peak_hour * 8 / 3600 / 1e6,
            "sent_bytes_by_participant": dict(sorted(sent.items())),
            "received_bytes_by_participant": dict(sorted(received.items())),
        }


def build(profile: Profile, seed: int | None = None) -> Model:
    p = profile
    rng = random.Random(p.seed if seed is None else seed)
    participants = [Participant(a, g) for g in p.groups for a in g.addresses(p.domain)]
    senders = [x for x in participants if x.group.sends > 0]
    send_w = [x.group.sends for x in senders]
    mods = {m.name: m for m in p.modalities}
    slot_w = [p.weekdays[(i // 24) % 7] * p.hours[i % 24] for i in range(MONTH_DAYS * 24)]
    slot_cum = []
    acc = 0.0
    for w in slot_w:
        acc += w
        slot_cum.append(acc)
    targets: dict[str, tuple[list[Participant], list[float]]] = {}
    for g in p.groups:
        cands = [x for x in participants if x.group.group in g.sends_to and x.group.receives > 0]
        targets[g.group] = (cands, [x.group.receives for x in cands])

    drawn: list[tuple[float, str, str, str, int, int]] = []
    total = 0
    while total < p.volume_per_month:
        sender = rng.choices(senders, weights=send_w)[0]
        allowed = [mods[n] for n in sender.group.modalities] or list(p.modalities)
        mod = rng.choices(allowed, weights=[m.share for m in allowed])[0]
        dicom = int(min(mod.max, max(mod.min, rng.lognormvariate(math.log(mod.median), mod.sigma))))
        slot = rng.choices(range(len(slot_w)), cum_weights=slot_cum)[0]
        t = (slot + rng.random()) * 3600
        cands, weights = targets[sender.group.group]
        while True:
            rcpt = rng.choices(cands, weights=weights)[0]
            if rcpt.address != sender.address:
                break
        size = email_size(dicom)
        if total + size > p.volume_per_month and total + size - p.volume_per_month > p.volume_per_month - total:
            break
        drawn.append((t, sender.address, rcpt.address, mod.name, dicom, size))
        total += size
    drawn.sort()
    crypt = random.Random(f"pgp-{p.seed if seed is None else seed}")   # apart: pgp_share changes nothing else
    studies = [Study(n, t, s, r, m, d, e, pieces(p, e), crypt.random() < p.pgp_share and e <= PGP_MAX)
               for n, (t, s, r, m, d, e) in enumerate(drawn)]
    return Model(p, participants, studies, {x.address: x for x in participants})


def pieces(profile: Profile, email_bytes: int, scale: float = 1.0) -> int:
    """How many messages carry a study: 1, or message/partial pieces above partial_above."""
    if email_bytes <= profile.partial_above * scale:
        return 1
    return math.ceil(email_bytes / (profile.partial_size * scale))
