"""Batchnorm with stored statistics: ``y = γ(x − μ)/√(σ² + ε) + β`` per channel.

Core ML back-propagates through it (never updates it); with fixed statistics the layer is
affine, so ``dx = dy·γ/√(σ² + ε)``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from xflwb.bridge.coreml_exec.base import Arr, Chw, StepKernel, read_weights, register


@register("batchnorm")
class BatchNorm(StepKernel):
    backprop = True
    has_backward = True

    def __init__(self, layer: Any, dtype: np.dtype[Any]) -> None:
        super().__init__(layer, dtype)
        p = layer.batchnorm
        if p.computeMeanVar or p.instanceNormalization:
            raise self.fail("computeMeanVar / instanceNormalization are not supported "
                            "(supported: batchnorm with stored mean and variance)")
        self.channels = int(p.channels)
        c = (self.channels,)
        vals = {what: read_weights(self.name, what, getattr(p, what), c, dtype)[0]
                for what in ("gamma", "beta", "mean", "variance")}
        eps = float(p.epsilon) or 1e-5  # the proto: 0 / unset means 1e-5
        scale = vals["gamma"] / np.sqrt(vals["variance"] + eps)
        self.scale = scale.reshape(-1, 1, 1).astype(dtype)
        self.shift = (vals["beta"] - vals["mean"] * scale).reshape(-1, 1, 1).astype(dtype)

    def _infer(self, shape: Chw) -> Chw:
        if shape[0] != self.channels:
            raise self.fail(f"input has {shape[0]} channels, the layer {self.channels}")
        return shape

    def forward(self, x: Arr, keep: bool) -> Arr:
        y: Arr = x * self.scale
        y += self.shift
        return y

    def backward(self, dy: Arr, need_dx: bool) -> Arr | None:
        return dy * self.scale if need_dx else None
