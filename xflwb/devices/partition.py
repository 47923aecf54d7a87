"""Split a dataset across simulated devices: IID, Dirichlet label skew, or McMahan shards.

Partition schemes are a registry of small parts picked by a spec string (``"iid"``,
``"dirichlet:0.5"``, ``"shards:2"``) so fleets, the CLI and notebooks name them the same
way. The splitting itself is flwr-datasets' partitioners, run on an in-memory Hugging Face
``Dataset`` of ``(label, idx)`` rows: we only ever ask them for *indices*, so the arrays stay
in xflwb's own NHWC numpy conventions and nothing is downloaded. ``Dataset.from_dict`` and the
partitioners never reach for the network (no hub, no cache), so nothing here needs the
``HF_*_OFFLINE`` switches, and the user's process environment is left alone.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from xflwb.bridge.arrays import AnyArray
from xflwb.errors import InputError

from . import datasets as xdatasets

if TYPE_CHECKING:
    import pandas as pd

Split = Callable[..., list[AnyArray]]


@dataclass(frozen=True)
class Scheme:
    """One partition scheme: how its spec reads, how to parse its argument, how to split."""

    form: str
    parse_arg: Callable[[str | None], dict[str, Any]]
    split: Split


# ----------------------------------------------------------------------------- specs


class _BadArg(ValueError):
    """Raised by an argument parser; `parse` turns it into a message naming the spec."""


def _no_arg(arg: str | None) -> dict[str, Any]:
    if arg is not None:
        raise _BadArg("takes no argument")
    return {}


def _alpha_arg(arg: str | None) -> dict[str, Any]:
    if arg is None:
        raise _BadArg("needs a concentration alpha")
    try:
        alpha = float(arg)
    except ValueError:
        raise _BadArg(f"alpha {arg!r} is not a number") from None
    if not (math.isfinite(alpha) and alpha > 0):
        raise _BadArg(f"alpha must be a finite number > 0, got {arg!r}")
    return {"alpha": alpha}


def _shards_arg(arg: str | None) -> dict[str, Any]:
    if arg is None:
        raise _BadArg("needs a number of shards per partition k")
    try:
        k = int(arg)
    except ValueError:
        raise _BadArg(f"k {arg!r} is not an integer") from None
    if k < 1:
        raise _BadArg(f"k must be an integer >= 1, got {arg!r}")
    return {"k": k}


def _valid_forms() -> str:
    return ", ".join(s.form for s in PARTITIONERS.values())


def parse(spec: str) -> tuple[str, dict[str, Any]]:
    """``"dirichlet:0.5"`` → ``("dirichlet", {"alpha": 0.5})``; a ValueError says what's valid."""
    if not isinstance(spec, str):
        raise InputError(f"partition spec must be a string, got {spec!r}; "
                         f"valid forms: {_valid_forms()}")
    name, sep, arg = spec.strip().partition(":")
    scheme = PARTITIONERS.get(name)
    if scheme is None:
        hint = xdatasets.did_you_mean(name, PARTITIONERS) or ";"
        raise InputError(f"unknown partition spec {spec!r}{hint} valid forms: {_valid_forms()}")
    try:
        params = scheme.parse_arg(arg.strip() if sep else None)
    except _BadArg as e:
        raise InputError(f"bad partition spec {spec!r}: {name} {e}; "
                         f"valid forms: {_valid_forms()}") from None
    return name, params


# ------------------------------------------------------------------------ splitters


def _partitioners() -> Any:
    """``flwr_datasets.partitioner``, without the package's plotting modules (seaborn,
    scipy.stats: 1.2 s of CPU in every device and simulated client; see `xflwb._imports`)."""
    from xflwb._imports import skipping_package_init

    return skipping_package_init("flwr_datasets.partitioner")


def _hf_dataset(labels: AnyArray, seed: int) -> Any:
    """Rows ``(label, idx)`` in a seeded random order.

    In memory (``Dataset.from_dict``): no download, no hub, no cache directory.
    flwr-datasets' ``FederatedDataset`` shuffles before partitioning; the bare partitioners
    do not (``IidPartitioner`` is a contiguous ``shard``, the others take each class's rows
    in order), so we shuffle here. ``idx`` carries the original position through.
    """
    import datasets as hf

    order = np.random.default_rng(seed).permutation(len(labels))
    return hf.Dataset.from_dict({"label": labels[order], "idx": order})


def _indices(partitioner: Any, num_partitions: int) -> list[AnyArray]:
    with warnings.catch_warnings():
        # pyarrow >= 25 deprecates an option `datasets.Dataset.sort` still passes.
        warnings.filterwarnings("ignore", message=".*null_placement.*", category=FutureWarning)
        # Read the column as one numpy batch: `ds["idx"]` is a lazy Column in datasets 4,
        # converted row by row (~10x slower).
        return [np.asarray(partitioner.load_partition(i).with_format("numpy", columns=["idx"])
                           [:]["idx"], dtype=np.int64) for i in range(num_partitions)]


def _iid(labels: AnyArray, num_partitions: int, seed: int) -> list[AnyArray]:
    IidPartitioner = _partitioners().IidPartitioner

    p = IidPartitioner(num_partitions)
    p.dataset = _hf_dataset(labels, seed)
    return _indices(p, num_partitions)


def _dirichlet(labels: AnyArray, num_partitions: int, seed: int,
               alpha: float) -> list[AnyArray]:
    DirichletPartitioner = _partitioners().DirichletPartitioner

    n = len(labels)
    # flwr-datasets' default of 10 is impossible for small data; demand at least one sample
    # per device (an empty device can't train) and at most 10.
    min_size = max(1, min(10, n // (2 * num_partitions)))
    p = DirichletPartitioner(num_partitions, partition_by="label", alpha=float(alpha),
                             min_partition_size=min_size, seed=seed)
    p.dataset = _hf_dataset(labels, seed)
    try:
        with warnings.catch_warnings():
            # It warns on every resampling attempt; the fallback below handles failure.
            warnings.filterwarnings("ignore", message=".*min_partition_size.*")
            return _indices(p, num_partitions)
    except ValueError:
        # DirichletPartitioner resamples at most 11 times until every partition holds
        # min_partition_size rows, then raises. With tiny data or tiny alpha (≈ one class
        # per device) that can't succeed, so sample once ourselves and top small partitions
        # up from the largest: a slight dilution of the skew, but never an empty device.
        return _dirichlet_numpy(labels, num_partitions, seed, alpha, min_size)


def _dirichlet_numpy(labels: AnyArray, num_partitions: int, seed: int, alpha: float,
                     min_size: int) -> list[AnyArray]:
    """Per-class Dirichlet split (as flwr-datasets does), then a repair to ``min_size``."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(labels))
    owner = np.empty(len(labels), dtype=np.int64)
    for c in np.unique(labels):
        rows = order[labels[order] == c]
        props = rng.dirichlet(np.full(num_partitions, alpha))
        cuts = (np.cumsum(props)[:-1] * len(rows)).astype(int)
        owner[rows] = np.repeat(np.arange(num_partitions), np.diff(cuts, prepend=0,
                                                                    append=len(rows)))
    sizes = np.bincount(owner, minlength=num_partitions)
    for small in np.flatnonzero(sizes < min_size):
        need = min_size - sizes[small]
        while need > 0:  # take from whichever partition is largest right now
            big = int(np.argmax(sizes))
            take = min(need, sizes[big] - min_size)
            moved = rng.choice(np.flatnonzero(owner == big), size=take, replace=False)
            owner[moved] = small
            sizes[big] -= take
            sizes[small] += take
            need -= take
    return [rng.permutation(np.flatnonzero(owner == i)) for i in range(num_partitions)]


def _shards(labels: AnyArray, num_partitions: int, seed: int, k: int) -> list[AnyArray]:
    """McMahan et al. (2017): sort by label, cut ``num_partitions * k`` shards, deal k each.

    Shards are equal-sized (``n // (num_partitions*k)``), so up to ``num_partitions*k - 1``
    trailing rows are left out, and a shard straddling a label boundary holds two labels.
    """
    ShardPartitioner = _partitioners().ShardPartitioner

    if len(labels) < num_partitions * k:
        raise InputError(
            f"shards:{k} with {num_partitions} partitions needs at least "
            f"{num_partitions * k} samples, the dataset has {len(labels)}; "
            "use fewer partitions or a smaller k")
    # ShardPartitioner insists on a Python int (numpy ints raise TypeError).
    p = ShardPartitioner(int(num_partitions), partition_by="label",
                         num_shards_per_partition=int(k), seed=seed)
    p.dataset = _hf_dataset(labels, seed)
    return _indices(p, num_partitions)


PARTITIONERS: dict[str, Scheme] = {
    "iid": Scheme("iid", _no_arg, _iid),
    "dirichlet": Scheme("dirichlet:<alpha> (alpha > 0)", _alpha_arg, _dirichlet),
    "shards": Scheme("shards:<k> (integer k >= 1)", _shards_arg, _shards),
}


def _check_num_partitions(num_partitions: int, n: int | None = None) -> None:
    if (not isinstance(num_partitions, int | np.integer) or isinstance(num_partitions, bool)
            or num_partitions < 1):
        raise InputError(f"num_partitions must be an integer >= 1, got {num_partitions!r}")
    if n is not None and num_partitions > n:
        raise InputError(f"num_partitions={num_partitions} exceeds the {n} samples available; "
                         "every device needs at least one sample")


def partition_indices(labels: AnyArray, num_partitions: int, spec: str,
                      seed: int = 0) -> list[AnyArray]:
    """Original row indices for each of ``num_partitions`` devices under ``spec``.

    Partitions are disjoint and deterministic for a seed; ``iid`` and ``dirichlet`` use
    every row, ``shards`` may drop a remainder (see `_shards`).
    """
    name, params = parse(spec)
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise InputError(f"labels must be 1-D, got shape {labels.shape}")
    _check_num_partitions(num_partitions, len(labels))
    return PARTITIONERS[name].split(labels, int(num_partitions), int(seed), **params)


# -------------------------------------------------------------------------- devices


@dataclass
class DeviceData:
    """One simulated device's own data, already split into its local train and test sets."""

    x_train: AnyArray
    y_train: AnyArray
    x_test: AnyArray
    y_test: AnyArray
    partition_id: int
    num_partitions: int


def _pool(dataset: str) -> tuple[AnyArray, AnyArray, int]:
    """All samples of a dataset (its global train/test split is meaningless per device)."""
    d = xdatasets.load(dataset)
    return (np.concatenate([d.x_train, d.x_test]), np.concatenate([d.y_train, d.y_test]),
            d.classes)


def dataset_indices(dataset: str, partition: str, num_partitions: int,
                    seed: int) -> list[AnyArray] | None:
    """Each device's rows of the pooled dataset (`partition_indices` of its labels), or
    ``None`` for synthetic data (its devices are its partitions, drawn by each device).

    A fleet or a simulation computes them once and hands them to its devices and simulated
    clients (`dataset_partitions`'s ``indices``), so that each of those processes need not
    import the partitioners: flwr-datasets works on Hugging Face datasets, whose import
    (with pandas) is about 1 s of CPU in every process.
    """
    parse(partition)
    base, _ = xdatasets.parse_name(dataset)
    if base == "synthetic":
        return None
    _, y, _ = _pool(dataset)
    return [np.asarray(p, dtype=np.int64)
            for p in partition_indices(y, num_partitions, partition, seed)]


def check_indices(indices: Any, num_partitions: int, rows: int) -> list[AnyArray]:
    """``indices`` as `dataset_indices` gives them, or an ``InputError`` naming what is
    wrong (they come from another process: a fleet's file, a simulation's object store)."""
    if not isinstance(indices, list | tuple) or len(indices) != num_partitions:
        got = len(indices) if isinstance(indices, list | tuple) else type(indices).__name__
        raise InputError(f"partition indices: expected {num_partitions} arrays, got {got}")
    out = []
    for k, part in enumerate(indices):
        a = np.asarray(part)
        if a.ndim != 1 or a.dtype.kind not in "iu" or (a.size and (a.min() < 0
                                                                   or a.max() >= rows)):
            raise InputError(f"partition indices: part {k} is not a 1-D array of row numbers "
                             f"in [0, {rows}) (dtype {a.dtype}, shape {a.shape})")
        out.append(a.astype(np.int64, copy=False))
    return out


def dataset_partitions(dataset: str, partition: str, num_partitions: int, seed: int,
                       indices: Any = None) -> tuple[list[tuple[AnyArray, AnyArray]], int]:
    """``(x, y)`` for every device, and the number of classes.

    Synthetic(α, β) data is federated by construction (each device draws its own model
    and input distribution), so its devices *are* the partitions and a label-based scheme
    is ignored (still validated); ``"iid"`` instead pools all devices' samples, reshuffles
    and deals them out evenly, the IID baseline for the same data. ``indices``: the rows
    `dataset_indices` computed for these arguments elsewhere (not for synthetic data).
    """
    name, params = parse(partition)
    base, kwargs = xdatasets.parse_name(dataset)
    if base == "synthetic":
        _check_num_partitions(num_partitions)
        devices = xdatasets.synthetic_federated(num_partitions, seed=seed, **kwargs)
        classes = int(kwargs.get("classes", 10))
        if name != "iid":
            return devices, classes
        x = np.concatenate([d[0] for d in devices])
        y = np.concatenate([d[1] for d in devices])
        parts = np.array_split(np.random.default_rng(seed).permutation(len(y)), num_partitions)
    else:
        x, y, classes = _pool(dataset)
        _check_num_partitions(num_partitions, len(y))
        if indices is not None:
            parts = check_indices(indices, num_partitions, len(y))
        else:
            parts = PARTITIONERS[name].split(y, int(num_partitions), int(seed), **params)
    return [(x[p], y[p]) for p in parts], classes


def _local_split(n: int, test_fraction: float, seed: int,
                 partition_id: int) -> tuple[AnyArray, AnyArray]:
    """Seeded (train, test) positions; at least one test row when there are ≥ 2 rows."""
    order = np.random.default_rng([seed, partition_id]).permutation(n)
    n_test = round(n * test_fraction)
    if test_fraction > 0 and n >= 2:
        n_test = min(max(n_test, 1), n - 1)
    return order[n_test:], order[:n_test]


def _check_fraction(test_fraction: float) -> None:
    if not 0 <= test_fraction < 1:
        raise InputError(f"test_fraction must be in [0, 1), got {test_fraction!r}")


def device_data(dataset: str, partition: str, num_partitions: int, partition_id: int,
                seed: int = 0, test_fraction: float = 0.2, indices: Any = None) -> DeviceData:
    """Device ``partition_id``'s data: partition the whole dataset, then split locally.

    A device evaluates on held-out data from its *own* distribution, as a phone would.
    ``indices``: every device's rows, as `dataset_indices` computed them elsewhere.
    """
    _check_fraction(test_fraction)
    if not isinstance(partition_id, int | np.integer) or isinstance(partition_id, bool):
        raise InputError(f"partition_id must be an integer, got {partition_id!r}")
    parse(partition)
    _check_num_partitions(num_partitions)
    if not 0 <= partition_id < num_partitions:
        raise InputError(f"partition_id={partition_id} out of range: "
                         f"expected 0 <= partition_id < num_partitions={num_partitions}")
    x, y = dataset_partitions(dataset, partition, num_partitions, seed,
                              indices)[0][partition_id]
    return local_data(x, y, partition_id, num_partitions, seed, test_fraction)


def local_data(x: AnyArray, y: AnyArray, partition_id: int, num_partitions: int,
               seed: int = 0, test_fraction: float = 0.2) -> DeviceData:
    """A device's train/test split of its partition ``(x, y)`` (seeded by ``seed`` and
    ``partition_id``); ``device_data`` and simulated clients split the same way."""
    train, test = _local_split(len(y), test_fraction, seed, partition_id)
    return DeviceData(x[train], y[train], x[test], y[test], int(partition_id),
                      int(num_partitions))


def partition_table(dataset: str, partition: str, num_partitions: int, seed: int = 0,
                    test_fraction: float = 0.2) -> pd.DataFrame:
    """One row per device: local train/test sizes and a label histogram, to eyeball skew."""
    _check_fraction(test_fraction)
    parts, classes = dataset_partitions(dataset, partition, num_partitions, seed)
    rows = []
    for pid, (_, y) in enumerate(parts):
        train, test = _local_split(len(y), test_fraction, seed, pid)
        hist = np.bincount(y, minlength=classes)
        rows.append({"partition_id": pid, "train": len(train), "test": len(test),
                     "labels": int(np.count_nonzero(hist)),
                     **{f"label_{c}": int(h) for c, h in enumerate(hist)}})
    import pandas as pd  # only for the table (not in every phone's start-up)

    return pd.DataFrame(rows)
