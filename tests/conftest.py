"""Shared fixtures: small Keras models built fresh (and seeded) for every test."""

from __future__ import annotations

import os
import subprocess
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import pytest


def run_python(code: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter (for what a module import or process-wide setting
    does to a process); fails the test with its stderr unless it exits 0."""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def digits_cnn(seed: int = 1):
    """The digits CNN shape: conv same → maxpool → flatten → dense softmax."""
    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input((8, 8, 1)),
        keras.layers.Conv2D(4, 3, padding="same", activation="relu"),
        keras.layers.MaxPooling2D(),
        keras.layers.Flatten(),
        keras.layers.Dense(10, activation="softmax"),
    ])


@pytest.fixture
def cnn():
    return digits_cnn(1)


@pytest.fixture
def mlp():
    keras.utils.set_random_seed(2)
    return keras.Sequential([
        keras.Input((12,)),
        keras.layers.Dense(16, activation="tanh"),
        keras.layers.Dense(8, activation="sigmoid"),
        keras.layers.Dense(4, activation="softmax"),
    ])


@pytest.fixture
def unseen():
    """Non-square two-channel input, stride-2 same conv, max-pool, flatten, two dense."""
    keras.utils.set_random_seed(3)
    inp = keras.Input((9, 7, 2))
    h = keras.layers.Conv2D(6, (3, 2), strides=2, padding="same", activation="relu")(inp)
    h = keras.layers.MaxPooling2D((2, 2), padding="same")(h)
    h = keras.layers.Flatten()(h)
    h = keras.layers.Dense(12, activation="relu")(h)
    out = keras.layers.Dense(5, activation="softmax")(h)
    return keras.Model(inp, out, name="unseen")


@pytest.fixture(scope="session")
def ip():
    """One IPython shell for the whole run (IPython allows a single global instance)."""
    from IPython.testing.globalipapp import get_ipython, start_ipython

    shell = start_ipython() or get_ipython()
    shell.run_line_magic("load_ext", "xflwb")
    return shell


TRANSFER_NAME, TRANSFER_DATA = "transfer", "digits32"


def transfer_model(seed: int = 0):
    """Frozen MobileNetV2 (α 0.35, 32×32×3, random weights: nothing is downloaded) → trainable
    1×1 conv adapter → BatchNormalization → ReLU6 → global average → softmax head."""
    import keras

    from xflwb.devices import datasets

    keras.utils.set_random_seed(seed)
    base = keras.applications.MobileNetV2(input_shape=(32, 32, 3), alpha=0.35,
                                          include_top=False, weights=None)
    # A random MobileNetV2 with BatchNormalization at its initial statistics (mean 0, var 1)
    # shrinks every image to ~1e-12: the adapter's kernel would get no gradient at all.
    # Pretrained weights would bring their own statistics; here one batch of images sets
    # them (momentum 0 makes the moving statistics that batch's).
    bns = [layer for layer in base.layers if isinstance(layer, keras.layers.BatchNormalization)]
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.momentum = 0.0
    base(datasets.load(TRANSFER_DATA).x_train[:256], training=True)
    for bn, m in zip(bns, momenta, strict=True):
        bn.momentum = m
    base.trainable = False
    inp = keras.Input((32, 32, 3))
    h = base(inp, training=False)
    h = keras.layers.Conv2D(8, 1, name="adapter")(h)
    h = keras.layers.BatchNormalization(name="adapter_bn")(h)
    h = keras.layers.ReLU(max_value=6.0, name="adapter_relu6")(h)
    h = keras.layers.GlobalAveragePooling2D(name="pool")(h)
    out = keras.layers.Dense(10, activation="softmax", name="head")(h)
    return keras.Model(inp, out, name=TRANSFER_NAME)


@pytest.fixture(scope="session")
def transfer_export(tmp_path_factory):
    """(model, export) of ``transfer_model``: the one expensive export its tests share."""
    import xflwb

    model = transfer_model()
    # plain SGD: no optimizer state carries over between rounds, so a round can be replayed
    res = xflwb.export(model, name=TRANSFER_NAME, data_type=TRANSFER_DATA,
                       out_dir=tmp_path_factory.mktemp("transfer"),
                       optimizer=xflwb.SGD(learning_rate=0.02))
    return model, res
