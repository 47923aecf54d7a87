"""Simulated clients as the reference clients of compression (issue 23): they decode every
down-link codec and encode their update in the codec the server asks for, clipping first
under central DP and keeping top-k's error feedback in the node's state.

``SimClient.fit`` runs here on the real runtimes (TFLite interpreter, the Core ML executor)
without Ray. The end-to-end run on the Simulation Engine (int8 up and fp16 down against the
same seeded float32 run) is in ``test_simulation.py``, beside the float32 run it compares
with.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import xflwb
from tests.conftest import digits_cnn
from xflwb.bridge import params
from xflwb.errors import InputError
from xflwb.federation import codecs
from xflwb.flower_legacy import (
    ClientProxy,
    EvaluateIns,
    FitIns,
    Parameters,
    SimpleClientManager,
)

PLATFORMS = ("android", "ios")
UP_SPECS = ("fp16", "int8", "int8:block=64", "topk:0.05", "rotate+int8")


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    # plain SGD: the worker's runtime keeps no optimizer state from one fit to the next, so
    # two clients given the same model and seed train to the same bytes
    return xflwb.export(digits_cnn(23), name="csim_cnn", data_type="digits",
                        out_dir=tmp_path_factory.mktemp("exp"),
                        optimizer=xflwb.SGD(learning_rate=0.1))


@pytest.fixture(scope="module")
def spec(export):
    from xflwb.simulation import client

    blob, sha = client.make_bundle(export.manifest, list(PLATFORMS))
    return client.ClientSpec(bundle=blob, bundle_sha=sha, android=1, ios=1, dataset="digits",
                             partition="iid", seed=5, test_fraction=0.2)


def _client(spec, platform):
    """A fresh simulated client (new node state) of ``platform``."""
    from flwr.app import RecordDict

    from xflwb.simulation import client

    return client.SimClient(spec, PLATFORMS.index(platform), RecordDict())


def _model(export, platform, seed=0):
    """A global model in ``platform``'s layout (the initial one, nudged by ``seed`` so
    rounds can differ)."""
    canonical = xflwb.bridge.manifest.initial_parameters(export.manifest)
    rng = np.random.default_rng(seed)
    canonical = [np.asarray(a, np.float32) + np.float32(0.01 * bool(seed)) *
                 rng.standard_normal(np.shape(a)).astype(np.float32) for a in canonical]
    return params.to_platform(canonical, export.manifest, platform)


def _shapes(export, platform):
    return params.platform_shapes(export.manifest, platform)


def _raw(arrays, codec="raw"):
    return Parameters(tensors=params.encode_tensors(arrays, codec),
                      tensor_type={"raw": "ND", "npy": "ndarray"}[codec])


def _down(arrays, spec):
    """A model compressed as the server sends it down: absolute, nearest rounding."""
    codec = codecs.parse(spec, "down")
    return Parameters(tensors=[codec.encode(a) for a in arrays],
                      tensor_type=codecs.tensor_type(codec)), codec


def _fit(client, parameters, **config):
    return client.fit(FitIns(parameters, {"local_epochs": 1, **config}))


def _float32(res, shapes):
    arrays, _ = params.decode_tensors(res.parameters.tensors)
    return [np.asarray(a, np.float32).reshape(s) for a, s in zip(arrays, shapes, strict=True)]


def _norm(arrays):
    return math.sqrt(sum(float(np.sum(np.square(a, dtype=np.float64))) for a in arrays))


def _sub(a, b):
    return [x - y for x, y in zip(a, b, strict=True)]


# -- down-link -------------------------------------------------------------------------------
@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("down", ["fp16", "int8"])
def test_a_compressed_downlink_is_the_model_the_client_trains_and_evaluates(
        export, spec, platform, down):
    model = _model(export, platform)
    compressed, codec = _down(model, down)
    decoded = [codec.decode(b, math.prod(s)).reshape(s)
               for b, s in zip(compressed.tensors, _shapes(export, platform), strict=True)]
    assert any(not np.array_equal(d, m) for d, m in zip(decoded, model, strict=True))
    # the same client state, fed the decoded model as float32, trains to the same bytes
    res = _fit(_client(spec, platform), compressed)
    want = _fit(_client(spec, platform), _raw(decoded))
    assert res.parameters.tensors == want.parameters.tensors
    # no up-link codec asked: the answer is float32 in the server's default encoding
    assert res.parameters.tensor_type == "ND" and codecs.KEY_CODEC not in res.metrics
    assert params.decode_tensors(res.parameters.tensors)[1] == "raw"
    ev = _client(spec, platform).evaluate(EvaluateIns(compressed, {}))
    ev_want = _client(spec, platform).evaluate(EvaluateIns(_raw(decoded), {}))
    assert ev.loss == ev_want.loss and ev.metrics == ev_want.metrics
    assert ev.num_examples > 0


@settings(max_examples=25, deadline=None)
@given(blob=st.binary(max_size=64), down=st.sampled_from(["fp16", "int8"]))
def test_a_corrupt_downlink_fails_the_client_naming_the_tensor(spec, export, blob, down):
    platform = "android"
    good, _ = _down(_model(export, platform), down)
    tensors = [blob, *good.tensors[1:]]
    with pytest.raises(ValueError, match=rf"down-link tensor 0 \({down}\)"):
        _client(spec, platform).evaluate(EvaluateIns(
            Parameters(tensors=tensors, tensor_type=good.tensor_type), {}))


def test_a_downlink_codec_that_cannot_carry_a_model_is_refused(spec, export):
    model = _model(export, "android")
    with pytest.raises(InputError, match=r"topk:0\.01.*cannot carry the down-link"):
        _fit(_client(spec, "android"), Parameters(tensors=params.encode_tensors(model),
                                                  tensor_type="xfl:topk:0.01"))
    with pytest.raises(InputError, match="unknown codec 'int4'"):
        _fit(_client(spec, "android"), _raw(model), **{codecs.KEY_UP: "int4"})


# -- up-link ---------------------------------------------------------------------------------
@pytest.mark.parametrize("platform", PLATFORMS)
def test_every_up_codec_decodes_to_the_trained_model_within_its_bound(export, spec, platform):
    model, shapes = _model(export, platform), _shapes(export, platform)
    trained = _float32(_fit(_client(spec, platform), _raw(model)), shapes)
    delta = _sub(trained, model)
    assert _norm(delta) > 0
    for up in UP_SPECS:
        client = _client(spec, platform)
        res = _fit(client, _raw(model), **{codecs.KEY_UP: up})
        codec = codecs.parse(up)
        assert res.metrics[codecs.KEY_CODEC] == codec.spec, up
        assert res.parameters.tensor_type == codecs.tensor_type(codec)
        wire = sum(len(t) for t in res.parameters.tensors)
        assert wire < sum(4 * math.prod(s) for s in shapes), up  # smaller than float32
        got = codecs.decode_arrays(res.parameters.tensors, codec, shapes, reference=model)
        # the decoder's view of the model: within the codec's stated bound, per tensor
        for g, t, d in zip(got, trained, delta, strict=True):
            bound = codec.bound(d) if codec.delta else codec.bound(t)
            assert np.linalg.norm(g - t) <= bound * (1 + 1e-6) + 1e-6, up
        residual = client.residual()
        if codec.delta:  # what was not sent is kept, exactly: decoded + residual = trained
            assert residual is not None
            for g, r, t in zip(got, residual, trained, strict=True):
                np.testing.assert_allclose(g + r, t, rtol=0, atol=1e-6)
        else:
            assert residual is None


@pytest.mark.parametrize("platform", PLATFORMS)
def test_topk_error_feedback_sends_the_residual_in_the_next_round(export, spec, platform):
    model, shapes = _model(export, platform), _shapes(export, platform)
    codec = codecs.parse("topk:0.05")
    plain, topk = _client(spec, platform), _client(spec, platform)
    deltas, sent = [], []
    for _ in range(2):  # the same model twice: the float32 client shows the true updates
        deltas.append(_sub(_float32(_fit(plain, _raw(model)), shapes), model))
        res = _fit(topk, _raw(model), **{codecs.KEY_UP: codec.spec})
        got = codecs.decode_arrays(res.parameters.tensors, codec, shapes, reference=model)
        sent.append(_sub(got, model))
        if len(sent) == 1:
            first = topk.residual()
            assert first is not None and _norm(first) > 0  # top-5 % left most of it behind
            stored = topk.state.array_records["xfl_residual"].to_numpy_ndarrays()
            assert all(np.array_equal(s, r) for s, r in zip(stored, first, strict=True))
    # round 2 encoded its own update plus round 1's residual: nothing lost, only delayed
    last = topk.residual()
    assert last is not None
    for s2, r2, d2, r1 in zip(sent[1], last, deltas[1], first, strict=True):
        np.testing.assert_allclose(s2 + r2, d2 + r1, rtol=0, atol=1e-6)
    # over both rounds, what arrived plus what is still held is what was trained
    total_sent = [a + b for a, b in zip(*sent, strict=True)]
    for t, r, d1, d2 in zip(total_sent, last, *deltas, strict=True):
        np.testing.assert_allclose(t + r, d1 + d2, rtol=0, atol=2e-6)


@pytest.mark.parametrize("platform", PLATFORMS)
def test_same_seed_same_bytes(export, spec, platform):
    model = _model(export, platform)
    for up in ("int8", "rotate+int8", "topk:0.05"):
        a = _fit(_client(spec, platform), _raw(model), **{codecs.KEY_UP: up})
        b = _fit(_client(spec, platform), _raw(model), **{codecs.KEY_UP: up})
        assert a.parameters.tensors == b.parameters.tensors, up
    # int8 rounds stochastically, seeded by the simulation's seed, client and attempt:
    # another seed is another draw (and another partition), so other bytes
    other = _fit(_client(replace(spec, seed=6), platform), _raw(model),
                 **{codecs.KEY_UP: "int8"})
    again = _fit(_client(spec, platform), _raw(model), **{codecs.KEY_UP: "int8"})
    assert other.parameters.tensors != again.parameters.tensors


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("up", ["int8", "rotate+int8", "topk:0.05", "fp16"])
def test_central_dp_clips_then_encodes(export, spec, platform, up):
    """The client clips its delta against the model it received, then encodes: what the
    server decodes is within the clip plus the codec's bound (the server clips again)."""
    model, shapes = _model(export, platform), _shapes(export, platform)
    clip = 0.05
    unclipped = _sub(_float32(_fit(_client(spec, platform), _raw(model)), shapes), model)
    assert _norm(unclipped) > 2 * clip  # clipping bites
    plain = _fit(_client(spec, platform), _raw(model), clipping_norm=clip)
    clipped = _sub(_float32(plain, shapes), model)
    assert _norm(clipped) <= clip * (1 + 1e-5) and plain.metrics["norm_bit"] == 0.0
    res = _fit(_client(spec, platform), _raw(model), clipping_norm=clip,
               **{codecs.KEY_UP: up})
    assert res.metrics["norm_bit"] == 0.0
    codec = codecs.parse(up)
    got = _sub(codecs.decode_arrays(res.parameters.tensors, codec, shapes, reference=model),
               model)
    bound = math.sqrt(sum((codec.bound(d) if codec.delta else codec.bound(d + m)) ** 2
                          for d, m in zip(clipped, model, strict=True)))
    assert _norm(got) <= clip * (1 + 1e-5) + bound + 1e-6
    if codec.delta:  # the clipped delta, not the raw one, is what was encoded
        for g, r, c in zip(got, _client_residual_after(spec, platform, model, clip, up),
                           clipped, strict=True):
            np.testing.assert_allclose(g + r, c, rtol=0, atol=1e-6)


def _client_residual_after(spec, platform, model, clip, up):
    client = _client(spec, platform)
    _fit(client, _raw(model), clipping_norm=clip, **{codecs.KEY_UP: up})
    residual = client.residual()
    assert residual is not None
    return residual


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("native", ["raw", "npy"])
def test_without_an_up_codec_the_payload_is_todays(export, spec, platform, native):
    """No ``KEY_UP``: the bytes a float32 client sent before compression existed (the
    runtime's parameters after training, in the encoding it received; clipped under DP)."""
    from xflwb.simulation import client as sim_client

    model = _model(export, platform)
    x, y, _, _ = sim_client.client_data(spec, PLATFORMS.index(platform))
    rt = sim_client.runtime_for(spec, platform)
    for dp in ({}, {"clipping_norm": 0.05}):
        res = _fit(_client(spec, platform), _raw(model, native), **dp)
        rt.set_parameters(params.decode_tensors(params.encode_tensors(model, native))[0])
        rt.fit(x, y, epochs=1, seed=spec.seed)
        today = rt.get_parameters()
        if dp:
            today, _ = params.clip_platform_update(today, model, export.manifest, platform,
                                                   dp["clipping_norm"])
        assert res.parameters.tensors == params.encode_tensors(today, native), dp
        assert res.parameters.tensor_type == {"raw": "ND", "npy": "ndarray"}[native]
        assert codecs.KEY_CODEC not in res.metrics
        assert not res.parameters.tensors[0].startswith(b"\x93XFL")


# -- the simulation's strategy and simulated clients, in process (no Ray) -------------------
class _InProcess(ClientProxy):
    """A simulated client reached in process: the message a Ray worker would get, minus
    Ray (the transport is not what is tested here)."""

    def __init__(self, cid, platform, client):
        super().__init__(cid)
        self.platform, self.client = platform, client

    def fit(self, ins, timeout, group_id):
        return self.client.fit(ins)

    def evaluate(self, ins, timeout, group_id):
        return self.client.evaluate(ins)

    def get_properties(self, *a):  # pragma: no cover - never called
        raise NotImplementedError

    get_parameters = reconnect = get_properties


@pytest.mark.parametrize(("up", "down"), [("int8", "fp16"), ("topk:0.05", "int8"),
                                          ("rotate+int8", "float32"), ("fp16", "fp16")])
def test_the_simulation_strategy_compresses_for_every_simulated_client(export, spec, up,
                                                                       down):
    """The strategy a simulation builds (its options plus ``compression_arguments``) asks
    every simulated client for the session's codecs without probing it, and the gate
    accepts what the clients answer: nobody rejected, the model moves, fewer bytes."""
    from xflwb.sessions.flower_strategy import CrossPlatformStrategy
    from xflwb.simulation import SimulationConfig
    from xflwb.simulation.server import compression_arguments

    cfg = SimulationConfig(android=1, ios=1,
                           compression=xflwb.Compression(up=up, down=down))
    assert compression_arguments(cfg) == {"capable_by_default": True}
    assert compression_arguments(SimulationConfig(android=1, ios=1)) == {}
    initial = [np.asarray(a, np.float32)
               for a in xflwb.bridge.manifest.initial_parameters(export.manifest)]
    reports = []
    strategy = CrossPlatformStrategy(export.manifest, initial,
                                     on_fit_round=lambda report, _: reports.append(report),
                                     **cfg.strategy_arguments(), **compression_arguments(cfg))
    manager = SimpleClientManager()
    for pid, platform in enumerate(PLATFORMS):
        manager.register(_InProcess(str(pid), platform, _client(spec, platform)))
    up_codec, down_codec = codecs.parse(up, "up"), codecs.parse(down, "down")
    for rnd in (1, 2):  # the second round sends top-k's residual along
        asked = strategy.configure_fit(rnd, None, manager)
        assert len(asked) == 2
        for _, ins in asked:
            assert ins.config[codecs.KEY_UP] == up_codec.spec
            assert ins.parameters.tensor_type == (
                "ND" if down_codec is None else codecs.tensor_type(down_codec))
        results = [(proxy, proxy.fit(ins, None, None)) for proxy, ins in asked]
        assert all(res.metrics[codecs.KEY_CODEC] == up_codec.spec for _, res in results)
        strategy.aggregate_fit(rnd, results, [])
        report = reports[-1]
        assert not report.rejections and not report.failures and report.failed is None
        got = {(p, k): v for p, k, v in report.metrics}
        for platform in PLATFORMS:
            assert got[(platform, "clients")] == 1
            assert got[(platform, "bytes_up")] < got[(platform, "bytes_up_float32")]
            if down_codec is not None:
                assert got[(platform, "bytes_down")] < got[(platform, "bytes_down_float32")]
    assert any(not np.allclose(g, i) for g, i in zip(strategy.global_, initial, strict=True))
