"""The report of a run: DIR/report.json (every figure), DIR/report.md and PNG plots.

Input is what the run recorded (see `Record` and `Event`); every figure is computed here, so
the report can be re-made from report.json's `raw` section. Times are recorded in wall seconds
since the start; simulated time = sim_start + wall x speedup. Full-scale figures divide bytes
by the byte scale.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from relay.config import format_size

PLOTS = ("throughput.png", "backlog.png", "latency.png", "deferrals.png")


@dataclass
class Record:
    """One message of the run."""
    id: str
    sender: str
    recipient: str
    size: int
    due: float                        # wall seconds at which the model submits it
    attempts: int = 0
    accepted: float | None = None     # wall seconds of the 250
    refused: str | None = None        # the 5xx reply, if any
    delivered: float | None = None    # wall seconds of the first verified download
    deliveries: int = 0               # verified downloads (more than 1 = duplicated)


@dataclass
class Event:
    t: float                          # wall seconds since the start
    kind: str                         # accepted | deferred | refused | delivered | corrupted | duplicated | stale | error
    nbytes: int = 0
    who: str = ""                     # the recipient (or sender for errors)
    detail: str = ""
    t0: float | None = None           # accepted/delivered: when that transfer began (its bytes
                                      # are spread over t0..t in throughput figures and plots)


@dataclass
class RunData:
    meta: dict[str, Any]              # profile, period, speedup, scale, sim_start, ...
    records: list[Record] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    wall_seconds: float = 0.0
    interrupted: bool = False


def _spread(bins: list[float], width: float, e: Event) -> None:
    """Add e's bytes to `bins` (wall-time bins of `width` seconds), spread evenly over the
    transfer's span t0..t: a 1 GB message accepted after 4 s of streaming is 250 MB/s over
    those 4 s, not 1 GB in the bin of its 250 reply."""
    n = len(bins)
    t1 = e.t
    t0 = t1 if e.t0 is None else min(max(0.0, e.t0), t1)
    i0, i1 = min(n - 1, int(t0 / width)), min(n - 1, int(t1 / width))
    if i0 == i1:
        bins[i0] += e.nbytes
        return
    rate = e.nbytes / (t1 - t0)
    for i in range(i0, i1 + 1):
        lo, hi = max(t0, i * width), min(t1, (i + 1) * width)
        if i == n - 1:
            hi = t1
        bins[i] += rate * max(0.0, hi - lo)


def _pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


def figures(data: RunData) -> dict[str, Any]:
    """Every figure of the report, JSON-ready."""
    m = data.meta
    speedup, scale = float(m["speedup"]), float(m["scale"])
    recs = data.records
    ev = data.events
    count: dict[str, int] = defaultdict(int)
    for e in ev:
        count[e.kind] += 1
    sent = sum(1 for r in recs if r.attempts > 0)
    accepted = [r for r in recs if r.accepted is not None]
    delivered = [r for r in recs if r.deliveries > 0]
    lost = sum(1 for r in accepted if r.deliveries == 0)
    duplicated = sum(max(0, r.deliveries - 1) for r in recs)     # (each also has an event)
    wall = max(data.wall_seconds, 1e-9)

    # throughput: accepted / downloaded bytes per wall-time bin, each over its transfer's span
    nbins = max(1, min(200, int(wall / 0.25)))
    width = wall / nbins
    acc_bins = [0.0] * nbins
    dl_bins = [0.0] * nbins
    for e in ev:
        if e.kind == "accepted":
            _spread(acc_bins, width, e)
        elif e.kind == "delivered":
            _spread(dl_bins, width, e)
    peak_mbs = max(acc_bins) / width / 1e6
    peak_dl_mbs = max(dl_bins) / width / 1e6

    # backlog per receiver: accepted for it and not yet downloaded
    backlog: dict[str, int] = defaultdict(int)
    peak_per: dict[str, int] = defaultdict(int)
    total = 0
    peak_total = 0
    for e in sorted(ev, key=lambda e: (e.t, e.kind != "delivered")):
        if e.kind == "accepted":
            backlog[e.who] += e.nbytes
            total += e.nbytes
        elif e.kind == "delivered":
            backlog[e.who] -= e.nbytes
            total -= e.nbytes
        else:
            continue
        peak_per[e.who] = max(peak_per[e.who], backlog[e.who])
        peak_total = max(peak_total, total)

    deferrals_for: dict[str, int] = defaultdict(int)
    for e in ev:
        if e.kind == "deferred":
            deferrals_for[e.who] += 1
    # downloads: bytes over the time spent in them (RETR/FETCH + digest check, not the pacing
    # that follows), against the rate the receiver is paced to (downlink x speedup x scale)
    dl_bytes: dict[str, int] = defaultdict(int)
    dl_time: dict[str, float] = defaultdict(float)
    for e in ev:
        if e.kind == "delivered" and e.t0 is not None:
            dl_bytes[e.who] += e.nbytes
            dl_time[e.who] += max(0.0, e.t - e.t0)
    limits = m.get("downlink_as_run", {})
    lat: dict[str, list[float]] = defaultdict(list)
    for r in delivered:
        if r.delivered is not None:
            lat[r.recipient].append((r.delivered - r.due) * speedup)
    all_lat = [x for v in lat.values() for x in v]
    per_receiver = {
        who: {"messages": len(v), "latency_p50_seconds": _pct(v, 0.5),
              "latency_p95_seconds": _pct(v, 0.95), "latency_max_seconds": max(v),
              "peak_backlog_bytes": peak_per.get(who, 0),
              "peak_backlog_full_scale_bytes": int(peak_per.get(who, 0) / scale),
              "deferrals": deferrals_for.get(who, 0),
              "download_mb_per_s": (dl_bytes[who] / dl_time[who] / 1e6 if dl_time.get(who) else None),
              "paced_to_mb_per_s": (limits[who] / 1e6 if who in limits else None)}
        for who, v in sorted(lat.items())}
    slowest = max(per_receiver.items(), key=lambda kv: (kv[1]["latency_p95_seconds"], kv[0]),
                  default=(None, None))
    largest = max((r.size for r in recs), default=0)
    sim_hourly: dict[int, int] = defaultdict(int)
    for e in ev:
        if e.kind == "accepted":
            sim_hourly[int(e.t * speedup // 3600)] += e.nbytes
    peak_sim_hour = max(sim_hourly.values(), default=0) / scale
    planned = len(recs)
    return {
        "profile": m.get("profile"), "period": m.get("period"), "speedup": speedup,
        "scale": scale, "seed": m.get("seed"), "participants": m.get("participants"),
        "server": m.get("server"),
        "planned": planned,
        "sent": sent,
        "accepted": len(accepted),
        "deferred": count["deferred"],
        "retried": sum(max(0, r.attempts - 1) for r in recs),
        "refused": sum(1 for r in recs if r.refused),
        "errors": count["error"],
        "delivered": len(delivered),
        "lost": lost,
        "duplicated": duplicated,
        "corrupted": count["corrupted"],
        "stale": count["stale"],          # intact messages of an earlier run, found and deleted
        "not_sent": planned - sent,
        "complete": len(delivered) == planned and not data.interrupted,
        "interrupted": data.interrupted,
        "bytes_sent": sum(r.size for r in accepted),
        "bytes_delivered": sum(r.size for r in delivered),
        "wall_seconds": round(data.wall_seconds, 3),
        "simulated_seconds": round(data.wall_seconds * speedup, 1),
        "mean_mb_per_s": sum(r.size for r in accepted) / wall / 1e6,
        "peak_mb_per_s": peak_mbs,
        "peak_download_mb_per_s": peak_dl_mbs,
        "peak_backlog_bytes": peak_total,
        "peak_backlog_full_scale_bytes": int(peak_total / scale),
        "disk_needed_bytes": int((peak_total + largest) / scale),
        "peak_simulated_hour_full_scale_mbit_per_s": peak_sim_hour * 8 / 3600 / 1e6,
        "latency_p50_seconds": _pct(all_lat, 0.5),
        "latency_p95_seconds": _pct(all_lat, 0.95),
        "latency_max_seconds": max(all_lat, default=0.0),
        "slowest_receiver": ({"address": slowest[0], **slowest[1]} if slowest[0] else None),
        "per_receiver": per_receiver,
    }


def fmt_bytes(n: float) -> str:
    """Traffic in powers of 1000 (60.0 GB a month, as the network's figures are given)."""
    return format_size(n, si=True)


def _dur(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h"


def plot(data: RunData, fig: dict[str, Any], out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    speedup = float(data.meta["speedup"])
    sim0 = float(data.meta.get("sim_start", 0.0))
    unit, div = ("h", 3600.0) if data.wall_seconds * speedup <= 4 * 86400 else ("days", 86400.0)

    def sim(t: float) -> float:
        return (sim0 + t * speedup) / div

    wall = max(data.wall_seconds, 1e-9)
    nbins = max(1, min(120, int(wall / 0.25)))
    width = wall / nbins
    xs = [sim((i + 0.5) * width) for i in range(nbins)]
    series: dict[str, list[float]] = {k: [0.0] * nbins for k in ("accepted", "delivered", "deferred", "refused")}
    for e in data.events:
        if e.kind in ("accepted", "delivered"):
            _spread(series[e.kind], width, Event(e.t, e.kind, e.nbytes, t0=e.t0))
        elif e.kind in series:
            series[e.kind][min(nbins - 1, int(e.t / width))] += 1
    for k in ("accepted", "delivered"):
        series[k] = [b / width / 1e6 for b in series[k]]

    f, ax = plt.subplots(figsize=(8, 4))
    ax.plot(xs, series["accepted"], label="accepted (SMTP 250)")
    ax.plot(xs, series["delivered"], label="downloaded and verified")
    ax.set_xlabel(f"simulated time ({unit} from the start of the month)")
    ax.set_ylabel("MB/s (wall clock)")
    ax.set_title(f"Throughput - {fig['profile']}, {fig['period']}, x{speedup:g}, scale {fig['scale']:g}")
    ax.legend()
    f.tight_layout()
    f.savefig(out / "throughput.png", dpi=90)
    plt.close(f)

    f, ax = plt.subplots(figsize=(8, 4))
    top = sorted(fig["per_receiver"].items(), key=lambda kv: -kv[1]["peak_backlog_bytes"])[:6]
    for who, _ in top:
        pts_t, pts_b, b = [0.0], [0.0], 0
        for e in sorted(data.events, key=lambda e: e.t):
            if e.who == who and e.kind in ("accepted", "delivered"):
                b += e.nbytes if e.kind == "accepted" else -e.nbytes
                pts_t.append(sim(e.t))
                pts_b.append(b / 1e6)
        ax.step(pts_t, pts_b, where="post", label=who)
    ax.set_xlabel(f"simulated time ({unit})")
    ax.set_ylabel("backlog on the server (MB, as run)")
    ax.set_title("Backlog per receiver (the 6 largest)")
    if top:
        ax.legend(fontsize=7)
    f.tight_layout()
    f.savefig(out / "backlog.png", dpi=90)
    plt.close(f)

    f, ax = plt.subplots(figsize=(8, 4))
    lats = sorted((r.delivered - r.due) * speedup / 60 for r in data.records if r.delivered is not None)
    if lats:
        ax.step(lats, [(i + 1) / len(lats) for i in range(len(lats))], where="post")
    ax.set_xlabel("latency from submission to verified download (simulated minutes)")
    ax.set_ylabel("share of messages")
    ax.set_ylim(0, 1.02)
    ax.set_title("Latency (CDF)")
    f.tight_layout()
    f.savefig(out / "latency.png", dpi=90)
    plt.close(f)

    f, ax = plt.subplots(figsize=(8, 4))
    ax.bar(xs, series["deferred"], width=(xs[1] - xs[0]) if nbins > 1 else 0.1, label="deferred (4xx)")
    ax.bar(xs, series["refused"], width=(xs[1] - xs[0]) if nbins > 1 else 0.1,
           bottom=series["deferred"], label="refused (5xx)")
    ax.set_xlabel(f"simulated time ({unit})")
    ax.set_ylabel("replies")
    ax.set_title("Deferrals and refusals")
    ax.legend()
    f.tight_layout()
    f.savefig(out / "deferrals.png", dpi=90)
    plt.close(f)


def _rate(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def markdown(fig: dict[str, Any]) -> str:
    sr = fig["slowest_receiver"]
    verdict = "PASS" if fig["lost"] == fig["duplicated"] == fig["corrupted"] == 0 and fig["complete"] else "FAIL"
    lines = [
        f"# Load run: {fig['profile']} ({fig['period']}) - {verdict}",
        "",
        f"Speed-up x{fig['speedup']:g}, byte scale {fig['scale']:g}, {fig['participants']} participants, "
        f"seed {fig['seed']}, server: {fig['server']}. Wall time {fig['wall_seconds']:.1f} s for "
        f"{_dur(fig['simulated_seconds'])} simulated."
        + (" **Interrupted** (Ctrl-C): senders stopped, accepted mail drained." if fig["interrupted"] else ""),
        "",
        "## Integrity",
        "",
        "| planned | sent | accepted | deferred | retried | refused | delivered | lost | duplicated | corrupted |",
        "|---|---|---|---|---|---|---|---|---|---|",
        (f"| {fig['planned']} | {fig['sent']} | {fig['accepted']} | {fig['deferred']} | {fig['retried']} | "
        f"{fig['refused']} | {fig['delivered']} | {fig['lost']} | {fig['duplicated']} | {fig['corrupted']} |"),
        "",
        *([(f"{fig['stale']} intact messages of an earlier run were found in the mailboxes and deleted "
            "(stale: not part of this run's figures)."), ""] if fig.get("stale") else []),
        "## Throughput (as run, on this machine)",
        "",
        f"- {fmt_bytes(fig['bytes_sent'])} accepted, {fmt_bytes(fig['bytes_delivered'])} downloaded and verified",
        (f"- mean {fig['mean_mb_per_s']:.1f} MB/s; peak {fig['peak_mb_per_s']:.1f} MB/s accepted, "
        f"{fig['peak_download_mb_per_s']:.1f} MB/s downloaded"),
        "",
        "## Capacity summary",
        "",
        (f"- peak throughput (as run, x{fig['speedup']:g}, scale {fig['scale']:g}): "
         f"{fig['peak_mb_per_s']:.1f} MB/s accepted, {fig['peak_download_mb_per_s']:.1f} MB/s downloaded"),
        (f"- busiest simulated hour at full scale: "
         f"{fig['peak_simulated_hour_full_scale_mbit_per_s']:.1f} Mbit/s of intake (the relay's link)"),
        (f"- peak backlog on the server (full scale): {fmt_bytes(fig['peak_backlog_full_scale_bytes'])}; "
        f"disk needed (peak backlog + the largest message): {fmt_bytes(fig['disk_needed_bytes'])}"),
        (f"- latency submission -> verified download: median {_dur(fig['latency_p50_seconds'])}, "
        f"95% {_dur(fig['latency_p95_seconds'])}, max {_dur(fig['latency_max_seconds'])}"),
    ]
    if sr:
        lines.append(f"- slowest receiver: {sr['address']} (95% latency {_dur(sr['latency_p95_seconds'])}); "
                     f"it costs the server {fmt_bytes(sr['peak_backlog_full_scale_bytes'])} of backlog at its peak"
                     ", "
                     f"and its senders {sr['deferrals']} deferrals (4xx)")
    lines += ["", "## Figures", ""]
    for name in PLOTS:
        lines.append(f"![{name.removesuffix('.png')}]({name})")
        lines.append("")
    lines += ["## Receivers", "",
              ("Download MB/s: bytes over the time spent downloading and checking them (as run); each "
               "receiver is paced to its downlink x speed-up x byte scale (the last column)."), "",
              "| receiver | messages | p50 | p95 | max | peak backlog (full scale) | download MB/s | paced to MB/s |",
              "|---|---|---|---|---|---|---|---|"]
    for who, r in fig["per_receiver"].items():
        lines.append(f"| {who} | {r['messages']} | {_dur(r['latency_p50_seconds'])} | "
                     f"{_dur(r['latency_p95_seconds'])} | {_dur(r['latency_max_seconds'])} | "
                     f"{fmt_bytes(r['peak_backlog_full_scale_bytes'])} | {_rate(r.get('download_mb_per_s'))} | "
                     f"{_rate(r.get('paced_to_mb_per_s'))} |")
    return "\n".join(lines) + "\n"


def write(data: RunData, out: str | Path) -> dict[str, Any]:
    """Write report.json, report.md and the plots into `out`; returns the figures."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    fig = figures(data)
    plot(data, fig, out)
    (out / "report.md").write_text(markdown(fig))
    doc = dict(fig, meta=data.meta, raw={"records": [asdict(r) for r in data.records],
                                         "events": [asdict(e) for e in data.events]})
    (out / "report.json").write_text(json.dumps(doc, indent=1))
    return fig
