"""Elementwise layers: add and multiply (N inputs with the legacy broadcasts, or one input
and ``alpha``), and the unary functions ``f(scale·x + shift)``.

None of them back-propagates in Core ML; their backward passes serve what-if runs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import numpy as np

from xflwb.bridge.coreml_exec.base import Arr, Kernel, Shape, StepKernel, register


def _reduce_to(g: Arr, shape: tuple[int, ...]) -> Arr:
    """Sum a gradient over the axes an input was broadcast along."""
    axes = tuple(i for i, (a, b) in enumerate(zip(g.shape, shape, strict=True)) if b == 1 != a)
    return g.sum(axis=axes, keepdims=True) if axes else g


class _Broadcasting(Kernel):
    """Shared by add and multiply: the proto's limited rank-5 broadcasting.

    Per sample, an input's (C, H, W) must be (1, 1, 1), (C, 1, 1), (1, H, W) or (C, H, W)
    of the output; its Seq must be 1 or the output's (assumed: the proto is silent).
    The output takes the broadcast shape.
    """

    n_in = (1, 1 << 20)
    has_backward = True

    def __init__(self, layer: Any, dtype: np.dtype[Any]) -> None:
        super().__init__(layer, dtype)
        self.alpha = float(getattr(layer, self.kind).alpha)

    def infer(self, shapes: list[Shape | None]) -> list[Shape]:
        out = tuple(max(s[i] for s in shapes) for i in range(4))  # type: ignore[index]
        s0, c, h, w = out
        for name, s in zip(self.inputs, shapes, strict=True):
            assert s is not None
            ok_chw = s[1:] in ((1, 1, 1), (c, 1, 1), (1, h, w), (c, h, w))
            if not ok_chw or s[0] not in (1, s0):
                raise self.fail(f"input '{name}' of shape (Seq, C, H, W) = {s} does not "
                                f"broadcast to {out}; supported per-sample (C, H, W): "
                                f"(1, 1, 1), (C, 1, 1), (1, H, W), (C, H, W)")
        self.shapes = [(s[0], 1, *s[1:]) for s in shapes]  # type: ignore[index]
        self.out_shape = out
        return [out]  # type: ignore[list-item]


@register("add")
class Add(_Broadcasting):
    def run(self, xs: list[Arr | None], keep: bool) -> list[Arr]:
        x0, *rest = cast("list[Arr]", xs)  # no input of add is optional
        if not rest:
            return [x0 + np.asarray(self.alpha, x0.dtype)]
        y = x0 + rest[0]
        for x in rest[1:]:
            y = y + x
        return [y]

    def grad(self, dys: list[Arr | None], need: list[bool]) -> list[Arr | None]:
        dy = dys[0]
        if dy is None:
            return [None] * len(need)
        return [_reduce_to(dy, (s[0], dy.shape[1], *s[2:])) if n else None
                for s, n in zip(self.shapes, need, strict=True)]


@register("multiply")
class Multiply(_Broadcasting):
    def run(self, xs: list[Arr | None], keep: bool) -> list[Arr]:
        self._xs = xs if keep else None
        x0, *rest = cast("list[Arr]", xs)  # no input of multiply is optional
        if not rest:
            return [x0 * np.asarray(self.alpha, x0.dtype)]
        y = x0 * rest[0]
        for x in rest[1:]:
            y = y * x
        return [y]

    def grad(self, dys: list[Arr | None], need: list[bool]) -> list[Arr | None]:
        dy = dys[0]
        if dy is None:
            return [None] * len(need)
        if len(need) == 1:
            return [dy * self.alpha if need[0] else None]
        xs = self._xs
        out: list[Arr | None] = []
        for i, (s, n) in enumerate(zip(self.shapes, need, strict=True)):
            if not n:
                out.append(None)
                continue
            g = dy
            for j, x in enumerate(xs):  # type: ignore[arg-type]
                if j != i:
                    g = g * x
            out.append(_reduce_to(g, (s[0], dy.shape[1], *s[2:])))
        return out


_Op = tuple[Callable[..., Arr], Callable[..., Arr]]


@register("unary")
class Unary(StepKernel):
    """``f(scale·x + shift)``; scale 0/unset means 1, epsilon 0/unset means 1e-6."""

    has_backward = True
    NAMES = ("SQRT", "RSQRT", "INVERSE", "POWER", "EXP", "LOG", "ABS", "THRESHOLD")

    def __init__(self, layer: Any, dtype: np.dtype[Any]) -> None:
        super().__init__(layer, dtype)
        p = layer.unary
        if p.type >= len(self.NAMES):
            raise self.fail(f"unary type {p.type} is not supported (supported: "
                            f"{', '.join(self.NAMES)})")
        self.op = self.NAMES[p.type]
        self.alpha = float(p.alpha)
        self.eps = float(p.epsilon) or 1e-6
        self.shift = float(p.shift)
        self.scale = float(p.scale) or 1.0
        a, e = self.alpha, self.eps
        ops: dict[str, _Op] = {  # (f, f')
            "SQRT": (np.sqrt, lambda z: 0.5 / np.sqrt(z)),
            "RSQRT": (lambda z: 1 / np.sqrt(z + e), lambda z: -0.5 * (z + e) ** -1.5),
            "INVERSE": (lambda z: 1 / (z + e), lambda z: -1 / (z + e) ** 2),
            "POWER": (lambda z: z ** a, lambda z: a * z ** (a - 1)),
            "EXP": (np.exp, np.exp),
            "LOG": (np.log, lambda z: 1 / z),
            "ABS": (np.abs, np.sign),
            "THRESHOLD": (lambda z: np.maximum(a, z), lambda z: (z > a).astype(z.dtype)),
        }
        self._f, self._df = ops[self.op]

    def _z(self, x: Arr) -> Arr:
        z: Arr = x * np.asarray(self.scale, x.dtype) + np.asarray(self.shift, x.dtype)
        return z

    def forward(self, x: Arr, keep: bool) -> Arr:
        self._x = x if keep else None
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            return np.asarray(self._f(self._z(x)), x.dtype)

    def backward(self, dy: Arr, need_dx: bool) -> Arr | None:
        if not need_dx:
            return None
        assert self._x is not None  # kept by the forward pass that grad follows
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            dx: Arr = (dy * self.scale * self._df(self._z(self._x))).astype(dy.dtype, copy=False)
            return dx
