"""The Core ML executor's layer kernels against Keras 3 / TensorFlow / numpy references.

Specs are built with coremltools' ``NeuralNetworkBuilder`` directly (not xflwb's exporter),
so each kernel is pinned to the proto's semantics on its own. Backward passes are checked
against central finite differences in float64. Nothing is mocked.
"""

from __future__ import annotations

import contextlib
import io
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import pytest
import tensorflow as tf

with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
    from coremltools.models import datatypes
    from coremltools.models.neural_network import NeuralNetworkBuilder
    from coremltools.models.neural_network.update_optimizer_utils import SgdParams

from xflwb.bridge.coreml_exec import KERNELS, CoreMLExecutor
from xflwb.bridge.coreml_rules import CoreMLRuleError
from xflwb.bridge.runtime.coreml import coreml_dims, to_coreml

L = keras.layers
ATOL = 1e-4


# -- helpers ---------------------------------------------------------------------------------
def nnb(in_dims: tuple[int, ...], outputs: tuple[str, ...] = ("out",)) -> NeuralNetworkBuilder:
    """A builder with input ``x`` of Core ML shape ``in_dims``."""
    return NeuralNetworkBuilder([("x", datatypes.Array(*in_dims))],
                                [(o, datatypes.Array(1)) for o in outputs])


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def nchw(x: np.ndarray) -> np.ndarray:
    return x.transpose(0, 3, 1, 2)


def nhwc(x: np.ndarray) -> np.ndarray:
    return x.transpose(0, 2, 3, 1)


def run(b: NeuralNetworkBuilder, x: np.ndarray, **kw) -> np.ndarray:
    return CoreMLExecutor(b.spec, **kw).forward(x)


def trainable(b: NeuralNetworkBuilder, updatable: list[str], loss: str = "cce",
              n_out: int = 3) -> None:
    """Make ``b`` an updatable model with output ``out`` (a softmax output for CCE)."""
    with contextlib.redirect_stdout(io.StringIO()):
        b.make_updatable(updatable)
        if loss == "cce":
            b.set_categorical_cross_entropy_loss(name="loss", input="out")
        else:
            b.set_mean_squared_error_loss(name="loss",
                                          input_feature=("out", datatypes.Array(n_out)))
        b.set_sgd_optimizer(SgdParams(lr=0.01, batch=8))
        b.set_epochs(1)


def fd_check(ex: CoreMLExecutor, x: np.ndarray, t: np.ndarray, per_tensor: int = 6) -> None:
    """Every updatable tensor's gradient against central differences (float64)."""
    _, grads = ex.loss_and_grads(x, t)
    base = [w.astype(np.float64) for w in ex.get_weights()]
    pick = rng(1)
    h = 1e-6
    checked = 0
    for i, g in enumerate(grads):
        if g is None:
            continue
        for j in pick.choice(base[i].size, min(per_tensor, base[i].size), replace=False):
            losses = []
            for sign in (1, -1):
                w = [a.copy() for a in base]
                w[i].flat[j] += sign * h
                ex.set_weights(w)
                losses.append(ex.loss_and_grads(x, t)[0])
            fd = (losses[0] - losses[1]) / (2 * h)
            assert abs(fd - g.flat[j]) < 1e-6 + 1e-5 * abs(fd), (i, j, fd, g.flat[j])
            checked += 1
    ex.set_weights(base)
    assert checked


def keras_out(layer: keras.layers.Layer, x: np.ndarray, weights: list[np.ndarray] | None = None
              ) -> np.ndarray:
    y = layer(x)
    if weights is not None:
        layer.set_weights(weights)
        y = layer(x)
    return np.asarray(y)


# -- convolution -------------------------------------------------------------------------------
@pytest.mark.parametrize("mult,padding,stride,dil", [
    (1, "same", 1, 1), (1, "valid", 2, 1), (2, "same", 2, 1), (2, "valid", 1, 1),
    (1, "same", 1, 2), (3, "valid", 1, 2)])
def test_depthwise_conv_matches_keras(mult, padding, stride, dil):
    c, h, w = 4, 9, 8
    x = rng(2).normal(size=(3, h, w, c)).astype(np.float32)
    layer = L.DepthwiseConv2D(3, strides=stride, padding=padding, depth_multiplier=mult,
                              dilation_rate=dil)
    k = rng(3).normal(size=(3, 3, c, mult)).astype(np.float32)
    bias = rng(4).normal(size=c * mult).astype(np.float32)
    want = keras_out(layer, x, [k, bias])
    b = nnb((c, h, w))
    b.add_convolution("dw", kernel_channels=1, output_channels=c * mult, height=3, width=3,
                      stride_height=stride, stride_width=stride,
                      border_mode=padding, groups=c, W=k.reshape(3, 3, 1, c * mult), b=bias,
                      has_bias=True, input_name="x", output_name="out",
                      dilation_factors=[dil, dil])
    ex = CoreMLExecutor(b.spec)
    assert ex.layers[0].depthwise
    np.testing.assert_allclose(ex.forward(nchw(x)), nchw(want), atol=ATOL)


@pytest.mark.parametrize("padding,stride", [("same", 1), ("same", 2), ("valid", 2)])
def test_conv1d_on_time_maps_matches_keras(padding, stride):
    """Keras (T, C) sequences run as Core ML (C, 1, T) maps with (1, k) kernels."""
    t, c, f = 11, 3, 5
    x = rng(5).normal(size=(4, t, c)).astype(np.float32)
    layer = L.Conv1D(f, 3, strides=stride, padding=padding)
    k = rng(6).normal(size=(3, c, f)).astype(np.float32)
    bias = rng(7).normal(size=f).astype(np.float32)
    want = keras_out(layer, x, [k, bias])  # (N, T', F)
    assert coreml_dims((t, c)) == (c, 1, t)
    b = nnb((c, 1, t))
    b.add_convolution("c1", kernel_channels=c, output_channels=f, height=1, width=3,
                      stride_height=1, stride_width=stride, border_mode=padding, groups=1,
                      W=k[None], b=bias, has_bias=True, input_name="x", output_name="out")
    got = run(b, to_coreml(x))  # (N, F, 1, T')
    np.testing.assert_allclose(got[:, :, 0, :].transpose(0, 2, 1), want, atol=ATOL)


def test_pooling_1xk_windows_match_keras():
    x = rng(8).normal(size=(3, 10, 4)).astype(np.float32)
    for kind, layer in (("MAX", L.MaxPooling1D(3, 2, padding="same")),
                        ("AVERAGE", L.AveragePooling1D(3, 2, padding="same")),
                        ("MAX", L.MaxPooling1D(2, 2, padding="valid"))):
        k, s = layer.pool_size[0], layer.strides[0]
        b = nnb((4, 1, 10))
        b.add_pooling("p", height=1, width=k, stride_height=1, stride_width=s,
                      layer_type=kind, padding_type=layer.padding.upper(), input_name="x",
                      output_name="out", exclude_pad_area=True)
        got = run(b, to_coreml(x))
        np.testing.assert_allclose(got[:, :, 0, :].transpose(0, 2, 1), keras_out(layer, x),
                                   atol=ATOL)


# -- normalisation, padding, activations, unary ----------------------------------------------
def test_batchnorm_inference_matches_keras():
    x = rng(9).normal(size=(5, 6, 7, 3)).astype(np.float32)
    layer = L.BatchNormalization(epsilon=1e-3)
    g = rng(10)
    weights = [g.normal(size=3).astype(np.float32), g.normal(size=3).astype(np.float32),
               g.normal(size=3).astype(np.float32), g.uniform(0.5, 2, 3).astype(np.float32)]
    want = keras_out(layer, x, weights)
    b = nnb((3, 6, 7))
    b.add_batchnorm("bn", 3, *weights, input_name="x", output_name="out", epsilon=1e-3)
    np.testing.assert_allclose(run(b, nchw(x)), nchw(want), atol=ATOL)
    b2 = nnb((3, 6, 7))
    b2.add_batchnorm("bn", 3, *weights[:2], input_name="x", output_name="out",
                     compute_mean_var=True, instance_normalization=True)
    with pytest.raises(ValueError, match=r"'bn' \(batchnorm\).*computeMeanVar"):
        CoreMLExecutor(b2.spec)


def test_padding_constant_reflection_replication():
    x = rng(11).normal(size=(2, 5, 6, 3)).astype(np.float32)
    want = keras_out(L.ZeroPadding2D(((1, 2), (0, 3))), x)
    b = nnb((3, 5, 6))
    b.add_padding("pad", left=0, right=3, top=1, bottom=2, input_name="x", output_name="out")
    np.testing.assert_allclose(run(b, nchw(x)), nchw(want), atol=0)
    xc = nchw(x)
    for kind, mode, value in (("constant", "constant", 0.5), ("reflection", "reflect", 0),
                              ("replication", "edge", 0)):
        b = nnb((3, 5, 6))
        b.add_padding("pad", left=2, right=1, top=0, bottom=2, value=value, input_name="x",
                      output_name="out", padding_type=kind)
        kw = {"constant_values": value} if mode == "constant" else {}
        want = np.pad(xc, ((0, 0), (0, 0), (0, 2), (2, 1)), mode=mode, **kw)
        np.testing.assert_allclose(run(b, xc), want, atol=0)


ACTIVATIONS = [
    ("SIGMOID_HARD", [1 / 6, 0.5], lambda x: keras.activations.hard_sigmoid(x)),
    ("ELU", 0.7, lambda x: keras.activations.elu(x, alpha=0.7)),
    ("LEAKYRELU", [0.2], lambda x: keras.activations.leaky_relu(x, negative_slope=0.2)),
    ("SOFTPLUS", None, keras.activations.softplus),
    ("SOFTSIGN", None, keras.activations.softsign),
    ("SIGMOID", None, keras.activations.sigmoid),
    ("TANH", None, keras.activations.tanh),
    ("RELU", None, keras.activations.relu),
    ("LINEAR", [2.0, -0.5], lambda x: 2 * x - 0.5),
    ("THRESHOLDEDRELU", 0.3, lambda x: np.where(x >= 0.3, x, 0)),
    ("SCALED_TANH", [1.5, 0.7], lambda x: 1.5 * np.tanh(0.7 * x)),
]


@pytest.mark.parametrize("name,params,ref", ACTIVATIONS, ids=[a[0] for a in ACTIVATIONS])
def test_activations_match_keras(name, params, ref):
    x = (rng(12).normal(size=(4, 3, 5, 2)) * 3).astype(np.float32)
    b = nnb((3, 5, 2))
    b.add_activation("act", name, "x", "out", params=params)
    np.testing.assert_allclose(run(b, x), np.asarray(ref(x)), atol=ATOL)


def test_prelu_per_channel():
    x = rng(13).normal(size=(2, 3, 4, 4)).astype(np.float32)
    alpha = np.array([0.1, 0.2, 0.3], np.float32)
    b = nnb((3, 4, 4))
    b.add_activation("act", "PRELU", "x", "out", params=alpha)
    want = np.where(x >= 0, x, alpha[:, None, None] * x)
    np.testing.assert_allclose(run(b, x), want, atol=1e-6)


UNARY = [("sqrt", lambda z, a: np.sqrt(z)), ("rsqrt", lambda z, a: 1 / np.sqrt(z + 1e-4)),
         ("inverse", lambda z, a: 1 / (z + 1e-4)), ("power", lambda z, a: z ** a),
         ("exp", lambda z, a: np.exp(z)), ("log", lambda z, a: np.log(z)),
         ("abs", lambda z, a: np.abs(z)), ("threshold", lambda z, a: np.maximum(a, z))]


@pytest.mark.parametrize("mode,ref", UNARY, ids=[u[0] for u in UNARY])
def test_unary_functions_match_numpy(mode, ref):
    """``f(scale·x + shift)``, with the builder's epsilon (1e-4 for rsqrt / inverse)."""
    x = rng(14).uniform(0.5, 2.0, size=(3, 2, 3, 4)).astype(np.float32)
    scale, shift, alpha = 1.5, 0.25, 1.7
    b = nnb((2, 3, 4))
    b.add_unary("u", "x", "out", mode, alpha=alpha, shift=shift, scale=scale)
    want = ref((scale * x + shift).astype(np.float64), alpha)
    np.testing.assert_allclose(run(b, x), want, rtol=1e-5, atol=1e-6)


def test_unary_defaults_epsilon_and_scale_when_unset():
    x = rng(15).uniform(0.5, 2.0, size=(2, 1, 2, 2)).astype(np.float32)
    b = nnb((1, 2, 2))
    layer = b.add_unary("u", "x", "out", "inverse")
    layer.unary.epsilon = 0  # unset: 1e-6
    layer.unary.scale = 0  # unset: 1
    np.testing.assert_allclose(run(b, x), 1 / (x + 1e-6), rtol=1e-6)


# -- add / multiply / concat -------------------------------------------------------------------
def test_squeeze_excite_multiply_add_broadcast_and_concat_match_keras():
    c, h, w = 4, 5, 6
    x = rng(16).normal(size=(3, h, w, c)).astype(np.float32)
    k = rng(17).normal(size=(c, c)).astype(np.float32)
    bias = rng(18).normal(size=c).astype(np.float32)
    # Keras: x * sigmoid(Dense(GAP(x))) (a (C,1,1) gate), then concat with x
    inp = keras.Input((h, w, c))
    gate = L.Dense(c, activation="sigmoid")(L.GlobalAveragePooling2D(keepdims=True)(inp))
    se = L.Multiply()([inp, gate])
    out = L.Concatenate()([se, inp])
    model = keras.Model(inp, out)
    model.layers[2].set_weights([k, bias])
    b = nnb((c, h, w))
    b.add_pooling("gap", 1, 1, 1, 1, "AVERAGE", "VALID", input_name="x", output_name="gap",
                  is_global=True)
    b.add_inner_product("fc", k.T, bias, c, c, True, "gap", "fc")
    b.add_activation("sig", "SIGMOID", "fc", "gate")
    b.add_elementwise("se", ["gate", "x"], "se", "MULTIPLY")  # (C,1,1) first: broadcast
    b.add_elementwise("cat", ["se", "x"], "out", "CONCAT")
    np.testing.assert_allclose(run(b, nchw(x)), nchw(np.asarray(model(x))), atol=ATOL)

    # add: three inputs, one of them a (1,1,1) scalar per sample; single-input alpha forms
    b = nnb((c, h, w))
    b.add_pooling("gap", 1, 1, 1, 1, "AVERAGE", "VALID", input_name="x", output_name="gap",
                  is_global=True)
    b.add_inner_product("s", np.ones((1, c), np.float32), None, c, 1, False, "gap", "s")
    b.add_elementwise("plus", ["x"], "plus", "ADD", alpha=0.5)
    b.add_elementwise("times", ["x"], "times", "MULTIPLY", alpha=-2.0)
    b.add_elementwise("out", ["plus", "s", "times"], "out", "ADD")
    xc = nchw(x)
    want = (xc + 0.5) + xc.mean(axis=(2, 3)).sum(axis=1)[:, None, None, None] + (-2 * xc)
    np.testing.assert_allclose(run(b, xc), want, atol=ATOL)
    want_keras = np.asarray(L.Add()([x + 0.5, x * -2.0]))
    b = nnb((c, h, w))
    b.add_elementwise("plus", ["x"], "plus", "ADD", alpha=0.5)
    b.add_elementwise("times", ["x"], "times", "MULTIPLY", alpha=-2.0)
    b.add_elementwise("out", ["plus", "times"], "out", "ADD")
    np.testing.assert_allclose(run(b, xc), nchw(want_keras), atol=ATOL)


def test_broadcast_outside_the_legacy_set_is_refused():
    b = nnb((4, 5, 6))
    b.add_pooling("row", 1, 6, 1, 6, "AVERAGE", "VALID", input_name="x", output_name="row")
    b.add_elementwise("out", ["x", "row"], "out", "ADD")  # (4, 5, 1): not in the set
    with pytest.raises(ValueError, match=r"'out' \(add\).*does not broadcast"):
        CoreMLExecutor(b.spec)


# -- reshape / permute ------------------------------------------------------------------------
def test_reshape_modes_follow_the_proto():
    x = rng(19).normal(size=(2, 2, 3, 4)).astype(np.float32)  # (N, C, H, W)
    cases = [((4, 3, 2), 0, x.reshape(2, 4, 3, 2)),
             ((4, 3, 2), 1, x.transpose(0, 2, 3, 1).reshape(2, 3, 2, 4).transpose(0, 3, 1, 2)),
             ((1, 24, 1, 1), 0, x.reshape(2, 24)),
             ((1, 24, 1, 1), 1, x.transpose(0, 2, 3, 1).reshape(2, 24)),
             ((3, 8, 1, 1), 0, x.reshape(2, 3, 8))]  # a 3-step sequence of 8-vectors
    for target, mode, want in cases:
        b = nnb((2, 3, 4))
        b.add_reshape("r", "x", "out", target, mode)
        np.testing.assert_allclose(run(b, x), want, atol=0, err_msg=str((target, mode)))


def test_permute_turns_time_maps_into_sequences_and_back():
    x = rng(20).normal(size=(2, 3, 1, 5)).astype(np.float32)  # (N, C, 1, T)
    b = nnb((3, 1, 5))
    b.add_permute("p", (3, 1, 2, 0), "x", "out")
    ex = CoreMLExecutor(b.spec)
    assert ex.blob_shapes["out"] == (5, 3, 1, 1)
    np.testing.assert_array_equal(ex.forward(x), x[:, :, 0, :].transpose(0, 2, 1))
    b.add_permute("back", (3, 1, 2, 0), "out", "back")
    b.spec.description.output[0].name = "back"
    np.testing.assert_array_equal(run(b, x), x)
    b = nnb((3, 1, 5))
    b.add_permute("p", (0, 3, 2, 1), "x", "out")  # (Seq, W, H, C)
    np.testing.assert_array_equal(run(b, x), x.transpose(0, 3, 2, 1))


# -- recurrent --------------------------------------------------------------------------------
def _seq_builder(c: int, t: int, outputs: tuple[str, ...]) -> NeuralNetworkBuilder:
    b = nnb((c, 1, t), outputs)
    b.add_permute("to_seq", (3, 1, 2, 0), "x", "seq")
    return b


@pytest.mark.parametrize("seqs,backwards", [(False, False), (True, False), (True, True)])
def test_lstm_matches_keras(seqs, backwards):
    t, c, hid = 6, 3, 4
    x = rng(21).normal(size=(3, t, c)).astype(np.float32)
    layer = L.LSTM(hid, return_sequences=seqs, return_state=True, go_backwards=backwards)
    g = rng(22)
    kern = g.normal(size=(c, 4 * hid)).astype(np.float32) * 0.5
    rec = g.normal(size=(hid, 4 * hid)).astype(np.float32) * 0.5
    bias = g.normal(size=4 * hid).astype(np.float32) * 0.5
    layer(x)
    layer.set_weights([kern, rec, bias])
    y, h_t, c_t = (np.asarray(v) for v in layer(x))
    ki, kf, kc, ko = np.split(kern, 4, axis=1)  # Keras i, f, c, o
    ri, rf, rc, ro = np.split(rec, 4, axis=1)
    bi, bf, bc, bo = np.split(bias, 4)
    for out, want in (("y", y), ("h", h_t), ("c", c_t)):
        b = _seq_builder(c, t, (out,))
        b.add_unilstm("lstm", [ri.T, rf.T, ro.T, rc.T], [ki.T, kf.T, ko.T, kc.T],
                      [bi, bf, bo, bc], hid, c, ["seq"], ["y", "h", "c"], output_all=seqs,
                      reverse_input=backwards)
        np.testing.assert_allclose(run(b, to_coreml(x)), want, atol=ATOL, err_msg=out)


@pytest.mark.parametrize("seqs,backwards", [(False, False), (True, True)])
def test_gru_matches_keras(seqs, backwards):
    t, c, hid = 5, 3, 4
    x = rng(23).normal(size=(2, t, c)).astype(np.float32)
    layer = L.GRU(hid, reset_after=False, return_sequences=seqs, go_backwards=backwards)
    g = rng(24)
    kern = g.normal(size=(c, 3 * hid)).astype(np.float32) * 0.5
    rec = g.normal(size=(hid, 3 * hid)).astype(np.float32) * 0.5
    bias = g.normal(size=3 * hid).astype(np.float32) * 0.5
    want = keras_out(layer, x, [kern, rec, bias])
    kz, kr, kh = np.split(kern, 3, axis=1)  # Keras z, r, h
    rz, rr, rh = np.split(rec, 3, axis=1)
    b = _seq_builder(c, t, ("y",))
    b.add_gru("gru", [rz.T, rr.T, rh.T], [kz.T, kr.T, kh.T], list(np.split(bias, 3)), hid, c,
              ["seq"], ["y", "h"], activation="TANH", inner_activation="SIGMOID",
              output_all=seqs, reverse_input=backwards)
    np.testing.assert_allclose(run(b, to_coreml(x)), want, atol=ATOL)


def test_lstm_unsupported_options_name_the_layer():
    b = _seq_builder(2, 3, ("y",))
    w = [np.zeros((2, 2), np.float32)] * 4
    layer = b.add_unilstm("lstm", w, w, None, 2, 2, ["seq"], ["y", "h", "c"],
                          peep=[np.zeros(2, np.float32)] * 3)
    with pytest.raises(ValueError, match=r"'lstm' \(uniDirectionalLSTM\).*peephole"):
        CoreMLExecutor(b.spec)
    layer.uniDirectionalLSTM.params.hasPeepholeVectors = False
    layer.uniDirectionalLSTM.activations[0].softsign.SetInParent()
    with pytest.raises(ValueError, match=r"'lstm'.*recurrent activation 'softsign'"):
        CoreMLExecutor(b.spec)


# -- backward ---------------------------------------------------------------------------------
def test_backward_of_depthwise_batchnorm_reshape_grouped_conv_matches_finite_differences():
    """conv (depthwise ×2) → batchnorm → ReLU → reshape → conv (groups 2) → pool → flatten →
    dense → softmax: every updatable tensor, so dx must cross batchnorm and reshape."""
    g = rng(25)
    b = nnb((2, 6, 5))
    b.add_convolution("dw", 1, 4, 3, 3, 1, 1, "same", 2,
                      g.normal(size=(3, 3, 1, 4)) * 0.5, g.normal(size=4), True, input_name="x",
                      output_name="dw")
    b.add_batchnorm("bn", 4, g.normal(size=4), g.normal(size=4), g.normal(size=4),
                    g.uniform(0.5, 2, 4), input_name="dw", output_name="bn")
    b.add_activation("relu", "RELU", "bn", "relu")
    b.add_reshape("r", "relu", "r", (4, 5, 6), 1)  # CHANNEL_LAST rearranges data
    b.add_convolution("gc", 2, 4, 2, 3, 2, 1, "valid", 2, g.normal(size=(2, 3, 2, 4)) * 0.5,
                      g.normal(size=4), True, input_name="r", output_name="gc")
    b.add_pooling("pool", 2, 2, 1, 1, "MAX", "VALID", input_name="gc", output_name="pool")
    b.add_flatten("flat", 0, "pool", "flat")
    b.add_inner_product("fc", g.normal(size=(3, 12)) * 0.2, g.normal(size=3) * 0.1, 12, 3, True,
                        "flat", "fc")
    b.add_softmax("sm", "fc", "out")
    trainable(b, ["dw", "gc", "fc"])
    ex = CoreMLExecutor(b.spec, dtype=np.float64)
    x = g.normal(size=(5, 2, 6, 5))
    fd_check(ex, x, np.arange(5) % 3, per_tensor=8)


def test_reshape_four_long_target_backward_and_mse():
    g = rng(26)
    b = nnb((2, 3, 4))
    b.add_convolution("c", 2, 3, 2, 2, 1, 1, "valid", 1, g.normal(size=(2, 2, 2, 3)),
                      g.normal(size=3), True, input_name="x", output_name="c")  # (3, 2, 3)
    b.add_reshape("r", "c", "r", (1, 6, 3, 1), 1)
    b.add_activation("t", "TANH", "r", "t")
    b.add_flatten("flat", 1, "t", "flat")
    b.add_inner_product("fc", g.normal(size=(2, 18)), None, 18, 2, False, "flat", "out")
    trainable(b, ["c", "fc"], loss="mse", n_out=2)
    ex = CoreMLExecutor(b.spec, dtype=np.float64)
    fd_check(ex, g.normal(size=(4, 2, 3, 4)), g.normal(size=(4, 2)))


def _branch_builder(updatable: bool) -> tuple[NeuralNetworkBuilder, dict[str, np.ndarray]]:
    """x → conv1 → relu → r; r → conv2 → a; add(a, r) → flatten → dense → softmax."""
    g = rng(27)
    w = {"k1": g.normal(size=(3, 3, 2, 3)).astype(np.float32) * 0.5,
         "b1": g.normal(size=3).astype(np.float32),
         "k2": g.normal(size=(3, 3, 3, 3)).astype(np.float32) * 0.5,
         "b2": g.normal(size=3).astype(np.float32),
         "kd": g.normal(size=(48, 4)).astype(np.float32) * 0.05,
         "bd": g.normal(size=4).astype(np.float32)}
    b = nnb((2, 4, 4))
    b.add_convolution("conv1", 2, 3, 3, 3, 1, 1, "same", 1, w["k1"], w["b1"], True,
                      input_name="x", output_name="c1")
    b.add_activation("relu", "RELU", "c1", "r")
    b.add_convolution("conv2", 3, 3, 3, 3, 1, 1, "same", 1, w["k2"], w["b2"], True,
                      input_name="r", output_name="a")
    b.add_elementwise("add", ["a", "r"], "sum", "ADD")
    b.add_flatten("flat", 1, "sum", "flat")  # CHANNEL_LAST: Keras' Flatten on HWC
    b.add_inner_product("fc", w["kd"].T, w["bd"], 48, 4, True, "flat", "fc")
    b.add_softmax("sm", "fc", "out")
    trainable(b, ["conv1", "conv2", "fc"] if updatable else ["fc"])
    return b, w


def test_dag_branch_forward_and_gradient_match_keras():
    b, w = _branch_builder(updatable=False)
    inp = keras.Input((4, 4, 2))
    r = L.ReLU()(L.Conv2D(3, 3, padding="same")(inp))
    s = L.Add()([L.Conv2D(3, 3, padding="same")(r), r])
    model = keras.Model(inp, L.Dense(4, activation="softmax")(L.Flatten()(s)))
    convs = [lay for lay in model.layers if isinstance(lay, L.Conv2D)]
    convs[0].set_weights([w["k1"], w["b1"]])
    convs[1].set_weights([w["k2"], w["b2"]])
    model.layers[-1].set_weights([w["kd"], w["bd"]])
    x = rng(28).normal(size=(6, 4, 4, 2)).astype(np.float32)
    y = np.arange(6) % 4
    ex = CoreMLExecutor(b.spec)
    np.testing.assert_allclose(ex.forward(nchw(x)), np.asarray(model(x)), atol=ATOL)
    with tf.GradientTape() as tape:
        loss = keras.losses.CategoricalCrossentropy()(np.eye(4, dtype=np.float32)[y],
                                                      model(x))
    gk, gb = tape.gradient(loss, model.layers[-1].trainable_variables)
    got_loss, grads = ex.loss_and_grads(nchw(x), y)
    assert got_loss == pytest.approx(float(loss), abs=1e-5)
    assert grads[:4] == [None] * 4  # the convolutions are frozen
    np.testing.assert_allclose(grads[4], np.asarray(gk).T, atol=1e-5)
    np.testing.assert_allclose(grads[5], np.asarray(gb), atol=1e-5)


def test_updatable_layer_above_a_non_backprop_layer_is_refused():
    b, _ = _branch_builder(updatable=True)
    with pytest.raises(CoreMLRuleError, match=r"'add' \(add\) does not support backprop"):
        CoreMLExecutor(b.spec)
    # permute / LSTM block too; a legacy reshape does not (Core ML back-propagates it)
    g = rng(29)
    for blocker, ok in (("permute", False), ("reshape", True)):
        b = nnb((2, 3, 4))
        b.add_convolution("c", 2, 2, 1, 1, 1, 1, "valid", 1, g.normal(size=(1, 1, 2, 2)), None,
                          False, input_name="x", output_name="c")
        if blocker == "permute":
            b.add_permute("p", (0, 1, 3, 2), "c", "m")
        else:
            b.add_reshape("p", "c", "m", (2, 4, 3), 0)
        b.add_flatten("flat", 0, "m", "flat")
        b.add_inner_product("fc", g.normal(size=(3, 24)), None, 24, 3, False, "flat", "fc")
        b.add_softmax("sm", "fc", "out")
        trainable(b, ["c", "fc"])
        if ok:
            CoreMLExecutor(b.spec)
        else:
            with pytest.raises(CoreMLRuleError, match=r"'p' \(permute\)"):
                CoreMLExecutor(b.spec)


def test_what_if_mode_accumulates_gradients_of_a_blob_read_twice():
    """With the Core ML rules off, conv1's output feeds conv2 and the add: its gradient is
    the sum over both paths (finite differences agree)."""
    b, _ = _branch_builder(updatable=True)
    ex = CoreMLExecutor(b.spec, dtype=np.float64, enforce_rules=False)
    x = rng(30).normal(size=(4, 2, 4, 4))
    fd_check(ex, x, np.arange(4) % 4, per_tensor=6)


# -- registry / errors / speed ----------------------------------------------------------------
def test_registry_and_unsupported_types():
    for kind in ("convolution", "innerProduct", "pooling", "flatten", "activation", "softmax",
                 "batchnorm", "padding", "add", "multiply", "concat", "unary", "reshape",
                 "permute", "uniDirectionalLSTM", "gru"):
        assert kind in KERNELS
    b = nnb((2, 3, 4))
    b.add_l2_normalize("l2", "x", "out")
    with pytest.raises(ValueError, match=r"'l2' \(#0\) has type 'l2normalize'.*supported: "):
        CoreMLExecutor(b.spec)


@pytest.mark.parametrize("stride", [1, 2])
def test_depthwise_channels_last_layout_gives_the_same_numbers(stride):
    """Small maps with many channels run depthwise channels-last (and the 1×1 convolution
    after it keeps that layout): forward, loss and every gradient equal the channels-first
    path's."""
    g = rng(31)
    c = 6
    b = nnb((c, 5, 5))
    b.add_convolution("dw", 1, c, 3, 3, stride, stride, "same", c,
                      g.normal(size=(3, 3, 1, c)), g.normal(size=c), True, input_name="x",
                      output_name="dw")
    b.add_activation("relu", "RELU", "dw", "relu")
    b.add_convolution("pw", c, 4, 1, 1, 1, 1, "valid", 1, g.normal(size=(1, 1, c, 4)),
                      g.normal(size=4), True, input_name="relu", output_name="pw")
    b.add_flatten("flat", 0, "pw", "flat")
    n_flat = 4 * (5 if stride == 1 else 3) ** 2
    b.add_inner_product("fc", g.normal(size=(3, n_flat)) * 0.2, None, n_flat, 3, False,
                        "flat", "fc")
    b.add_softmax("sm", "fc", "out")
    x = g.normal(size=(7, c, 5, 5)).astype(np.float32)
    t = np.arange(7) % 3
    trainable(b, ["dw", "pw"])
    results = []
    for channels_last in (True, False):
        ex = CoreMLExecutor(b.spec)
        assert ex.layers[0]._dw_channels_last  # 6 channels ≥ 5 (or 3) output columns
        ex.layers[0]._dw_channels_last = channels_last
        loss, grads = ex.loss_and_grads(x, t)
        results.append((ex.forward(x), loss, grads))
    (out_a, loss_a, g_a), (out_b, loss_b, g_b) = results
    np.testing.assert_allclose(out_a, out_b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(loss_a, loss_b, rtol=1e-5)
    assert len(g_a) == len(g_b) and sum(a is not None for a in g_a) >= 4  # dw, pw: W and b
    for a, b_ in zip(g_a, g_b, strict=True):
        assert (a is None) == (b_ is None)
        if a is not None:
            np.testing.assert_allclose(a, b_, rtol=1e-4, atol=1e-6)
