"""The traffic model and the profile format: statistics of the shipped profiles, determinism,
and profile mistakes named with their key and place. Nothing is sent."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys

import pytest

from loadgen import model
from loadgen.cli import main
from loadgen.profile import ProfileError, load_profile, parse_profile

GOOD = """
name = "tiny"
domain = "tiny.test"
volume_per_month = "1GB"

[schedule]
weekdays = [1, 1, 1, 1, 1, 0.5, 0.5]
hours = [1, 1, 1, 1, 1, 1, 1, 2, 3, 3, 2, 2, 2, 2, 2, 2, 1, 1, 1, 1, 1, 1, 1, 1]

[modality.CR]
share = 1.0
median = "5MB"

[[participants]]
group = "hospital"
count = 2
role = "hospital"
uplink = "100Mbit"
downlink = "100Mbit"
sends_to = ["centre"]

[[participants]]
group = "centre"
role = "teleradiology-centre"
uplink = "100Mbit"
downlink = "1Gbit"
sends_to = ["hospital"]
"""


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_ruhr_pilot_month_totals_60_gb_within_5_percent(seed: int) -> None:
    m = model.build(load_profile("ruhr-pilot"), seed)
    assert abs(m.bytes_per_month - 60e9) <= 0.05 * 60e9
    assert all(0 <= s.t < model.MONTH for s in m.studies)
    assert [s.t for s in m.studies] == sorted(s.t for s in m.studies)


def test_shipped_profiles_have_the_published_participants() -> None:
    s = model.build(load_profile("ruhr-pilot")).summary()
    assert (s["participants"], s["gateways"], s["mail_clients"]) == (46, 35, 11)
    early = model.build(load_profile("ruhr-early")).summary()
    assert (early["participants"], early["gateways"]) == (28, 28)
    assert abs(early["bytes_per_month"] - 10e9) <= 0.1 * 10e9
    assert model.build(load_profile("bw-100")).summary()["participants"] == 100


def test_modality_sizes_are_realistic() -> None:
    m = model.build(load_profile("ruhr-pilot"))
    sizes: dict[str, list[int]] = {}
    for s in m.studies:
        sizes.setdefault(s.modality, []).append(s.dicom_bytes)
    median = {k: sorted(v)[len(v) // 2] for k, v in sizes.items()}
    assert 2e6 <= median["CR"] <= 20e6 and 2e6 <= median["DX"] <= 20e6      # a few MB
    assert 10e6 <= median["MG"] <= 100e6                                     # tens of MB
    assert 100e6 <= median["CT"] <= 900e6 and 50e6 <= median["MR"] <= 900e6  # hundreds of MB
    assert max(max(v) for v in sizes.values()) > 1e9                        # rare multi-GB
    assert all(s.pieces > 1 for s in m.studies if s.email_bytes > m.profile.partial_above)


def test_daily_curve_has_a_morning_peak_quiet_nights_and_weekends() -> None:
    s = model.build(load_profile("ruhr-pilot")).summary()
    per_hour = s["studies_by_hour_of_day"]
    morning = (per_hour[8] + per_hour[9]) / 2
    night = sum(per_hour[0:5]) / 5
    afternoon = sum(per_hour[13:16]) / 3
    assert morning > 4 * night and morning > afternoon > night
    assert max(range(24), key=per_hour.__getitem__) in (8, 9, 10)
    wd = s["studies_by_weekday"]
    assert min(wd["Mon"], wd["Tue"], wd["Wed"], wd["Thu"]) > max(wd["Sat"], wd["Sun"])


def test_recipients_follow_sends_to_and_never_the_sender() -> None:
    m = model.build(load_profile("ruhr-pilot"))
    for s in m.studies:
        sender, rcpt = m.by_address[s.sender], m.by_address[s.recipient]
        assert s.sender != s.recipient
        assert rcpt.group.group in sender.group.sends_to
        assert sender.group.sends > 0
        if sender.group.modalities:
            assert s.modality in sender.group.modalities
    received = {s.recipient for s in m.studies}
    assert "slowpractice@ruhr.test" in received     # the slow receiver gets traffic


def test_deterministic_for_a_seed() -> None:
    p = load_profile("ruhr-pilot")
    assert model.build(p, 7).studies == model.build(p, 7).studies
    assert model.build(p, 7).studies != model.build(p, 8).studies


def test_participants_scale_grows_participants_and_volume() -> None:
    p = load_profile("ruhr-pilot").scaled(3)
    m = model.build(p)
    assert len(m.participants) == 138
    assert abs(m.bytes_per_month - 180e9) <= 0.05 * 180e9


@pytest.mark.parametrize("period,length", [("hour", 3600), ("day", 86400), ("week", 7 * 86400)])
def test_periods_are_the_busiest_window(period: str, length: int) -> None:
    m = model.build(load_profile("ruhr-pilot"))
    start, got, studies = m.studies_in(period)
    assert got == length and studies
    assert all(start <= s.t < start + length for s in studies)
    busiest = sum(s.email_bytes for s in studies)
    for other in range(0, model.MONTH - length + 1, length if period != "week" else 7 * 86400):
        assert sum(s.email_bytes for s in m.studies if other <= s.t < other + length) <= busiest


def test_model_json_from_the_command_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["model", "--profile", "ruhr-pilot", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["participants"] == 46
    assert abs(out["bytes_per_month"] - 60e9) <= 3e9
    assert main(["model", "--profile", "ruhr-early"]) == 0
    assert "28 gateways" in capsys.readouterr().out


def _error(text: str) -> str:
    with pytest.raises(ProfileError) as e:
        parse_profile(text, "net.toml")
    return str(e.value)


def test_a_good_small_profile_loads() -> None:
    p = parse_profile(GOOD, "net.toml")
    assert p.participants == 3
    assert [x.address for x in model.build(p).participants] == [
        "hospital01@tiny.test", "hospital02@tiny.test", "centre@tiny.test"]


def test_unknown_key_is_named_with_its_place() -> None:
    text = GOOD.replace('downlink = "1Gbit"', 'downlink = "1Gbit"\ndownlnk = "2Mbit"')
    msg = _error(text)
    line = text.splitlines().index('downlnk = "2Mbit"') + 1
    assert f"net.toml:{line}" in msg and "participants[1] (centre)" in msg and "'downlnk'" in msg
    assert "unknown key" in _error(GOOD.replace("[schedule]", "[schedule]\nmondays = 1"))


@pytest.mark.parametrize("old,new,key", [
    ('uplink = "100Mbit"', 'uplink = "0Mbit"', "uplink"),
    ('uplink = "100Mbit"', 'uplink = "fast"', "uplink"),
    ("count = 2", "count = 0", "count"),
    ("share = 1.0", "share = -1", "share"),
    ('median = "5MB"', 'median = "5MB"\nmax = "1MB"', "median"),
    ('role = "hospital"', 'role = "clinic"', "role"),
    ("weekdays = [1, 1, 1, 1, 1, 0.5, 0.5]", "weekdays = [1, 1, 1]", "weekdays"),
    ('volume_per_month = "1GB"', 'volume_per_month = "lots"', "volume_per_month"),
])
def test_impossible_values_are_named(old: str, new: str, key: str) -> None:
    msg = _error(GOOD.replace(old, new, 1))
    line = GOOD.replace(old, new, 1).splitlines().index(new.splitlines()[-1]) + 1
    assert re.search(rf"net\.toml:\d+: .*{key}", msg), msg
    assert f"net.toml:{line}:" in msg or key == "median"


def test_a_participant_sending_to_nobody_is_an_error() -> None:
    msg = _error(GOOD.replace('sends_to = ["hospital"]', "sends_to = []"))
    assert "participants[1] (centre).sends_to" in msg and "sending to nobody" in msg
    alone = GOOD.replace('sends_to = ["hospital"]', 'sends_to = ["centre"]')
    assert "sending to nobody" in _error(alone)          # only itself
    assert "unknown group 'clinic'" in _error(GOOD.replace('sends_to = ["hospital"]', 'sends_to = ["clinic"]'))


def test_cli_reports_profile_errors_before_anything_is_sent(tmp_path) -> None:  # type: ignore[no-untyped-def]
    bad = tmp_path / "bad.toml"
    bad.write_text(GOOD.replace("count = 2", "count = 2\ncolour = 'red'"))
    r = subprocess.run([sys.executable, "-m", "loadgen.cli", "run", "--profile", str(bad),
                        "--report", str(tmp_path / "rep")], capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 2
    assert "bad.toml:" in r.stderr and "'colour'" in r.stderr
    assert not (tmp_path / "rep").exists()
    r = subprocess.run([sys.executable, "-m", "loadgen.cli", "model", "--profile", "no-such"],
                       capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 2 and "ruhr-pilot" in r.stderr


def test_pgp_share_marks_studies_and_changes_nothing_else() -> None:
    plain = model.build(load_profile("ruhr-pilot"))
    crypt = model.build(load_profile("ruhr-pilot", pgp_share=0.3))
    assert not any(s.pgp for s in plain.studies)
    assert [(s.t, s.email_bytes, s.recipient) for s in plain.studies] == \
        [(s.t, s.email_bytes, s.recipient) for s in crypt.studies]
    small = [s for s in crypt.studies if s.email_bytes <= model.PGP_MAX]
    assert 0.2 < sum(s.pgp for s in small) / len(small) < 0.4
    assert not any(s.pgp for s in crypt.studies if s.email_bytes > model.PGP_MAX)
    with pytest.raises(ProfileError, match="pgp-share"):
        load_profile("ruhr-pilot", pgp_share=1.5)
    assert "pgp_share" in _error(GOOD.replace('volume_per_month = "1GB"',
                                              'volume_per_month = "1GB"\n[messages]\npgp_share = 2'))


def test_command_line_follows_the_contract() -> None:
    """CONTRACT.md "Load generator": the options of `loadgen model` and `loadgen run`."""
    from loadgen.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    options = {name: {s for a in p._actions for s in a.option_strings} for name, p in sub.choices.items()}
    assert {"--profile", "--json"} <= options["model"]
    assert {"--profile", "--period", "--speedup", "--scale", "--report", "--smtp", "--imap",
            "--pop3"} <= options["run"]
    args = parser.parse_args(["run", "--profile", "ruhr-pilot", "--period", "week", "--speedup", "100",
                              "--scale", "0.5", "--report", "DIR", "--smtp", "mx.test:25",
                              "--imap", "[::1]:143", "--pop3", "pop.test:110"])
    assert (args.period, args.speedup, args.scale, args.report) == ("week", 100.0, 0.5, "DIR")
    assert (args.smtp, args.imap, args.pop3) == (("mx.test", 25), ("::1", 143), ("pop.test", 110))
    for bad in (["--period", "year"], ["--speedup", "0"], ["--smtp", "mx.test"]):
        with pytest.raises(SystemExit):
            parser.parse_args(["run", "--profile", "ruhr-pilot", *bad])
