"""The cross-platform strategy with real Flower message types: decoding, masking,
rejection, server optimisers, per-client encodings."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import SERVED_TOY_MANIFEST as MANIFEST
from tests.conftest import Phone
from tests.conftest import toy_canonical as _canon
from tests.conftest import toy_fit_res as _res
from xflwb.bridge import params
from xflwb.flower_legacy import (
    Code,
    FedAdam,
    FitRes,
    SimpleClientManager,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from xflwb.sessions.flower_strategy import CrossPlatformStrategy


def test_frozen_ios_copy_does_not_dilute_and_codecs_are_remembered():
    start, a, i = _canon(0), _canon(1), _canon(2)
    reports = []
    s = CrossPlatformStrategy(MANIFEST, start, min_clients=1, max_weight_ratio=None,
                              on_fit_round=lambda r, g: reports.append(r))
    ios = Phone("i", "ios")
    results = [(Phone("a", "android"), _res(a, 10)),
               (ios, _res(params.to_platform(i, MANIFEST, "ios"), 30, codec="npy"))]
    out, _ = s.aggregate_fit(1, results, [])
    got = parameters_to_ndarrays(out)
    # dense/bias (index 3) is not updatable on iOS: Android's value alone
    np.testing.assert_allclose(got[3], a[3], atol=1e-6)
    for k in (0, 1, 2, 4):
        np.testing.assert_allclose(got[k], (10 * a[k] + 30 * i[k]) / 40, atol=1e-5)
    assert s.codec_of == {"a": "raw", "i": "npy"}
    manager = SimpleClientManager()
    manager.register(ios)
    ins = dict(s.configure_fit(2, out, manager))
    enc = next(iter(ins.values()))
    assert enc.parameters.tensor_type == "ndarray"  # answered in the encoding it used
    assert enc.config == {"local_epochs": 1}
    decoded = [params.decode_npy(t) for t in enc.parameters.tensors]
    for d, w in zip(decoded, params.to_platform(got, MANIFEST, "ios"), strict=True):
        np.testing.assert_allclose(d, w, atol=1e-6)
    metrics = {(p, k): v for p, k, v in reports[0].metrics}
    assert metrics[("ios", "examples")] == 30 and metrics[("all", "clients")] == 2


@pytest.mark.parametrize("bad, reason", [
    (lambda a: a[:-1], "expected 5 android tensors, got 4"),
    (lambda a: [*a[:-1], np.zeros(3, np.float32)], "has 3 elements, expected 14"),
    (lambda a: [np.full_like(x, np.inf) for x in a], "NaN or inf"),
])
def test_bad_update_is_rejected_round_goes_on(bad, reason):
    start, good = _canon(0), _canon(1)
    reports = []
    s = CrossPlatformStrategy(MANIFEST, start, on_fit_round=lambda r, g: reports.append(r))
    out, _ = s.aggregate_fit(1, [(Phone("g", "android"), _res(good, 5)),
                                 (Phone("b", "android"), _res(bad(good), 500))], [])
    for x, y in zip(parameters_to_ndarrays(out), good, strict=True):
        np.testing.assert_allclose(x, y, atol=1e-6)
    (platform, cid, why), = reports[0].rejections
    assert (platform, cid) == ("android", "b") and reason in why


def test_no_good_update_keeps_the_global():
    start = _canon(0)
    s = CrossPlatformStrategy(MANIFEST, start)
    out, _ = s.aggregate_fit(1, [(Phone("b", "ios"), _res([np.ones(1)], 5))], [])
    for x, y in zip(parameters_to_ndarrays(out), start, strict=True):
        np.testing.assert_array_equal(x, y)


def _broken_ios_manifest() -> dict:
    """``MANIFEST`` with the iOS conv weights' layout key lost (an export bug, not a phone's)."""
    import copy

    m = copy.deepcopy(MANIFEST)
    del m["platforms"]["ios"]["coreml_layers"][0]["layout"]
    return m


def test_a_broken_manifest_fails_at_start_naming_model_and_platform():
    with pytest.raises(ValueError, match=r"manifest of model 't' is malformed for platform "
                                         r"'ios' \(KeyError: 'layout'\); re-export"):
        CrossPlatformStrategy(_broken_ios_manifest(), _canon(0))


def test_a_manifest_lookup_error_in_a_round_is_not_taken_for_a_bad_update():
    """A KeyError while mapping an update is ours (manifest or code): the round fails loudly
    instead of rejecting an honest phone's update."""
    s = CrossPlatformStrategy(MANIFEST, _canon(0), min_clients=1)
    s.manifest = _broken_ios_manifest()  # corrupted after the start-up check
    ios = _res(params.to_platform(_canon(1), MANIFEST, "ios"), 10, codec="npy")
    with pytest.raises(RuntimeError, match=r"round 1: .* ios client i's update \(KeyError: "
                                           r"'layout'\): the manifest of model 't'"):
        s.aggregate_fit(1, [(Phone("i", "ios"), ios)], [])


def test_server_optimiser_is_flowers_on_the_canonical_pseudo_gradient():
    start, a = _canon(0), _canon(1)
    s = CrossPlatformStrategy(MANIFEST, start, strategy="fedadam",
                              strategy_options={"eta": 0.05})
    out, _ = s.aggregate_fit(1, [(Phone("a", "android"), _res(a, 10))], [])
    ref = FedAdam(initial_parameters=ndarrays_to_parameters(start), eta=0.05)
    want, _ = ref.aggregate_fit(1, [(Phone("a", "android"), FitRes(
        Status(Code.OK, ""), ndarrays_to_parameters(a), 10, {}))], [])
    for x, y in zip(parameters_to_ndarrays(out), parameters_to_ndarrays(want), strict=True):
        np.testing.assert_allclose(x, y, atol=1e-6)
    with pytest.raises(ValueError, match="unknown strategy"):
        CrossPlatformStrategy(MANIFEST, start, strategy="fedmagic")


# -- the frozen-weights digest a client reports crosses the gRPC boundary ---------------------
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

DIGEST = "ab" * 32


@settings(max_examples=40, deadline=None)
@given(value=st.one_of(st.text(max_size=80), st.integers(), st.floats(allow_nan=True),
                       st.binary(max_size=40), st.booleans(), st.just(DIGEST)))
def test_any_reported_frozen_digest_costs_only_that_update(value):
    start, good, bad = _canon(0), _canon(1), _canon(2)
    reports = []
    s = CrossPlatformStrategy({**MANIFEST, "frozen": {"sha256": DIGEST}}, start,
                              min_clients=1, on_fit_round=lambda r, g: reports.append(r))
    odd = _res(bad, 10)
    odd.metrics = {"frozen_sha256": value}
    ok = _res(good, 10)
    ok.metrics = {"frozen_sha256": DIGEST}
    s.aggregate_fit(1, [(Phone("g", "android"), ok), (Phone("x", "android"), odd)], [])
    rejected = [cid for _, cid, _ in reports[0].rejections]
    if value == DIGEST:
        assert rejected == []
    else:  # refused with the reason; the other client's update is the new global model
        assert rejected == ["x"] and "frozen weights" in reports[0].rejections[0][2]
        for got, want in zip(s.global_, good, strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_the_adapter_exposes_the_core_by_public_names_and_the_old_ones_still_work():
    """FedBuff's loop and the hosts use these until they are re-pointed at the core."""
    from xflwb.federation.rounds import ClientRefused

    s = CrossPlatformStrategy(MANIFEST, _canon(0), min_clients=1)
    assert s.gate is s.core.gate and s.bounds is s.core.bounds and s._masks is s.masks
    s.global_ = _canon(1)  # FedBuff assigns each version
    assert s.core.global_ is s.global_
    s.refuse = lambda cid: "device token 3 was revoked" if cid == "x" else None
    with pytest.raises(ClientRefused, match="revoked"):
        s.refused("x")
    s._refused("y")
    states: list = []
    s.on_progress = states.append
    s.progress(phase="fedbuff", round=1)
    s._progress(phase="fedbuff", round=1)  # unchanged: not reported twice
    assert states == [{"phase": "fedbuff", "round": 1}]
    canonical, n, capped, codec = s._accept("android", _res(_canon(2), 5), base=_canon(0))
    assert (n, capped, codec) == (5, False, "raw") and s.accept("ios", _res(
        params.to_platform(_canon(2), MANIFEST, "ios"), 7))[1] == 7
    assert s._bounded("android", "a", canonical, 50, cap=20) == (20, True)
    assert s.max_norm_ratio == 10.0 and s.inner.__class__.__name__ == "FedAvg"
