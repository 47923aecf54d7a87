"""Partitioners (flwr-datasets underneath), per-device data and Synthetic(α, β); all offline."""

from __future__ import annotations

import sys
import types
from collections import Counter
from unittest import mock

import numpy as np
import pytest

from xflwb.devices import datasets, partition
from xflwb.devices.partition import device_data, parse, partition_indices, partition_table


@pytest.fixture(scope="module")
def digits_pool() -> tuple[np.ndarray, np.ndarray]:
    d = datasets.load("digits")
    return np.concatenate([d.x_train, d.x_test]), np.concatenate([d.y_train, d.y_test])


@pytest.fixture(scope="module")
def labels(digits_pool: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    return digits_pool[1]


def label_skew(y: np.ndarray, parts: list[np.ndarray], classes: int = 10) -> float:
    """Mean total-variation distance of each partition's label mix from the global one."""
    glob = np.bincount(y, minlength=classes) / len(y)
    return float(np.mean([0.5 * np.abs(np.bincount(y[p], minlength=classes) / len(p)
                                       - glob).sum() for p in parts]))


def assert_disjoint(parts: list[np.ndarray]) -> np.ndarray:
    allidx = np.concatenate(parts)
    assert len(np.unique(allidx)) == len(allidx), "an index is in two partitions"
    return allidx


# ---------------------------------------------------------------------- spec parsing


@pytest.mark.parametrize(("spec", "expected"), [
    ("iid", ("iid", {})),
    ("dirichlet:0.5", ("dirichlet", {"alpha": 0.5})),
    ("dirichlet:100", ("dirichlet", {"alpha": 100.0})),
    ("shards:2", ("shards", {"k": 2})),
    (" shards: 3 ", ("shards", {"k": 3})),
])
def test_parse_valid(spec: str, expected: tuple[str, dict]) -> None:
    assert parse(spec) == expected


@pytest.mark.parametrize("spec", ["dirichlet", "dirichlet:-1", "dirichlet:0", "dirichlet:x",
                                  "dirichlet:nan", "dirichlet:inf", "shards:0", "shards:-2",
                                  "shards:2.5", "shards", "iid:3", "banana", "", "IID"])
def test_parse_invalid_names_spec_and_valid_forms(spec: str) -> None:
    with pytest.raises(ValueError) as e:
        parse(spec)
    msg = str(e.value)
    assert repr(spec) in msg
    assert "iid" in msg and "dirichlet:<alpha>" in msg and "shards:<k>" in msg


def test_registry_lists_schemes() -> None:
    assert set(partition.PARTITIONERS) == {"iid", "dirichlet", "shards"}


# ------------------------------------------------------------------------ partitions


def test_iid_balanced_and_complete(labels: np.ndarray) -> None:
    parts = partition_indices(labels, 10, "iid", seed=0)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert np.array_equal(np.sort(assert_disjoint(parts)), np.arange(len(labels)))
    assert all(len(np.unique(labels[p])) == 10 for p in parts)
    assert label_skew(labels, parts) < 0.1


def test_dirichlet_small_alpha_more_skewed(labels: np.ndarray) -> None:
    skewed = partition_indices(labels, 10, "dirichlet:0.1", seed=0)
    even = partition_indices(labels, 10, "dirichlet:100", seed=0)
    for parts in (skewed, even):
        assert np.array_equal(np.sort(assert_disjoint(parts)), np.arange(len(labels)))
        assert min(len(p) for p in parts) >= 10  # min_partition_size for this much data
    assert label_skew(labels, skewed) > 0.3
    assert label_skew(labels, even) < 0.1
    assert label_skew(labels, skewed) > 3 * label_skew(labels, even)


def test_shards_few_labels_per_partition(labels: np.ndarray) -> None:
    parts = partition_indices(labels, 10, "shards:2", seed=0)
    assert_disjoint(parts)
    n_labels = [len(np.unique(labels[p])) for p in parts]
    # two shards of one label each, or one more where a shard straddles a label boundary
    assert max(n_labels) <= 4 and np.mean(n_labels) <= 3
    sizes = {len(p) for p in parts}
    assert len(sizes) == 1  # equal shards; the remainder (< 20 rows) is dropped
    assert len(labels) - 20 < sum(len(p) for p in parts) <= len(labels)
    assert label_skew(labels, parts) > 0.6


def test_shards_needs_enough_samples() -> None:
    with pytest.raises(ValueError, match="at least 6 samples"):
        partition_indices(np.arange(5) % 2, 3, "shards:2")


@pytest.mark.parametrize("spec", ["iid", "dirichlet:0.5", "shards:2"])
def test_deterministic_per_seed_and_seeds_differ(labels: np.ndarray, spec: str) -> None:
    a = partition_indices(labels, 7, spec, seed=3)
    b = partition_indices(labels, 7, spec, seed=3)
    c = partition_indices(labels, 7, spec, seed=4)
    assert len(a) == 7
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))
    assert_disjoint(a)


def test_dirichlet_falls_back_when_flwr_cannot_meet_min_size() -> None:
    # One class, tiny alpha: every Dirichlet draw hands (nearly) all rows to one partition.
    y = np.zeros(20, dtype=np.int64)
    with mock.patch.object(partition, "_dirichlet_numpy",
                           wraps=partition._dirichlet_numpy) as fallback:
        parts = partition_indices(y, 4, "dirichlet:0.001", seed=1)
    assert fallback.called
    assert np.array_equal(np.sort(assert_disjoint(parts)), np.arange(20))
    assert min(len(p) for p in parts) >= 2  # min(10, 20 // (2*4))
    again = partition_indices(y, 4, "dirichlet:0.001", seed=1)
    assert all(np.array_equal(x, z) for x, z in zip(parts, again, strict=True))


def test_one_sample_per_partition_is_allowed() -> None:
    y = np.array([0, 1, 0, 1, 2])
    for spec in ("iid", "dirichlet:1"):
        parts = partition_indices(y, 5, spec)
        assert sorted(len(p) for p in parts) == [1] * 5


@pytest.mark.parametrize("num_partitions", [0, -1, 2.5, True])
def test_num_partitions_must_be_positive_int(labels: np.ndarray, num_partitions: object) -> None:
    with pytest.raises(ValueError, match="num_partitions"):
        partition_indices(labels, num_partitions, "iid")  # type: ignore[arg-type]


def test_num_partitions_larger_than_data(labels: np.ndarray) -> None:
    with pytest.raises(ValueError, match=f"exceeds the {len(labels)} samples"):
        partition_indices(labels, len(labels) + 1, "iid")
    with pytest.raises(ValueError, match="exceeds"):
        device_data("digits", "dirichlet:0.5", 5000, 0)


def test_labels_must_be_1d() -> None:
    with pytest.raises(ValueError, match="1-D"):
        partition_indices(np.zeros((4, 2)), 2, "iid")


# --------------------------------------------------------------------------- devices


@pytest.mark.parametrize("spec", ["iid", "dirichlet:0.3", "shards:2"])
def test_device_split_disjoint_and_covers_partition(
        digits_pool: tuple[np.ndarray, np.ndarray], spec: str) -> None:
    x, y = digits_pool
    parts = partition_indices(y, 6, spec, seed=5)
    for pid in (0, 5):
        d = device_data("digits", spec, 6, pid, seed=5)
        assert (d.partition_id, d.num_partitions) == (pid, 6)
        assert d.x_train.shape[1:] == (8, 8, 1) and d.x_train.dtype == np.float32
        assert len(d.x_train) == len(d.y_train) and len(d.x_test) == len(d.y_test)
        rows = lambda xs, ys: Counter(  # noqa: E731
            (a.tobytes(), int(b)) for a, b in zip(xs, ys, strict=True))
        # train ⊎ test == the partition, as multisets of (image, label) rows
        assert rows(d.x_train, d.y_train) + rows(d.x_test, d.y_test) == rows(x[parts[pid]],
                                                                            y[parts[pid]])
        assert len(d.y_test) == round(0.2 * len(parts[pid]))


def test_device_data_deterministic_and_fleet_covers_dataset(labels: np.ndarray) -> None:
    a = device_data("digits", "iid", 4, 2, seed=1)
    b = device_data("digits", "iid", 4, 2, seed=1)
    assert np.array_equal(a.x_train, b.x_train) and np.array_equal(a.y_test, b.y_test)
    total = sum(len(d.y_train) + len(d.y_test)
                for d in (device_data("digits", "iid", 4, i, seed=1) for i in range(4)))
    assert total == len(labels)


def test_device_has_a_test_sample_even_for_tiny_fractions() -> None:
    d = device_data("digits", "iid", 10, 0, test_fraction=0.001)
    assert len(d.y_test) == 1
    d = device_data("digits", "iid", 10, 0, test_fraction=0.0)
    assert len(d.y_test) == 0
    train, test = partition._local_split(2, 0.2, 0, 0)
    assert (len(train), len(test)) == (1, 1)
    train, test = partition._local_split(1, 0.2, 0, 0)
    assert (len(train), len(test)) == (1, 0)


@pytest.mark.parametrize("pid", [-1, 4, 10])
def test_partition_id_out_of_range(pid: int) -> None:
    with pytest.raises(ValueError, match="partition_id"):
        device_data("digits", "iid", 4, pid)


@pytest.mark.parametrize("frac", [-0.1, 1.0, 2])
def test_bad_test_fraction(frac: float) -> None:
    with pytest.raises(ValueError, match="test_fraction"):
        device_data("digits", "iid", 4, 0, test_fraction=frac)


def test_device_data_bad_spec_and_unknown_dataset() -> None:
    with pytest.raises(ValueError, match="valid forms"):
        device_data("digits", "banana", 4, 0)
    with pytest.raises(ValueError, match="unknown dataset 'cifar'"):
        device_data("cifar", "iid", 4, 0)
    with pytest.raises(ValueError, match="unknown dataset"):
        partition_table("nope", "iid", 4)


def test_partition_table(labels: np.ndarray) -> None:
    t = partition_table("digits", "shards:2", 10, seed=0)
    assert list(t.columns[:4]) == ["partition_id", "train", "test", "labels"]
    assert [f"label_{c}" for c in range(10)] == list(t.columns[4:])
    assert list(t.partition_id) == list(range(10))
    hist = t[[f"label_{c}" for c in range(10)]].to_numpy()
    assert np.array_equal(hist.sum(axis=1), t.train + t.test)
    assert np.array_equal((hist > 0).sum(axis=1), t.labels)
    assert t.labels.max() <= 4
    d3 = device_data("digits", "shards:2", 10, 3, seed=0)
    assert (t.train[3], t.test[3]) == (len(d3.y_train), len(d3.y_test))


# ------------------------------------------------------------------- Synthetic(α, β)


def test_synthetic_federated_shapes_and_ranges() -> None:
    devices = datasets.synthetic_federated(20, alpha=0.5, beta=0.5, seed=0)
    assert len(devices) == 20
    for x, y in devices:
        assert x.dtype == np.float32 and x.ndim == 2 and x.shape[1] == 60
        assert np.issubdtype(y.dtype, np.integer) and y.shape == (len(x),)
        assert 50 <= len(x) <= 500
        assert y.min() >= 0 and y.max() < 10
    sizes = [len(y) for _, y in devices]
    assert len(set(sizes)) > 5  # power-law sizes, not uniform
    again = datasets.synthetic_federated(20, alpha=0.5, beta=0.5, seed=0)
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(devices, again, strict=True))
    other = datasets.synthetic_federated(20, alpha=0.5, beta=0.5, seed=1)
    assert not np.array_equal(devices[0][0][:10], other[0][0][:10])


def _synthetic_heterogeneity(alpha: float, beta: float) -> tuple[float, float]:
    """(mean label skew, mean distance of device input means from their centre), 3 seeds."""
    skew, spread = [], []
    for seed in range(3):
        devices = datasets.synthetic_federated(30, alpha, beta, seed)
        y = np.concatenate([d[1] for d in devices])
        bounds = np.cumsum([len(d[1]) for d in devices])[:-1]
        skew.append(label_skew(y, np.split(np.arange(len(y)), bounds)))
        means = np.stack([d[0].mean(axis=0) for d in devices])
        spread.append(np.linalg.norm(means - means.mean(axis=0), axis=1).mean())
    return float(np.mean(skew)), float(np.mean(spread))


def test_synthetic_devices_differ_more_as_alpha_beta_grow() -> None:
    s0, d0 = _synthetic_heterogeneity(0.0, 0.0)
    _, d1 = _synthetic_heterogeneity(1.0, 1.0)
    s5, d5 = _synthetic_heterogeneity(5.0, 5.0)
    assert d0 < d1 < d5 and d5 > 2 * d0  # β shifts each device's inputs
    assert s5 > s0  # and concentrates each device on fewer labels


def test_synthetic_alpha_only_shifts_logits_uniformly() -> None:
    # W_k, b_k ~ N(u_k, 1) add u_k·(Σx + 1) to every logit alike: argmax ignores it.
    a = datasets.synthetic_federated(10, alpha=0.0, beta=1.0, seed=0)
    b = datasets.synthetic_federated(10, alpha=5.0, beta=1.0, seed=0)
    same = np.concatenate([ya == yb for (_, ya), (_, yb) in zip(a, b, strict=True)])
    assert same.mean() > 0.99


def test_synthetic_load_and_name_suffix() -> None:
    d = datasets.load("synthetic")
    assert d.name == "synthetic" and d.classes == 10 and d.input_shape == (60,)
    assert d.x_train.dtype == np.float32 and len(d.x_test) > 0
    d2 = datasets.load("synthetic:0.5,0.5", num_devices=5)
    assert d2.name == "synthetic:0.5,0.5"
    assert len(d2.y_train) + len(d2.y_test) == sum(
        len(y) for _, y in datasets.synthetic_federated(5, 0.5, 0.5, 0))
    assert datasets.parse_name("synthetic:0,2") == ("synthetic", {"alpha": 0.0, "beta": 2.0})


@pytest.mark.parametrize(("name", "match"), [
    ("synthetic:1", "synthetic:<alpha>,<beta>"),
    ("synthetic:a,b", "synthetic:<alpha>,<beta>"),
    ("synthetic:-1,1", ">= 0"),
    ("digits:1,2", "takes no ':' parameters"),
    ("banana", "unknown dataset 'banana'"),
])
def test_load_bad_names(name: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        datasets.load(name)


def test_load_name_and_kwarg_clash() -> None:
    with pytest.raises(ValueError, match="both"):
        datasets.load("synthetic:1,1", alpha=2.0)


def test_synthetic_devices_are_the_partitions() -> None:
    devices = datasets.synthetic_federated(6, 0.5, 0.5, seed=2)
    for spec in ("dirichlet:0.1", "shards:2"):  # label-based schemes don't apply: ignored
        d = device_data("synthetic:0.5,0.5", spec, 6, 4, seed=2)
        x, y = devices[4]
        assert len(d.y_train) + len(d.y_test) == len(y)
        rows = lambda xs, ys: Counter(  # noqa: E731
            (a.tobytes(), int(b)) for a, b in zip(xs, ys, strict=True))
        assert rows(d.x_train, d.y_train) + rows(d.x_test, d.y_test) == rows(x, y)
        assert d.x_train.shape[1:] == (60,)
    # "iid" pools every device's samples and deals them out evenly
    t = partition_table("synthetic:0.5,0.5", "iid", 6, seed=2)
    sizes = t.train + t.test
    assert sizes.max() - sizes.min() <= 1
    assert sizes.sum() == sum(len(y) for _, y in devices)
    natural = partition_table("synthetic:0.5,0.5", "shards:2", 6, seed=2)
    assert natural.labels.mean() < t.labels.mean()
    with pytest.raises(ValueError, match="valid forms"):
        device_data("synthetic", "banana", 6, 0)
    with pytest.raises(ValueError, match="partition_id"):
        device_data("synthetic", "iid", 6, 6)


# ------------------------------------------------------------------ registry hygiene


def test_existing_digits_api_unchanged() -> None:
    d = datasets.load("digits", seed=3)
    assert d.input_shape == (8, 8, 1) and d.classes == 10
    assert d.x_train.dtype == np.float32 and d.x_train.min() >= 0 and d.x_train.max() <= 1


def test_mnist_registered_but_only_downloads_when_called(monkeypatch: pytest.MonkeyPatch) -> None:
    assert "mnist" in datasets.DATASETS
    calls = []

    def load_data() -> tuple:
        calls.append(1)
        img = np.full((3, 28, 28), 255, np.uint8)
        return (img, np.array([1, 2, 3])), (img[:2], np.array([4, 5]))

    fake = types.SimpleNamespace(datasets=types.SimpleNamespace(
        mnist=types.SimpleNamespace(load_data=load_data)))
    monkeypatch.setitem(sys.modules, "keras", fake)
    assert not calls
    d = datasets.load("mnist")
    assert calls == [1]
    assert d.x_train.shape == (3, 28, 28, 1) and d.x_test.shape == (2, 28, 28, 1)
    assert d.x_train.dtype == np.float32 and d.x_train.max() == 1.0 and d.classes == 10


def test_partitioning_leaves_the_environment_alone_and_stays_offline():
    """In a fresh interpreter (module imports count): loading a dataset and partitioning it
    every way changes no environment variable of the user's process (no ``HF_*_OFFLINE``),
    and opens no network connection although nothing tells Hugging Face to stay offline."""
    import os
    import subprocess

    code = """
import os, socket
import xflwb  # (its documented TF log level is set here, before the snapshot)
before = dict(os.environ)

def refuse(*args, **kwargs):
    raise AssertionError(f"network connection attempted: {args}")

socket.socket.connect = socket.socket.connect_ex = refuse
socket.create_connection = refuse
from xflwb.devices import datasets
from xflwb.devices.partition import device_data, partition_table
datasets.load("digits")
for spec in ("iid", "dirichlet:0.5", "shards:2"):
    assert len(partition_table("digits", spec, 5)) == 5
assert len(device_data("digits", "dirichlet:0.3", 4, 2).y_train) > 0
changed = sorted(k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k))
print("changed:", changed)
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "changed: []", done.stdout


# -- indices computed once (a fleet's file, a simulation's object store) ----------------------
@pytest.mark.parametrize("spec", ["iid", "dirichlet:0.5", "shards:2"])
def test_indices_computed_once_give_every_device_the_same_data(spec):
    """What a device gets from the rows its fleet computed is what it would have computed."""
    idx = partition.dataset_indices("digits", spec, 6, 3)
    assert idx is not None and len(idx) == 6
    for pid in (0, 5):
        own = device_data("digits", spec, 6, pid, seed=3)
        given = device_data("digits", spec, 6, pid, seed=3, indices=idx)
        for a, b in zip((own.x_train, own.y_train, own.x_test, own.y_test),
                        (given.x_train, given.y_train, given.x_test, given.y_test), strict=True):
            assert np.array_equal(a, b)


def test_synthetic_data_has_no_shared_indices():
    assert partition.dataset_indices("synthetic", "iid", 4, 0) is None


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.extra import numpy as hnp  # noqa: E402

_ARRAYS = st.one_of(
    hnp.arrays(st.sampled_from([np.int64, np.int32, np.int8]),
               hnp.array_shapes(min_dims=0, max_dims=2, max_side=5), elements=st.integers(-3, 12)),
    hnp.arrays(st.sampled_from([np.uint8, np.float64, np.bool_]),
               hnp.array_shapes(min_dims=0, max_dims=2, max_side=5), elements=st.integers(0, 1)))


@settings(max_examples=150, deadline=None)
@given(st.one_of(st.lists(_ARRAYS, max_size=5), st.none(), st.integers(), st.text(max_size=5)))
def test_indices_from_another_process_are_checked(indices):
    """A partition file is an input (``xflwb device --partition-file``): anything but one
    1-D array of row numbers per device is an InputError naming the part, never a crash or
    a silently wrong split."""
    rows, n = 10, 3
    ok = (isinstance(indices, list) and len(indices) == n
          and all(a.ndim == 1 and a.dtype.kind in "iu" and (a.size == 0 or (a.min() >= 0
                  and a.max() < rows)) for a in indices))
    if ok:
        assert [list(a) for a in partition.check_indices(indices, n, rows)] == \
            [list(a) for a in indices]
    else:
        with pytest.raises(partition.InputError, match="partition indices"):
            partition.check_indices(indices, n, rows)
