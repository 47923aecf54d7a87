"""Device profiles (issue 24 item 1): the option set on every front-end, the seeded draws
of capacities and availability, deadlines nobody can meet.

Pure numpy and option handling: no runtime, no Ray (tests/test_costs.py measures the real
runtimes; tests/test_profiles_traces.py reads trace files).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import pickle

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import xflwb
from xflwb import _options, cli, magics
from xflwb.federation import profiles as P
from xflwb.federation.fleet import AlwaysAvailable, Capacities, NoClientAvailable, Windows
from xflwb.simulation.config import SimulationConfig

COSTS = {"android": 2e-3, "ios": 1e-3}
EVAL = {"android": 5e-4, "ios": 2.5e-4}


def _plats(n_android: int, n_ios: int) -> list[str]:
    return ["android"] * n_android + ["ios"] * n_ios


# -- the option set --------------------------------------------------------------------------------
def test_profiles_is_a_public_option_set_stored_as_the_dict_of_all_fields():
    assert xflwb.DeviceProfiles.__module__ == "xflwb" and "DeviceProfiles" in xflwb.__all__
    full = P.profiles_dict(xflwb.DeviceProfiles(android_slowdown="3"))
    assert full is not None
    assert set(full) == {f.name for f in dataclasses.fields(xflwb.DeviceProfiles)}
    assert full["android_slowdown"] == "const:3"  # canonical spelling
    assert P.profiles_dict(None) is None
    assert P.profiles_dict({}) == dataclasses.asdict(xflwb.DeviceProfiles())
    assert P.profiles_dict(full) == full  # a stored dict round-trips
    cfg = SimulationConfig(android=2, ios=1, profiles=xflwb.DeviceProfiles(
        availability="diurnal", available_fraction=0.3))
    assert cfg.profiles is not None and cfg.profiles["available_fraction"] == 0.3
    assert SimulationConfig(android=2).profiles is None


@pytest.mark.parametrize("text, field, stored", [
    ("android_slowdown=lognormal:4,0.6,availability=diurnal", "android_slowdown",
     "lognormal:4,0.6"),
    ("timezones=-8,0,8,window=21-6", "timezones", "-8,0,8"),
    ("available_fraction=0.25,availability=diurnal", "available_fraction", 0.25),
    ('{"ios_uplink": "uniform:1e5,2e5"}', "ios_uplink", "uniform:100000,200000"),
    ("devices=none", "devices", None),
])
def test_a_spec_string_or_json_gives_the_same_profile(text, field, stored):
    assert P.profiles_dict(text)[field] == stored


def _sub(name: str) -> argparse.ArgumentParser:
    parser = cli.build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[name]


@pytest.mark.parametrize("factory", [lambda: _sub("simulate"), magics._simulate_parser],
                         ids=["xflwb simulate", "%xfl_simulate"])
def test_command_lines_take_profiles_as_a_spec_or_json(factory):
    parser = factory()
    action = parser._option_string_actions["--profiles"]
    assert action.metavar == "SPEC"
    for typed in ("availability=diurnal,ios_slowdown=lognormal:3,0.2",
                  '{"availability": "diurnal", "ios_slowdown": "lognormal:3,0.2"}'):
        ns = parser.parse_args(["m", "--android", "50", "--profiles", typed])
        cfg = SimulationConfig(**_options.given(ns, SimulationConfig))
        assert cfg.profiles is not None
        assert (cfg.profiles["availability"], cfg.profiles["ios_slowdown"]) == (
            "diurnal", "lognormal:3,0.2")
    ns = parser.parse_args(["m", "--android", "2", "--profiles", "none"])
    assert SimulationConfig(**_options.given(ns, SimulationConfig)).profiles is None


@pytest.mark.parametrize("value, match", [
    ({"android_slowdwn": "2"}, r"unexpected option 'android_slowdwn': did you mean "
                               r"'android_slowdown'\?"),
    ("andriod_uplink=3", r"did you mean 'android_uplink'\?"),
    ({"android_uplink": "const:0"}, r"android_uplink: 'const:0': its value must be > 0"),
    ({"ios_downlink": "lognormal:-5,1"}, r"ios_downlink: .* MEDIAN must be > 0"),
    ({"ios_latency": "lognorm:0.1,0.5"}, r"not a distribution; did you mean 'lognormal'\?"),
    ({"android_slowdown": "uniform:3"}, r"uniform takes 2 finite number"),
    ({"android_slowdown": "uniform:3,1"}, r"needs A <= B"),
    ({"android_slowdown": "pareto:1,0"}, r"ALPHA must be > 0"),
    ({"android_slowdown": "lognormal:a,b"}, r"is not a list of numbers"),
    ({"android_slowdown": "pareto:1,0.05"}, r"draws values up to about 1e319, too large"),
    ({"ios_uplink": "lognormal:1e290,5"}, r"too large to simulate"),
    ({"availability": "diurnl"}, r"no file 'diurnl'; did you mean 'diurnal'\?"),
    ({"availability": "/no/such/trace.csv"}, r"availability: no file '/no/such/trace.csv'"),
    ({"devices": "/no/such/devices.csv"}, r"devices: no file"),
    ({"window": "22:00-7"}, r"window '22:00-7' is not understood"),
    ({"timezones": "UTC+1"}, r"timezones 'UTC\+1' is not understood"),
    ({"available_fraction": 0}, r"available_fraction must be a number in \(0, 1\]"),
    ({"availability": "diurnal", "available_fraction": 0.5, "window": "22-7"},
     r"cannot be reached inside the window '22-7' \(0.375 of the day\)"),
    (42, r"profiles must be xflwb.DeviceProfiles"),
    ("availability", r"is not key=value"),
])
def test_bad_profiles_are_refused_in_one_line_naming_the_field(value, match):
    with pytest.raises(xflwb.OptionError, match=match):
        SimulationConfig(android=2, profiles=value)


def test_a_fleet_nobody_is_available_in_at_the_start_is_refused_up_front():
    # every client at UTC+0, its window 08-20 local: nobody at 00:00 UTC
    with pytest.raises(NoClientAvailable, match=r"no client of the 3-client fleet is available at "
                       r"the start \(t=0\) under availability .diurnal.; at 00:00 UTC"):
        SimulationConfig(android=3, profiles={"availability": "diurnal", "timezones": "0",
                                              "window": "8-20"})


# -- distributions -------------------------------------------------------------------------------
N = 20_000


@pytest.mark.parametrize("spec, stat, expected, tol", [
    ("const:3", np.mean, 3.0, 0.0),
    ("uniform:2,6", np.mean, 4.0, 0.03),
    ("uniform:2,6", np.min, 2.0, 0.01),
    ("lognormal:4,0.6", np.median, 4.0, 0.03),
    ("lognormal:4,0.6", lambda a: np.std(np.log(a)), 0.6, 0.03),
    ("pareto:2,3", np.median, 2 * 2 ** (1 / 3), 0.03),
    ("pareto:2,3", np.mean, 3.0, 0.05),  # α·xm/(α−1)
    ("pareto:2,3", np.min, 2.0, 0.01),
])
def test_each_distribution_matches_its_parameters(spec, stat, expected, tol):
    dist = P.distribution(spec, "x")
    draws = dist.sample(np.random.default_rng(7), N)
    assert draws.shape == (N,) and (draws > 0).all()
    assert stat(draws) == pytest.approx(expected, rel=tol, abs=1e-12)


def test_sampled_capacities_follow_each_platforms_profile():
    prof = {"android_slowdown": "lognormal:4,0.5", "ios_slowdown": "const:2",
            "android_uplink": "uniform:1e5,3e5", "ios_latency": "pareto:0.1,4"}
    caps = P.sample_capacities(prof, _plats(N // 2, N // 2), COSTS, EVAL, seed=3)
    a, i = slice(0, N // 2), slice(N // 2, N)
    assert isinstance(caps, Capacities) and len(caps) == N
    assert np.median(caps.slowdown[a]) == pytest.approx(4.0, rel=0.03)
    assert (caps.slowdown[i] == 2.0).all()
    assert np.mean(caps.uplink[a]) == pytest.approx(2e5, rel=0.02)
    assert caps.uplink[a].min() >= 1e5 and caps.uplink[a].max() <= 3e5
    assert caps.latency[i].min() >= 0.1
    assert np.median(caps.latency[i]) == pytest.approx(0.1 * 2 ** 0.25, rel=0.03)
    assert caps.train_cost == COSTS and caps.platform[0] == "android"


def test_same_seed_same_fleet_another_seed_another():
    prof = P.profiles_dict({"availability": "diurnal"})
    plats = _plats(300, 200)

    def draw(seed: int) -> tuple[Capacities, Windows]:
        av = P.availability(prof, 500, seed)
        assert isinstance(av, Windows)
        return P.sample_capacities(prof, plats, COSTS, EVAL, seed), av

    (c1, w1), (c2, w2), (c3, w3) = draw(11), draw(11), draw(12)
    for kind in P.KINDS:
        assert np.array_equal(getattr(c1, kind), getattr(c2, kind)), kind
        assert not np.array_equal(getattr(c1, kind), getattr(c3, kind)), kind
    for part in ("client", "start", "end"):
        assert np.array_equal(getattr(w1, part), getattr(w2, part)), part
    assert not (len(w1.start) == len(w3.start) and np.array_equal(w1.start, w3.start))


def test_one_fields_draws_do_not_move_when_another_changes_nor_when_the_fleet_grows():
    base = P.sample_capacities({}, _plats(50, 50), COSTS, EVAL, seed=1)
    other = P.sample_capacities({"ios_uplink": "const:5"}, _plats(50, 50), COSTS, EVAL, 1)
    assert np.array_equal(base.slowdown, other.slowdown)
    assert not np.array_equal(base.uplink, other.uplink)
    bigger = P.sample_capacities({}, _plats(80, 50), COSTS, EVAL, seed=1)
    assert np.array_equal(base.slowdown[:50], bigger.slowdown[:50])


# -- availability ---------------------------------------------------------------------------------
def test_always_is_everyone_all_the_time():
    av = P.availability({}, 7, 0)
    assert isinstance(av, AlwaysAvailable) and av.available(123.0).all()


def _day_share(av: Windows, step: float = 120.0) -> float:
    ts = np.arange(0.0, P.DAY, step)
    return float(np.mean([av.available(t).mean() for t in ts]))


@pytest.mark.parametrize("fraction, timezones, window, sessions", [
    (0.2, "-8,-5,-3,0,1,2,5.5,8,9", "22-7", "lognormal:45,0.8"),
    (0.1, "0", "23-6", "const:30"),
    (0.3, "-5,1,8", "20-8", "pareto:20,2.5"),
    (0.5, "1", "0-24", "uniform:10,120"),
])
def test_the_diurnal_fleet_is_available_for_its_fraction_of_a_simulated_day(
        fraction, timezones, window, sessions):
    n = 4000
    av = P.diurnal(n, 5, fraction=fraction, timezones=timezones, window=window,
                   session_minutes=sessions)
    assert av.period == P.DAY
    assert _day_share(av) == pytest.approx(fraction, abs=0.01)
    # exact: the windows' total length is the fraction of the fleet's day
    assert float((av.end - av.start).sum()) == pytest.approx(fraction * P.DAY * n, rel=1e-6)


def test_diurnal_windows_lie_in_each_clients_local_night():
    n = 2000
    av = P.diurnal(n, 2, fraction=0.2, timezones="-5,0,8", window="22-7",
                   session_minutes="lognormal:45,0.8")
    offsets = np.array([-5.0, 0.0, 8.0])
    # a client's offset: the one that puts all its windows in 22:00-07:00 local
    mids = (av.start + av.end) / 2 / 3600
    fits = np.zeros((len(mids), 3), bool)
    for k, off in enumerate(offsets):
        local = np.mod(mids + off, 24)
        fits[:, k] = (local >= 22) | (local <= 7)
    per_client = np.ones((n, 3), bool)
    np.logical_and.at(per_client, av.client, fits)
    assert per_client.any(axis=1)[np.unique(av.client)].all()
    # 12:00 UTC is 07:00 (window closed), 12:00 and 20:00 local: nobody; 00:00 UTC is
    # 19:00, 00:00 and 08:00 local: only clients of UTC+0, in a session
    assert not av.available(12 * 3600.0).any()
    assert 0.05 < av.available(0.0).mean() < 1 / 3


def test_session_lengths_follow_session_minutes():
    av = P.diurnal(3000, 4, fraction=0.05, timezones="0", window="0-24",
                   session_minutes="const:20")
    lengths = av.end - av.start
    # all 20 min, but for a session cut at the UTC midnight seam (two windows)
    assert np.median(lengths) == pytest.approx(1200.0)
    assert lengths.max() <= 1200.0 + 1e-6


# -- deadlines -------------------------------------------------------------------------------
def _caps() -> Capacities:
    return P.sample_capacities({"android_slowdown": "const:4", "ios_slowdown": "const:1",
                                "android_latency": "0", "ios_latency": "0",
                                "android_uplink": "1e6", "ios_uplink": "1e6",
                                "android_downlink": "1e6", "ios_downlink": "1e6"},
                               _plats(2, 2), COSTS, EVAL, seed=0)


def test_a_deadline_somebody_can_meet_is_accepted_one_nobody_can_is_refused():
    caps = _caps()
    examples = np.array([100, 100, 100, 100])
    # iOS: 100 × 1e-3 × 1 = 0.1 s compute, 1e6 bytes each way at 1e6 B/s = 2 s: 2.1 s
    fastest = 2.1
    P.check_deadline(caps, fastest + 0.01, examples, 1, 1e6, 1e6)
    with pytest.raises(xflwb.InputError, match=r"deadline 2 s: no client can report in "
                       r"time; the fastest \(ios client 2\) needs 2\.1 s") as err:
        P.check_deadline(caps, 2.0, examples, 1, 1e6, 1e6)
    assert "Raise deadline above 2.1" in str(err.value)


def test_the_stored_config_keeps_canonical_values_and_pickles():
    cfg = SimulationConfig(android=30, ios=30, profiles="availability=diurnal")
    back = _options.restore(SimulationConfig, dataclasses.asdict(cfg))
    assert back.profiles == cfg.profiles
    assert math.isclose(back.profiles["available_fraction"], 0.2)
    prof = xflwb.DeviceProfiles(ios_slowdown="uniform:1,2")
    assert pickle.loads(pickle.dumps(prof)) == prof


# -- untrusted option values -------------------------------------------------------------------
@settings(max_examples=200, deadline=None)
@given(text=st.one_of(
    st.text(max_size=40),
    st.builds(lambda k, a: f"{k}:{a}", st.sampled_from(["const", "uniform", "lognormal",
                                                         "pareto", "lognorm", "normal"]),
              st.lists(st.one_of(st.floats(allow_nan=True, allow_infinity=True),
                                 st.integers(-10, 10)), max_size=3).map(
                  lambda v: ",".join(map(str, v))))))
def test_any_distribution_text_is_parsed_or_refused_by_name(text):
    try:
        dist = P.distribution(text, "ios_uplink")
    except xflwb.OptionError as exc:
        assert str(exc).startswith("ios_uplink")
        return
    # accepted: the canonical spelling means the same, and draws are positive and finite
    assert P.distribution(dist.spec, "ios_uplink") == dist
    draws = dist.sample(np.random.default_rng(0), 100)
    assert (draws > 0).all() and np.isfinite(draws).all()


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=80))
def test_any_profiles_text_builds_a_profile_or_an_option_error(text):
    try:
        full = P.profiles_dict(text)
    except xflwb.OptionError:
        return
    assert full is not None and P.profiles_dict(full) == full


def test_the_command_refuses_a_bad_profile_before_starting(tmp_path, capsys):
    code = cli.main(["simulate", "m", "--android", "2", "--profiles", "andriod_uplink=3",
                     "--data-dir", str(tmp_path / "sim")])
    err = capsys.readouterr().err
    assert code == 2 and "did you mean 'android_uplink'?" in err
    assert not (tmp_path / "sim").exists()


@settings(max_examples=25, deadline=None)
@given(start=st.integers(0, 23), hours=st.integers(1, 24), share=st.floats(0.01, 1.0),
       zones=st.lists(st.sampled_from([-11, -8, -5, -3.5, 0, 1, 5.5, 8, 9, 13]), min_size=1,
                      max_size=5),
       sessions=st.sampled_from(["const:30", "lognormal:45,0.8", "uniform:5,90",
                                 "pareto:10,1.2"]),
       seed=st.integers(0, 2**32 - 1))
def test_the_diurnal_calibration_holds_for_any_window_and_mix(start, hours, share, zones,
                                                              sessions, seed):
    """Whatever the window, time-zone mix and session lengths, the windows total the
    asked share of the fleet's day, lie inside each client's local window, and repeat."""
    n = 300
    window = f"{start}-{(start + hours) % 24}"
    fraction = share * hours / 24  # reachable inside the window
    av = P.diurnal(n, seed, fraction=fraction, timezones=",".join(map(str, zones)),
                   window=window, session_minutes=sessions)
    assert float((av.end - av.start).sum()) == pytest.approx(fraction * P.DAY * n, rel=1e-6)
    assert av.start.min() >= 0 and av.end.max() <= P.DAY
    offsets = np.array(zones, float)
    mid = (av.start + av.end) / 2 / 3600
    inside = np.zeros(len(mid), bool)
    for off in offsets:  # each window is inside the window of one of the offsets
        local = np.mod(mid + off - start, 24)
        inside |= local <= hours
    assert inside.all()
    assert np.array_equal(av.available(1000.0), av.available(1000.0 + 3 * P.DAY))


def test_a_stored_profile_is_not_validated_again():
    """The simulation process reads the stored dict (validated once, on the way in)."""
    before = _options.validations["DeviceProfiles"]
    cfg = SimulationConfig(android=40, ios=10, profiles={"availability": "diurnal"})
    assert _options.validations["DeviceProfiles"] == before + 1
    before += 1
    P.sample_capacities(cfg.profiles, _plats(40, 10), COSTS, EVAL, seed=0)
    P.availability(cfg.profiles, 50, seed=0)
    assert _options.validations["DeviceProfiles"] == before
    P.sample_capacities({"ios_slowdown": "2"}, _plats(1, 1), COSTS, EVAL, seed=0)
    assert _options.validations["DeviceProfiles"] == before + 1  # a partial one is checked
    with pytest.raises(xflwb.OptionError, match=r"'warp' this xflwb does not know"):
        P.availability({**cfg.profiles, "warp": 1}, 50, seed=0)
