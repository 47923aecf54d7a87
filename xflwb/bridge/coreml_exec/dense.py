"""innerProduct: ``y = W·x + b`` with W ``[C_out, C_in]``; updatable.

A rank-5 input is flattened in (C, H, W) order per sequence step, as the proto says.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from xflwb.bridge.coreml_exec.base import Arr, Chw, Weighted, register


@register("innerProduct")
class InnerProduct(Weighted):
    """Fully connected layer; its gradient is the classic ``dyᵀ·x`` / ``dy·W``."""

    def __init__(self, layer: Any, dtype: np.dtype[Any]) -> None:
        p = layer.innerProduct
        super().__init__(layer, p, dtype)
        if p.int8DynamicQuantize:
            raise self.fail("int8 dynamic quantisation is not supported")
        self.in_channels, self.out_channels = int(p.inputChannels), int(p.outputChannels)
        self._load_params((self.out_channels, self.in_channels), self.out_channels)

    def _infer(self, shape: Chw) -> Chw:
        if math.prod(shape) != self.in_channels:
            raise self.fail(f"input {shape} has {math.prod(shape)} elements per step, "
                            f"inputChannels is {self.in_channels}")
        return self.out_channels, 1, 1

    def forward(self, x: Arr, keep: bool) -> Arr:
        x2 = x.reshape(len(x), -1)
        self._x = x2 if keep else None
        y = x2 @ self.W.T
        if self.b is not None:
            y += self.b
        return y[:, :, None, None]

    def backward(self, dy: Arr, need_dx: bool) -> Arr | None:
        dy2 = dy.reshape(len(dy), -1)
        if self.updatable:
            self.dW = dy2.T @ self._x
            self.db = dy2.sum(axis=0) if self.b is not None else None
        return (dy2 @ self.W).reshape(len(dy), *self.in_shape) if need_dx else None
