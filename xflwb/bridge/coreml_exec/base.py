"""Kernel base classes, the kernel registry and the helpers every kernel module shares.

A kernel executes one Core ML layer. Blobs are rank 5 as in Core ML (``[Seq, Batch, C, H,
W]``), carried as numpy arrays of shape (S, N, C, H, W) where N is the number of samples
(Core ML runs each sample with Batch = 1; we vectorise over them). Static per-sample shapes
are (S, C, H, W) tuples. Most layers act on every sequence step alike: those derive from
``StepKernel`` and see plain (S·N, C, H, W) maps, so image models pay nothing for the
sequence axis.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, TypeAlias

import numpy as np

from xflwb.bridge.arrays import AnyArray

Shape = tuple[int, int, int, int]  # (Seq, C, H, W) of one sample
Chw = tuple[int, int, int]
Arr: TypeAlias = AnyArray

#: Core ML layer type (the ``layer`` oneof name) -> kernel class
KERNELS: dict[str, type[Kernel]] = {}


def register(kind: str) -> Callable[[type[Kernel]], type[Kernel]]:
    """Class decorator: ``@register("batchnorm") class BatchNorm(Kernel)``."""
    def deco(cls: type[Kernel]) -> type[Kernel]:
        if kind in KERNELS:
            raise ValueError(f"a kernel for '{kind}' is already registered")
        cls.kind = kind
        KERNELS[kind] = cls
        return cls
    return deco


def pair(values: Sequence[int], default: int) -> tuple[int, int]:
    """Core ML leaves repeated size fields empty for their defaults."""
    if len(values) == 0:
        return default, default
    if len(values) != 2:
        raise ValueError(f"expected 2 values, got {list(values)}")
    return int(values[0]), int(values[1])


def read_weights(layer_name: str, what: str, wp: Any, shape: tuple[int, ...], dtype: np.dtype[Any],
                 allow_fp16: bool = True) -> tuple[Arr, bool]:
    """A ``WeightParams`` as an array: float32 ``floatValue`` or fp16; quantised refused.

    Returns (array, stored as fp16?).
    """
    size = math.prod(shape)
    if wp.HasField("quantization") or len(wp.rawValue) or len(wp.int8RawValue):
        raise ValueError(f"layer '{layer_name}' has quantised {what}; the executor (like "
                         "Core ML's updatable models) supports float32 weights only")
    fp16 = bool(len(wp.float16Value))
    if fp16:
        if not allow_fp16:
            raise ValueError(f"layer '{layer_name}' is updatable but has fp16 {what}; "
                             "Core ML trains float32 weights only")
        arr = np.frombuffer(wp.float16Value, dtype="<f2")
    else:
        arr = np.asarray(wp.floatValue, dtype=np.float32)
    if arr.size != size:
        raise ValueError(f"layer '{layer_name}' {what} has {arr.size} values, expected "
                         f"{size} (shape {list(shape)})")
    return arr.astype(dtype).reshape(shape), fp16


class Kernel:
    """One Core ML layer: shape inference, forward and (where it exists) backward.

    ``run``/``grad`` take and return lists of 5-D arrays, one per input/output blob
    (``None`` for an absent optional input or an output that receives no gradient).
    """

    kind: ClassVar[str] = ""
    #: inputs / outputs the layer accepts: (min, max)
    n_in: ClassVar[tuple[int, int]] = (1, 1)
    n_out: ClassVar[tuple[int, int]] = (1, 1)
    #: does Core ML pass gradients through it? (the validator's view; see coreml_rules)
    backprop: bool = False
    #: does this executor implement its backward? (may exceed Core ML, for what-if runs)
    has_backward: bool = False
    #: may it be marked updatable?
    can_update: ClassVar[bool] = False

    def __init__(self, layer: Any, dtype: np.dtype[Any]) -> None:
        self.name: str = layer.name
        self.dtype = np.dtype(dtype)
        self.inputs: list[str] = list(layer.input)
        self.outputs: list[str] = list(layer.output)
        self.updatable = bool(layer.isUpdatable)
        for what, got, (lo, hi) in (("inputs", len(self.inputs), self.n_in),
                                    ("outputs", len(self.outputs), self.n_out)):
            if not lo <= got <= hi:
                want = str(lo) if lo == hi else f"{lo} to {hi}"
                raise ValueError(f"layer '{self.name}' ({self.kind}) has {got} {what}; the "
                                 f"executor supports {want}")
        if self.updatable and not self.can_update:
            raise ValueError(f"layer '{self.name}' ({self.kind}) is marked updatable, but Core "
                             "ML trains only convolution and innerProduct layers")

    @property
    def label(self) -> str:
        """``'name' (kind)`` for error messages."""
        return f"'{self.name}' ({self.kind})"

    def fail(self, what: str) -> ValueError:
        """A ValueError naming the layer and its type."""
        return ValueError(f"layer {self.label}: {what}")

    def infer(self, shapes: list[Shape | None]) -> list[Shape]:
        """Output shapes from input shapes (``None``: an absent optional input)."""
        raise NotImplementedError

    def run(self, xs: list[Arr | None], keep: bool) -> list[Arr]:
        """Outputs for 5-D inputs; ``keep`` stores what ``grad`` needs."""
        raise NotImplementedError

    def grad(self, dys: list[Arr | None], need: list[bool]) -> list[Arr | None]:
        """Input gradients (only where ``need``) from output gradients."""
        raise self.fail("the executor has no backward for this layer type")


class StepKernel(Kernel):
    """A one-input, one-output layer applied to every sequence step alike.

    Subclasses implement ``_infer`` on (C, H, W) and ``forward``/``backward`` on
    (B, C, H, W) maps; the sequence axis is folded into B here (free for S = 1).
    """

    def __init__(self, layer: Any, dtype: np.dtype[Any]) -> None:
        super().__init__(layer, dtype)
        self.in_shape: Chw = (0, 0, 0)
        self.out_shape: Chw = (0, 0, 0)

    def infer(self, shapes: list[Shape | None]) -> list[Shape]:
        shape = shapes[0]
        assert shape is not None  # a step kernel's one input is never optional
        s, c, h, w = shape
        self.in_shape = (c, h, w)
        self.out_shape = self._infer(self.in_shape)
        return [(s, *self.out_shape)]

    def _infer(self, shape: Chw) -> Chw:
        return shape

    def run(self, xs: list[Arr | None], keep: bool) -> list[Arr]:
        x = xs[0]
        assert x is not None
        s, n = x.shape[:2]
        if s == 1:
            return [self.forward(x[0], keep)[None]]
        y = self.forward(x.reshape(s * n, *x.shape[2:]), keep)
        return [y.reshape(s, n, *y.shape[1:])]

    def grad(self, dys: list[Arr | None], need: list[bool]) -> list[Arr | None]:
        dy = dys[0]
        if dy is None:
            return [None]
        s, n = dy.shape[:2]
        if s == 1:  # backward also runs for dW alone (an updatable layer fed by the input)
            dx = self.backward(dy[0], need[0])
            return [None if dx is None else dx[None]]
        dx = self.backward(dy.reshape(s * n, *dy.shape[2:]), need[0])
        return [None if dx is None else dx.reshape(s, n, *dx.shape[1:])]

    def forward(self, x: Arr, keep: bool) -> Arr:
        raise NotImplementedError

    def backward(self, dy: Arr, need_dx: bool) -> Arr | None:
        raise self.fail("the executor has no backward for this layer type")


class Weighted(StepKernel):
    """A convolution / innerProduct: weights and optional bias that may be updatable.

    ``W``/``b`` are what a phone reads and writes; ``dW``/``db`` the last gradients.
    """

    can_update = True
    backprop = True
    has_backward = True
    w_shape: tuple[int, ...] = ()

    def __init__(self, layer: Any, params: Any, dtype: np.dtype[Any]) -> None:
        super().__init__(layer, dtype)
        self._params = params
        self.has_bias = bool(params.hasBias)
        if self.updatable and (not params.weights.isUpdatable
                               or (self.has_bias and not params.bias.isUpdatable)):
            raise ValueError(f"layer '{self.name}' is updatable but its weights/bias are not "
                             "marked updatable (Core ML rejects the model)")
        self.fp16 = {"weights": False, "bias": False}
        self.W: Arr = np.zeros(0, dtype)
        self.b: Arr | None = None
        self.dW: Arr | None = None
        self.db: Arr | None = None

    def _load_params(self, w_shape: tuple[int, ...], n_out: int) -> None:
        self.w_shape = w_shape
        self.W, self.fp16["weights"] = read_weights(
            self.name, "weights", self._params.weights, w_shape, self.dtype,
            allow_fp16=not self.updatable)
        if self.has_bias:
            self.b, self.fp16["bias"] = read_weights(
                self.name, "bias", self._params.bias, (n_out,), self.dtype,
                allow_fp16=not self.updatable)

    def write(self, layer: Any) -> None:
        """Write the current values into a (copied) layer proto, keeping each encoding."""
        params = getattr(layer, self.kind)
        for what, arr, wp in (("weights", self.W, params.weights),
                              ("bias", self.b, params.bias)):
            if arr is None:
                continue
            if self.fp16[what]:
                wp.float16Value = np.asarray(arr, "<f2").tobytes()
            else:
                del wp.floatValue[:]
                wp.floatValue.extend(np.asarray(arr, np.float32).ravel().tolist())
