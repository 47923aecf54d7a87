"""FedBuff (``strategy="fedbuff"``): options, the staleness rules, the masked buffer against a
numpy reference, and real sessions on loopback — scripted wire phones for exact numbers,
virtual devices (real processes, real TFLite / Core ML executor) for a 10× slower phone, a
phone killed mid-fit, a late joiner and a resume after the session process was killed."""

from __future__ import annotations

import os
import signal
import threading

import keras
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import xflwb
from tests.conftest import SERVED_TOY_MANIFEST as MANIFEST
from tests.conftest import toy_canonical as _canon
from tests.conftest import toy_fit_res as _res
from tests.support import wait_until
from tests.wirephone import WirePhone
from xflwb.bridge import params
from xflwb.server.config import SessionConfig
from xflwb.server.fedbuff import (
    Arrival,
    FedBuff,
    StaleUpdate,
    VersionBuffer,
    fedbuff_options,
    staleness_rule,
)
from xflwb.sessions.checkpoints import load_checkpoint
from xflwb.sessions.flower_strategy import CrossPlatformStrategy
from xflwb.simulation.config import SimulationConfig


# -- options and rules ------------------------------------------------------------------------
def test_staleness_rules_have_the_papers_values():
    assert staleness_rule("constant")(7) == 1.0
    poly = staleness_rule("polynomial:0.5")  # FedBuff's 1/sqrt(1+s)
    assert [poly(s) for s in (0, 3, 8)] == [1.0, 0.5, pytest.approx(1 / 3)]
    hinge = staleness_rule("hinge:10,4")  # FedAsync: 1 up to b, then 1/(a(s-b)+1)
    assert hinge(4) == 1.0 and hinge(6) == pytest.approx(1 / 21)
    for bad in ("linear", "polynomial", "polynomial:x", "hinge:1", "polynomial:-1",
                "constant:2", "polynomial:nan"):
        with pytest.raises(ValueError, match=r"polynomial:0\.5"):
            staleness_rule(bad)


@settings(max_examples=60, deadline=None)
@given(a=st.floats(0, 5), b=st.integers(0, 20), s=st.integers(0, 1000))
def test_staleness_weights_are_in_0_1_and_never_grow(a, b, s):
    for rule in (staleness_rule(f"polynomial:{a}"), staleness_rule(f"hinge:{a},{b}")):
        assert 0.0 < rule(s + 1) <= rule(s) <= 1.0


def test_fedbuff_options_are_checked_and_stored_whole():
    cfg = SessionConfig(strategy="FedBuff", strategy_options=xflwb.FedBuff(buffer_size=3))
    assert cfg.strategy == "fedbuff"
    assert cfg.strategy_options == {**xflwb.FedBuff().__dict__, "buffer_size": 3}
    assert SessionConfig(strategy="fedbuff", strategy_options={"max_staleness": 2}
                         ).strategy_options["staleness"] == "polynomial:0.5"
    with pytest.raises(ValueError, match="did you mean 'buffer_size'"):
        SessionConfig(strategy="fedbuff", strategy_options={"bufer_size": 3})
    with pytest.raises(ValueError, match="buffer_size"):
        SessionConfig(strategy="fedbuff", strategy_options={"buffer_size": 0})
    with pytest.raises(ValueError, match="staleness 'sqrt'"):
        SessionConfig(strategy="fedbuff", strategy_options={"staleness": "sqrt"})
    with pytest.raises(ValueError, match="ε ledger"):
        SessionConfig(strategy="fedbuff", privacy=xflwb.DP(noise_multiplier=1.0,
                                                                    clipping_norm=1.0))
    with pytest.raises(ValueError, match="max_concurrency"):
        SessionConfig(strategy="fedbuff", fraction_fit=0.5)
    # the Simulation Engine runs FedBuff on its virtual clock, but not under SecAgg+
    assert SimulationConfig(android=2, strategy="fedbuff").strategy == "fedbuff"
    with pytest.raises(ValueError, match="secagg=None with fedbuff"):
        SimulationConfig(android=2, strategy="fedbuff", secagg={})


@settings(max_examples=80, deadline=None)
@given(st.dictionaries(st.sampled_from(["buffer_size", "max_staleness", "server_lr",
                                        "staleness", "max_versions", "max_seconds",
                                        "evaluate_every", "max_concurrency", "bogus"]),
                       st.one_of(st.none(), st.booleans(), st.integers(-5, 50),
                                 st.floats(allow_nan=True), st.text(max_size=12),
                                 st.just("hinge:2,3")), max_size=5))
def test_any_strategy_options_are_accepted_whole_or_refused_with_a_value_error(options):
    try:
        opts = fedbuff_options(options)
    except ValueError as exc:
        assert str(exc)
    else:
        assert isinstance(opts, FedBuff) and opts.buffer_size >= 1
        assert staleness_rule(opts.staleness)(opts.max_staleness) > 0


# -- the buffer, against numpy ------------------------------------------------------------------
def _strategy(start):
    return CrossPlatformStrategy(MANIFEST, start, min_clients=1)


def _arrive(buf, strategy, platform, base_version, canonical, n, cid):
    """What ``AsyncLoop`` does with one FitRes: the phone sends its platform's layout."""
    base = buf.base(base_version, platform, cid)
    res = _res(params.to_platform(canonical, MANIFEST, platform), n)
    got, n, _, _ = strategy._accept(platform, res, base)
    staleness = buf.version - base_version
    a = Arrival(buf.version + 1, platform, cid, base_version, staleness,
                buf.weight_of(staleness), n, 0.0, 0.0, "applied")
    buf.add(a, got, n)
    return a


def test_masked_staleness_weighted_buffer_matches_numpy():
    """An Android and a stale iOS update in one buffer: per tensor, Σ n·s·Δ / Σ n over the
    updates whose platform trains it (dense/bias is frozen on iOS: Android's alone)."""
    v0 = _canon(0)
    strategy = _strategy(v0)
    opts = FedBuff(buffer_size=2, max_staleness=3, server_lr=0.7)
    buf = VersionBuffer(v0, 5, opts, strategy._masks)  # a resumed session at version 5
    a1 = _canon(1)
    _arrive(buf, strategy, "android", 5, a1, 10, "a")
    _arrive(buf, strategy, "android", 5, _canon(2), 10, "b")
    assert buf.full
    v6, applied = buf.make_version()
    assert buf.version == 6 and [a.client for a in applied] == ["a", "b"]
    want6 = [g + 0.7 * ((x - g) + (y - g)) / 2 for g, x, y in zip(v0, a1, _canon(2),
                                                                  strict=True)]
    for got, want in zip(v6, want6, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # version 7 from an iOS update trained on version 5 (staleness 1) and an Android one on 6
    ios, droid = _canon(3), _canon(4)
    i = _arrive(buf, strategy, "ios", 5, ios, 30, "i")
    d = _arrive(buf, strategy, "android", 6, droid, 10, "a")
    assert (i.staleness, i.weight) == (1, pytest.approx(2 ** -0.5))
    assert (d.staleness, d.weight) == (0, 1.0)
    v7, _ = buf.make_version()
    mask_ios = params.trained_mask(MANIFEST, "ios")
    assert mask_ios == [True, True, True, False, True]
    ios_canon = params.from_platform(params.to_platform(ios, MANIFEST, "ios"), MANIFEST,
                                     "ios", base=v0)
    for k in range(5):
        d_ios = (ios_canon[k] - v0[k]) * 2 ** -0.5
        d_droid = droid[k] - v6[k]
        mean = (30 * d_ios + 10 * d_droid) / 40 if mask_ios[k] else d_droid
        np.testing.assert_allclose(v7[k], v6[k] + 0.7 * mean, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(v7[3], v6[3] + 0.7 * (droid[3] - v6[3]), rtol=1e-5,
                               atol=1e-6)  # iOS's frozen copy did not dilute it


def test_updates_older_than_max_staleness_are_refused_and_memory_is_bounded():
    v0 = _canon(0)
    strategy = _strategy(v0)
    buf = VersionBuffer(v0, 0, FedBuff(buffer_size=1, max_staleness=2), strategy._masks)
    for k in range(5):
        _arrive(buf, strategy, "android", buf.version, _canon(k + 1), 5, "a")
        buf.make_version()
    assert buf.version == 5 and sorted(buf.versions) == [3, 4, 5]  # max_staleness + 1 kept
    _arrive(buf, strategy, "ios", 3, _canon(9), 5, "i")  # staleness 2: still accepted
    with pytest.raises(StaleUpdate, match="staleness 3 > max_staleness 2"):
        buf.base(2, "ios", "i")
    before = [a.copy() for a in buf.current]
    bad = _res(params.to_platform([np.full_like(a, np.nan) for a in v0], MANIFEST,
                                  "android"), 5)
    with pytest.raises(ValueError, match="NaN or inf"):
        got, n, _, _ = strategy._accept("android", bad, buf.current)
        buf.add(Arrival(6, "android", "x", 5, 0, 1.0, n, 0, 0, "applied"), got, n)
    assert buf.buffer.count == 1  # the bad update touched nothing
    for a, b in zip(before, buf.current, strict=True):
        np.testing.assert_array_equal(a, b)


@settings(max_examples=60, deadline=None)
@given(tensors=st.lists(st.binary(max_size=64), max_size=6),
       n=st.one_of(st.integers(-3, 10**7), st.booleans(), st.floats(allow_nan=True)),
       platform=st.sampled_from(["android", "ios"]), base_version=st.integers(-2, 6))
def test_any_bytes_a_phone_sends_cost_at_most_its_own_update(tensors, n, platform,
                                                             base_version):
    """Whatever a FitRes carries, the buffer either takes it or refuses it with a
    ValueError, and a refusal leaves the buffer and every version as they were."""
    from xflwb.flower_legacy import Code, FitRes, Parameters, Status

    v0 = _canon(0)
    strategy = _strategy(v0)
    buf = VersionBuffer(v0, 0, FedBuff(buffer_size=3, max_staleness=2), strategy._masks)
    _arrive(buf, strategy, "android", 0, _canon(1), 5, "a")
    buf.make_version()
    _arrive(buf, strategy, "android", 1, _canon(2), 5, "b")
    snapshot = {v: [a.copy() for a in arrays] for v, arrays in buf.versions.items()}
    summed = buf.buffer.result()
    res = FitRes(status=Status(Code.OK, ""), num_examples=n,
                 parameters=Parameters(tensors=tensors, tensor_type="ND"), metrics={})
    try:
        base = buf.base(base_version, platform, "x")
        got, count, _, _ = strategy._accept(platform, res, base)
        a = Arrival(2, platform, "x", base_version, buf.version - base_version,
                    buf.weight_of(buf.version - base_version), count, 0, 0, "applied")
        buf.add(a, got, count)
    except ValueError:
        assert buf.buffer.count == 1
        for before, after in zip(summed, buf.buffer.result(), strict=True):
            np.testing.assert_array_equal(before, after)
    else:
        assert buf.buffer.count == 2
    assert sorted(buf.versions) == sorted(snapshot)
    for v, arrays in snapshot.items():
        for before, after in zip(arrays, buf.versions[v], strict=True):
            np.testing.assert_array_equal(before, after)


# -- real sessions --------------------------------------------------------------------------
def _bn_model():
    """BatchNorm's scale and offset train on Android only (Core ML cannot update them)."""
    keras.utils.set_random_seed(4)
    return keras.Sequential([
        keras.Input((8, 8, 1)),
        keras.layers.Conv2D(3, 3, padding="same"),
        keras.layers.BatchNormalization(),
        keras.layers.ReLU(),
        keras.layers.Flatten(),
        keras.layers.Dense(10, activation="softmax"),
    ])


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    from xflwb.demo import demo_model

    out = tmp_path_factory.mktemp("fedbuff")
    return {"bn": xflwb.export(_bn_model(), name="fb_bn", data_type="bn-data",
                               out_dir=out / "bn"),
            "digits": xflwb.export(demo_model(), name="fb_digits", data_type="digits",
                                   out_dir=out / "digits",
                                   optimizer=xflwb.SGD(0.05, momentum=0.9))}


def _versions(wb, session, manifest):
    """Every checkpointed version of ``session``: {version: canonical arrays}."""
    rows = wb.registry.checkpoints_newest_first(manifest["name"], session_id=session.id)
    return {r["round"]: load_checkpoint(r["path"], r.get("sha256"), manifest) for r in rows}


def test_stale_ios_update_is_mapped_masked_and_weighted_exactly(exports, tmp_path):
    """Scripted phones over the real wire, K=1: Android makes versions 1 and 2 while iOS
    trains on version 0; iOS's late update (staleness 2) moves only the tensors Core ML
    trains, by (1+2)^-0.5 times its delta; then Android's update on version 2 (staleness 1).
    Every checkpointed version equals the numpy reference."""
    res = exports["bn"]
    m = res.manifest
    mask_ios = params.trained_mask(m, "ios")
    assert not all(mask_ios) and any(mask_ios)  # BatchNorm: Android only
    ios_go = threading.Event()
    droid_fits = []

    def droid(ts, rnd):
        droid_fits.append(rnd)
        if rnd == 2:  # its third fit waits until iOS's late update made version 3
            ios_go.set()
            wait_until(lambda: s.round >= 3, 60, "iOS's late update to make version 3",
                       max_pause=0.02)
        return [t + 1.0 for t in ts]

    def ios(ts, rnd):
        ios_go.wait(60)  # Android has made versions 1 and 2 by now
        if rnd > 0:  # its next fit ends after Android's (too late to count)
            wait_until(lambda: s.round >= 4, 60, "Android's version 4", max_pause=0.02)
        return [t + 2.0 for t in ts]

    with xflwb.Workbench(data_dir=tmp_path / "xfl", port=0) as wb:
        wb.publish(res)
        # bounded influence off: its warm-up holds Android's first update until iOS has
        # reported, and this script makes iOS wait for Android's versions
        s = wb.train("fb_bn", rounds=4, min_clients=2, round_timeout=60, strategy="fedbuff",
                     strategy_options={"buffer_size": 1, "evaluate_every": 0},
                     max_weight_ratio=None, max_norm_ratio=None)
        phones = [WirePhone(wb.url, "android", "bn-data", droid, device_id=1),
                  WirePhone(wb.url, "ios", "bn-data", ios, encoding="npy", device_id=2)]
        threads = [p.start() for p in phones]
        assert s.wait(timeout=120) == "finished", (s.error, [p.report.error for p in phones])
        for t in threads:
            t.join(60)
        arrivals = s.arrivals
        versions = _versions(wb, s, m)
    assert all(p.report.error is None for p in phones), [p.report.error for p in phones]
    # iOS's second fit may end after the last version: recorded, never applied
    late = arrivals[arrivals.version > 4]
    assert (late.status == "rejected").all() and len(late) <= 1
    assert late.reason.str.contains("after the session's last version 4").all()
    arrivals = arrivals[arrivals.version <= 4]
    assert list(arrivals.version) == [1, 2, 3, 4]
    assert list(arrivals.platform) == ["android", "android", "ios", "android"]
    assert list(arrivals.base_version) == [0, 1, 0, 2]
    assert list(arrivals.staleness) == [0, 0, 2, 1]
    np.testing.assert_allclose(arrivals.weight, [1, 1, 3 ** -0.5, 2 ** -0.5])
    assert set(arrivals.status) == {"applied"}
    v = {0: xflwb.bridge.manifest.initial_parameters(m)}
    v[1] = [a + 1 for a in v[0]]
    v[2] = [a + 1 for a in v[1]]
    v[3] = [a + 2 * 3 ** -0.5 * t for a, t in zip(v[2], mask_ios, strict=True)]
    v[4] = [a + 2 ** -0.5 for a in v[3]]
    assert sorted(versions) == [0, 1, 2, 3, 4]
    for k in range(5):
        for got, want in zip(versions[k], v[k], strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    hist = s.history
    assert "version" in hist.columns and set(hist["version"]) == {1, 2, 3, 4}
    stale = hist.query("metric == 'staleness_max' and platform == 'ios'")
    assert list(stale.value) == [2.0]


def _slowest(arrivals):
    """The client whose fits took longest (the 10× slower device)."""
    return arrivals.groupby("client").fit_seconds.median().idxmax()


@pytest.mark.slow
def test_a_10x_slower_device_never_stalls_training(exports, tmp_path):
    """4 virtual devices, one 10× slower: versions keep coming while it trains; its late
    update is applied with FedBuff's weight, or refused past max_staleness."""
    res = exports["digits"]
    with xflwb.Workbench(data_dir=tmp_path / "xfl", port=0) as wb:
        wb.publish(res)
        runs = {}
        for max_staleness in (50, 1):
            s = wb.train("fb_digits", rounds=24, min_clients=4, local_epochs=3,
                         round_timeout=120, strategy="fedbuff",
                         strategy_options={"buffer_size": 3, "max_staleness": max_staleness,
                                           "evaluate_every": 4})
            fleet = wb.spawn_devices(android=2, ios=2, dataset="digits", partition="iid",
                                     seed=2, slowdown=[1, 1, 1, 10])
            status = s.wait(timeout=300)
            fleet.wait(timeout=120)
            runs[max_staleness] = (status, s.error, s.arrivals, s.history, s.rejections)
    status, error, arrivals, hist, _ = runs[50]
    assert status == "finished", error
    slow = arrivals[arrivals.client == _slowest(arrivals)]
    assert (slow.platform == "ios").all()
    late = slow[slow.status == "applied"]
    assert len(late) >= 1 and (late.staleness >= 2).all(), slow
    # versions were made while it trained: as many as its staleness
    np.testing.assert_allclose(late.weight, (1.0 + late.staleness) ** -0.5)
    assert (late.version - late.base_version - 1 == late.staleness).all()
    assert hist.query("metric == 'accuracy' and platform == 'all'").value.notna().any()
    status, error, arrivals, _, rejections = runs[1]
    assert status == "finished", error
    slow = arrivals[arrivals.client == _slowest(arrivals)]
    refused = slow[slow.status == "rejected"]
    assert (refused.weight == 0).all()
    stale = refused[refused.reason.str.startswith("stale update")]
    assert len(stale) >= 1 and stale.reason.str.contains("> max_staleness 1").all()
    assert (stale.staleness > 1).all()
    assert (arrivals[arrivals.status == "applied"].staleness <= 1).all()
    assert rejections.reason.str.contains("max_staleness 1").any()


@pytest.mark.slow
def test_killed_device_costs_only_its_update_and_a_late_joiner_gets_the_current_version(
        exports, tmp_path):
    res = exports["digits"]
    with xflwb.Workbench(data_dir=tmp_path / "xfl", port=0) as wb:
        wb.publish(res)
        # bounded influence off: this test asserts every update but the killed one is
        # applied; the warm-up supersedes held updates and a late joiner's first, larger
        # step can exceed max_norm_ratio × a converged fleet's median (docs/security.md)
        # no time limit: the session ends once the late joiner has delivered, not after a
        # fixed time its start-up (importing TensorFlow, loading the model) could outlast
        s = wb.train("fb_digits", rounds=100_000, min_clients=3, local_epochs=2,
                     round_timeout=60, strategy="fedbuff",
                     strategy_options={"buffer_size": 2, "evaluate_every": 0},
                     max_weight_ratio=None, max_norm_ratio=None)
        fleet = wb.spawn_devices(android=2, ios=1, dataset="digits", partition="iid",
                                 seed=3, slowdown=[4, 1, 1])
        victim = fleet.ids[0]
        wait_until(lambda: s.round >= 2  # kill the slow Android phone in mid-fit
                   and fleet.table.set_index("id").loc[victim].status == "training", 120,
                   "version 2 with the slow Android phone training", max_pause=0.02,
                   describe=lambda: (s.round, fleet.table))
        fleet.kill(victim)
        at_kill = s.round
        late = wb.spawn_devices(ios=1, dataset="digits", partition="iid", seed=4)

        def newcomer_delivered() -> bool:
            ios = s.arrivals.query("platform == 'ios'").client.nunique()
            return (late.table.rounds_done.iloc[0] >= 1 and ios >= 2
                    and s.round > at_kill + 2)

        wait_until(newcomer_delivered, 240, "the late joiner's update and 3 more versions",
                   describe=lambda: (s.round, late.table, s.arrivals.tail()))
        s.stop()
        fleet.wait(timeout=60)
        late.wait(timeout=60)
        arrivals, failures = s.arrivals, s.failures
    assert at_kill >= 2
    assert len(failures) >= 1  # the killed fit, recorded, cost nothing else
    late = arrivals.reason.str.startswith("arrived after the session's last version")
    assert (arrivals[~late].status == "applied").all()
    arrivals = arrivals[~late]
    first_seen = arrivals.drop_duplicates("client", keep="first")
    newcomer = first_seen.iloc[-1]  # the last client to deliver its first update
    assert newcomer.platform == "ios" and newcomer.base_version >= at_kill
    assert arrivals.version.max() > at_kill + 2  # training went on after the kill


def test_resume_after_the_session_process_was_killed_continues_from_the_last_version(
        exports, tmp_path):
    res = exports["bn"]
    release = threading.Event()

    def held(ts, rnd):
        if rnd >= 3:
            release.wait(60)
        return [t + 0.5 for t in ts]

    with xflwb.Workbench(data_dir=tmp_path / "xfl", port=0) as wb:
        wb.publish(res)
        opts = {"buffer_size": 1, "evaluate_every": 0}
        s = wb.train("fb_bn", rounds=10, min_clients=1, round_timeout=60,
                     strategy="fedbuff", strategy_options=opts)
        phone = WirePhone(wb.url, "android", "bn-data", held, device_id=7)
        thread = phone.start()
        wait_until(lambda: s.round >= 3, 60, "version 3", describe=lambda: s.info)
        assert s.round == 3
        os.kill(s.info["pid"], signal.SIGKILL)
        wait_until(lambda: s.status == "crashed", 10, "the killed session to read crashed",
                   describe=lambda: s.info)
        release.set()
        thread.join(60)
        saved = s.global_parameters()
        s2 = wb.train("fb_bn", rounds=2, min_clients=1, round_timeout=60, resume=True,
                      strategy="fedbuff", strategy_options=opts)
        phone2 = WirePhone(wb.url, "android", "bn-data", lambda ts, r: [t + 1 for t in ts],
                           device_id=8)
        phone2.start().join(60)
        assert s2.wait(timeout=60) == "finished", s2.error
        arrivals = s2.arrivals
        assert s2.started_from == f"resumed from session {s.id}, round 3"
    for got, want in zip(phone2.report.received[0], saved, strict=True):
        np.testing.assert_allclose(got, want.ravel(), atol=1e-7)
    assert list(arrivals.version) == [4, 5] and list(arrivals.base_version) == [3, 4]


def test_max_concurrency_bounds_the_phones_training_at_once(exports, tmp_path):
    """Counted, not timed: with buffer_size 1 every applied update makes a version, so a fit
    sent while another is out comes back stale. All three phones are idle when the first
    fits go out (min_clients=3): without the bound two of them would arrive stale."""
    res = exports["bn"]

    def tracked(ts, rnd):
        return [t + 0.1 for t in ts]

    with xflwb.Workbench(data_dir=tmp_path / "xfl", port=0) as wb:
        wb.publish(res)
        s = wb.train("fb_bn", rounds=6, min_clients=3, round_timeout=60, strategy="fedbuff",
                     strategy_options={"buffer_size": 1, "max_concurrency": 1,
                                       "evaluate_every": 0},
                     # bounded influence off: its warm-up holds the first updates, so the
                     # versions (the count this test reads) would not move with each one
                     max_weight_ratio=None, max_norm_ratio=None)
        phones = [WirePhone(wb.url, "android", "bn-data", tracked, device_id=20 + i)
                  for i in range(3)]
        threads = [p.start() for p in phones]
        assert s.wait(timeout=120) == "finished", s.error
        for t in threads:
            t.join(60)
        arrivals = s.arrivals
    assert (arrivals.status == "applied").all() and list(arrivals.staleness) == [0] * 6
    assert arrivals.client.nunique() >= 2  # idle phones take turns, not one phone alone


# -- the loop in-process: the stop rule ---------------------------------------------------------
def test_updates_landing_in_one_poll_never_make_more_than_max_versions():
    """Three updates back in the same poll with K=1 and max_versions=1: one version is
    made, the other two are recorded as arriving after the last version, never applied."""
    from concurrent.futures import wait

    from tests.conftest import Phone
    from xflwb.flower_legacy import SimpleClientManager
    from xflwb.server.fedbuff import AsyncLoop

    start = _canon(0)
    strategy = CrossPlatformStrategy(MANIFEST, start, min_clients=1, fraction_evaluate=0.0,
                                     max_weight_ratio=None, max_norm_ratio=None)
    cm = SimpleClientManager()
    for i in range(3):
        phone = Phone(f"p{i}", "android")
        update = params.to_platform([a + 0.1 * (i + 1) for a in start], MANIFEST, "android")
        phone.fit = lambda ins, timeout, group_id, u=update: _res(u, 10)
        phone.reconnect = lambda *a: None
        cm.register(phone)
    arrivals: list[Arrival] = []
    loop = AsyncLoop(cm, strategy, FedBuff(buffer_size=1), max_versions=1,
                     round_timeout=30, on_arrival=arrivals.append)
    # the loop reports progress after dispatching and before it polls: holding it until
    # every fit is back puts all three updates in the first poll
    strategy.on_progress = lambda state: wait(list(loop._jobs), timeout=30)
    loop.run()
    assert loop.versions_made == 1
    applied = [a for a in arrivals if a.status == "applied"]
    late = [a for a in arrivals if "after the session's last version" in (a.reason or "")]
    assert len(applied) == 1 and len(late) == 2, [(a.status, a.reason) for a in arrivals]
    expected = [s + 0.1 * (int(applied[0].client[1:]) + 1) for s in start]
    for got, want in zip(strategy.global_, expected, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5)
