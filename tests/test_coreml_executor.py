"""The numpy Core ML executor against Keras 3: forward, gradients, training, error paths.

Specs come from the real builder (graph.analyze → coreml.build), so these tests also pin
the builder's layouts; Keras runs real tf.function steps, nothing is mocked.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import pytest
import tensorflow as tf

from xflwb.bridge import coreml, graph, optim, params
from xflwb.bridge.runtime.base import epoch_batches
from xflwb.bridge.runtime.coreml import CoreMLExecutor, IOSRuntime

L = keras.layers
CCE = "categorical_crossentropy"


# -- helpers -----------------------------------------------------------------------------------
def seq(input_shape: tuple[int, ...], *layers: keras.layers.Layer, seed: int = 0
        ) -> keras.Model:
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input(input_shape), *layers])


def build(model: keras.Model, loss: str | None = None, opt: optim.Optimizer | None = None,
          batch_size: int = 8, epochs: int = 2):
    g = graph.analyze(model)
    if loss is None:
        loss = CCE if g.final_activation == "softmax" else "mse"
    b = coreml.build(g, loss, opt or optim.SGD(0.05), batch_size,
                     epochs)
    return g, b


def manifest(g, b, loss: str) -> dict:
    return {"name": "t", "version": 1, "loss": loss,
            "classes": int(g.output_shape[0]) if loss == CCE else None,
            "input": {"shape": list(g.input_shape), "dtype": "float32"}, "batch_size": 8,
            "parameters": g.parameters, "platforms": {"ios": {"coreml_layers": b.coreml_layers}}}


def nchw(x: np.ndarray) -> np.ndarray:
    return x.transpose(0, 3, 1, 2) if x.ndim == 4 else x


def data(g, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, *g.input_shape)).astype(np.float32)
    if g.final_activation == "softmax":
        return x, rng.integers(0, g.output_shape[0], n)
    return x, rng.normal(size=(n, *g.output_shape)).astype(np.float32)


def keras_platform(model: keras.Model, g, b, values=None) -> list[np.ndarray]:
    """Keras tensors (weights or gradients) mapped to Core ML layout via the manifest."""
    canon = [np.asarray(v, np.float32) for v in (values or model.trainable_weights)]
    return params.to_platform(canon, manifest(g, b, CCE), "ios")


def keras_trainer(model: keras.Model, loss: str, opt: keras.optimizers.Optimizer):
    loss_fn = keras.losses.CategoricalCrossentropy() if loss == CCE else (
        keras.losses.MeanSquaredError())
    classes = model.output_shape[-1]

    @tf.function
    def step(x, y):
        with tf.GradientTape() as tape:
            value = loss_fn(y, model(x, training=True))
        grads = tape.gradient(value, model.trainable_variables)
        opt.apply_gradients(zip(grads, model.trainable_variables, strict=True))
        return value

    def run(x, y):
        y = np.eye(classes, dtype=np.float32)[y] if loss == CCE else y
        return float(step(tf.constant(x), tf.constant(y)))

    return run


def _copy(spec):
    out = type(spec)()
    out.CopyFrom(spec)
    return out


def assert_close_list(a, b, atol, what=""):
    assert len(a) == len(b)
    for i, (u, v) in enumerate(zip(a, b, strict=True)):
        np.testing.assert_allclose(u, v, atol=atol, rtol=0, err_msg=f"{what} tensor {i}")


# -- forward -------------------------------------------------------------------------------------
FORWARD = {
    "conv_valid": lambda: seq((7, 5, 2), L.Conv2D(3, 3), L.Flatten(), L.Dense(4)),
    "conv_same_relu": lambda: seq((7, 5, 2), L.Conv2D(4, (3, 2), padding="same",
                                                      activation="relu"),
                                  L.Flatten(), L.Dense(3, activation="softmax")),
    "stride2_same": lambda: seq((9, 7, 2), L.Conv2D(5, 3, strides=2, padding="same",
                                                    activation="tanh"),
                                L.Flatten(), L.Dense(3)),
    "stride_2x3_valid": lambda: seq((10, 8, 1), L.Conv2D(3, (3, 2), strides=(2, 3)),
                                    L.Flatten(), L.Dense(2)),
    "dilation2": lambda: seq((9, 8, 2), L.Conv2D(4, 3, dilation_rate=2, padding="same",
                                                 activation="sigmoid"),
                             L.Conv2D(3, 2, dilation_rate=(1, 2)), L.Flatten(), L.Dense(3)),
    "groups2": lambda: seq((7, 5, 4), L.Conv2D(6, 3, groups=2, padding="same"),
                           L.Conv2D(4, 1, groups=2, use_bias=False), L.Flatten(), L.Dense(3)),
    "maxpool_valid_odd": lambda: seq((7, 5, 2), L.Conv2D(3, 1), L.MaxPooling2D(2),
                                     L.Flatten(), L.Dense(3)),
    "maxpool_same_odd": lambda: seq((7, 5, 2), L.Conv2D(3, 1), L.MaxPooling2D((3, 2),
                                                                            padding="same"),
                                    L.Flatten(), L.Dense(3)),
    "maxpool_overlap": lambda: seq((7, 5, 2), L.MaxPooling2D(3, strides=1), L.Flatten(),
                                   L.Dense(3)),
    "avgpool_valid_odd": lambda: seq((7, 5, 2), L.Conv2D(3, 1), L.AveragePooling2D(2),
                                     L.Flatten(), L.Dense(3)),
    "avgpool_same_odd": lambda: seq((7, 5, 2), L.Conv2D(3, 1), L.AveragePooling2D(
        (3, 2), strides=(2, 1), padding="same"), L.Flatten(), L.Dense(3)),
    "mlp": lambda: seq((12,), L.Dense(16, activation="tanh"), L.Dense(8, activation="sigmoid"),
                       L.Dense(6, activation="relu"), L.Dense(4, activation="softmax")),
    "activation_layers": lambda: seq((6, 6, 1), L.Conv2D(2, 3), L.ReLU(), L.Flatten(),
                                     L.Dense(5), L.Activation("tanh"), L.Dense(3),
                                     L.Activation("sigmoid")),
}


@pytest.mark.parametrize("case", sorted(FORWARD))
def test_forward_matches_keras(case):
    model = FORWARD[case]()
    g, b = build(model)
    x, _ = data(g, 6, seed=1)
    ex = CoreMLExecutor(b.spec)
    out = ex.forward(nchw(x))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, np.asarray(model(x)), atol=1e-5, rtol=0)


def test_forward_top_left_heavy_and_explicit_valid_padding():
    """Padding variants the builder never emits, checked against a shifted Keras input."""
    model = seq((6, 5, 1), L.Conv2D(2, 2, padding="same"), L.Flatten(), L.Dense(2))
    g, b = build(model)
    x, _ = data(g, 3)
    spec = _copy(b.spec)
    conv = spec.neuralNetwork.layers[0].convolution
    conv.same.asymmetryMode = 1  # TOP_LEFT_HEAVY: the extra pad row/col goes first
    ex = CoreMLExecutor(spec)
    # 2x2 kernel, stride 1: total pad 1 → TOP_LEFT puts it at top/left. Same as Keras 'valid'
    # on the input padded by one row/col at the top/left.
    k, bias = (np.asarray(v) for v in model.layers[0].weights)
    xp = np.pad(x, ((0, 0), (1, 0), (1, 0), (0, 0)))
    ref = np.asarray(tf.nn.conv2d(xp, k, 1, "VALID")) + bias
    ref = np.asarray(model.layers[2](model.layers[1](ref)))
    np.testing.assert_allclose(ex.forward(nchw(x)), ref, atol=1e-5)
    # explicit valid padding amounts (top 1, bottom 0, left 0, right 1) behave the same way
    conv.ClearField("same")
    amounts = conv.valid.paddingAmounts.borderAmounts
    amounts.add(startEdgeSize=1, endEdgeSize=0)
    amounts.add(startEdgeSize=0, endEdgeSize=1)
    xp = np.pad(x, ((0, 0), (1, 0), (0, 1), (0, 0)))
    ref = np.asarray(tf.nn.conv2d(xp, k, 1, "VALID")) + bias
    ref = np.asarray(model.layers[2](model.layers[1](ref)))
    np.testing.assert_allclose(CoreMLExecutor(spec).forward(nchw(x)), ref, atol=1e-5)


def test_global_pooling_flatten_channel_last_and_blocking_activations_forward():
    """Layers the builder does not emit still run forward with Core ML semantics."""
    model = seq((5, 4, 3), L.Conv2D(3, 1), L.Flatten(), L.Dense(2))
    g, b = build(model)
    x, _ = data(g, 4)
    xc = nchw(x).astype(np.float32)
    spec = _copy(b.spec)
    nn = spec.neuralNetwork
    # x → linear(2x+1) → leakyReLU(0.1) → conv → global avg pool → ...
    pre = nn.layers.add()
    pre.name, pre.activation.linear.alpha, pre.activation.linear.beta = "lin", 2.0, 1.0
    pre.input.append("x")
    pre.output.append("lin")
    leaky = nn.layers.add()
    leaky.name, leaky.activation.leakyReLU.alpha = "leaky", 0.1
    leaky.input.append("lin")
    leaky.output.append("leaky")
    nn.layers[0].input[0] = "leaky"
    order = [nn.layers[-2], nn.layers[-1], *list(nn.layers)[:-2]]
    copies = [type(order[0])() for _ in order]
    for c, o in zip(copies, order, strict=True):
        c.CopyFrom(o)
    del nn.layers[:]
    nn.layers.extend(copies)
    ex = CoreMLExecutor(spec)  # no updatable layer upstream of the blockers: accepted
    z = 2 * xc + 1
    z = np.where(z >= 0, z, 0.1 * z)
    k, bias = (np.asarray(v) for v in model.layers[0].weights)
    ref = np.asarray(model.layers[2](model.layers[1](
        np.asarray(tf.nn.conv2d(z.transpose(0, 2, 3, 1), k, 1, "VALID")) + bias)))
    np.testing.assert_allclose(ex.forward(xc), ref, atol=1e-5)

    # global max / avg pooling and CHANNEL_LAST flatten on a tiny hand-made graph
    for mode, fn in ((0, np.max), (1, np.mean)):
        s2 = _copy(b.spec)
        layers = s2.neuralNetwork.layers
        flat = layers[1]
        pool = type(flat)()
        pool.name = "gpool"
        pool.input.append(layers[0].output[0])
        pool.output.append("gpool")
        pool.pooling.type = mode
        pool.pooling.globalPooling = True
        pool.pooling.valid.SetInParent()
        flat.input[0] = "gpool"
        flat.flatten.mode = 1
        rest = [type(flat)() for _ in layers]
        for c, o in zip(rest, layers, strict=True):
            c.CopyFrom(o)
        del layers[:]
        layers.extend([rest[0], pool, *rest[1:]])
        dense = layers[-1].innerProduct
        dense.inputChannels = 3
        del dense.weights.floatValue[:]
        dense.weights.floatValue.extend(np.arange(6, dtype=np.float32) / 6)
        conv_out = np.asarray(tf.nn.conv2d(x, k, 1, "VALID")) + bias  # (N, H, W, C)
        pooled = fn(conv_out, axis=(1, 2))
        want = pooled @ (np.arange(6, dtype=np.float32) / 6).reshape(2, 3).T + np.asarray(
            model.layers[2].bias)
        np.testing.assert_allclose(CoreMLExecutor(s2).forward(xc), want, atol=1e-5)


def test_channel_last_flatten_and_avg_pool_including_padding():
    """CHANNEL_LAST flatten takes Keras' kernel as W = K.T; exclude-padding off divides by k²."""
    model = seq((7, 5, 2), L.Conv2D(3, 3, padding="same", activation="tanh"),
                L.AveragePooling2D((2, 2), padding="same"), L.Flatten(), L.Dense(4), seed=6)
    g, b = build(model, "mse")
    x, y = data(g, 5)
    spec = _copy(b.spec)
    layers = spec.neuralNetwork.layers
    flat = next(lay for lay in layers if lay.WhichOneof("layer") == "flatten")
    flat.flatten.mode = 1  # CHANNEL_LAST: (h, w, c) order, as Keras
    dense = layers[-1].innerProduct
    del dense.weights.floatValue[:]
    dense.weights.floatValue.extend(np.asarray(model.layers[-1].kernel).T.ravel())
    np.testing.assert_allclose(CoreMLExecutor(spec).forward(nchw(x)), np.asarray(model(x)),
                               atol=1e-5)
    _fd_check(CoreMLExecutor(spec, dtype=np.float64), nchw(x).astype(np.float64), y)

    pool = next(lay for lay in layers if lay.WhichOneof("layer") == "pooling")
    pool.pooling.avgPoolExcludePadding = False
    conv_out = np.asarray(model.layers[0](x))  # 7x5 → pad one row/col at bottom/right
    padded = np.pad(conv_out, ((0, 0), (0, 1), (0, 1), (0, 0)))
    pooled = np.asarray(tf.nn.avg_pool2d(padded, 2, 2, "VALID"))
    want = np.asarray(model.layers[-1](model.layers[-2](pooled)))
    np.testing.assert_allclose(CoreMLExecutor(spec).forward(nchw(x)), want, atol=1e-5)
    _fd_check(CoreMLExecutor(spec, dtype=np.float64), nchw(x).astype(np.float64), y)


# -- gradients ------------------------------------------------------------------------------------
def _fd_check(ex: CoreMLExecutor, x: np.ndarray, t: np.ndarray, per_tensor: int = 12) -> None:
    _, grads = ex.loss_and_grads(x, t)
    weights = ex.get_weights()
    base = [w.astype(np.float64) for w in weights]
    rng = np.random.default_rng(0)
    h = 1e-6
    for i, g in enumerate(grads):
        assert g is not None and g.shape == base[i].shape
        picks = rng.choice(base[i].size, min(per_tensor, base[i].size), replace=False)
        for j in picks:
            for sign, store in ((1, "p"), (-1, "m")):
                w = [a.copy() for a in base]
                w[i].flat[j] += sign * h
                ex.set_weights(w)
                if store == "p":
                    lp = ex.loss_and_grads(x, t)[0]
                else:
                    lm = ex.loss_and_grads(x, t)[0]
            fd = (lp - lm) / (2 * h)
            assert abs(fd - g.flat[j]) < 1e-6 + 1e-5 * abs(fd), (i, j, fd, g.flat[j])
    ex.set_weights(base)


def test_gradients_match_finite_differences_cce():
    """conv(1x1) in front so every later conv/pool must produce input gradients too."""
    model = seq((7, 6, 2), L.Conv2D(4, 1, activation="tanh"),
                L.Conv2D(4, 3, strides=2, padding="same", groups=2, activation="relu"),
                L.MaxPooling2D((2, 2), padding="same"),
                L.Conv2D(3, 2, padding="same", activation="sigmoid"),
                L.MaxPooling2D((2, 2), strides=1),
                L.Flatten(), L.Dense(5), L.Dense(3, activation="softmax"), seed=4)
    g, b = build(model)
    x, y = data(g, 5, seed=2)
    _fd_check(CoreMLExecutor(b.spec, dtype=np.float64), nchw(x).astype(np.float64), y)


def test_gradients_match_finite_differences_mse():
    model = seq((12, 11, 1), L.Conv2D(3, 1, use_bias=False),
                L.Conv2D(4, 3, dilation_rate=2, padding="same", activation="tanh"),
                L.AveragePooling2D((3, 2), strides=(2, 1), padding="same"),
                L.Conv2D(2, (3, 2), strides=(2, 3)),
                L.AveragePooling2D(2, padding="valid"),
                L.Flatten(), L.Dense(3), seed=5)
    g, b = build(model, "mse")
    x, y = data(g, 4, seed=3)
    _fd_check(CoreMLExecutor(b.spec, dtype=np.float64), nchw(x).astype(np.float64), y)


def test_gradients_match_keras_gradient_tape():
    model = seq((9, 7, 2), L.Conv2D(6, (3, 2), strides=2, padding="same", activation="relu"),
                L.Conv2D(4, 3, padding="same", activation="tanh"),
                L.MaxPooling2D((2, 2), padding="same"), L.Flatten(),
                L.Dense(12, activation="relu"), L.Dense(5, activation="softmax"), seed=3)
    g, b = build(model)
    x, y = data(g, 16, seed=4)
    with tf.GradientTape() as tape:
        loss = keras.losses.CategoricalCrossentropy()(np.eye(5, dtype=np.float32)[y],
                                                      model(x, training=True))
    kgrads = tape.gradient(loss, model.trainable_variables)
    want = keras_platform(model, g, b, kgrads)
    got_loss, got = CoreMLExecutor(b.spec).loss_and_grads(nchw(x), y)
    assert got_loss == pytest.approx(float(loss), abs=1e-5)
    assert_close_list(got, want, 2e-6, "gradient")
    # Dense right after Flatten of an HxWxC map: CHANNEL_LAST flatten keeps Keras' order
    assert b.coreml_layers[4]["layout"] == "dense"


def test_max_pool_tie_sends_gradient_to_first_argmax():
    model = seq((4, 4, 1), L.Conv2D(1, 1), L.MaxPooling2D(2), L.Flatten(), L.Dense(2))
    _, b = build(model, "mse")
    ex = CoreMLExecutor(b.spec)
    pool = next(lay for lay in ex.layers if lay.kind == "pooling")
    x = np.zeros((1, 1, 4, 4), np.float32)
    x[0, 0, 2:, 2:] = [[1, 3], [3, 0]]  # tie in the last window: first is (2, 3)
    pool.forward(x, keep=True)
    dx = pool.backward(np.ones((1, 1, 2, 2), np.float32), need_dx=True)[0, 0]
    want = np.zeros((4, 4))
    want[0, 0] = want[0, 2] = want[2, 0] = want[2, 3] = 1
    np.testing.assert_array_equal(dx, want)


# -- training ----------------------------------------------------------------------------------
def _train_vs_keras(model, loss, opt, kopt, steps: int, n: int = 24, batch: int = 8):
    g, b = build(model, loss, opt, batch_size=batch)
    ex = CoreMLExecutor(b.spec)
    x, y = data(g, n, seed=7)
    run = keras_trainer(model, loss, kopt)
    for i in range(steps):
        idx = np.arange(i * batch, (i + 1) * batch) % n
        lk = run(x[idx], y[idx])
        le = ex.step(nchw(x[idx]), y[idx])
        assert le == pytest.approx(lk, rel=1e-4, abs=1e-5)
    assert_close_list(ex.get_weights(), keras_platform(model, g, b), 1e-4, "weights")
    return ex


def _cnn(seed=11):
    return seq((8, 8, 1), L.Conv2D(8, 3, padding="same", activation="relu"), L.MaxPooling2D(),
               L.Flatten(), L.Dense(10, activation="softmax"), seed=seed)


def test_sgd_momentum_matches_keras():
    _train_vs_keras(_cnn(), CCE, optim.SGD(0.1, 0.9), keras.optimizers.SGD(0.1, momentum=0.9),
                    steps=5)


def test_adam_matches_keras():
    _train_vs_keras(_cnn(), CCE, optim.Adam(0.01, 0.8, 0.99, 1e-7),
                    keras.optimizers.Adam(0.01, beta_1=0.8, beta_2=0.99, epsilon=1e-7),
                    steps=5)


def test_mse_sgd_and_adam_match_keras():
    def mlp():
        return seq((12,), L.Dense(16, activation="tanh"), L.Dense(8, activation="sigmoid"),
                   L.Dense(3), seed=12)

    _train_vs_keras(mlp(), "mse", optim.SGD(0.05), keras.optimizers.SGD(0.05), steps=4)
    _train_vs_keras(mlp(), "mse", optim.Adam(0.01), keras.optimizers.Adam(0.01, epsilon=1e-7),
                    steps=4)


def test_mse_reduction_switch():
    model = seq((5,), L.Dense(4), seed=23)
    g, b = build(model, "mse")
    x, y = data(g, 6)
    lm, gm = CoreMLExecutor(b.spec).loss_and_grads(x, y)
    ls, gs = CoreMLExecutor(b.spec, mse_reduction="sum").loss_and_grads(x, y)
    assert lm == pytest.approx(float(np.mean((np.asarray(model(x)) - y) ** 2)), rel=1e-5)
    assert ls == pytest.approx(4 * lm, rel=1e-6)
    assert_close_list(gs, [4 * a for a in gm], 1e-6)
    with pytest.raises(ValueError, match="mse_reduction"):
        CoreMLExecutor(b.spec, mse_reduction="half")


def test_adam_epsilon_placements():
    """One step from zero state: 'hat' is lr·g/(|g|+eps/√(1-β2)), 'corrected' lr·g/(|g|+eps)."""
    model = seq((5,), L.Dense(3), L.Dense(2, activation="softmax"), seed=13)
    lr, b2, eps = 0.01, 0.99, 0.1
    g, b = build(model, CCE, optim.Adam(lr, 0.9, b2, eps))
    x, y = data(g, 6)
    for mode, eff in (("hat", eps / np.sqrt(1 - b2)), ("corrected", eps)):
        ex = CoreMLExecutor(b.spec, adam_epsilon=mode)
        before = ex.get_weights()
        _, grads = ex.loss_and_grads(x, y)
        ex.step(x, y)
        for w0, w1, gr in zip(before, ex.get_weights(), grads, strict=True):
            np.testing.assert_allclose(w0 - w1, lr * gr / (np.abs(gr) + eff), atol=1e-7)
    with pytest.raises(ValueError, match="adam_epsilon"):
        CoreMLExecutor(b.spec, adam_epsilon="sqrt")


def test_ios_runtime_fit_and_update_match_keras_loop(tmp_path):
    """Base-class fit (shared batching, partial last batch, shuffle, seed) vs a Keras loop."""
    model = _cnn(seed=14)
    g, b = build(model, CCE, optim.SGD(0.05, 0.5), batch_size=8, epochs=2)
    coreml.save(b.spec, tmp_path / "m.mlmodel")
    rt = IOSRuntime(manifest(g, b, CCE), tmp_path / "m.mlmodel")
    x, y = data(g, 20, seed=8)  # batches 8, 8, 4
    start = rt.get_parameters()
    losses = rt.fit(x, y, epochs=2, batch_size=8, shuffle=True, seed=3)
    run = keras_trainer(model, CCE, keras.optimizers.SGD(0.05, momentum=0.5))
    rng = np.random.default_rng(3)
    klosses = []
    for _ in range(2):
        total = 0.0
        for idx in epoch_batches(len(x), 8, True, rng):
            total += run(x[idx], y[idx]) * len(idx)
        klosses.append(total / len(x))
    np.testing.assert_allclose(losses, klosses, rtol=1e-4)
    assert_close_list(rt.get_parameters(), keras_platform(model, g, b), 1e-4, "fit")

    # update(): the same task with Core ML-style parameters gives the same result
    rt.set_parameters([a.ravel() for a in start])  # flat, as on the wire
    got = rt.update(x, y, epochs=2, batch_size=8, shuffle=True, seed=3)
    np.testing.assert_allclose(got, losses, rtol=1e-6)
    assert_close_list(rt.get_parameters(), keras_platform(model, g, b), 1e-4, "update")


def test_update_uses_model_defaults_and_last_partial_batch():
    model = seq((4,), L.Dense(3, activation="softmax"), seed=15)
    g, b = build(model, CCE, optim.SGD(0.1), batch_size=4, epochs=3)
    x, y = data(g, 10)
    ex = CoreMLExecutor(b.spec)
    hp = ex.hyperparameters()
    assert (hp["epochs"], hp["mini_batch_size"], hp["shuffle"], hp["seed"]) == (3, 4, True,
                                                                                None)
    ex2 = CoreMLExecutor(b.spec)
    losses = ex.update(x, y, shuffle=False)
    assert len(losses) == 3
    manual = []
    for _ in range(3):
        parts = [ex2.step(x[s:s + 4], y[s:s + 4]) * len(x[s:s + 4]) for s in (0, 4, 8)]
        manual.append(sum(parts) / 10)
    np.testing.assert_allclose(losses, manual, rtol=1e-6)
    assert_close_list(ex.get_weights(), ex2.get_weights(), 1e-7)


def test_only_updatable_layers_change():
    model = _cnn(seed=16)
    g, b = build(model)
    spec = _copy(b.spec)
    conv = spec.neuralNetwork.layers[0]
    conv.isUpdatable = False
    conv.convolution.weights.isUpdatable = False
    conv.convolution.bias.isUpdatable = False
    ex = CoreMLExecutor(spec)
    x, y = data(g, 8)
    before = ex.get_weights()
    _, grads = ex.loss_and_grads(nchw(x), y)
    assert grads[0] is None and grads[1] is None
    ex.step(nchw(x), y)
    after = ex.get_weights()
    np.testing.assert_array_equal(after[0], before[0])
    np.testing.assert_array_equal(after[1], before[1])
    assert not np.allclose(after[2], before[2])


# -- weight I/O and the iOS runtime ------------------------------------------------------------
def test_ios_runtime_parameters_predict_and_spec_round_trip(tmp_path):
    model = seq((9, 7, 2), L.Conv2D(6, (3, 2), strides=2, padding="same", activation="relu"),
                L.MaxPooling2D((2, 2), padding="same"), L.Flatten(),
                L.Dense(12, activation="relu"), L.Dense(5, activation="softmax"), seed=17)
    g, b = build(model)
    path = tmp_path / "m.mlmodel"
    coreml.save(b.spec, path)
    man = manifest(g, b, CCE)
    rt = IOSRuntime(man, path)
    assert rt.platform == "ios"
    x, y = data(g, 7)
    np.testing.assert_allclose(rt.predict(x), np.asarray(model(x)), atol=1e-5)
    want = params.to_platform(params.canonical(model), man, "ios")
    assert_close_list(rt.get_parameters(), want, 0)
    assert_close_list(rt.canonical_parameters(), params.canonical(model), 0)
    got = rt.get_parameters()
    got[0][0, 0, 0, 0] = 99.0  # a copy: the runtime is untouched
    assert rt.get_parameters()[0][0, 0, 0, 0] != 99.0
    loss, acc = rt.evaluate(x, y)
    assert np.isfinite(loss) and 0 <= acc <= 1

    rt.fit(x, y, epochs=1, batch_size=4, seed=0)
    trained = rt.get_parameters()
    path2 = tmp_path / "trained.mlmodel"
    coreml.save(rt.to_spec(), path2)
    rt2 = IOSRuntime(man, path2)
    assert_close_list(rt2.get_parameters(), trained, 0)
    np.testing.assert_allclose(rt2.predict(x), rt.predict(x), atol=0)
    # the original file still holds the untrained weights
    assert_close_list(IOSRuntime(man, path).get_parameters(), want, 0)

    with pytest.raises(ValueError, match="expected 6 iOS tensors"):
        rt.set_parameters(trained[:-1])
    bad = [a.copy() for a in trained]
    bad[2] = bad[2][:-1]
    with pytest.raises(ValueError, match="dense"):
        rt.set_parameters(bad)
    with pytest.raises(ValueError, match="shape"):
        rt.predict(nchw(x))


def test_set_weights_errors_name_the_layer():
    model = _cnn(seed=18)
    _, b = build(model)
    ex = CoreMLExecutor(b.spec)
    w = ex.get_weights()
    with pytest.raises(ValueError, match="expected 4 weight tensors"):
        ex.set_weights(w[:3])
    bad = [a.copy() for a in w]
    bad[2] = np.zeros(bad[2].size + 1, np.float32)
    with pytest.raises(ValueError, match=r"layer 'dense\w*' weights: got 1281 values"):
        ex.set_weights(bad)
    bad = [a.copy() for a in w]
    bad[0] = bad[0].reshape(8, 3, 3, 1)
    with pytest.raises(ValueError, match=r"layer 'conv2d\w*' weights: got shape"):
        ex.set_weights(bad)
    ex.set_weights([a.ravel() for a in w])  # flat arrays are fine
    assert_close_list(ex.get_weights(), w, 0)


# -- error paths ---------------------------------------------------------------------------------
def test_overrides_outside_allowed_values_raise():
    model = _cnn(seed=19)
    g, b = build(model, CCE, optim.SGD(0.05, 0.9))
    x, y = data(g, 6)
    ex = CoreMLExecutor(b.spec)
    xc = nchw(x)
    for kwargs, match in (({"epochs": 1000}, "epochs=1000 is not in the model's allowed set"),
                          ({"batch_size": 10000}, "mini_batch_size=10000"),
                          ({"overrides": {"learning_rate": 2.0}}, r"learning_rate=2\.0 is outside"),
                          ({"overrides": {"momentum": -0.5}}, "momentum"),
                          ({"overrides": {"beta1": 0.5}}, "does not exist"),
                          ({"overrides": {"lr": 0.1}}, "unknown update parameter"),
                          ({"epochs": 0}, "epochs must be >= 1")):
        with pytest.raises(ValueError, match=match):
            ex.update(xc, y, **kwargs)
    # allowed values go through
    assert len(ex.update(xc, y, epochs=3, batch_size=5,
                         overrides={"learning_rate": 0.01, "momentum": 0.0})) == 3
    _, ba = build(model, CCE, optim.Adam(0.01))
    exa = CoreMLExecutor(ba.spec)
    with pytest.raises(ValueError, match="momentum"):
        exa.update(xc, y, overrides={"momentum": 0.5})
    with pytest.raises(ValueError, match=r"beta2=1\.5 is outside"):
        exa.update(xc, y, overrides={"beta2": 1.5})


def test_shuffle_seed_reproducible():
    model = _cnn(seed=20)
    g, b = build(model)
    x, y = data(g, 30)
    xc = nchw(x)
    runs = {}
    for key, seed in (("a", 5), ("b", 5), ("c", 6)):
        ex = CoreMLExecutor(b.spec)
        losses = ex.update(xc, y, epochs=2, batch_size=8, shuffle=True, seed=seed)
        runs[key] = (losses, ex.get_weights())
    assert runs["a"][0] == runs["b"][0]
    assert_close_list(runs["a"][1], runs["b"][1], 0)
    assert not np.allclose(runs["a"][1][2], runs["c"][1][2])


def test_unknown_layer_fp16_and_blocked_gradients_raise():
    model = seq((6, 6, 1), L.Conv2D(2, 3, activation="relu"), L.Flatten(),
                L.Dense(3, activation="softmax"), seed=21)
    _, b = build(model)

    spec = _copy(b.spec)
    spec.neuralNetwork.layers[1].l2normalize.SetInParent()  # replaces the ReLU
    with pytest.raises(ValueError, match=r"'conv2d\w*__relu'.*'l2normalize'.*not support"):
        CoreMLExecutor(spec)

    spec = _copy(b.spec)
    w = spec.neuralNetwork.layers[0].convolution.weights
    half = np.asarray(w.floatValue, np.float16).tobytes()
    del w.floatValue[:]
    w.float16Value = half
    with pytest.raises(ValueError, match=r"'conv2d\w*' is updatable but has fp16 weights"):
        CoreMLExecutor(spec)

    spec = _copy(b.spec)
    spec.neuralNetwork.layers[0].convolution.weights.rawValue = b"\0" * 8
    with pytest.raises(ValueError, match="quantised"):
        CoreMLExecutor(spec)

    spec = _copy(b.spec)
    spec.neuralNetwork.layers[1].activation.leakyReLU.alpha = 0.2
    with pytest.raises(ValueError, match="does not support backpropagation"):
        CoreMLExecutor(spec)

    spec = _copy(b.spec)
    spec.neuralNetwork.layers[1].isUpdatable = True
    with pytest.raises(ValueError, match="marked updatable"):
        CoreMLExecutor(spec)

    spec = _copy(b.spec)
    del spec.neuralNetwork.layers[0].convolution.weights.floatValue[-1]
    with pytest.raises(ValueError, match=r"'conv2d\w*' weights has 17 values, expected 18"):
        CoreMLExecutor(spec)

    with pytest.raises(ValueError, match=r"x must have shape \(N, 1, 6, 6\)"):
        CoreMLExecutor(b.spec).forward(np.zeros((2, 6, 6, 1), np.float32))
