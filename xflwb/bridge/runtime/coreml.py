"""The iOS runtime: the exported ``.mlmodel`` run by xflwb's numpy Core ML executor
(``xflwb.bridge.coreml_exec``), with parameters in FedKit's iOS order and data converted
from Keras layout as the app does. Light: no TensorFlow, no coremltools import."""

from __future__ import annotations

import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from xflwb.bridge.arrays import AnyArray
from xflwb.bridge.coreml_exec import CoreMLExecutor
from xflwb.bridge.manifest import Manifest
from xflwb.bridge.runtime.base import Runtime

__all__ = ["CoreMLExecutor", "IOSRuntime", "coreml_dims", "to_coreml"]


def coreml_dims(keras_shape: Sequence[int]) -> tuple[int, ...]:
    """Core ML input dims for a Keras per-sample shape: (D,), (T, C) → (C, 1, T),
    (H, W, C) → (C, H, W)."""
    s = tuple(int(v) for v in keras_shape)
    if len(s) == 2:
        return s[1], 1, s[0]
    if len(s) == 3:
        return s[2], s[0], s[1]
    return s


def to_coreml(x: AnyArray) -> AnyArray:
    """A Keras-layout batch in Core ML layout (see ``coreml_dims``)."""
    if x.ndim == 3:
        return x.transpose(0, 2, 1)[:, :, None, :]
    if x.ndim == 4:
        return x.transpose(0, 3, 1, 2)
    return x


class IOSRuntime(Runtime):
    """A virtual iPhone: parameters travel as Core ML tensors in ``coreml_layers`` order
    (FedKit's iOS client); ``predict``/``fit`` take Keras-layout data."""

    platform = "ios"

    def __init__(self, manifest: Manifest, path: pathlib.Path,
                 adam_epsilon: str = "hat") -> None:
        from xflwb.bridge.coreml_proto import load_spec

        super().__init__(manifest)
        self.path = pathlib.Path(path)
        self.executor = ex = CoreMLExecutor(load_spec(self.path), adam_epsilon=adam_epsilon)
        if tuple(ex.input_dims) != coreml_dims(self.input_shape):
            raise ValueError(f"{self.path.name}: Core ML input {list(ex.input_dims)} does not "
                             f"match the manifest's input {list(self.input_shape)} (expected "
                             f"{list(coreml_dims(self.input_shape))})")
        keys = ex.weight_keys()
        index = {(name, what): i for i, (name, what, _) in enumerate(keys)}
        self.entries = manifest["platforms"]["ios"]["coreml_layers"]
        self._order: list[int] = []
        for e in self.entries:
            i = index.get((e["name"], e["type"]))
            if i is None:
                raise ValueError(f"{self.path.name} has no {e['type']} for layer "
                                 f"'{e['name']}' listed in the manifest")
            if tuple(e["shape"]) != keys[i][2]:
                raise ValueError(f"layer '{e['name']}' {e['type']}: manifest shape "
                                 f"{e['shape']} but the model holds {list(keys[i][2])}")
            self._order.append(i)
        self._out_keras = tuple(manifest.get("output_shape") or ())

    def get_parameters(self) -> list[AnyArray]:
        weights = self.executor.get_weights()
        return [weights[i] for i in self._order]

    def set_parameters(self, arrays: Sequence[AnyArray]) -> None:
        if len(arrays) != len(self._order):
            raise ValueError(f"expected {len(self._order)} iOS tensors "
                             f"({', '.join(e['name'] + ' ' + e['type'] for e in self.entries)})"
                             f", got {len(arrays)}")
        current = self.executor.get_weights()
        for i, arr in zip(self._order, arrays, strict=True):
            current[i] = arr
        self.executor.set_weights(current)

    def _map_output(self) -> bool:
        """Is the output a map whose Core ML layout is ``coreml_dims`` of Keras'?"""
        out = self._out_keras
        return len(out) in (2, 3) and tuple(self.executor.output_shape) == coreml_dims(out)

    def predict(self, x: AnyArray) -> AnyArray:
        x = self._check_x(x)
        out = self.executor.forward(to_coreml(x))
        if self._map_output():  # back to Keras layout
            out = out[:, :, 0, :].transpose(0, 2, 1) if out.ndim == 4 and len(
                self._out_keras) == 2 else out.transpose(0, 2, 3, 1)
            return np.ascontiguousarray(out, dtype=np.float32)
        return out.reshape(len(x), -1).astype(np.float32, copy=False)

    def _target(self, y: AnyArray) -> AnyArray:
        """MSE targets in the executor's (Core ML) order."""
        if self.loss == "categorical_crossentropy" or not self._map_output():
            return y
        return to_coreml(y.reshape(len(y), *self._out_keras))

    def _begin_task(self) -> None:
        self.executor.reset_optimizer()

    def _train_step(self, x: AnyArray, y: AnyArray) -> float:
        return self.executor.step(to_coreml(x), self._target(y))

    def update(self, x: AnyArray, y: AnyArray, epochs: int | None = None,
               batch_size: int | None = None, shuffle: bool | None = None,
               seed: int | None = None, overrides: dict[str, Any] | None = None
               ) -> list[float]:
        """An update task with Core ML-style overrides, validated against the model."""
        x, y = self._check_xy(x, y)
        return self.executor.update(to_coreml(x), self._target(y), epochs=epochs,
                                    batch_size=batch_size, shuffle=shuffle, seed=seed,
                                    overrides=overrides)

    def to_spec(self) -> Any:
        return self.executor.to_spec()
