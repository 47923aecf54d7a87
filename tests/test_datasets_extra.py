"""The `activity` (generated accelerometer windows) and `digits32` datasets; no TensorFlow."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from xflwb import cli, demo
from xflwb.devices import datasets
from xflwb.devices.partition import device_data, partition_table


@pytest.fixture(scope="module")
def activity() -> datasets.Dataset:
    return datasets.load("activity")


@pytest.fixture(scope="module")
def digits32() -> datasets.Dataset:
    return datasets.load("digits32")


def test_activity_shapes_dtypes_classes(activity: datasets.Dataset) -> None:
    d = activity
    assert d.name == "activity" and d.classes == 6 == len(datasets.ACTIVITY_CLASSES)
    assert d.input_shape == (32, 3)
    assert len(d.x_train) + len(d.x_test) == 3000
    assert len(d.x_test) == 600  # test_fraction 0.2, via `_split`
    for x, y in ((d.x_train, d.y_train), (d.x_test, d.y_test)):
        assert x.dtype == np.float32 and y.dtype == np.int64
        assert len(x) == len(y) and np.isfinite(x).all()
    y = np.concatenate([d.y_train, d.y_test])
    assert (np.bincount(y, minlength=6) == 500).all()  # balanced
    # gravity: about 1 g on the vertical axis on average, ~0 sideways
    x = np.concatenate([d.x_train, d.x_test])
    assert 0.85 < x[..., 2].mean() < 1.1 and abs(x[..., 0].mean()) < 0.2


def test_activity_deterministic_by_seed(activity: datasets.Dataset) -> None:
    again = datasets.load("activity", seed=0)
    np.testing.assert_array_equal(again.x_train, activity.x_train)
    np.testing.assert_array_equal(again.y_test, activity.y_test)
    other = datasets.load("activity", seed=1)
    assert other.x_train.shape == activity.x_train.shape
    assert not np.allclose(other.x_train, activity.x_train)


def test_activity_size_and_bad_size() -> None:
    d = datasets.load("activity", n=600, test_fraction=0.25, seed=3)
    assert (len(d.x_train), len(d.x_test)) == (450, 150)
    with pytest.raises(ValueError, match="n >= 6"):
        datasets.load("activity", n=5)


def _features(x: np.ndarray) -> np.ndarray:
    """Per-axis mean, spread and low-frequency spectrum: what a phone's HAR pipeline uses."""
    spec = np.abs(np.fft.rfft(x - x.mean(1, keepdims=True), axis=1))[:, 1:9]
    return np.concatenate([x.mean(1), x.std(1), x.min(1), x.max(1),
                           spec.reshape(len(x), -1)], axis=1)


def _accuracy(fx, d: datasets.Dataset) -> float:
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    model.fit(fx(d.x_train), d.y_train)
    return float(model.score(fx(d.x_test), d.y_test))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_activity_is_learnable_but_not_linear_in_raw_values(seed: int) -> None:
    d = datasets.load("activity", seed=seed)
    featured = _accuracy(_features, d)
    raw = _accuracy(lambda x: x.reshape(len(x), -1), d)
    # chance is 1/6; a linear model on the raw samples can't undo the random phase
    assert featured > 0.85, featured
    assert raw < featured - 0.2, (raw, featured)


def test_digits32_is_digits_upscaled(digits32: datasets.Dataset) -> None:
    small = datasets.load("digits")
    d = digits32
    assert d.name == "digits32" and d.classes == 10 and d.input_shape == (32, 32, 3)
    assert d.x_train.dtype == np.float32 and d.y_train.dtype == np.int64
    assert d.x_train.min() >= 0.0 and d.x_train.max() <= 1.0
    np.testing.assert_array_equal(d.y_train, small.y_train)  # same split
    np.testing.assert_array_equal(d.y_test, small.y_test)
    assert len(d.x_test) == len(small.x_test)
    for i in (0, 7, len(d.x_train) - 1):
        for r, c in ((0, 0), (3, 5), (7, 7), (4, 2)):
            block = d.x_train[i, 4 * r:4 * r + 4, 4 * c:4 * c + 4, :]
            assert (block == small.x_train[i, r, c, 0]).all()
    # exactly: every 4×4 block of every channel is the 8×8 pixel
    np.testing.assert_array_equal(d.x_test[:, ::4, ::4, 1], small.x_test[..., 0])
    up = np.repeat(np.repeat(small.x_test, 4, axis=1), 4, axis=2)
    np.testing.assert_array_equal(d.x_test, np.repeat(up, 3, axis=-1))


def test_digits32_seed_moves_the_split(digits32: datasets.Dataset) -> None:
    other = datasets.load("digits32", seed=1)
    assert not np.array_equal(other.y_test, digits32.y_test)


@pytest.mark.parametrize("spec", ["iid", "dirichlet:0.5"])
def test_activity_partitions_for_devices(spec: str) -> None:
    parts = [device_data("activity", spec, 4, pid, seed=0) for pid in range(4)]
    for p in parts:
        assert p.x_train.shape[1:] == (32, 3) and p.x_test.shape[1:] == (32, 3)
        assert p.x_train.dtype == np.float32 and len(p.x_train) == len(p.y_train) > 0
        assert len(p.x_test) > 0
    assert sum(len(p.y_train) + len(p.y_test) for p in parts) == 3000
    again = device_data("activity", spec, 4, 2, seed=0)
    np.testing.assert_array_equal(again.x_train, parts[2].x_train)
    table = partition_table("activity", spec, 4, seed=0)
    assert list(table.columns[-6:]) == [f"label_{c}" for c in range(6)]
    assert table[[f"label_{c}" for c in range(6)]].to_numpy().sum() == 3000


def test_digits32_partitions_for_devices() -> None:
    p = device_data("digits32", "dirichlet:0.5", 3, 1, seed=0)
    assert p.x_train.shape[1:] == (32, 32, 3) and len(p.y_train) > 0


def test_registry_lists_new_datasets() -> None:
    assert {"activity", "digits32"} <= set(datasets.DATASETS)
    with pytest.raises(ValueError, match="known: ") as err:
        datasets.load("banana")
    for name in ("activity", "digits", "digits32", "synthetic"):
        assert repr(name) in str(err.value)
    with pytest.raises(ValueError, match="takes no ':' parameters"):
        datasets.load("activity:1,2")


def test_demo_model_option_wiring() -> None:
    assert demo.MODELS["activity"][1] == "activity"
    assert demo.MODELS["digits_cnn"] == (demo.demo_model, "digits")
    for name in demo.MODELS:  # the CLI's choices are demo.MODELS' keys
        assert cli.build_parser().parse_args(["demo", "--model", name]).model == name
    assert cli.build_parser().parse_args(["demo"]).model == "digits_cnn"
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["demo", "--model", "banana"])
    with pytest.raises(ValueError, match="unknown demo model"):
        demo.run_federated(model="banana")
