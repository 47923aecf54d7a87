"""End-to-end export: real TFLite interpreter, real coremltools specs, the numpy executor."""

from __future__ import annotations

import json
import warnings

import keras
import numpy as np
import pytest

import xflwb
from xflwb.bridge import coreml, manifest, params, runtime

REQUIRED = ("schema", "name", "version", "data_type", "input", "classes", "loss", "optimizer",
            "batch_size", "epochs", "parameters", "platforms")


def test_cnn_exports_both_platforms_with_parity(cnn, tmp_path):
    res = xflwb.export(cnn, name="cnn", data_type="digits", out_dir=tmp_path,
                       optimizer=xflwb.SGD(learning_rate=0.05, momentum=0.9))
    assert res.version == 1
    assert res.directory == (tmp_path / "cnn" / "v1").resolve()
    for key in ("android", "ios", "manifest", "keras"):
        assert res.paths[key].is_file(), key
    assert res.paths["android"].name == "cnn-v1.tflite"
    assert res.paths["ios"].name == "cnn-v1.mlmodel"
    m = json.loads(res.paths["manifest"].read_text())
    assert all(k in m for k in REQUIRED)
    assert m["schema"] == "xflwb.manifest/2" and m["data_type"] == "digits"
    assert m["classes"] == 10 and m["input"]["shape"] == [8, 8, 1]
    assert m["optimizer"] == {"type": "sgd", "learning_rate": 0.05, "momentum": 0.9}
    assert [p["shape"] for p in m["parameters"]] == [[3, 3, 1, 4], [4], [64, 10], [10]]
    assert m["platforms"]["android"]["tflite_layers"] == [36 * 4, 4 * 4, 640 * 4, 10 * 4]
    assert m["platforms"]["android"]["sha256"] == manifest.sha256(res.paths["android"])
    assert m["platforms"]["ios"]["sha256"] == manifest.sha256(res.paths["ios"])
    layers = m["platforms"]["ios"]["coreml_layers"]
    assert [(e["type"], e["shape"], e["canonical"], e["updatable"]) for e in layers] == [
        ("weights", [4, 1, 3, 3], 0, True), ("bias", [4], 1, True),
        ("weights", [10, 64], 2, True), ("bias", [10], 3, True)]
    # CHANNEL_LAST flatten keeps Keras' (h, w, c) order: the Dense kernel is a plain transpose
    assert layers[2]["layout"] == "dense" and "chw" not in layers[2]
    assert m["platforms"]["ios"]["flatten_mode"] == "CHANNEL_LAST"
    # nothing frozen, every parameter trains on both platforms
    assert m["platforms"]["android"]["trained"] == m["platforms"]["ios"]["trained"] == [0, 1, 2, 3]
    assert m["frozen"]["tensors"] == 0 and len(m["frozen"]["sha256"]) == 64
    # the parity report covers every check on both platforms and passes
    rep = res.parity
    assert set(rep["platform"]) == {"android", "ios"}
    for plat in ("android", "ios"):
        checks = set(rep[rep.platform == plat]["check"])
        assert {"forward", "params_in_artifact", "params_layout_roundtrip",
                "params_runtime_roundtrip", "train_step", "train_3_steps"} <= checks
    assert rep["ok"].all(), rep
    assert (rep[rep.check.str.startswith("params")]["max_abs_err"] == 0).all()
    assert (rep["tol"][rep.check == "forward"] == 1e-4).all()
    html = res._repr_html_()
    for needle in ("Trainability plan", "Parameters", "Files", "Parity", "cnn-v1.mlmodel",
                   "bytes per update"):
        assert needle in html


def test_mlp_adam_parity(mlp, tmp_path):
    res = xflwb.export(mlp, name="mlp", out_dir=tmp_path, optimizer=xflwb.Adam(0.01),
                       batch_size=8)
    assert res.parity["ok"].all(), res.parity
    assert res.manifest["data_type"] == "mlp"
    assert res.manifest["platforms"]["ios"]["coreml_layers"][0]["layout"] == "dense"


def test_mse_regression_parity(tmp_path):
    keras.utils.set_random_seed(5)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, activation="relu"),
                              keras.layers.Dense(3)])
    res = xflwb.export(model, name="reg", out_dir=tmp_path, loss="mse",
                       optimizer=xflwb.SGD(0.1, momentum=0.5))
    assert res.manifest["classes"] is None and res.manifest["loss"] == "mse"
    assert res.parity["ok"].all(), res.parity
    assert res.manifest["platforms"]["ios"]["target_dtype"] == "double"


@pytest.mark.parametrize("opt", [xflwb.SGD(learning_rate=0.05, momentum=0.9),
                                 xflwb.Adam(learning_rate=0.01)], ids=["sgd-momentum", "adam"])
def test_unseen_model_agrees_across_runtimes(unseen, tmp_path, opt):
    """A model no other test sees: predictions and parameters after several steps agree."""
    res = xflwb.export(unseen, name="unseen", out_dir=tmp_path, optimizer=opt, batch_size=8)
    assert res.parity["ok"].all(), res.parity
    rng = np.random.default_rng(7)
    x = rng.random((40, 9, 7, 2), dtype=np.float32)
    y = rng.integers(0, 5, size=40)
    start = params.canonical(unseen)
    results = {}
    for name in ("keras", "android", "ios"):
        rt = runtime.load(res.paths["manifest"], name)
        rt.set_canonical_parameters(start)
        before = rt.predict(x)
        losses = rt.fit(x, y, epochs=2, batch_size=8, shuffle=True, seed=3)
        results[name] = (before, losses, rt.canonical_parameters(), rt.predict(x))
    ref = results["keras"]
    for name in ("android", "ios"):
        got = results[name]
        np.testing.assert_allclose(got[0], ref[0], atol=1e-4)
        np.testing.assert_allclose(got[1], ref[1], atol=1e-4)
        for a, b in zip(got[2], ref[2], strict=True):
            np.testing.assert_allclose(a, b, atol=1e-4)
        np.testing.assert_allclose(got[3], ref[3], atol=1e-4)
    # training really moved the parameters (the comparison above is not vacuous)
    assert max(float(np.abs(a - b).max()) for a, b in zip(ref[2], start, strict=True)) > 1e-3


def test_mlmodel_weights_are_coreml_layouts(unseen, tmp_path):
    """The .mlmodel holds Core ML's documented layouts of the Keras weights, exactly."""
    res = xflwb.export(unseen, name="lay", out_dir=tmp_path, platforms="ios")
    spec = coreml.load_spec(res.paths["ios"])
    layers = {lay.name: lay for lay in spec.neuralNetwork.layers}
    conv, dense1, dense2 = [lay for lay in unseen.layers if lay.weights]
    k = conv.kernel.numpy()
    got = np.array(layers[conv.name].convolution.weights.floatValue, np.float32)
    np.testing.assert_array_equal(got, k.transpose(3, 2, 0, 1).ravel())
    assert list(layers[conv.name].convolution.kernelSize) == [3, 2]
    # Dense after Flatten of a (3, 2, 6) map: a CHANNEL_LAST flatten orders (h, w, c) as
    # Keras does, so the innerProduct weights are the plain transpose
    flat = next(lay for lay in spec.neuralNetwork.layers if lay.WhichOneof("layer") == "flatten")
    assert flat.flatten.mode == 1  # CHANNEL_LAST
    k1 = dense1.kernel.numpy()
    got = np.array(layers[dense1.name].innerProduct.weights.floatValue, np.float32)
    np.testing.assert_array_equal(got, k1.T.ravel())
    k2 = dense2.kernel.numpy()
    got = np.array(layers[dense2.name].innerProduct.weights.floatValue, np.float32)
    np.testing.assert_array_equal(got, k2.T.ravel())
    np.testing.assert_array_equal(
        np.array(layers[dense2.name].innerProduct.bias.floatValue, np.float32),
        dense2.bias.numpy())
    assert spec.specificationVersion >= 4
    assert spec.isUpdatable
    up = spec.neuralNetwork.updateParams
    assert up.lossLayers[0].WhichOneof("LossLayerType") == "categoricalCrossEntropyLossLayer"
    assert up.optimizer.WhichOneof("OptimizerType") == "sgdOptimizer"
    assert set(range(1, 21)) <= set(up.epochs.set.values)
    assert {1, 8, 16, 32, 64, 128} <= set(up.optimizer.sgdOptimizer.miniBatchSize.set.values)
    assert up.shuffle.defaultValue is True
    kinds = {lay.WhichOneof("layer") for lay in spec.neuralNetwork.layers}
    assert not kinds & {"batchedMatmul", "softmaxND", "transpose", "reshapeStatic"}
    assert {n for n, lay in layers.items() if lay.isUpdatable} == {conv.name, dense1.name,
                                                                   dense2.name}


def test_tflite_signatures_and_restore_resets_optimizer(cnn, tmp_path):
    from xflwb.bridge.runtime.tflite import load_interpreter

    res = xflwb.export(cnn, name="sig", out_dir=tmp_path, platforms=["android"],
                       optimizer=xflwb.Adam(0.01))
    assert "ios" not in res.manifest["platforms"] and "ios" not in res.paths
    interp = load_interpreter(res.paths["android"])
    sigs = interp.get_signature_list()
    assert sigs["train"] == {"inputs": ["x", "y"], "outputs": ["loss"]}
    assert sigs["infer"] == {"inputs": ["x"], "outputs": ["logits"]}
    assert sigs["parameters"]["outputs"] == ["a0", "a1", "a2", "a3"]
    assert sigs["restore"]["inputs"] == ["a0", "a1", "a2", "a3"]
    train = interp.get_signature_runner("train")
    assert list(train.get_input_details()["y"]["shape_signature"]) == [-1, 10]  # one-hot rows
    restore = interp.get_signature_runner("restore")
    get = interp.get_signature_runner("parameters")
    start = get()
    rng = np.random.default_rng(0)
    x = rng.random((6, 8, 8, 1), dtype=np.float32)
    y = np.eye(10, dtype=np.float32)[rng.integers(0, 10, 6)]
    train(x=x, y=y)
    once = get()
    train(x=x, y=y)  # second step carries Adam state
    restore(**start)
    train(x=x, y=y)
    again = get()
    for k in once:  # after restore the step equals the very first one: state was reset
        np.testing.assert_allclose(again[k], once[k], atol=1e-7)
    assert any(not np.allclose(once[k], start[k]) for k in once)


def test_dropping_custom_gradients_from_the_saved_model_changes_no_training_step(
        cnn, tmp_path, monkeypatch):
    """The converter's SavedModel is saved without custom gradients (faster): the .tflite
    it gives trains exactly as the one from a SavedModel saved with them, bit for bit."""
    import tensorflow as tf

    from xflwb.bridge.runtime.tflite import load_interpreter

    def trained(path):
        interp = load_interpreter(path)
        train, get = (interp.get_signature_runner(n) for n in ("train", "parameters"))
        rng = np.random.default_rng(5)
        losses = []
        for _ in range(3):
            x = rng.random((6, 8, 8, 1), dtype=np.float32)
            y = np.eye(10, dtype=np.float32)[rng.integers(0, 10, 6)]
            losses.append(train(x=x, y=y)["loss"])
        return losses, get()

    opt = xflwb.SGD(0.05, momentum=0.9)
    lean = xflwb.export(cnn, name="lean", out_dir=tmp_path, platforms="android",
                        optimizer=opt, check_parity=False)
    with monkeypatch.context() as m:  # the SavedModel's defaults: custom gradients saved
        defaults = tf.saved_model.SaveOptions
        m.setattr(tf.saved_model, "SaveOptions", lambda **_: defaults())
        full = xflwb.export(cnn, name="full", out_dir=tmp_path, platforms="android",
                            optimizer=opt, check_parity=False)
    (lean_losses, lean_params), (full_losses, full_params) = (
        trained(r.paths["android"]) for r in (lean, full))
    assert lean_losses == full_losses and len(set(map(float, lean_losses))) > 1
    assert lean_params.keys() == full_params.keys()
    for k in lean_params:
        np.testing.assert_array_equal(lean_params[k], full_params[k])


def test_an_export_leaves_the_garbage_collector_as_it_found_it(cnn, tmp_path):
    """The conversion runs with the process's objects frozen (TF's converter collects
    garbage): afterwards nothing of ours stays frozen, and objects the process froze itself
    stay frozen."""
    import gc

    assert gc.get_freeze_count() == 0
    xflwb.export(cnn, name="gc", out_dir=tmp_path, platforms="android", check_parity=False)
    assert gc.get_freeze_count() == 0
    gc.freeze()
    try:
        theirs = gc.get_freeze_count()
        assert theirs > 0
        xflwb.export(cnn, name="gc", out_dir=tmp_path, platforms="android",
                     check_parity=False)
        # objects freed meanwhile leave the permanent generation; an unfreeze would empty it
        assert gc.get_freeze_count() > theirs // 2
    finally:
        gc.unfreeze()


def test_new_version_never_overwrites(cnn, tmp_path):
    first = xflwb.export(cnn, name="same", out_dir=tmp_path, platforms="android")
    digest = manifest.sha256(first.paths["android"])
    text = first.paths["manifest"].read_text()
    second = xflwb.export(cnn, name="same", out_dir=tmp_path, platforms="android")
    assert (first.version, second.version) == (1, 2)
    assert second.paths["android"].name == "same-v2.tflite"
    assert manifest.sha256(first.paths["android"]) == digest
    assert first.paths["manifest"].read_text() == text
    assert sorted(p.name for p in (tmp_path / "same").iterdir()) == ["v1", "v2"]
    assert not list(tmp_path.glob(".*staging*"))
    with pytest.raises(FileExistsError):
        manifest.save(first.manifest, first.directory)


def test_loaded_manifest_drives_runtimes(cnn, tmp_path):
    res = xflwb.export(cnn, name="m", out_dir=tmp_path)
    m = manifest.load(res.directory)
    assert m["version"] == 1 and m["_dir"] == str(res.directory)
    assert "_dir" not in json.loads(res.paths["manifest"].read_text())
    x = np.random.default_rng(1).random((3, 8, 8, 1), dtype=np.float32)
    preds = [runtime.load(src, p).predict(x) for src, p in
             ((m, "ios"), (res, "android"), (res.paths["manifest"], "keras"))]
    np.testing.assert_allclose(preds[0], preds[2], atol=1e-5)
    np.testing.assert_allclose(preds[1], preds[2], atol=1e-5)
    with pytest.raises(ValueError, match="unknown runtime"):
        runtime.load(m, "windows")


def test_dropout_warns_and_parity_explains(tmp_path):
    keras.utils.set_random_seed(4)
    model = keras.Sequential([keras.Input((10,)), keras.layers.Dense(8, activation="relu"),
                              keras.layers.Dropout(0.5), keras.layers.Dense(3,
                                                                            activation="softmax")])
    with pytest.warns(xflwb.DropoutWarning, match="Core ML has no dropout"):
        res = xflwb.export(model, name="drop", out_dir=tmp_path)
    assert res.warnings and "dropout" in res.warnings[0].lower()
    rep = res.parity.set_index(["platform", "check"])
    assert rep.loc[("ios", "train_step"), "ok"]
    assert "no dropout" in rep.loc[("ios", "train_step"), "note"]
    assert "not comparable" in rep.loc[("android", "train_step"), "note"]
    assert res.layers.set_index("layer").loc["dropout", "ios"].startswith("identity")


def test_strict_ios_training_names_layers_auto_freezes_them(tmp_path):
    keras.utils.set_random_seed(6)
    model = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Conv2D(4, 3, name="conv"),
                              keras.layers.BatchNormalization(name="bn"),
                              keras.layers.LeakyReLU(name="leaky"),
                              keras.layers.Flatten(), keras.layers.Dense(3, activation="softmax",
                                                                         name="head")])
    with pytest.raises(xflwb.ExportError) as err:
        xflwb.export(model, name="bn", out_dir=tmp_path, ios_training="strict")
    msg = str(err.value)
    assert "layer 'bn' (BatchNormalization)" in msg and "layer 'conv' (Conv2D)" in msg
    assert "'leaky' (LeakyReLU)" in msg  # the layer that blocks the conv's gradients
    assert "platforms=('android',)" in msg and "trainable = False" in msg
    assert not (tmp_path / "bn").exists() or not list((tmp_path / "bn").iterdir())
    res = xflwb.export(model, name="bn", out_dir=tmp_path)  # auto: iOS trains the head only
    assert res.parity["ok"].all(), res.parity
    plan = res.layers.set_index("layer")
    assert plan.loc["head", "ios"] == "trained" and plan.loc["conv", "ios"] == "frozen on iOS"
    assert plan.loc["bn", "ios"] == "frozen on iOS" and plan.loc["bn", "android"] == "trained"
    ios = res.manifest["platforms"]["ios"]
    assert [e["name"] for e in ios["coreml_layers"]] == ["head", "head"]  # only what it trains
    assert params.trained_mask(res.manifest, "ios") == [False] * 4 + [True, True]


def test_gru_reset_after_names_layer_and_fix(tmp_path):
    model = keras.Sequential([keras.Input((5, 3)), keras.layers.GRU(4, name="gru_1"),
                              keras.layers.Dense(2, activation="softmax")])
    with pytest.raises(xflwb.ExportError) as err:
        xflwb.export(model, name="g", out_dir=tmp_path)
    assert "layer 'gru_1' (GRU)" in str(err.value)
    assert "reset_after=False" in str(err.value)
    assert "platforms=('android',)" in str(err.value)


@pytest.mark.parametrize("bad, match", [
    (object(), "expected a Keras 3 model"),
    ("model.keras", "expected a Keras 3 model"),
])
def test_non_keras_object(bad, match, tmp_path):
    with pytest.raises(xflwb.ExportError, match=match):
        xflwb.export(bad, name="x", out_dir=tmp_path)


def test_missing_input_shape(tmp_path):
    model = keras.Sequential([keras.layers.Dense(3, activation="softmax")])
    with pytest.raises(xflwb.ExportError, match=r"keras.Input\(shape="):
        xflwb.export(model, name="x", out_dir=tmp_path)


@pytest.mark.parametrize("opt, exc, match", [
    (keras.optimizers.SGD(), TypeError, "xflwb.SGD"),
    ("rmsprop", ValueError, "unknown optimizer 'rmsprop'"),
    (lambda: xflwb.SGD(learning_rate=-1.0), ValueError, "learning_rate"),
    (lambda: xflwb.SGD(momentum=1.5), ValueError, "momentum"),
    (lambda: xflwb.Adam(beta_1=1.0), ValueError, "beta_1"),
])
def test_bad_optimizer(cnn, tmp_path, opt, exc, match):
    with pytest.raises(exc, match=match):
        xflwb.export(cnn, name="x", out_dir=tmp_path, optimizer=opt() if callable(opt) else opt)


@pytest.mark.parametrize("kwargs, match", [
    ({"name": "bad name!"}, "name"),
    ({"name": "ok", "loss": "hinge"}, "unsupported loss"),
    ({"name": "ok", "platforms": ("android", "windows")}, "platforms"),
    ({"name": "ok", "batch_size": 0}, "batch_size"),
    ({"name": "ok", "epochs": 1.5}, "epochs"),
])
def test_bad_arguments(cnn, tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        xflwb.export(cnn, out_dir=tmp_path, **kwargs)
    assert not list(tmp_path.rglob("*.tflite"))


def test_cce_needs_softmax(tmp_path):
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    with pytest.raises(xflwb.ExportError, match="activation='softmax'"):
        xflwb.export(model, name="x", out_dir=tmp_path)


@pytest.mark.parametrize("make, match", [
    (lambda: keras.Model([i1 := keras.Input((4,)), i2 := keras.Input((4,))],
                         keras.layers.Dense(2, activation="softmax")(
                             keras.layers.Concatenate()([i1, i2]))), "2 inputs"),
    (lambda: (lambda d, i: keras.Model(i, keras.layers.Softmax()(
        keras.layers.Add()([d(i), d(i)]))))(keras.layers.Dense(4, name="shared"),
                                           keras.Input((4,))), "called more than once"),
    (lambda: keras.Sequential([keras.Input((4,)), keras.layers.Dense(4),
                               keras.layers.LayerNormalization(name="ln"),
                               keras.layers.Dense(2, activation="softmax")]),
     "replace LayerNormalization by BatchNormalization"),
    (lambda: keras.Sequential([keras.Input((4,)), keras.layers.Dense(4, activation="selu"),
                               keras.layers.Dense(2, activation="softmax")]), "'selu'"),
])
def test_unsupported_graphs_name_the_layer_and_fix(make, match, tmp_path):
    with pytest.raises(xflwb.ExportError, match=match):
        xflwb.export(make(), name="x", out_dir=tmp_path)
    assert not (tmp_path / "x").exists()


def test_parity_failure_raises_unless_not_strict(cnn, tmp_path, monkeypatch):
    """Break the Core ML layout on purpose: parity catches it; strict=False keeps it."""
    from xflwb.bridge import params as params_mod

    real = params_mod.to_platform_array

    def wrong(k, layout, chw=None):  # a conv kernel in the wrong axis order
        return real(k, layout, chw).swapaxes(2, 3).copy() if layout == "conv" else real(
            k, layout, chw)

    monkeypatch.setattr(params_mod, "to_platform_array", wrong)
    with pytest.raises(xflwb.ParityError) as err:
        xflwb.export(cnn, name="broken", out_dir=tmp_path)
    assert "ios forward" in str(err.value)
    assert not (tmp_path / "broken" / "v1").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = xflwb.export(cnn, name="broken", out_dir=tmp_path, strict=False)
    assert not res.parity["ok"].all()
    assert res.parity.set_index(["platform", "check"]).loc[("android", "forward"), "ok"]
    assert "FAILED" in repr(res)


def test_allowed_sets_cover_large_session_settings(mlp, tmp_path):
    """A session may ask for more epochs / bigger batches than the defaults: all allowed."""
    res = xflwb.export(mlp, name="wide", out_dir=tmp_path, epochs=150, batch_size=512,
                       platforms="ios")
    ios = res.manifest["platforms"]["ios"]
    assert ios["allowed_epochs"] == [1, 150] and ios["allowed_batch_sizes"] == [1, 512]
    rt = runtime.load(res, "ios")
    x = np.random.default_rng(0).random((20, 12), dtype=np.float32)
    y = np.arange(20) % 4
    assert len(rt.update(x, y, overrides={"epochs": 120, "mini_batch_size": 300})) == 120
    with pytest.raises(ValueError, match="epochs"):
        rt.update(x, y, overrides={"epochs": 151})


def test_trailing_dropout_after_softmax_is_fine_for_ios(tmp_path):
    keras.utils.set_random_seed(8)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(3, activation="softmax"),
                              keras.layers.Dropout(0.1)])
    with pytest.warns(xflwb.DropoutWarning):
        res = xflwb.export(model, name="td", out_dir=tmp_path)
    assert res.parity["ok"].all(), res.parity
