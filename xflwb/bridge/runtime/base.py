"""What every device runtime shares: the training loop, batching, losses and metrics.

The loop lives here once so that Keras, the TFLite interpreter and the Core ML executor see
the *same* mini-batches for the same seed; that is what makes their results comparable.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence

import numpy as np

from xflwb.bridge.arrays import AnyArray
from xflwb.bridge.manifest import Manifest, class_count

CCE_EPSILON = 1e-7  # Keras' clipping constant for cross-entropy on probabilities


def epoch_batches(n: int, batch_size: int, shuffle: bool,
                  rng: np.random.Generator) -> Iterator[AnyArray]:
    """Index arrays of one epoch; the last, partial batch is kept (Core ML trains it too)."""
    order = rng.permutation(n) if shuffle else np.arange(n)
    for start in range(0, n, batch_size):
        yield order[start:start + batch_size]


def loss_value(loss: str, pred: AnyArray, y: AnyArray) -> float:
    """Batch-mean loss with Keras semantics (CCE on probabilities, clipped; MSE, no ½)."""
    pred = np.asarray(pred, dtype=np.float64)
    if loss == "categorical_crossentropy":
        p = np.clip(pred, CCE_EPSILON, 1.0 - CCE_EPSILON)
        labels = np.asarray(y).astype(np.int64).reshape(-1)
        return float(-np.mean(np.log(p[np.arange(len(labels)), labels])))
    target = np.asarray(y, dtype=np.float64).reshape(pred.shape)
    return float(np.mean((pred - target) ** 2))


class Runtime(ABC):
    """One device's copy of an exported model.

    Parameters are exchanged in the *platform's* order and layout (what that phone would
    send over the wire); ``canonical_parameters``/``set_canonical_parameters`` convert.
    Optimizer state starts at zero at every ``fit`` call, as in a Core ML update task and an
    Android round (FedKit restores the parameters, which resets the optimizer).
    """

    platform: str = ""

    def __init__(self, manifest: Manifest) -> None:
        self.manifest = manifest
        self.loss = manifest["loss"]
        self.classes = manifest.get("classes")
        self.input_shape = tuple(manifest["input"]["shape"])
        self.batch_size = int(manifest.get("batch_size", 32))

    # -- parameters -------------------------------------------------------------------
    @abstractmethod
    def get_parameters(self) -> list[AnyArray]:
        """Parameters in platform order and layout."""

    @abstractmethod
    def set_parameters(self, arrays: Sequence[AnyArray]) -> None:
        """Load parameters given in platform order (flat arrays accepted)."""

    def canonical_parameters(self) -> list[AnyArray]:
        from xflwb.bridge import params

        return params.from_platform(self.get_parameters(), self.manifest, self.platform)

    def set_canonical_parameters(self, canonical: Sequence[AnyArray]) -> None:
        from xflwb.bridge import params

        self.set_parameters(params.to_platform(canonical, self.manifest, self.platform))

    # -- inference ----------------------------------------------------------------------
    @abstractmethod
    def predict(self, x: AnyArray) -> AnyArray:
        """Model outputs (probabilities for a softmax model) for NHWC / (N, D) float32 x."""

    def evaluate(self, x: AnyArray, y: AnyArray,
                 batch_size: int = 256) -> tuple[float, float]:
        """(loss, accuracy); accuracy is NaN for regression."""
        x, y = self._check_xy(x, y)
        preds = np.concatenate([self.predict(x[i:i + batch_size])
                                for i in range(0, len(x), batch_size)]) if len(x) else (
            np.zeros((0, *self.manifest.get("output_shape", [1])), np.float32))
        loss = loss_value(self.loss, preds, y)
        if self.loss == "categorical_crossentropy":
            acc = float(np.mean(np.argmax(preds, axis=-1) == y.astype(np.int64)))
        else:
            acc = float("nan")
        return loss, acc

    # -- training -----------------------------------------------------------------------
    def fit(self, x: AnyArray, y: AnyArray, epochs: int = 1, batch_size: int | None = None,
            shuffle: bool = True, seed: int | None = None) -> list[float]:
        """Train like one phone update task; returns the sample-weighted mean loss per epoch."""
        x, y = self._check_xy(x, y)
        if len(x) == 0:
            raise ValueError("fit() got no samples")
        if int(epochs) < 1:
            raise ValueError(f"epochs must be >= 1, got {epochs}")
        bs = int(batch_size or self.batch_size)
        if bs < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        rng = np.random.default_rng(seed)
        self._begin_task()
        losses = []
        for _ in range(int(epochs)):
            total = 0.0
            for idx in epoch_batches(len(x), bs, shuffle, rng):
                total += float(self._train_step(x[idx], y[idx])) * len(idx)
            losses.append(total / len(x))
        self._end_task()
        return losses

    @abstractmethod
    def _begin_task(self) -> None:
        """Reset optimizer state to zero (a new update task)."""

    @abstractmethod
    def _train_step(self, x: AnyArray, y: AnyArray) -> float:
        """One optimizer step on one mini-batch; returns the batch-mean loss before it."""

    def _end_task(self) -> None:  # noqa: B027 - optional hook
        """Hook for runtimes that buffer updates."""

    # -- input checks ---------------------------------------------------------------------
    def _check_xy(self, x: AnyArray, y: AnyArray) -> tuple[AnyArray, AnyArray]:
        x = self._check_x(x)
        y = np.asarray(y)
        if len(y) != len(x):
            raise ValueError(f"x has {len(x)} samples but y has {len(y)}")
        if self.loss == "categorical_crossentropy":
            y = y.reshape(len(y), -1)
            if y.shape[1] != 1:
                raise ValueError(
                    f"labels must be integer class indices of shape (N,), got shape {y.shape}"
                    " (one-hot labels? pass y.argmax(axis=1))")
            y = y.reshape(-1)
            if len(y) and (not np.all(np.equal(np.mod(y, 1), 0)) or y.min() < 0
                           or (self.classes and y.max() >= self.classes)):
                raise ValueError(f"labels must be integers in [0, {self.classes}), "
                                 f"got values in [{y.min()}, {y.max()}]")
            y = y.astype(np.int64)
        else:
            y = y.astype(np.float32)
        return x, y

    def _targets(self, y: AnyArray) -> AnyArray:
        """Labels as the training signatures take them: one-hot rows for cross-entropy
        (FedKit's layout), else the regression targets in the output's shape."""
        if self.loss == "categorical_crossentropy":
            return np.eye(class_count(self.manifest), dtype=np.float32)[y]
        return y.reshape(len(y), *self.manifest["output_shape"]).astype(np.float32)

    def _check_x(self, x: AnyArray) -> AnyArray:
        x = np.asarray(x, dtype=np.float32)
        if x.shape[1:] != self.input_shape:
            raise ValueError(f"x must have shape (N, {', '.join(map(str, self.input_shape))})"
                             f" (Keras layout), got {x.shape}")
        return x
