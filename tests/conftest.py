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
