"""Layers that move data around: flatten, reshape, permute, concat, padding.

Core ML back-propagates through flatten and (legacy) reshape; the others have backward
passes here only for what-if runs with the Core ML rules switched off.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np

from xflwb.bridge.coreml_exec.base import Arr, Chw, Kernel, Shape, StepKernel, register
from xflwb.bridge.coreml_exec.conv import pad


@register("flatten")
class Flatten(StepKernel):
    """(C, H, W) → (C·H·W, 1, 1) per step; CHANNEL_LAST orders (h, w, c) like Keras."""

    backprop = True
    has_backward = True

    def __init__(self, layer: Any, dtype: np.dtype[Any]) -> None:
        super().__init__(layer, dtype)
        self.channel_last = layer.flatten.mode == 1

    def _infer(self, shape: Chw) -> Chw:
        return math.prod(shape), 1, 1

    def forward(self, x: Arr, keep: bool) -> Arr:
        if self.channel_last:
            x = x.transpose(0, 2, 3, 1)
        return x.reshape(len(x), -1, 1, 1)

    def backward(self, dy: Arr, need_dx: bool) -> Arr | None:
        if not need_dx:
            return None
        c, h, w = self.in_shape
        if self.channel_last:
            return dy.reshape(len(dy), h, w, c).transpose(0, 3, 1, 2)
        return dy.reshape(len(dy), c, h, w)


def _seq_first(a: Arr) -> Arr:
    """(N, S, ...) ⇄ (S, N, ...)."""
    return a.transpose(1, 0, 2, 3, 4)


@register("reshape")
class Reshape(Kernel):
    """Legacy rank-5 reshape (the proto's ReshapeLayerParams).

    CHANNEL_FIRST flattens each sample in (Seq, C, H, W) order and reshapes; CHANNEL_LAST
    flattens in (Seq, H, W, C) order, reshapes to (Seq_out, H_out, W_out, C_out) and permutes
    to channels first. A 3-long ``targetShape`` keeps the sequence length.
    """

    backprop = True
    has_backward = True

    def __init__(self, layer: Any, dtype: np.dtype[Any]) -> None:
        super().__init__(layer, dtype)
        p = layer.reshape
        self.target = tuple(int(v) for v in p.targetShape)
        if len(self.target) not in (3, 4) or min(self.target) < 1:
            raise self.fail(f"targetShape {list(self.target)} is not supported (supported: 3 "
                            "or 4 positive sizes, (C, H, W) or (Seq, C, H, W))")
        self.channel_last = p.mode == 1

    def infer(self, shapes: list[Shape | None]) -> list[Shape]:
        s, c, h, w = shapes[0]  # type: ignore[misc]
        self.in_shape: Shape = (s, c, h, w)
        out = (s, *self.target) if len(self.target) == 3 else self.target
        if math.prod(out) != s * c * h * w:
            raise self.fail(f"cannot reshape (Seq, C, H, W) = {self.in_shape} to {list(out)}")
        self.out_shape: Shape = out  # type: ignore[assignment]
        return [self.out_shape]

    def _move(self, x: Arr, src: Shape, dst: Shape) -> Arr:
        """Reshape one batch of 5-D blobs from per-sample ``src`` to ``dst`` (both S,C,H,W)."""
        xs = _seq_first(x)
        if self.channel_last:
            xs = xs.transpose(0, 1, 3, 4, 2)
            ys = xs.reshape(len(xs), dst[0], dst[2], dst[3], dst[1]).transpose(0, 1, 4, 2, 3)
        else:
            ys = xs.reshape(len(xs), *dst)
        return _seq_first(ys)

    def _unmove(self, dy: Arr, src: Shape, dst: Shape) -> Arr:
        """The inverse of ``_move``: gradients back to the input layout."""
        return self._move(dy, dst, src)

    def run(self, xs: list[Arr | None], keep: bool) -> list[Arr]:
        return [self._move(xs[0], self.in_shape, self.out_shape)]  # type: ignore[arg-type]

    def grad(self, dys: list[Arr | None], need: list[bool]) -> list[Arr | None]:
        if dys[0] is None or not need[0]:
            return [None]
        return [self._unmove(dys[0], self.in_shape, self.out_shape)]


@register("permute")
class Permute(Kernel):
    """Legacy permute: ``axis`` is a permutation of (Seq, C, H, W); Batch stays put.

    E.g. (3, 1, 2, 0) turns a unit-sequence (C, 1, T) map into T steps of (C, 1, 1).
    """

    has_backward = True
    _AX = (0, 2, 3, 4)  # array axes of Seq, C, H, W in an (S, N, C, H, W) blob

    def __init__(self, layer: Any, dtype: np.dtype[Any]) -> None:
        super().__init__(layer, dtype)
        axis = tuple(int(a) for a in layer.permute.axis) or (0, 1, 2, 3)
        if sorted(axis) != [0, 1, 2, 3]:
            raise self.fail(f"axis {list(axis)} is not a permutation of [0, 1, 2, 3]")
        self.axis = axis
        a = [self._AX[i] for i in axis]
        self.perm = (a[0], 1, a[1], a[2], a[3])
        self.inv = tuple(int(i) for i in np.argsort(self.perm))

    def infer(self, shapes: list[Shape | None]) -> list[Shape]:
        shape = shapes[0]
        assert shape is not None  # a permute's one input is never optional
        a, b, c, e = (shape[i] for i in self.axis)
        return [(a, b, c, e)]

    def run(self, xs: list[Arr | None], keep: bool) -> list[Arr]:
        return [xs[0].transpose(self.perm)]  # type: ignore[union-attr]

    def grad(self, dys: list[Arr | None], need: list[bool]) -> list[Arr | None]:
        if dys[0] is None or not need[0]:
            return [None]
        return [dys[0].transpose(self.inv)]


@register("concat")
class Concat(Kernel):
    """Concatenation along C (axis −3), or along Seq (axis −5) with ``sequenceConcat``."""

    n_in = (2, 1 << 20)
    has_backward = True

    def __init__(self, layer: Any, dtype: np.dtype[Any]) -> None:
        super().__init__(layer, dtype)
        self.seq = bool(layer.concat.sequenceConcat)
        self.dim = 0 if self.seq else 1  # in (S, C, H, W)

    def infer(self, shapes: list[Shape | None]) -> list[Shape]:
        first = shapes[0]
        assert first is not None
        for name, s in zip(self.inputs, shapes, strict=True):
            assert s is not None
            if tuple(v for i, v in enumerate(s) if i != self.dim) != tuple(
                    v for i, v in enumerate(first) if i != self.dim):
                raise self.fail(f"input '{name}' has shape (Seq, C, H, W) = {s}, which does "
                                f"not match {first} outside the "
                                f"{'sequence' if self.seq else 'channel'} axis")
        self.sizes = [s[self.dim] for s in shapes]  # type: ignore[index]
        out = list(first)
        out[self.dim] = sum(self.sizes)
        return [tuple(out)]  # type: ignore[list-item]

    def run(self, xs: list[Arr | None], keep: bool) -> list[Arr]:
        return [np.concatenate(xs, axis=0 if self.seq else 2)]  # type: ignore[arg-type]

    def grad(self, dys: list[Arr | None], need: list[bool]) -> list[Arr | None]:
        if dys[0] is None:
            return [None] * len(need)
        parts = np.split(dys[0], np.cumsum(self.sizes)[:-1], axis=0 if self.seq else 2)
        return [p if n else None for p, n in zip(parts, need, strict=True)]


@register("padding")
class Padding(StepKernel):
    """Spatial padding: constant value, reflection or replication (the proto's examples)."""

    _MODES: ClassVar[dict[str, str | None]] = {
        "constant": None, "reflection": "reflect", "replication": "edge"}

    def __init__(self, layer: Any, dtype: np.dtype[Any]) -> None:
        super().__init__(layer, dtype)
        p = layer.padding
        self.mode = p.WhichOneof("PaddingType") or "constant"
        if self.mode not in self._MODES:
            raise self.fail(f"padding type '{self.mode}' is not supported (supported: "
                            f"{', '.join(self._MODES)})")
        self.value = float(p.constant.value) if self.mode == "constant" else 0.0
        amounts = list(p.paddingAmounts.borderAmounts)
        if amounts and len(amounts) != 2:
            raise self.fail("paddingAmounts needs 2 border amounts ([H, W])")
        pt, pb = (amounts[0].startEdgeSize, amounts[0].endEdgeSize) if amounts else (0, 0)
        pl, pr = (amounts[1].startEdgeSize, amounts[1].endEdgeSize) if amounts else (0, 0)
        self.pads = (int(pt), int(pb), int(pl), int(pr))
        self.has_backward = self.mode == "constant"

    def _infer(self, shape: Chw) -> Chw:
        c, h, w = shape
        pt, pb, pl, pr = self.pads
        if self.mode == "reflection" and (max(pt, pb) >= h or max(pl, pr) >= w):
            raise self.fail(f"reflection padding {self.pads} needs an input larger than the "
                            f"padding, got {h}x{w}")
        return c, h + pt + pb, w + pl + pr

    def forward(self, x: Arr, keep: bool) -> Arr:
        if self.mode == "constant":
            return pad(x, self.pads, self.value)
        pt, pb, pl, pr = self.pads
        mode: Any = self._MODES[self.mode]  # "reflect" or "edge" (constant returned above)
        y: Arr = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)), mode=mode)
        return y

    def backward(self, dy: Arr, need_dx: bool) -> Arr | None:
        if not need_dx:
            return None
        if self.mode != "constant":
            raise self.fail(f"no backward for {self.mode} padding")
        _, h, w = self.in_shape
        pt, _, pl, _ = self.pads
        return dy[:, :, pt:pt + h, pl:pl + w]
