"""Datasets that ship with the installed packages or are generated: nothing is downloaded.

A small registry (name → loader) so fleets, the CLI and notebooks pick data by name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Dataset:
    """Arrays in xflwb's conventions: NHWC float32 inputs, integer class labels."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])


def _split(name: str, x: np.ndarray, y: np.ndarray, classes: int, test_fraction: float,
           seed: int) -> Dataset:
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(x))
    n_test = round(len(x) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    return Dataset(name, x[train], y[train], x[test], y[test], classes)


def digits(test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """scikit-learn's 8×8 handwritten digits (1797 images, ships with scikit-learn)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0)[..., None]
    return _split("digits", x, d.target.astype(np.int64), 10, test_fraction, seed)


def synthetic(n: int = 2000, input_shape: tuple[int, ...] = (8, 8, 1), classes: int = 10,
              test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """Gaussian class prototypes plus noise: learnable, any shape, generated offline."""
    rng = np.random.default_rng(seed)
    protos = rng.random((classes, *input_shape), dtype=np.float32)
    y = rng.integers(0, classes, size=n)
    x = protos[y] + 0.25 * rng.standard_normal((n, *input_shape)).astype(np.float32)
    return _split("synthetic", x.astype(np.float32), y.astype(np.int64), classes,
                  test_fraction, seed)


DATASETS: dict[str, Callable[..., Dataset]] = {"digits": digits, "synthetic": synthetic}


def load(name: str, **kwargs: object) -> Dataset:
    try:
        loader = DATASETS[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; available: {sorted(DATASETS)}") from None
    return loader(**kwargs)
