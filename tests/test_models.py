"""The models researchers put on phones, exported for both platforms with parity.

Each model goes through the real exporter: the real TFLite converter and interpreter, the
real coremltools spec run by the Core ML executor, and Keras. Parity (forward to 1e-4,
exact parameter round trips, one and three training steps against Keras trained under each
platform's plan) must hold for all of them; the plan itself is pinned per model.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import pytest

import xflwb
from tests.conftest import transfer_model
from xflwb.bridge import coreml_rules, manifest, params, runtime

L = keras.layers


def frozen_feature() -> keras.Model:
    keras.utils.set_random_seed(1)
    feat = L.Dense(16, activation="relu", name="feat")
    feat.trainable = False
    return keras.Sequential([keras.Input((20,)), feat,
                             L.Dense(4, activation="softmax", name="head")])


def bn_cnn() -> keras.Model:
    keras.utils.set_random_seed(2)
    return keras.Sequential([keras.Input((8, 8, 1)), L.Conv2D(4, 3, name="conv"),
                             L.BatchNormalization(name="bn"), L.ReLU(name="relu"),
                             L.GlobalAveragePooling2D(name="gap"),
                             L.Dense(10, activation="softmax", name="head")])


def activity() -> keras.Model:
    keras.utils.set_random_seed(3)
    return keras.Sequential([
        keras.Input((32, 3)), L.Conv1D(8, 5, padding="same", activation="relu", name="c1"),
        L.MaxPooling1D(2, name="p1"), L.ZeroPadding1D((1, 0), name="pad"),
        L.Conv1D(8, 3, padding="causal", dilation_rate=2, activation="relu", name="c2"),
        L.AveragePooling1D(2, padding="same", name="p2"),
        L.Conv1D(8, 3, strides=2, name="c3"), L.GlobalMaxPooling1D(name="gmp"),
        L.Dense(6, activation="softmax", name="head")])


def text() -> keras.Model:
    keras.utils.set_random_seed(4)
    return keras.Sequential([keras.Input((12,)), L.Embedding(30, 8, name="emb"),
                             L.Dense(8, activation="tanh", name="per_token"),
                             L.GlobalAveragePooling1D(name="gap"),
                             L.Dense(3, activation="softmax", name="head")])


def lstm() -> keras.Model:
    keras.utils.set_random_seed(5)
    return keras.Sequential([keras.Input((10, 3)), L.LSTM(8, name="lstm"),
                             L.Dense(4, activation="softmax", name="head")])


def gru() -> keras.Model:
    keras.utils.set_random_seed(6)
    return keras.Sequential([keras.Input((10, 3)),
                             L.GRU(8, reset_after=False, return_sequences=True, name="gru"),
                             L.Flatten(name="flat"), L.Dense(4, activation="softmax",
                                                             name="head")])


def branchy() -> keras.Model:
    """Branches, squeeze-excite, separable/depthwise convs and every composed activation."""
    keras.utils.set_random_seed(7)
    inp = keras.Input((8, 8, 3))
    x = L.Rescaling(1 / 2.0, offset=-0.5, name="rescale")(inp)
    a = L.Conv2D(6, 3, padding="same", activation="swish", name="conv_a")(x)
    b = L.SeparableConv2D(6, 3, padding="same", activation="hard_silu", name="sep")(x)
    c = L.Add(name="add")([a, b])
    s = L.GlobalAveragePooling2D(keepdims=True, name="squeeze")(c)
    s = L.Dense(6, activation="hard_sigmoid", name="excite")(s)
    c = L.Multiply(name="scale")([c, s])
    d = L.DepthwiseConv2D(3, depth_multiplier=2, strides=2, padding="same",
                          activation="relu6", name="dw")(c)
    d = L.ZeroPadding2D(((1, 0), (0, 1)), name="pad")(d)
    e = L.Concatenate(name="cat")([L.LeakyReLU(name="leaky")(d), L.ELU(name="elu")(d)])
    f = L.Flatten(name="flat")(L.MaxPooling2D(name="pool")(e))
    f = L.Dense(8, activation="gelu", name="gelu")(L.Reshape((2, 2, 6), name="rs")(
        L.Dense(24, name="pre")(f)))
    f = L.Flatten(name="flat2")(f)
    out = L.Dense(5, activation="softmax", name="head")(L.Dropout(0.0, name="drop")(f))
    return keras.Model(inp, out, name="branchy")


def normalized_mlp() -> keras.Model:
    keras.utils.set_random_seed(8)
    norm = L.Normalization(name="norm")
    norm.adapt(np.random.default_rng(0).normal(2.0, 3.0, (64, 6)).astype(np.float32))
    return keras.Sequential([keras.Input((6,)), norm, L.Dense(8, activation="tanh", name="h"),
                             L.Dense(3, activation="softmax", name="head")])


def stem() -> keras.Model:
    """ResNet/MobileNet-style explicit padding before valid convolutions."""
    keras.utils.set_random_seed(10)
    inp = keras.Input((9, 9, 2))
    x = L.ZeroPadding2D(1, name="pad1")(inp)
    x = L.Conv2D(4, 3, strides=2, name="conv1")(x)  # valid: the padding folds into it
    x = L.ReLU(name="relu")(x)
    x = L.ZeroPadding2D(((0, 1), (0, 1)), name="pad2")(x)
    x = L.DepthwiseConv2D(2, activation="relu", name="dw")(x)
    x = L.GlobalAveragePooling2D(name="gap")(L.ZeroPadding2D(1, name="pad3")(x))
    return keras.Model(inp, L.Dense(3, activation="softmax", name="head")(x), name="stem")


def stem_folded() -> keras.Model:
    """The same stem without the padding before pooling: every padding folds."""
    keras.utils.set_random_seed(10)
    inp = keras.Input((9, 9, 2))
    x = L.Conv2D(4, 3, strides=2, name="conv1")(L.ZeroPadding2D(1, name="pad1")(inp))
    x = L.ZeroPadding2D(((0, 1), (0, 1)), name="pad2")(L.ReLU(name="relu")(x))
    x = L.GlobalAveragePooling2D(name="gap")(L.DepthwiseConv2D(2, activation="relu",
                                                               name="dw")(x))
    return keras.Model(inp, L.Dense(3, activation="softmax", name="head")(x), name="stem2")


def operators() -> keras.Model:
    """Arithmetic written with Python operators on symbolic tensors (MobileNetV3's style)."""
    keras.utils.set_random_seed(11)
    inp = keras.Input((6,))
    h = L.Dense(8, name="h")(inp)
    gate = L.ReLU(6.0, name="r6")(h + 3.0) * (1.0 / 6.0)  # MobileNetV3's hard sigmoid
    x = h * gate - L.Dense(8, name="skip")(inp)
    x = (x - 1.0) / 2.0
    return keras.Model(inp, L.Dense(3, activation="softmax", name="head")(x), name="ops")


# model → the iOS status of each named layer ("trained" unless listed)
CASES = {
    "frozen_feature": (frozen_feature, {"feat": "frozen"}),
    "bn_cnn": (bn_cnn, {"conv": "trained", "bn": "frozen on iOS"}),
    # ZeroPadding1D before a causal Conv1D folds into the convolution's own padding, so the
    # gradient reaches c1 (a Core ML padding layer would block it)
    "activity": (activity, {"c1": "trained", "c2": "trained", "c3": "trained"}),
    # pad3 feeds pooling, so it stays a padding layer and blocks conv1 and dw on iOS
    "stem": (lambda: stem(), {"conv1": "frozen on iOS", "dw": "frozen on iOS"}),
    "stem_folded": (lambda: stem_folded(), {"conv1": "trained", "dw": "trained"}),
    "text": (text, {"emb": "trained", "per_token": "trained"}),
    "lstm": (lstm, {"lstm": "frozen on iOS"}),
    "gru": (gru, {"gru": "frozen on iOS"}),
    "branchy": (branchy, {"conv_a": "frozen on iOS", "sep": "frozen on iOS",
                          "excite": "frozen on iOS", "dw": "frozen on iOS",
                          "pre": "frozen on iOS", "gelu": "frozen on iOS"}),
    "normalized_mlp": (normalized_mlp, {"h": "trained"}),
    "operators": (operators, {"h": "frozen on iOS", "skip": "frozen on iOS"}),
}


def _check_export(res: xflwb.ExportResult) -> None:
    rep = res.parity
    assert rep["ok"].all(), rep[~rep["ok"]]
    assert set(rep["platform"]) == {"android", "ios"}
    for plat in ("android", "ios"):
        checks = set(rep[rep.platform == plat]["check"])
        assert {"forward", "params_in_artifact", "params_layout_roundtrip",
                "params_runtime_roundtrip", "train_step", "train_3_steps"} <= checks
    assert (rep[rep.check.str.startswith("params")]["max_abs_err"] == 0).all()
    m = res.manifest
    manifest.validate(m)
    # the exchanged iOS tensors are exactly the ones iOS trains
    mask = params.trained_mask(m, "ios")
    assert sorted({e["canonical"] for e in m["platforms"]["ios"]["coreml_layers"]}) == [
        i for i, t in enumerate(mask) if t]
    assert params.trained_mask(m, "android") == [True] * len(m["parameters"])
    # the saved spec passes Core ML's updatable-model rules
    from xflwb.bridge.coreml_proto import load_spec

    spec = load_spec(res.paths["ios"])
    coreml_rules.validate(spec.neuralNetwork.layers, "output",
                          m["loss"] == "categorical_crossentropy")


#: the cases exported with another optimizer than SGD with momentum: branchy's graph (frozen
#: and iOS-frozen parts) is also the one Adam's parity is checked on
OPTIMIZERS = {"branchy": lambda: xflwb.Adam(0.01)}


@pytest.fixture(scope="module")
def case_exports(tmp_path_factory):
    """case → its export, made on first use: one export per model for the whole module."""
    made: dict[str, xflwb.ExportResult] = {}

    def get(case: str) -> xflwb.ExportResult:
        if case not in made:
            make = CASES[case][0]
            optimizer = OPTIMIZERS.get(case, lambda: xflwb.SGD(learning_rate=0.05,
                                                                momentum=0.9))()
            made[case] = xflwb.export(make(), name=case,
                                      out_dir=tmp_path_factory.mktemp(case),
                                      optimizer=optimizer, batch_size=8)
        return made[case]

    return get


@pytest.mark.parametrize("case", sorted(CASES))
def test_model_exports_with_parity_and_plan(case, case_exports):
    expected = CASES[case][1]
    res = case_exports(case)
    _check_export(res)
    plan = res.layers.set_index("layer")
    for layer, status in expected.items():
        assert plan.loc[layer, "ios"] == status, (layer, plan.loc[layer].to_dict())
        if status == "frozen on iOS":
            assert plan.loc[layer, "android"] == "trained"
            assert "Android trains it" in plan.loc[layer, "ios_why"]
    assert (plan["ios"] == "trained").any()


def test_sequential_inside_functional_inside_sequential_keeps_nesting_names(tmp_path):
    keras.utils.set_random_seed(13)
    block = keras.Sequential([keras.Input((8,)), L.Dense(8, activation="relu", name="d1"),
                              L.Dense(8, activation="relu", name="d2")], name="block")
    inp = keras.Input((8,))
    mid = keras.Model(inp, L.Add(name="res")([inp, block(inp)]), name="mid")
    model = keras.Sequential([keras.Input((8,)), mid, L.Dense(3, activation="softmax",
                                                               name="head")])
    res = xflwb.export(model, name="nest", out_dir=tmp_path)
    _check_export(res)
    assert [p["name"] for p in res.manifest["parameters"]] == [
        "mid/block/d1/kernel", "mid/block/d1/bias", "mid/block/d2/kernel",
        "mid/block/d2/bias", "head/kernel", "head/bias"]
    plan = res.layers.set_index("layer")
    assert plan.loc["mid/block/d1", "ios"] == "frozen on iOS"  # the Add blocks gradients
    assert plan.loc["head", "ios"] == "trained"


@pytest.mark.slow
def test_mobilenet_v3_backbone_exports_with_parity(tmp_path):
    """keras.applications' MobileNetV3Small: hard-swish, squeeze-excite, operator arithmetic."""
    keras.utils.set_random_seed(12)
    base = keras.applications.MobileNetV3Small(input_shape=(32, 32, 3), include_top=False,
                                               weights=None)
    base.trainable = False
    inp = keras.Input((32, 32, 3))
    x = L.GlobalAveragePooling2D(name="gap")(base(inp))
    model = keras.Model(inp, L.Dense(10, activation="softmax", name="head")(x))
    res = xflwb.export(model, name="v3", out_dir=tmp_path, batch_size=8)
    _check_export(res)
    plan = res.layers.set_index("layer")
    assert plan.loc["head", "ios"] == "trained"
    assert (plan["type"] == "ops.Add").sum() >= 9 and (plan["type"] == "Multiply").sum() >= 9


def test_adam_on_a_graph_with_frozen_and_ios_frozen_parts(case_exports):
    res = case_exports("branchy")  # exported with Adam (OPTIMIZERS)
    assert res.manifest["optimizer"]["type"] == "adam", res.manifest["optimizer"]
    _check_export(res)


@pytest.fixture(scope="module")
def transfer(transfer_export):
    """The frozen-MobileNetV2 export shared with tests/test_transfer_fleet.py: backbone
    frozen, a 1×1 adapter + BatchNorm + ReLU6 (Android only), a head (both)."""
    return transfer_export


def test_frozen_backbone_is_baked_and_never_travels(transfer):
    model, res = transfer
    _check_export(res)
    m = res.manifest
    # canonical = the trainable part; the backbone's weights are frozen and digested
    assert [p["name"] for p in m["parameters"]] == [
        "adapter/kernel", "adapter/bias", "adapter_bn/gamma", "adapter_bn/beta",
        "head/kernel", "head/bias"]
    assert m["frozen"]["tensors"] == len(model.non_trainable_weights) > 200
    plan = res.layers.set_index("layer")
    backbone = [n for n in plan.index if n.startswith("mobilenetv2_0.35_32/")]
    assert len(backbone) > 100  # nested model read into one graph, names keep the path
    assert set(plan.loc[backbone, "ios"]) <= {"frozen", "runs"}
    assert set(plan.loc[backbone, "android"]) <= {"frozen", "runs"}
    # frozen layers count their (baked) weights, as Keras does, and say they are frozen
    weighted = plan.loc[backbone][plan.loc[backbone, "params"] > 0]
    assert len(weighted) > 50 and weighted["frozen"].astype(bool).all()
    nested = next(layer for layer in model.layers if layer.name.startswith("mobilenetv2"))
    assert plan.loc[backbone, "params"].sum() == nested.count_params() > 0
    shapes = {p: [a.shape for a in params.to_platform(params.canonical(model), m, p)]
              for p in ("android", "ios")}
    assert shapes["android"] == [(1, 1, 1280, 8), (8,), (8,), (8,), (8, 10), (10,)]
    assert shapes["ios"] == [(10, 8), (10,)]  # the head only: iOS sends what it trains
    assert m["platforms"]["android"]["tflite_layers"] == [
        4 * int(np.prod(s)) for s in shapes["android"]]


def test_android_runtime_predicts_batches_xnnpack_could_not(transfer):
    """TF 2.18's XNNPACK delegate broke on batches of 256 for this graph (and stayed broken);
    the Android runtime uses the built-in kernels, which agree with Keras at every size."""
    _, res = transfer
    rt, ref = runtime.load(res, "android"), runtime.load(res, "keras")
    for n in (255, 256, 300):
        x = np.random.default_rng(n).random((n, 32, 32, 3), dtype=np.float32)
        out = rt.predict(x)
        assert out.shape == (n, 10)
        np.testing.assert_allclose(out, ref.predict(x), atol=1e-4)


def test_frozen_digest_tells_backbones_apart(transfer):
    _, res = transfer
    other = transfer_model()
    layer = other.get_layer("mobilenetv2_0.35_32").get_layer("Conv1")
    layer.kernel.assign(layer.kernel.numpy() + 1.0)
    from xflwb.bridge import graph

    assert graph.analyze(other).frozen["sha256"] != res.manifest["frozen"]["sha256"]
    assert graph.analyze(transfer_model()).frozen["sha256"] == res.manifest["frozen"]["sha256"]


def test_ios_runtime_trains_only_the_head_and_keeps_the_backbone(transfer):
    _, res = transfer
    rt = runtime.load(res, "ios")
    ex = rt.executor
    frozen = [lay for lay in ex.weighted if not lay.updatable]
    assert len(frozen) > 30 and [lay.name for lay in ex.weighted if lay.updatable] == ["head"]
    backbone = [lay.W.copy() for lay in frozen]
    x = np.random.default_rng(0).random((12, 32, 32, 3), dtype=np.float32)
    y = np.arange(12) % 10
    before = rt.get_parameters()
    rt.fit(x, y, epochs=1, batch_size=4, seed=0)
    after = rt.get_parameters()
    # (an untrained backbone's features are tiny, but the head's bias always moves)
    assert np.abs(after[1] - before[1]).max() > 1e-4
    assert all(np.array_equal(lay.W, w) for lay, w in zip(frozen, backbone, strict=True))


def test_strict_refuses_what_ios_cannot_train(tmp_path):
    with pytest.raises(xflwb.ExportError) as err:
        xflwb.export(lstm(), name="s", out_dir=tmp_path, ios_training="strict")
    msg = str(err.value)
    assert "layer 'lstm' (LSTM)" in msg and "ios_training='auto'" in msg
    assert "platforms=('android',)" in msg
    with pytest.raises(ValueError, match="ios_training"):
        xflwb.export(lstm(), name="s", out_dir=tmp_path, ios_training="sometimes")


def test_nothing_trainable_on_ios_is_a_clear_error(tmp_path):
    keras.utils.set_random_seed(9)
    model = keras.Sequential([keras.Input((6,)), L.Dense(4, activation="softmax", name="d"),
                              L.Activation("relu6", name="clip")])
    with pytest.raises(xflwb.ExportError, match="softmax"):
        xflwb.export(model, name="n", out_dir=tmp_path, loss="categorical_crossentropy")
    model = keras.Sequential([keras.Input((6,)), L.Dense(4, name="d"),
                              L.LeakyReLU(name="leaky")])
    with pytest.raises(xflwb.ExportError) as err:
        xflwb.export(model, name="n", out_dir=tmp_path, loss="mse")
    assert "nothing can train on iOS" in str(err.value) and "'leaky'" in str(err.value)
    res = xflwb.export(model, name="n", out_dir=tmp_path, loss="mse", platforms=("android",))
    assert res.parity["ok"].all()


def test_ios_from_platform_fills_untrained_from_base_or_export(case_exports):
    res = case_exports("bn_cnn")
    m = res.manifest
    start = manifest.initial_parameters(m)
    ios = params.to_platform(start, m, "ios")
    assert len(ios) == 4  # conv and head: BatchNorm's gamma/beta stay on Android
    moved = [a + 1 for a in start]
    back = params.from_platform([a.ravel() for a in ios], m, "ios", base=moved)
    mask = params.trained_mask(m, "ios")
    for a, s, mv, t in zip(back, start, moved, mask, strict=True):
        np.testing.assert_array_equal(a, s if t else mv)
    default = params.from_platform(ios, m, "ios")  # the export's values, what iOS computes with
    for a, s in zip(default, start, strict=True):
        np.testing.assert_array_equal(a, s)
