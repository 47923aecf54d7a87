"""The train signature's ReLU, max-pool and conv-kernel gradients avoid TF's slow Flex kernels.

``xflwb.bridge.tflite_grads`` swaps TF's ``ReluGrad``/``MaxPoolGrad`` (Flex ops: TF's
generic kernels on the phone) for built-in twins, and ``Conv2DBackpropFilter`` for a
swapped convolution, while the exporter traces. These tests hold the ReLU and pool twins
to TF's gradients bit for bit (ties in a window included), the conv twin to 1e-4, check the real
converted ``.tflite`` has no such Flex op left and trains like Keras on data full of ties,
and check the user's model comes back untouched.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import pytest
import tensorflow as tf

import xflwb
from xflwb.bridge import graph, runtime, tflite, tflite_grads

L = keras.layers


def _ties(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """ReLU-like maps with many exact ties: zeros, and a few repeated positive values."""
    rng = np.random.default_rng(seed)
    x = np.maximum(rng.standard_normal(shape), 0).astype(np.float32)
    x[rng.random(shape) < 0.3] = 0.5
    return x


def _grad(fn, x: np.ndarray, dy: np.ndarray) -> np.ndarray:
    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        y = fn(xt)
    return tape.gradient(y, xt, output_gradients=tf.constant(dy)).numpy()


@pytest.mark.parametrize(("size", "k"), [(26, 2), (11, 2), (9, 3), (7, 3)])
def test_max_pool_twin_gradient_is_tfs_bit_for_bit(size, k):
    x = _ties((4, size, size + 1, 3), seed=size)
    h, w = size // k, (size + 1) // k
    dy = np.random.default_rng(k).standard_normal((4, h, w, 3)).astype(np.float32)
    ours = _grad(lambda t: tflite_grads.max_pool_2d(t, k), x, dy)
    ref = _grad(lambda t: tf.nn.max_pool2d(t, k, k, "VALID"), x, dy)
    np.testing.assert_array_equal(ours, ref)
    # the forward is TF's own op
    np.testing.assert_array_equal(tflite_grads.max_pool_2d(tf.constant(x), k).numpy(),
                                  tf.nn.max_pool2d(x, k, k, "VALID").numpy())
    # every window sends its gradient to one input only, even when all its values tie
    assert np.count_nonzero(ours) == np.count_nonzero(dy)


def test_relu_twin_gradient_is_tfs_bit_for_bit():
    x = np.random.default_rng(0).standard_normal((5, 6, 7)).astype(np.float32)
    x[:, 0] = 0.0  # ReLU's kink: TF's gradient there is 0
    dy = np.random.default_rng(1).standard_normal(x.shape).astype(np.float32)
    np.testing.assert_array_equal(_grad(tflite_grads.relu, x, dy), _grad(tf.nn.relu, x, dy))


@pytest.mark.parametrize(("k", "padding"), [(3, "VALID"), (3, "SAME"), (2, "SAME"), (4, "SAME")])
def test_conv_twin_gradients_are_tfs(k, padding):
    rng = np.random.default_rng(k)
    x = tf.constant(rng.standard_normal((5, 9, 8, 3)).astype(np.float32))
    kernel = tf.constant(rng.standard_normal((k, k, 3, 4)).astype(np.float32))

    def grads(fn):
        with tf.GradientTape() as tape:
            tape.watch([x, kernel])
            y = fn(x, kernel)
            loss = tf.reduce_sum(y * tf.sin(y))  # a dy that differs everywhere
        return [y.numpy(), *(g.numpy() for g in tape.gradient(loss, [x, kernel]))]

    ours = grads(lambda a, b: tflite_grads.conv_2d(a, b, padding))
    ref = grads(lambda a, b: tf.nn.conv2d(a, b, 1, padding))
    np.testing.assert_array_equal(ours[0], ref[0])  # the forward is TF's own op
    for o, r in zip(ours[1:], ref[1:], strict=True):
        np.testing.assert_allclose(o, r, rtol=1e-4, atol=1e-4)


def cnn() -> keras.Model:
    keras.utils.set_random_seed(7)
    return keras.Sequential([
        keras.Input((14, 14, 1)), L.Conv2D(4, 3, activation="relu", name="c1"),  # 12×12
        L.MaxPooling2D(name="p1"),                                               # 6×6
        L.Conv2D(6, 2, padding="same", name="c2"), L.ReLU(name="r2"),            # 6×6
        L.Conv2D(6, 2, name="c3"),                                               # 5×5
        L.MaxPooling2D(name="p2"),                                               # 2×2, odd
        L.Flatten(), L.Dense(8, activation="relu", name="d1"),
        L.Dense(3, activation="softmax", name="head")])


def _train_ops(data: bytes) -> list[str]:
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        tf.lite.experimental.Analyzer.analyze(model_content=data)
    train = buf.getvalue().split(" train(")[1].split("Tensors of")[0]
    return [line.split()[1].split("(")[0] for line in train.splitlines()
            if line.strip().startswith("Op#")]


def test_exported_train_signature_has_no_relu_or_pool_flex_op_and_trains_like_keras(tmp_path):
    model = cnn()
    data = tflite.build(model, graph.analyze(model), "categorical_crossentropy",
                        xflwb.SGD(0.1, 0.9))
    ops = _train_ops(data)
    flex = {op for op in ops if op.startswith("Flex")}
    assert flex == {"FlexConv2D"}, ops  # the kernel gradients: the swapped convolutions
    assert {"SPACE_TO_DEPTH", "DEPTH_TO_SPACE", "TRANSPOSE_CONV"} <= set(ops)

    res = xflwb.export(model, name="ties", out_dir=tmp_path, optimizer=xflwb.SGD(0.1, 0.9))
    assert bool(res.parity["ok"].all())
    android, ref = runtime.load(res, "android"), runtime.load(res, "keras", dropout=False)
    x = _ties((40, 14, 14, 1), seed=3)  # blank regions: whole pooling windows tie
    y = np.random.default_rng(4).integers(0, 3, 40)
    la = android.fit(x, y, epochs=2, batch_size=16, shuffle=True, seed=5)  # last batch of 8
    lk = ref.fit(x, y, epochs=2, batch_size=16, shuffle=True, seed=5)
    np.testing.assert_allclose(la, lk, rtol=1e-5)
    for a, b in zip(android.canonical_parameters(), ref.canonical_parameters(), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_the_users_model_is_restored_and_other_pools_keep_tfs_gradient():
    model = keras.Sequential([
        keras.Input((9, 9, 2)), L.Conv2D(3, 3, activation="relu", name="c"),
        L.MaxPooling2D(3, strides=2, name="overlapping"),  # windows overlap: TF's gradient
        L.MaxPooling2D(2, padding="same", name="same_odd"),  # 3×3 → reads a padded window
        L.Flatten(), L.Dense(2, activation="softmax", name="head")])
    before = {lay.name: (lay.activation if hasattr(lay, "activation") else None)
              for lay in model.layers}
    seen = {}
    with tflite_grads.builtin_gradients(model):
        seen = {lay.name: "call" in vars(lay) for lay in model.layers}
        assert model.get_layer("c").activation is tflite_grads.relu
        assert "convolution_op" in vars(model.get_layer("c"))
    assert seen["overlapping"] is False and seen["same_odd"] is False
    assert {lay.name: (lay.activation if hasattr(lay, "activation") else None)
            for lay in model.layers} == before
    assert not any({"call", "convolution_op"} & set(vars(lay)) for lay in model.layers)
    data = tflite.build(model, graph.analyze(model), "categorical_crossentropy",
                        xflwb.SGD(0.1))
    assert _train_ops(data).count("FlexMaxPoolGrad") == 2
