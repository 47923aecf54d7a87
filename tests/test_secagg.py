"""Secure aggregation (Flower's SecAgg+) in the Simulation Engine: the masked cross-platform
average survives the masking, the strategy only ever sees the unmasked sum, and a client
that drops after sharing its keys is recovered (real Ray, real Flower workflow and mod)."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest

import xflwb
from xflwb.bridge import manifest as manifest_mod
from xflwb.bridge import params
from xflwb.simulation import SimulationConfig
from xflwb.simulation.secagg import (
    SecAgg,
    canonical_payload,
    check_range,
    mod_ratio,
    neighbourhood,
    uniform,
)

L = keras.layers
SEED = 5


def bn_digits() -> keras.Model:
    """Digits-shaped conv → BatchNorm → head: the BatchNorm is frozen on iOS (Core ML cannot
    update it), so an iOS client's weight for it must be 0, not its stale copy."""
    keras.utils.set_random_seed(7)
    return keras.Sequential([keras.Input((8, 8, 1)), L.Conv2D(4, 3, name="conv"),
                             L.BatchNormalization(name="bn"), L.ReLU(name="relu"),
                             L.GlobalAveragePooling2D(name="gap"),
                             L.Dense(10, activation="softmax", name="head")])


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    return xflwb.export(bn_digits(), name="secagg_bn", data_type="digits",
                        out_dir=tmp_path_factory.mktemp("exp"),
                        optimizer=xflwb.SGD(learning_rate=0.05, momentum=0.9))


def _wide(session):
    return session.history.pivot_table(index=["round", "platform"], columns="metric",
                                       values="value")


# -- options: declared once, checked at the call ---------------------------------------------
def test_secagg_option_is_normalised_and_checked():
    cfg = SimulationConfig(android=2, ios=2, secagg=xflwb.SecAgg(clipping_range=4.0))
    assert cfg.secagg == {"num_shares": 3, "reconstruction_threshold": 2, "max_weight": 1000.0,
                          "clipping_range": 4.0, "quantization_range": 2**22,
                          "modulus_range": 2**32, "timeout": None}
    assert json.loads(json.dumps(cfg.secagg)) == cfg.secagg  # stored as JSON in the registry
    assert SimulationConfig(android=3, secagg={}).secagg["num_shares"] == 3  # Flower's example
    assert SimulationConfig(android=3).secagg is None and xflwb.SecAgg is SecAgg
    with pytest.raises(TypeError, match=r"'num_share': did you mean 'num_shares'\?"):
        SimulationConfig(android=3, secagg={"num_share": 3})
    for kwargs, match in [
        ({"secagg": {"num_shares": 2}}, "num_shares as an integer must be greater than 2"),
        ({"secagg": {"num_shares": 1.5}}, r"fraction must be in \(0, 1\]"),
        ({"secagg": {"reconstruction_threshold": 3}}, "must be less than num_shares"),
        ({"secagg": {"clipping_range": -1.0}}, "clipping_range must be a positive number"),
        ({"secagg": "on"}, "secagg must be xflwb.SecAgg"),
        ({"secagg": {}, "strategy": "krum"}, "needs every client's update"),
        ({"secagg": {}, "max_update_norm": 1.0}, "max_update_norm rejects single updates"),
        ({"secagg": {}, "privacy": {"noise_multiplier": 1.0, "clipping_norm": 1.0,
                                    "client_clipping": False}}, "needs client_clipping"),
        ({"secagg": {"num_shares": 5, "reconstruction_threshold": 4}},
         "threshold 4 exceeds the 3 clients"),
    ]:
        with pytest.raises(ValueError, match=match):
            SimulationConfig(android=3, **kwargs)
    with pytest.raises(ValueError, match="at least 2 clients per round"):
        SimulationConfig(android=1, secagg={})
    # Flower's own arithmetic: 5 shares among 10 sampled clients, threshold 0.6 of them
    assert neighbourhood({"num_shares": 0.5, "reconstruction_threshold": 0.6}, 10) == (5, 3)


def test_front_ends_take_secagg_and_phones_refuse_it(tmp_path):
    import inspect

    from xflwb import magics

    assert inspect.signature(xflwb.simulate).parameters["secagg"].default is None
    assert "secagg" in inspect.signature(xflwb.Workbench.simulate).parameters
    args = magics._simulate_parser().parse_args(
        ["m", "--android", "2", "--secagg", '{"num_shares": 3, "timeout": 30}'])
    assert args.secagg == {"num_shares": 3, "timeout": 30}
    wb = xflwb.Workbench(data_dir=tmp_path / "d", port=0)
    with pytest.raises(TypeError, match=r"secagg runs only in the Simulation Engine.*"
                                        r"wb\.simulate\(\.\.\., secagg=\.\.\.\)"):
        wb.train("anything", rounds=1, secagg=xflwb.SecAgg())
    assert not (tmp_path / "d").exists()


def test_canonical_payload_zeroes_what_the_platform_does_not_train(export):
    m = export.manifest
    mask = params.trained_mask(m, "ios")
    assert any(mask) and not all(mask)  # the export really freezes something on iOS
    canonical = manifest_mod.initial_parameters(m)
    payload = canonical_payload(canonical, mask)
    k = len(canonical)
    assert len(payload) == 2 * k + 1 and payload[-1].tolist() == [1.0]  # sums, weights, count
    for a, w, t, c in zip(payload[:k], payload[k:2 * k], mask, canonical, strict=True):
        assert w.tolist() == [1.0 if t else 0.0]
        np.testing.assert_array_equal(a, c if t else np.zeros_like(c))
    # under DP each client counts once: the mod's num_examples factor is divided out
    cfg = SimulationConfig(android=3, secagg={}).secagg
    ratio = mod_ratio(300, cfg)
    assert ratio == pytest.approx(0.3)
    for u, a in zip(uniform(payload, 300, cfg), payload, strict=True):
        np.testing.assert_allclose(u * ratio, a, rtol=1e-6)
    with pytest.raises(ValueError, match="more than secagg's max_weight 1000: raise"):
        check_range(payload, 1001, cfg)
    with pytest.raises(ValueError, match="beyond secagg's clipping_range 8"):
        check_range([np.full(3, 9.0, np.float32)], 1000, cfg)
    check_range(payload, 1000, cfg)


# -- real runs on the shared Ray head -------------------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_secure_aggregate_equals_plain_masked_average(export, tmp_path, shared_ray):
    """(a) Same seeds with and without SecAgg+: the global models agree within the
    quantisation error, on the tensors both platforms train and on the BatchNorm only
    Android trains (whose average a frozen iOS copy would have pulled back by ~half).
    (b) The strategy got one FitRes per surviving client, all carrying one aggregate."""
    run = {"android": 2, "ios": 2, "rounds": 2, "dataset": "digits", "seed": SEED,
           "fraction_evaluate": 0.0, "ray_address": shared_ray,
           "data_dir": tmp_path / "d", "progress": False}
    plain = xflwb.simulate(export, **run)
    secure = xflwb.simulate(export, secagg=xflwb.SecAgg(), **run)
    assert plain.status == secure.status == "finished"
    m = export.manifest
    start = manifest_mod.initial_parameters(m)
    frozen_on_ios = [i for i, t in enumerate(params.trained_mask(m, "ios")) if not t]
    got, want = secure.global_parameters(), plain.global_parameters()
    for i, (g, w, s) in enumerate(zip(got, want, start, strict=True)):
        np.testing.assert_allclose(g, w, atol=5e-4, err_msg=f"tensor {i}")
        if i in frozen_on_ios:  # the check can tell a diluted average from a masked one
            moved, off = float(np.abs(w - s).max()), float(np.abs(g - w).max())
            assert moved > 5e-3 and off < moved / 10, (i, moved, off)
    wide = _wide(secure)
    for rnd in (1, 2):
        assert wide.loc[(rnd, "all"), "secure_aggregates"] == 1.0  # one sum, not 4 updates
        assert wide.loc[(rnd, "all"), "clients"] == 4.0
        assert wide.loc[(rnd, "android"), "clients"] == wide.loc[(rnd, "ios"), "clients"] == 2
        assert wide.loc[(rnd, "all"), "rejected"] == 0.0
    assert "secure_aggregates" not in _wide(plain).columns


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_client_dropping_after_key_sharing_is_survived(export, tmp_path, shared_ray):
    """(c) One client of four fails its fit (stage 2: after sharing its keys); SecAgg+
    removes its masks with its neighbours' shares and the round completes with three."""
    draws = [np.random.default_rng([SEED, pid, 0]).random() for pid in range(4)]
    low, second = sorted(draws)[:2]
    drop_prob = (low + second) / 2  # exactly the client with the lowest draw drops
    dropped = draws.index(low)
    sim = xflwb.simulate(export, android=2, ios=2, rounds=1, dataset="digits", seed=SEED,
                         fraction_evaluate=0.0, drop_prob=drop_prob,
                         secagg={"num_shares": 3, "reconstruction_threshold": 2},
                         ray_address=shared_ray, data_dir=tmp_path / "d", progress=False)
    assert sim.status == "finished", sim.info["error"]
    wide = _wide(sim)
    assert wide.loc[(1, "all"), "clients"] == 3.0 and wide.loc[(1, "all"), "failures"] == 1.0
    assert wide.loc[(1, "all"), "secure_aggregates"] == 1.0
    survivors = {"android": 2, "ios": 2}
    survivors["android" if dropped < 2 else "ios"] -= 1
    for platform, n in survivors.items():
        assert wide.loc[(1, platform), "clients"] == n
    start = manifest_mod.initial_parameters(export.manifest)
    got = sim.global_parameters()
    assert all(np.isfinite(a).all() for a in got)
    assert max(float(np.abs(a - s).max()) for a, s in zip(got, start, strict=True)) > 1e-3


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_secagg_with_central_dp_clips_on_clients_and_counts_each_once(export, tmp_path,
                                                                      shared_ray):
    """Flower's fl-dp-sa pattern: clients clip their delta (the server cannot clip a
    masked update), each counts once, the server noises the unmasked mean per tensor
    count. Without noise the secure run equals the plain DP run (server-side clipping of
    the same clipped updates) within the quantisation error."""
    privacy = {"noise_multiplier": 0.0, "clipping_norm": 0.05}
    run = {"android": 2, "ios": 2, "rounds": 1, "dataset": "digits", "seed": SEED,
           "fraction_evaluate": 0.0, "privacy": privacy, "ray_address": shared_ray,
           "data_dir": tmp_path / "d", "progress": False}
    plain = xflwb.simulate(export, **run)
    secure = xflwb.simulate(export, secagg={}, **run)
    start = manifest_mod.initial_parameters(export.manifest)
    got, want = secure.global_parameters(), plain.global_parameters()
    moved = max(float(np.abs(w - s).max()) for w, s in zip(want, start, strict=True))
    assert moved > 1e-3  # the clipped updates did move the model
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        np.testing.assert_allclose(g, w, atol=moved / 50, err_msg=f"tensor {i}")
    # clipped to 0.05 per client: the mean moved far less than an unclipped round does
    delta = np.sqrt(sum(float(np.sum((g - s) ** 2)) for g, s in zip(got, start, strict=True)))
    assert delta <= 0.05 * 1.01
    wide = _wide(secure)
    assert wide.loc[(1, "all"), "secure_aggregates"] == 1.0
    assert wide.loc[(1, "all"), "clipping_norm"] == 0.05
