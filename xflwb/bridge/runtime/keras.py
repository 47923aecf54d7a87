"""The reference runtime: the exported Keras model trained by a ``tf.function`` step."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from xflwb.bridge.arrays import AnyArray
from xflwb.bridge.manifest import Manifest, class_count
from xflwb.bridge.optim import resolve_optimizer
from xflwb.bridge.runtime.base import Runtime


class KerasRuntime(Runtime):
    """Parameters are the canonical list (Keras ``trainable_weights``).

    ``train_mask`` (one bool per canonical parameter) trains only part of the model, as a
    platform's trainability plan does: it is how parity compares iOS with Keras.
    """

    platform = "keras"

    def __init__(self, manifest: Manifest, path: Path | None = None, model: Any = None,
                 dropout: bool = True, train_mask: Sequence[bool] | None = None) -> None:
        super().__init__(manifest)
        import keras
        import tensorflow as tf

        from xflwb.bridge.tflite import (
            batchnorm_inference,
            keras_loss,
            keras_optimizer,
            reset_optimizer,
        )

        if model is None:
            model = keras.models.load_model(str(path), compile=False)
        else:  # a private copy: fitting must never change the caller's model
            clone = keras.models.clone_model(model)
            clone.set_weights(model.get_weights())
            model = clone
        batchnorm_inference(model)  # the phones' BatchNorm rule (see xflwb.bridge.tflite)
        self.model = model
        n = len(model.trainable_variables)
        mask = [True] * n if train_mask is None else [bool(m) for m in train_mask]
        if len(mask) != n:
            raise ValueError(f"train_mask has {len(mask)} entries for {n} parameters")
        opt = resolve_optimizer(manifest["optimizer"])
        self._lr = opt.learning_rate
        self.opt = keras_optimizer(opt)
        self.opt.build(model.trainable_variables)
        self._reset = reset_optimizer
        loss_fn = keras_loss(self.loss)
        training = bool(dropout)

        # one trace per runtime, whatever the batch size (a MobileNet trace takes seconds)
        x_spec = tf.TensorSpec([None, *self.input_shape], tf.float32)
        y_shape = [class_count(manifest)] if self.loss == "categorical_crossentropy" else list(
            manifest["output_shape"])
        y_spec = tf.TensorSpec([None, *y_shape], tf.float32)

        @tf.function(input_signature=[x_spec, y_spec])  # type: ignore[untyped-decorator]  # TF has no stubs
        def step(x: Any, y: Any) -> Any:
            with tf.GradientTape() as tape:
                value = loss_fn(y, model(x, training=training))
            grads = tape.gradient(value, model.trainable_variables)
            # untrained parameters get zero gradients: with optimiser state reset at every
            # task, SGD (any momentum) and Adam then leave them exactly unchanged
            grads = [g if keep and g is not None else tf.zeros_like(v)
                     for g, v, keep in zip(grads, model.trainable_variables, mask, strict=True)]
            self.opt.apply_gradients(zip(grads, model.trainable_variables, strict=True))
            return value

        @tf.function(input_signature=[x_spec])  # type: ignore[untyped-decorator]  # TF has no stubs
        def infer(x: Any) -> Any:
            return model(x, training=False)

        self._step = step
        self._infer = infer

    def get_parameters(self) -> list[AnyArray]:
        return [np.array(v.numpy(), dtype=np.float32) for v in self.model.trainable_variables]

    def set_parameters(self, arrays: Sequence[AnyArray]) -> None:
        from xflwb.bridge import params

        shaped = params._shaped(arrays, [tuple(p["shape"]) for p in self.manifest["parameters"]],
                                [p["name"] for p in self.manifest["parameters"]], "canonical")
        for v, a in zip(self.model.trainable_variables, shaped, strict=True):
            v.assign(a)

    def canonical_parameters(self) -> list[AnyArray]:
        return self.get_parameters()

    def set_canonical_parameters(self, canonical: Sequence[AnyArray]) -> None:
        self.set_parameters(canonical)

    def predict(self, x: AnyArray) -> AnyArray:
        x = self._check_x(x)
        return np.array(self._infer(x), dtype=np.float32)

    def _begin_task(self) -> None:
        self._reset(self.opt, self._lr)

    def _train_step(self, x: AnyArray, y: AnyArray) -> float:
        return float(self._step(x, self._targets(y)))
