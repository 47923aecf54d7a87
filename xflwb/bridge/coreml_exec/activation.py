"""Activations (every ``ActivationParams`` function) and the legacy softmax.

Core ML back-propagates through ReLU, sigmoid and tanh only; the other derivatives exist
for what-if runs with the Core ML rules switched off. ReLU's derivative at 0 is 0
(undocumented).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from xflwb.bridge.coreml_exec.base import Arr, Chw, StepKernel, read_weights, register

_BACKPROP = ("ReLU", "sigmoid", "tanh")


def sigmoid(x: Arr) -> Arr:
    """Overflow-free logistic."""
    y: Arr = 0.5 * (np.tanh(0.5 * x) + 1)
    return y


def _affine(x: Arr, a: Any, b: Any) -> Arr:
    """a·x + b with one temporary (these run on every pixel of frozen backbones)."""
    y = np.multiply(x, a, dtype=x.dtype)
    if np.any(b):
        y += b
    return y


def _hard_sigmoid(x: Arr, a: Any, b: Any) -> Arr:
    y = _affine(x, a, b)
    return np.clip(y, 0, 1, out=y)


def _fn(kind: str, a: Any, b: Any) -> Callable[[Arr], Arr]:
    """The forward function of activation ``kind`` with parameters ``a``, ``b``."""
    table: dict[str, Callable[[Arr], Arr]] = {
        "linear": lambda x: _affine(x, a, b),
        "ReLU": lambda x: np.maximum(x, 0),
        "leakyReLU": lambda x: np.where(x >= 0, x, a * x),
        "thresholdedReLU": lambda x: np.where(x >= a, x, 0),
        "PReLU": lambda x: np.where(x >= 0, x, a * x),
        "tanh": np.tanh,
        "scaledTanh": lambda x: a * np.tanh(b * x),
        "sigmoid": sigmoid,
        "sigmoidHard": lambda x: _hard_sigmoid(x, a, b),
        "ELU": lambda x: np.where(x >= 0, x, a * np.expm1(np.minimum(x, 0))),
        "softsign": lambda x: x / (1 + np.abs(x)),
        "softplus": lambda x: np.logaddexp(0, x),
        "parametricSoftplus": lambda x: a * np.logaddexp(0, b * x),
    }
    return table[kind]


def _dfn(kind: str, a: Any, b: Any) -> Callable[[Arr, Arr], Arr]:
    """dy/dx of activation ``kind`` as a function of (x, y)."""
    table: dict[str, Callable[[Arr, Arr], Arr]] = {
        "linear": lambda x, y: np.full_like(x, a),
        "ReLU": lambda x, y: (y > 0).astype(x.dtype),
        "leakyReLU": lambda x, y: np.where(x >= 0, 1, a),
        "thresholdedReLU": lambda x, y: (x >= a).astype(x.dtype),
        "PReLU": lambda x, y: np.where(x >= 0, 1, a),
        "tanh": lambda x, y: 1 - y * y,
        "scaledTanh": lambda x, y: a * b * (1 - np.tanh(b * x) ** 2),
        "sigmoid": lambda x, y: y * (1 - y),
        "sigmoidHard": lambda x, y: np.where((y > 0) & (y < 1), a, 0),
        "ELU": lambda x, y: np.where(x >= 0, 1, y + a),
        "softsign": lambda x, y: 1 / (1 + np.abs(x)) ** 2,
        "softplus": lambda x, y: sigmoid(x),
        "parametricSoftplus": lambda x, y: a * b * sigmoid(b * x),
    }
    return table[kind]


#: recurrent layers: activations Core ML supports there, and the only parameters it
#: supports for them (the builder writes empty messages, i.e. alpha = beta = 0)
_RNN_FIXED = {"sigmoidHard": (0.2, 0.5), "scaledTanh": (1.7159, 2 / 3), "linear": (1.0, 0.0)}
RNN_ACTIVATIONS = ("linear", "sigmoid", "tanh", "ReLU", "scaledTanh", "sigmoidHard")


def rnn_activation(layer_label: str, msg: Any) -> Callable[[Arr], Arr]:
    """The forward function of a recurrent layer's ``ActivationParams``.

    Assumption (undocumented): unset alpha/beta mean the proto's documented values
    (hard sigmoid 0.2/0.5, scaled tanh 1.7159/(2/3)) and identity for linear.
    """
    kind = msg.WhichOneof("NonlinearityType")
    if kind not in RNN_ACTIVATIONS:
        raise ValueError(f"layer {layer_label}: recurrent activation '{kind}' is not supported "
                         f"(supported: {', '.join(RNN_ACTIVATIONS)})")
    a = b = 0.0
    if kind in _RNN_FIXED:
        sub = getattr(msg, kind)
        a, b = float(sub.alpha), float(sub.beta)
        if a == 0 and b == 0:
            a, b = _RNN_FIXED[kind]
    return _fn(kind, a, b)


@register("activation")
class Activation(StepKernel):
    """Elementwise nonlinearity; Core ML trains through ReLU / sigmoid / tanh only."""

    has_backward = True
    KNOWN = ("linear", "ReLU", "leakyReLU", "thresholdedReLU", "PReLU", "tanh", "scaledTanh",
             "sigmoid", "sigmoidHard", "ELU", "softsign", "softplus", "parametricSoftplus")

    def __init__(self, layer: Any, dtype: np.dtype[Any]) -> None:
        super().__init__(layer, dtype)
        act = layer.activation
        self.fn = act.WhichOneof("NonlinearityType") or ""
        if self.fn not in self.KNOWN:
            raise self.fail(f"activation '{self.fn}' is not supported (supported: "
                            f"{', '.join(self.KNOWN)})")
        self.backprop = self.fn in _BACKPROP
        self.sub = getattr(act, self.fn)
        self.a: Any = float(getattr(self.sub, "alpha", 0.0)) if self.fn not in (
            "PReLU", "parametricSoftplus") else 0.0
        self.b: Any = float(getattr(self.sub, "beta", 0.0)) if self.fn not in (
            "PReLU", "parametricSoftplus") else 0.0

    def _infer(self, shape: Chw) -> Chw:
        if self.fn in ("PReLU", "parametricSoftplus"):  # per-channel vectors of length C or 1
            c = shape[0]
            vals = []
            for what in ("alpha", "beta") if self.fn == "parametricSoftplus" else ("alpha",):
                wp = getattr(self.sub, what)
                size = len(wp.floatValue) or len(wp.float16Value) // 2
                if size not in (1, c):
                    raise self.fail(f"{what} has {size} values; expected 1 or {c} (channels)")
                arr, _ = read_weights(self.name, what, wp, (size,), self.dtype)
                vals.append(arr.reshape(-1, 1, 1))
            self.a = vals[0]
            self.b = vals[1] if len(vals) > 1 else 0.0
        self._f, self._df = _fn(self.fn, self.a, self.b), _dfn(self.fn, self.a, self.b)
        return shape

    def forward(self, x: Arr, keep: bool) -> Arr:
        y = np.asarray(self._f(x), dtype=x.dtype)
        self._x: Arr | None
        self._y: Arr | None
        self._x, self._y = (x, y) if keep else (None, None)
        return y

    def backward(self, dy: Arr, need_dx: bool) -> Arr | None:
        if not need_dx:
            return None
        assert self._x is not None and self._y is not None  # kept by the forward pass
        return (dy * self._df(self._x, self._y)).astype(dy.dtype, copy=False)


@register("softmax")
class Softmax(StepKernel):
    """Legacy softmax over C; its gradient exists only fused with cross-entropy."""

    def forward(self, x: Arr, keep: bool) -> Arr:
        z = np.exp(x - x.max(axis=1, keepdims=True))
        y: Arr = z / z.sum(axis=1, keepdims=True)
        return y

    def backward(self, dy: Arr, need_dx: bool) -> Arr | None:
        raise self.fail("softmax passes gradients only fused into a categorical "
                        "cross-entropy loss")
