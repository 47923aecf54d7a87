"""Datasets that ship with the installed packages or are generated offline.

Only loaders registered for where a network exists (``mnist``) download, and only when called.

A small registry (name → loader) so fleets, the CLI and notebooks pick data by name.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from xflwb.bridge.arrays import AnyArray
from xflwb.errors import InputError


@dataclass(frozen=True)
class Dataset:
    """Arrays in xflwb's conventions: float32 inputs (NHWC images, (N, steps, channels) time
    series, (N, features) vectors), integer class labels."""

    name: str
    x_train: AnyArray
    y_train: AnyArray
    x_test: AnyArray
    y_test: AnyArray
    classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])


def _split(name: str, x: AnyArray, y: AnyArray, classes: int, test_fraction: float,
           seed: int) -> Dataset:
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(x))
    n_test = round(len(x) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    return Dataset(name, x[train], y[train], x[test], y[test], classes)


def _digits_arrays() -> tuple[AnyArray, AnyArray]:
    """scikit-learn's digits as ``load_digits`` gives them: 8×8 images (0–16) and labels.

    Read from the file scikit-learn ships (``sklearn/datasets/data/digits.csv.gz``), parsed
    as ``load_digits`` parses it, without importing scikit-learn: that import (scipy.stats
    with it) is 1.1 s of CPU in every virtual phone and simulated client. Should the file
    move, ``load_digits`` itself is used.
    """
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("sklearn")
    roots = spec.submodule_search_locations if spec is not None else None
    path = Path(roots[0]) / "datasets" / "data" / "digits.csv.gz" if roots else None
    if path is None or not path.is_file():
        from sklearn.datasets import load_digits

        d = load_digits()
        return d.images, d.target
    data = np.loadtxt(path, delimiter=",")
    return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(int)


def digits(test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """scikit-learn's 8×8 handwritten digits (1797 images, ships with scikit-learn)."""
    images, target = _digits_arrays()
    x = (images.astype(np.float32) / 16.0)[..., None]
    return _split("digits", x, target.astype(np.int64), 10, test_fraction, seed)


def digits32(test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """`digits` upscaled to 32×32×3 for small-input ImageNet-style backbones.

    ``keras.applications.MobileNetV2`` (and its kin) need inputs of at least 32×32×3: each
    8×8 pixel becomes a 4×4 block (``np.repeat``, no interpolation) and the gray channel is
    copied to three. Float32 in [0, 1], same images, labels and train/test split as `digits`.
    """
    images, target = _digits_arrays()
    gray = images.astype(np.float32) / 16.0
    x = np.repeat(np.repeat(gray, 4, axis=1), 4, axis=2)
    x = np.repeat(x[..., None], 3, axis=-1)
    return _split("digits32", x, target.astype(np.int64), 10, test_fraction, seed)


#: `activity`'s classes, in label order.
ACTIVITY_CLASSES = ("still", "walking", "running", "stairs_up", "stairs_down", "cycling")

# Per class: (cycles per window, per-axis (offset, amplitude, harmonic, phase, sharpness)) for
# axes x (sideways), y (forward), z (vertical, where gravity ≈ 1 g sits). A waveform is
# tanh(sharpness·sin)/tanh(sharpness): a sinusoid at sharpness ≈ 0, square-ish steps above ~2.
_ACTIVITY = (
    (1.0, ((0.05, 0.02, 1, 0.0, 0.0), (0.00, 0.02, 1, 1.0, 0.0), (1.00, 0.02, 1, 2.0, 0.0))),
    (2.0, ((0.00, 0.25, 1, 0.0, 0.0), (0.10, 0.15, 0.5, 1.0, 0.0), (1.00, 0.45, 1, 0.0, 0.0))),
    (3.5, ((0.00, 0.55, 1, 0.0, 0.0), (0.15, 0.30, 0.5, 1.0, 0.0), (1.00, 1.10, 1, 0.0, 1.5))),
    (1.5, ((0.00, 0.20, 1, 0.0, 0.0), (0.30, 0.20, 1, 1.6, 3.0), (0.95, 0.40, 1, 0.0, 3.0))),
    (1.8, ((0.00, 0.25, 1, 0.0, 0.0), (-0.25, 0.20, 1, 1.6, 3.0), (1.05, 0.55, 2, 0.0, 3.0))),
    (1.2, ((0.30, 0.35, 1, 0.0, 0.0), (0.00, 0.35, 1, 1.571, 0.0), (0.90, 0.10, 2, 0.0, 0.0))),
)


def activity(n: int = 3000, test_fraction: float = 0.2, seed: int = 0, *,
             noise: float = 0.2) -> Dataset:
    """Windows of 3-axis accelerometer data, (32, 3) float32, 6 activities (`ACTIVITY_CLASSES`).

    An offline stand-in for a phone-sensor human-activity-recognition dataset (UCI HAR,
    WISDM...), which can't be downloaded here: a time-series input for Conv1D models, with
    the label mix and partitioning behaving as on the image datasets. Each class has its
    own per-axis signal: a gravity offset (mostly on z, tilted by stairs and cycling),
    sinusoids or square-ish steps at its own step/pedal frequency, amplitude and phase
    between axes. Every window then gets a random phase, ±20 % frequency and ±40 %
    amplitude jitter, a per-axis orientation offset (σ 0.12 g) and Gaussian ``noise`` (σ,
    in g), so a small Conv1D learns it (≈ 90 % in 5 epochs) while a linear model on the raw
    values stays near 50 %. ``n`` windows, classes balanced, deterministic for ``seed``.
    """
    if n < len(_ACTIVITY):
        raise InputError(f"activity needs n >= {len(_ACTIVITY)} windows, got {n}")
    rng = np.random.default_rng([seed, 0xAC7])  # own stream: `_split` reuses `seed`
    y = rng.permutation(np.arange(n) % len(_ACTIVITY)).astype(np.int64)
    steps = 32
    t = np.arange(steps) / steps  # one window = 1 time unit
    x = np.empty((n, steps, 3), dtype=np.float64)
    for c, (cycles, axes) in enumerate(_ACTIVITY):
        rows = np.flatnonzero(y == c)
        k = len(rows)
        freq = cycles * rng.uniform(0.8, 1.2, (k, 1))
        phase = rng.uniform(0, 4 * np.pi, (k, 1))  # 4π: harmonic 0.5 too
        gain = rng.uniform(0.6, 1.4, (k, 1))
        for a, (offset, amp, harmonic, shift, sharp) in enumerate(axes):
            wave = np.sin(2 * np.pi * harmonic * freq * t + harmonic * phase + shift)
            if sharp > 0:
                wave = np.tanh(sharp * wave) / np.tanh(sharp)
            x[rows, :, a] = offset + rng.normal(0, 0.12, (k, 1)) + amp * gain * wave
    x += rng.normal(0, noise, x.shape)
    return _split("activity", x.astype(np.float32), y, len(_ACTIVITY), test_fraction, seed)


def synthetic_federated(num_devices: int, alpha: float = 1.0, beta: float = 1.0, seed: int = 0,
                        *, dim: int = 60, classes: int = 10, min_samples: int = 50,
                        max_samples: int = 500) -> list[tuple[AnyArray, AnyArray]]:
    """Synthetic(α, β) of FedProx (Li et al., 2020): per-device models *and* input shift.

    Device k draws u_k ~ N(0, α), B_k ~ N(0, β); W_k ~ N(u_k, 1) (classes × dim),
    b_k ~ N(u_k, 1); v_k ~ N(B_k, 1) elementwise; x ~ N(v_k, Σ) with Σ_jj = j^-1.2;
    y = argmax(W_k x + b_k). As in the reference code (litian96/FedProx), α and β are
    standard deviations and sample counts are lognormal(4, 2) + ``min_samples``, here capped
    at ``max_samples``. β moves each device's inputs apart; α only adds the same u_k to every
    logit, which argmax ignores, so in this model α alone doesn't change any device's data.
    Returns one ``(x float32 (n, dim), y int64 (n,))`` per device.
    """
    if num_devices < 1:
        raise InputError(f"num_devices must be >= 1, got {num_devices}")
    if alpha < 0 or beta < 0:
        raise InputError(f"alpha and beta are standard deviations (>= 0), got {alpha}, {beta}")
    if not 1 <= min_samples <= max_samples:
        raise InputError(f"need 1 <= min_samples <= max_samples, got {min_samples}, {max_samples}")
    rng = np.random.default_rng(seed)
    sizes = np.minimum(rng.lognormal(4, 2, num_devices).astype(np.int64) + min_samples,
                       max_samples)
    u = rng.normal(0.0, alpha, num_devices)
    big_b = rng.normal(0.0, beta, num_devices)
    sd = np.arange(1, dim + 1, dtype=np.float64) ** -0.6  # sqrt of Σ_jj = j^-1.2
    devices = []
    for k in range(num_devices):
        w = rng.normal(u[k], 1.0, (classes, dim))
        b = rng.normal(u[k], 1.0, classes)
        v = rng.normal(big_b[k], 1.0, dim)
        x = v + sd * rng.standard_normal((sizes[k], dim))
        y = np.argmax(x @ w.T + b, axis=1)  # softmax is monotone: argmax of the logits
        devices.append((x.astype(np.float32), y.astype(np.int64)))
    return devices


def synthetic(num_devices: int = 30, alpha: float = 1.0, beta: float = 1.0,
              test_fraction: float = 0.2, seed: int = 0, **kwargs: int) -> Dataset:
    """All devices of `synthetic_federated` pooled, for centralised baselines (x is (60,))."""
    devices = synthetic_federated(num_devices, alpha, beta, seed, **kwargs)
    x = np.concatenate([d[0] for d in devices])
    y = np.concatenate([d[1] for d in devices])
    name = "synthetic" if (alpha, beta) == (1.0, 1.0) else f"synthetic:{alpha:g},{beta:g}"
    return _split(name, x, y, kwargs.get("classes", 10), test_fraction, seed)


def _synthetic_args(arg: str) -> dict[str, float]:
    """``"0.5,0.5"`` → α, β."""
    try:
        alpha, beta = (float(a) for a in arg.split(","))
    except ValueError:
        raise InputError(
            f"synthetic takes 'synthetic:<alpha>,<beta>', got suffix {arg!r}") from None
    if not (alpha >= 0 and beta >= 0 and np.isfinite([alpha, beta]).all()):
        raise InputError(f"synthetic alpha, beta must be finite and >= 0, got {arg!r}")
    return {"alpha": alpha, "beta": beta}


def mnist() -> Dataset:
    """MNIST via Keras (28×28×1). Downloads on first call, so never used offline or in tests."""
    import keras

    (x_train, y_train), (x_test, y_test) = keras.datasets.mnist.load_data()
    scale = np.float32(1 / 255)
    return Dataset("mnist", (x_train.astype(np.float32) * scale)[..., None],
                   y_train.astype(np.int64), (x_test.astype(np.float32) * scale)[..., None],
                   y_test.astype(np.int64), 10)


# Loaders are only called by `load`, so registering `mnist` downloads nothing.
DATASETS: dict[str, Callable[..., Dataset]] = {
    "digits": digits,
    "digits32": digits32,
    "activity": activity,
    "synthetic": synthetic,
    "mnist": mnist,
}

# Datasets whose name takes a ``:suffix`` of parameters, e.g. ``"synthetic:0.5,0.5"``.
NAME_ARGS: dict[str, Callable[[str], dict[str, Any]]] = {"synthetic": _synthetic_args}


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """``"; did you mean 'digits'?"`` for a near miss among ``choices``, else ``""``."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def parse_name(name: str) -> tuple[str, dict[str, Any]]:
    """``"synthetic:0.5,0.5"`` → ``("synthetic", {"alpha": 0.5, "beta": 0.5})``."""
    if not isinstance(name, str):
        raise InputError(f"a dataset is named by a string, got {name!r}; known: "
                         f"{', '.join(sorted(DATASETS))}")
    base, sep, arg = name.partition(":")
    if base not in DATASETS:
        raise InputError(f"unknown dataset {name!r}{did_you_mean(base, DATASETS) or ';'} known: "
                         f"{', '.join(map(repr, sorted(DATASETS)))} (parameterised: "
                         f"{', '.join(f'{n}:...' for n in NAME_ARGS)})")
    if not sep:
        return base, {}
    if base not in NAME_ARGS:
        raise InputError(f"dataset {base!r} takes no ':' parameters, got {name!r}")
    return base, NAME_ARGS[base](arg)


def load(name: str, **kwargs: Any) -> Dataset:
    """A registered dataset by name (``xflwb.load_dataset``): the arrays the devices train on,
    so a notebook sees the same data (``digits``, ``digits32``, ``activity``, ``synthetic``
    offline; ``mnist`` downloads). A ``:suffix`` sets its parameters (``synthetic:α,β``);
    keywords go to its loader (``seed=``; ``test_fraction=`` where it splits)."""
    base, params = parse_name(name)
    clash = params.keys() & kwargs.keys()
    if clash:
        raise InputError(f"{sorted(clash)} given both in the name {name!r} and as arguments")
    return DATASETS[base](**params, **kwargs)


@dataclass(frozen=True)
class DataSpec:
    """What one sample of a registered dataset looks like, known without loading it (so a
    notebook can refuse a model/dataset mismatch before any process starts; MNIST would
    otherwise download). ``tests/test_honest_start.py`` checks it against the loaders."""

    shape: tuple[int, ...]
    dtype: str
    classes: int
    values: str  # what the inputs hold, for messages
    ids_below: int | None = None  # integer token ids in [0, ids_below) (Embedding inputs)


SPECS: dict[str, DataSpec] = {
    "digits": DataSpec((8, 8, 1), "float32", 10, "grey levels in [0, 1]"),
    "digits32": DataSpec((32, 32, 3), "float32", 10, "grey levels in [0, 1]"),
    "activity": DataSpec((32, 3), "float32", len(ACTIVITY_CLASSES), "accelerations in g"),
    "synthetic": DataSpec((60,), "float32", 10, "real-valued features"),
    "mnist": DataSpec((28, 28, 1), "float32", 10, "grey levels in [0, 1]"),
}


class IncompatibleData(InputError):
    """A model cannot train on a dataset: the message names both and the fix."""


def _shape(shape: tuple[int, ...]) -> str:
    return f"({shape[0]},)" if len(shape) == 1 else f"({', '.join(map(str, shape))})"


def check_compatible(manifest: Mapping[str, Any] | None, dataset: str,
                     partition: str | None = None) -> DataSpec:
    """Refuse, in the calling process, what would make every device or client fail later.

    Checks the dataset (and partition) names, then, given a model's manifest, that the
    dataset's samples have the model's input shape and dtype (integer ids below the
    vocabulary for an Embedding input) and that its labels fit the model's output. One
    ``ValueError`` names the model, the dataset and the fix. Returns the dataset's spec.
    """
    base, _ = parse_name(dataset)
    if partition is not None:
        from xflwb.devices.partition import parse

        parse(partition)
    spec = SPECS[base]
    if manifest is None:
        return spec
    name = manifest.get("name", "?")
    inp = manifest.get("input", {})
    want = tuple(int(d) for d in inp.get("shape", ()))
    if want != spec.shape:
        same = sorted(n for n, s in SPECS.items() if s.shape == want)
        pick = (f"a dataset with {want[0]} features" if len(want) == 1
                else f"a dataset with samples of shape {_shape(want)}")
        known = f" (known: {', '.join(same)})" if same else ""
        raise IncompatibleData(
            f"model {name!r} takes inputs of shape {_shape(want)} but dataset {dataset!r} has "
            f"samples of shape {_shape(spec.shape)}; export with an Input({_shape(spec.shape)})"
            f" model or pick {pick}{known}")
    ids = inp.get("ids_below")
    if ids and (spec.ids_below is None or spec.ids_below > int(ids)):
        what = (f"token ids below {spec.ids_below}" if spec.ids_below
                else f"{spec.dtype} {spec.values}")
        raise IncompatibleData(
            f"model {name!r} takes token ids below {ids} (its input feeds an Embedding) but "
            f"dataset {dataset!r} holds {what}; pick a dataset of integer ids below {ids} or "
            "export a model whose input does not feed an Embedding")
    if not ids and inp.get("dtype", "float32") != spec.dtype:
        raise IncompatibleData(
            f"model {name!r} takes {inp.get('dtype')} inputs but dataset {dataset!r} holds "
            f"{spec.dtype}; export the model with {spec.dtype} inputs")
    classes = manifest.get("classes")
    if manifest.get("loss") == "categorical_crossentropy" and classes is not None:
        if int(classes) < spec.classes:
            raise IncompatibleData(
                f"model {name!r} outputs {classes} classes but dataset {dataset!r} has "
                f"{spec.classes} (labels 0..{spec.classes - 1}); export with a last layer "
                f"Dense({spec.classes}, activation='softmax') or pick a dataset with at most "
                f"{classes} classes")
    elif manifest.get("loss") == "mse":
        out = tuple(int(d) for d in manifest.get("output_shape", (1,)))
        if int(np.prod(out)) != 1:
            raise IncompatibleData(
                f"model {name!r} (loss 'mse') outputs shape {_shape(out)} per sample but "
                f"dataset {dataset!r} gives one label per sample; end the model in Dense(1) "
                "or export it with loss='categorical_crossentropy'")
    return spec
