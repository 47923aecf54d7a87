"""Central differential privacy (issue 14): noise, clipping in canonical space, the ε ledger,
``max_epsilon``, failures, and the ``privacy`` option — real strategies, real exports."""

from __future__ import annotations

import dataclasses
import math

import dp_accounting
import keras
import numpy as np
import pytest
from dp_accounting import rdp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import xflwb
from tests.conftest import SERVED_TOY_MANIFEST as TOY
from tests.conftest import Phone
from tests.conftest import toy_canonical as _canon
from tests.conftest import toy_fit_res as _res
from xflwb import _options
from xflwb.bridge import manifest as manifest_mod
from xflwb.bridge import params
from xflwb.federation.dp import DP, CentralDP, PrivacyBudgetSpent
from xflwb.flower_legacy import (
    Code,
    FitRes,
    Parameters,
    SimpleClientManager,
    Status,
    parameters_to_ndarrays,
)
from xflwb.server.config import SessionConfig
from xflwb.sessions.flower_strategy import ClientFailure, CrossPlatformStrategy

L = keras.layers


@pytest.fixture(scope="module")
def bn_export(tmp_path_factory):
    """Conv → BatchNorm → head on 8×8 digits: iOS trains conv and head, not BatchNorm's
    gamma/beta (``ios_training="auto"`` freezes them there)."""
    keras.utils.set_random_seed(2)
    model = keras.Sequential([keras.Input((8, 8, 1)), L.Conv2D(4, 3, name="conv"),
                              L.BatchNormalization(name="bn"), L.ReLU(name="relu"),
                              L.GlobalAveragePooling2D(name="gap"),
                              L.Dense(10, activation="softmax", name="head")])
    return xflwb.export(model, name="dp_bn", data_type="digits", ios_training="auto",
                        out_dir=tmp_path_factory.mktemp("dp"),
                        optimizer=xflwb.SGD(learning_rate=0.05))


def _metrics(report) -> dict[tuple[str, str], float | None]:
    return {(p, k): v for p, k, v in report.metrics}


def _strategy(manifest, start, reports=None, **privacy):
    return CrossPlatformStrategy(
        manifest, start, min_clients=1, privacy=privacy or None,
        on_fit_round=(lambda r, g: reports.append(r)) if reports is not None else None)


def _toy_round(seed: int, n_android: int = 3, n_ios: int = 2, scale: float = 5.0):
    """A round of toy results: updates far from the start (so every one is clipped)."""
    start = _canon(seed)
    results = []
    for k in range(n_android + n_ios):
        platform = "android" if k < n_android else "ios"
        arrays = [s + scale * u for s, u in zip(start, _canon(seed * 100 + k + 1), strict=True)]
        wire = arrays if platform == "android" else params.to_platform(arrays, TOY, "ios")
        results.append((Phone(f"{platform[0]}{k}", platform), _res(wire, 10 + k)))
    return start, results


def _dp_minus_clipped_mean(seed: int, privacy: dict, failures: list | None = None,
                           n_android: int = 3, n_ios: int = 2) -> list[np.ndarray]:
    """DP aggregate − the same aggregate without noise (noise_multiplier 0, same clipping):
    exactly the noise the mechanism added, per canonical tensor."""
    start, results = _toy_round(seed, n_android, n_ios)
    noisy = _strategy(TOY, start, **privacy)
    clean = _strategy(TOY, start, **{**privacy, "noise_multiplier": 0.0})
    a = parameters_to_ndarrays(noisy.aggregate_fit(1, results, failures or [])[0])
    b = parameters_to_ndarrays(clean.aggregate_fit(1, results, failures or [])[0])
    return [x.astype(np.float64) - y for x, y in zip(a, b, strict=True)]


# -- (a) the noise is there, at the calibrated scale ------------------------------------------
def test_noise_is_added_with_std_noise_multiplier_times_norm_over_count():
    privacy = {"noise_multiplier": 1.3, "clipping_norm": 0.7}
    start, results = _toy_round(0)
    one = parameters_to_ndarrays(_strategy(TOY, start, **privacy).aggregate_fit(
        1, results, [])[0])
    two = parameters_to_ndarrays(_strategy(TOY, start, **privacy).aggregate_fit(
        1, results, [])[0])
    assert any(not np.array_equal(x, y) for x, y in zip(one, two, strict=True))
    # 3 Android + 2 iOS: every tensor but dense/bias (index 3, not trained on iOS) is
    # averaged over 5 clients, dense/bias over the 3 Android ones
    noise5, noise3 = [], []
    for seed in range(8):
        diff = _dp_minus_clipped_mean(seed, privacy)
        noise5 += [d.ravel() for k, d in enumerate(diff) if k != 3]
        noise3.append(diff[3].ravel())
    five = np.concatenate(noise5)
    assert abs(five.mean()) < 0.1 * 1.3 * 0.7 / 5
    assert five.std() == pytest.approx(1.3 * 0.7 / 5, rel=0.1), five.std()
    for seed in range(8, 48):  # dense/bias has 7 values a round: 336 of them in all
        noise3.append(_dp_minus_clipped_mean(seed, privacy)[3].ravel())
    three = np.concatenate(noise3)  # /3, not /5: σ = 0.303 against 0.182 (sd of std ≈ 4 %)
    assert 1.3 * 0.7 / 4 < three.std() < 1.3 * 0.7 / 2.2


# -- (b) clipping in canonical space, over the tensors the platform trains ---------------------
def test_huge_ios_update_is_clipped_over_what_ios_trains(bn_export):
    m = bn_export.manifest
    start = manifest_mod.initial_parameters(m)
    ios_mask, android_mask = params.trained_mask(m, "ios"), params.trained_mask(m, "android")
    frozen_on_ios = [k for k, (i, a) in enumerate(zip(ios_mask, android_mask, strict=True))
                     if a and not i]
    assert frozen_on_ios and any(ios_mask)  # BatchNorm's gamma/beta: Android only
    small = [s + np.float32(1e-3) for s in start]
    huge = [s + np.float32(1e3) for s in start]
    ios_huge = params.to_platform(huge, m, "ios")
    privacy = {"noise_multiplier": 0.0, "clipping_norm": 1.0}
    reports: list = []
    s = _strategy(m, start, reports, **privacy)
    out = parameters_to_ndarrays(s.aggregate_fit(
        1, [(Phone("a", "android"), _res(small, 10)),
            (Phone("i", "ios"), _res(ios_huge, 1000))], [])[0])
    # tensors iOS does not train: Android's update alone, untouched by the huge one
    for k in frozen_on_ios:
        np.testing.assert_allclose(out[k], small[k], atol=1e-6)
    # the rest: uniform mean of Android's (unclipped, tiny) and iOS's clipped delta, whose
    # norm over the tensors iOS trains is exactly the clipping norm
    ios_delta = [2 * (o.astype(np.float64) - s0) - (sm - s0)
                 for o, s0, sm, t in zip(out, start, small, ios_mask, strict=True) if t]
    norm = math.sqrt(sum(float(np.sum(d * d)) for d in ios_delta))
    assert norm == pytest.approx(1.0, rel=1e-4)
    per_element = 1.0 / math.sqrt(sum(a.size for a, t in zip(start, ios_mask, strict=True)
                                      if t))
    for d in ios_delta:
        np.testing.assert_allclose(d, per_element, rtol=1e-3)
    # the client's own clipping (the same function, in its platform layout) is what the
    # server does: a pre-clipped update aggregates to the same model, and its norm was huge
    clipped, raw_norm = params.clip_platform_update(
        ios_huge, params.to_platform(start, m, "ios"), m, "ios", 1.0)
    assert raw_norm > 1e3
    again = parameters_to_ndarrays(_strategy(m, start, **privacy).aggregate_fit(
        1, [(Phone("a", "android"), _res(small, 10)),
            (Phone("i", "ios"), _res(clipped, 1000))], [])[0])
    for x, y in zip(again, out, strict=True):
        np.testing.assert_allclose(x, y, atol=1e-6)
    assert _metrics(reports[0])[("all", "clipping_norm")] == 1.0


def _delta_norm(update, start, manifest, platform) -> float:
    canonical = params.from_platform(update, manifest, platform, base=start)
    return math.sqrt(sum(float(np.sum((np.asarray(u, np.float64) - s) ** 2))
                         for u, s, t in zip(canonical, start,
                                            params.trained_mask(manifest, platform),
                                            strict=True) if t))


@pytest.mark.parametrize("platform", ["android", "ios"])
def test_simulated_and_virtual_clients_clip_locally_and_report_the_bit(bn_export, platform,
                                                                        tmp_path):
    from flwr.app import RecordDict

    from xflwb.bridge import runtime
    from xflwb.devices.device import Device
    from xflwb.flower_legacy import FitIns
    from xflwb.flower_legacy import transport_pb2 as pb
    from xflwb.simulation import client

    m = bn_export.manifest
    start = manifest_mod.initial_parameters(m)
    arrays = params.to_platform(start, m, platform)
    blob, sha = client.make_bundle(m, ["android", "ios"])
    spec = client.ClientSpec(bundle=blob, bundle_sha=sha, android=1, ios=1, dataset="digits",
                             partition="iid", seed=3, test_fraction=0.2)
    sim = client.SimClient(spec, 0 if platform == "android" else 1, RecordDict())
    tensors = params.encode_tensors(arrays, "raw")
    plain = sim.fit(FitIns(Parameters(tensors=tensors, tensor_type="ND"), {"local_epochs": 1}))
    assert "norm_bit" not in plain.metrics
    raw = _delta_norm(params.decode_tensors(plain.parameters.tensors)[0], start, m, platform)
    for cap, bit in ((raw / 10, 0.0), (raw * 10, 1.0)):
        res = sim.fit(FitIns(Parameters(tensors=tensors, tensor_type="ND"),
                             {"local_epochs": 1, "clipping_norm": cap}))
        got = _delta_norm(params.decode_tensors(res.parameters.tensors)[0], start, m, platform)
        assert res.metrics["norm_bit"] == bit
        assert got == pytest.approx(min(cap, raw), rel=0.05)  # seed + rounds done differ
    # the virtual phone's FedKit/Flower flow, on the same message types as the wire
    device = Device("http://127.0.0.1:9", platform, "digits", *client.client_data(spec, 0),
                    cache_dir=tmp_path)
    device.runtime, device.manifest = runtime.load(bn_export, platform), m
    msg = pb.ServerMessage(fit_ins=pb.ServerMessage.FitIns(
        parameters=pb.Parameters(tensors=tensors, tensor_type="ND"),
        config={"local_epochs": pb.Scalar(sint64=1),
                "clipping_norm": pb.Scalar(double=raw / 10)}))
    reply = device._answer(pb, "fit_ins", msg).fit_res
    assert reply.metrics["norm_bit"].double == 0.0
    got = _delta_norm(params.decode_tensors(list(reply.parameters.tensors))[0], start, m,
                      platform)
    assert got == pytest.approx(raw / 10, rel=1e-4)


# -- (c) the ledger is dp-accounting's own computation -----------------------------------------
def test_ledger_matches_dp_accounting_for_the_rounds_sampled():
    z, delta = 0.9, 1e-6
    reports: list = []
    start = _canon(0)
    s = CrossPlatformStrategy(TOY, start, min_clients=1, fraction_fit=0.5,
                              privacy={"noise_multiplier": z, "clipping_norm": 1.0,
                                       "target_delta": delta},
                              on_fit_round=lambda r, g: reports.append(r))
    manager = SimpleClientManager()
    phones = [Phone(f"a{k}", "android") for k in range(6)]
    for p in phones:
        manager.register(p)
    expected = rdp.RdpAccountant(
        neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    for rnd in (1, 2, 3):
        if rnd == 3:
            manager.unregister(phones[0])  # 5 available: int(2.5) = 2 sampled
        ins = s.configure_fit(rnd, None, manager)
        population = manager.num_available()
        assert ins[0][1].config["clipping_norm"] == 1.0  # clients clip to it
        s.aggregate_fit(rnd, [(Phone(c.cid, "android"), _res(_canon(rnd * 10 + k), 5))
                              for k, (c, _) in enumerate(ins)], [])
        expected.compose(dp_accounting.SampledWithoutReplacementDpEvent(
            population, len(ins), dp_accounting.GaussianDpEvent(z)))
        got = _metrics(reports[-1])
        assert got[("all", "epsilon")] == pytest.approx(expected.get_epsilon(delta), rel=1e-9)
        assert got[("all", "noise_std")] == pytest.approx(z * 1.0)
    assert [e.sample_size for e in s.dp.ledger.events] == [3, 3, 2]


# -- (d) max_epsilon stops before it is exceeded ------------------------------------------------
def test_max_epsilon_stops_the_round_that_would_exceed_it():
    reports: list = []
    start = _canon(0)
    s = _strategy(TOY, start, reports, noise_multiplier=1.0, clipping_norm=1.0,
                  max_epsilon=10.0)
    manager = SimpleClientManager()
    for k in range(4):
        manager.register(Phone(f"a{k}", "android"))
    rounds = 0
    with pytest.raises(PrivacyBudgetSpent) as stop:
        for rnd in range(1, 20):
            ins = s.configure_fit(rnd, None, manager)
            s.aggregate_fit(rnd, [(Phone(c.cid, "android"), _res(_canon(rnd + k), 5))
                                  for k, (c, _) in enumerate(ins)], [])
            rounds = rnd
    # 4 of 4 sampled, z = 1, δ = 1e-5: ε = 4.73, 7.08, 9.01, then 10.73 > 10
    assert rounds == 3 and stop.value.round == 3
    eps = [_metrics(r)[("all", "epsilon")] for r in reports]
    assert eps == sorted(eps) and eps[-1] <= 10.0
    assert dict(((p, k), v) for p, k, v in stop.value.metrics)[
        ("all", "epsilon_next_round")] > 10.0
    assert ("all", "privacy_budget_spent", 1.0) in stop.value.metrics


@pytest.mark.timeout(600)
def test_simulation_ends_finished_when_the_budget_is_spent(bn_export, tmp_path, shared_ray):
    sim = xflwb.simulate(bn_export, android=2, ios=2, rounds=10, seed=0,
                         privacy=xflwb.DP(noise_multiplier=1.0, clipping_norm=1.0,
                                          max_epsilon=10.0),
                         data_dir=tmp_path / "d", ray_address=shared_ray, progress=False)
    info = sim.info
    assert info["status"] == "finished" and not info.get("error"), info
    hist = sim.history
    eps = hist.query("metric == 'epsilon' and platform == 'all'")
    assert list(eps["round"]) == [1, 2, 3]  # the 4th round would reach ε = 10.73
    assert eps["value"].iloc[-1] <= 10.0
    spent = hist.query("metric == 'privacy_budget_spent'")
    assert list(spent["value"]) == [1.0] and list(spent["round"]) == [3]
    norms = hist.query("metric == 'clipping_norm'")["value"]
    assert (norms == 1.0).all() and len(norms) == 3
    assert (hist.query("metric == 'clients' and platform == 'all'")["value"] == 4).all()


# -- (e) a failed client does not void a DP round -------------------------------------------------
def test_failures_do_not_void_the_round_and_noise_fits_who_took_part():
    privacy = {"noise_multiplier": 1.0, "clipping_norm": 0.5}
    lost = FitRes(status=Status(code=Code.FIT_NOT_IMPLEMENTED, message="dropped out"),
                  parameters=Parameters(tensors=[], tensor_type=""), num_examples=0,
                  metrics={})
    failures = [ClientFailure("android", "x", RuntimeError("boom")),
                (Phone("y", "android"), lost)]
    reports: list = []
    start, results = _toy_round(1, n_android=2, n_ios=0)
    s = _strategy(TOY, start, reports, **privacy)
    out = parameters_to_ndarrays(s.aggregate_fit(1, results, failures)[0])
    assert any(not np.array_equal(x, y) for x, y in zip(out, start, strict=True))
    got = _metrics(reports[0])
    assert got[("all", "failures")] == 2 and got[("all", "clients")] == 2
    assert got[("all", "epsilon")] is not None and reports[0].failed is None
    noise = np.concatenate([d.ravel() for seed in range(8) for d in _dp_minus_clipped_mean(
        seed, privacy, failures, n_android=2, n_ios=0)])
    assert noise.std() == pytest.approx(1.0 * 0.5 / 2, rel=0.1)  # /2 who came, not /4


# -- adaptive clipping ---------------------------------------------------------------------
def test_adaptive_norm_moves_geometrically_and_reported_bits_count():
    reports: list = []
    start = _canon(0)
    s = _strategy(TOY, start, reports, noise_multiplier=0.0, target_quantile=0.5,
                  initial_clipping_norm=0.1)

    def round_of(offset: float, bit: float | None, cids: str, local: bool = False) -> list:
        out = []
        for k in range(4):
            arrays = [g + np.float32(offset) for g in s.global_]
            if local:  # the client clipped to the round's norm itself (as virtual devices do)
                arrays, _ = params.clip_update(arrays, s.global_, [True] * len(arrays),
                                               s.dp.clipping_norm)
            res = _res(arrays, 5)
            if bit is not None:
                res.metrics = {"norm_bit": bit}
            out.append((Phone(f"{cids}{k}", "android"), res))
        return out

    # far updates: clipped whatever a client claims (b = 0) → C·e^{0.2·(0.5 − 0)}
    s.aggregate_fit(1, round_of(1.0, 1.0, "a"), [])
    assert _metrics(reports[0])[("all", "clipping_norm")] == pytest.approx(0.1)
    assert s.dp.clipping_norm == pytest.approx(0.1 * math.exp(0.1))
    # updates clients clipped locally (they land at the norm) and say so (b = 0): the norm
    # grows, and no claim is overruled
    s.aggregate_fit(2, round_of(1.0, 0.0, "b", local=True), [])
    assert s.dp.clipping_norm == pytest.approx(0.1 * math.exp(0.2))
    assert ("all", "norm_bit_overruled") not in _metrics(reports[1])
    # near updates, nothing reported: the server's own b = 1 → C·e^{−0.1}
    s.aggregate_fit(3, round_of(1e-4, None, "c"), [])
    assert s.dp.clipping_norm == pytest.approx(0.1 * math.exp(0.1))
    assert [_metrics(r)[("all", "clipping_norm")] for r in reports] == pytest.approx(
        [0.1, 0.1 * math.exp(0.1), 0.1 * math.exp(0.2)])


# -- norm_bit is a claim, checked against the update the server sees (issue 20, item 7) --------
_CLAIMS = st.one_of(st.none(), st.sampled_from([0, 1, 0.0, 1.0, True, False, -1, 2, "0"]),
                    st.floats(allow_nan=True, allow_infinity=True))


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**16), fraction=st.floats(0.0, 0.99), c=st.floats(1e-3, 1e3),
       claim=_CLAIMS)
def test_a_reported_bit_cannot_make_an_update_clearly_below_the_norm_count_as_clipped(
        seed, fraction, c, claim):
    """Below C (by more than float32 rounding) the update was certainly not clipped: its
    bit is 1 whatever the client reports; a false 0 is counted as overruled."""
    dp = CentralDP(DP(noise_multiplier=0.0, target_quantile=0.5, initial_clipping_norm=c))
    global_ = _canon(seed)
    rng = np.random.default_rng(seed)
    direction = [rng.standard_normal(g.shape) for g in global_]
    size = math.sqrt(sum(float((d**2).sum()) for d in direction))
    update = [(g + d * (fraction * c / size)).astype(np.float32)
              for g, d in zip(global_, direction, strict=True)]
    dp.begin()
    _, bit = dp.clip(update, global_, [True] * len(global_), {"norm_bit": claim})
    assert bit == 1.0
    lied = claim == 0 and not isinstance(claim, bool)
    assert dp.end_round(True, 0.0, 0)[-1] == (
        ("all", "norm_bit_overruled", 1.0) if lied else ("all", "clipping_norm", c))
    # and an update above the norm is clipped (b = 0) whatever is claimed
    far = [(g + d * (2 * c / size)).astype(np.float32)
           for g, d in zip(global_, direction, strict=True)]
    assert dp.clip(far, global_, [True] * len(global_), {"norm_bit": claim})[1] == 0.0


def test_clients_claiming_to_be_clipped_cannot_push_the_adaptive_norm_up():
    """One honest client and three liars (tiny updates, ``norm_bit`` 0): believed, the
    unclipped fraction looks like 1/4 < 1/2 and the norm would grow every round; checked,
    all four are unclipped and the norm shrinks."""
    reports: list = []
    s = _strategy(TOY, _canon(0), reports, noise_multiplier=0.0, target_quantile=0.5,
                  initial_clipping_norm=0.1)
    for rnd in range(1, 4):
        results = []
        for k in range(4):
            res = _res([g + np.float32(1e-5) for g in s.global_], 5)
            res.metrics = {"norm_bit": 1.0 if k == 0 else 0.0}
            results.append((Phone(f"c{k}", "android"), res))
        s.aggregate_fit(rnd, results, [])
    norms = [_metrics(r)[("all", "clipping_norm")] for r in reports] + [s.dp.clipping_norm]
    assert norms == sorted(norms, reverse=True) and norms[-1] < norms[0]
    assert norms[-1] == pytest.approx(0.1 * math.exp(-0.2 * 0.5 * 3))
    assert [_metrics(r)[("all", "norm_bit_overruled")] for r in reports] == [3.0] * 3


# -- configuration -------------------------------------------------------------------------
def test_robust_rules_are_refused_with_privacy():
    dp = {"noise_multiplier": 1.0, "clipping_norm": 1.0}
    for rule in ("fedmedian", "fedtrimmedavg", "krum"):
        with pytest.raises(ValueError, match=f"privacy.*{rule}"):
            SessionConfig(strategy=rule, privacy=dp)
        with pytest.raises(ValueError, match="privacy"):
            CrossPlatformStrategy(TOY, _canon(0), strategy=rule, privacy=dp)
    cfg = SessionConfig(privacy=xflwb.DP(noise_multiplier=1.0, clipping_norm=1.0))
    assert cfg.privacy == dataclasses.asdict(DP(noise_multiplier=1.0, clipping_norm=1.0))


_BAD = {
    "noise_multiplier": st.sampled_from([-1.0, -1e-9, float("nan"), float("inf"), "1", True]),
    "clipping_norm": st.sampled_from([0.0, -2.0, float("inf"), "0.5"]),
    "target_quantile": st.sampled_from([0.0, 1.0, 1.5, -0.1]),
    "clip_learning_rate": st.sampled_from([0.0, -0.2, None]),
    "clipped_count_stddev": st.sampled_from([-1.0, "x"]),
    "initial_clipping_norm": st.sampled_from([0.0, -1.0, None]),
    "target_delta": st.sampled_from([0.0, 1.0, 2.0]),
    "max_epsilon": st.sampled_from([0.0, -3.0, float("nan")]),
    "client_clipping": st.sampled_from([1, "yes", None]),
}


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), z=st.floats(0.01, 10), c=st.floats(1e-3, 1e3))
def test_privacy_option_refuses_bad_values_by_name(data, z, c):
    good = {"noise_multiplier": z, "clipping_norm": c}
    assert SessionConfig(privacy=good).privacy == dataclasses.asdict(DP(**good))
    name = data.draw(st.sampled_from(sorted(_BAD)))
    value = data.draw(_BAD[name])
    bad = {**good, name: value}
    if name == "target_quantile":
        bad.pop("clipping_norm")
    with pytest.raises(ValueError, match=f"privacy.*{name}"):
        SessionConfig(privacy=bad)
    assert set(_BAD) == set(_options.names(DP))
