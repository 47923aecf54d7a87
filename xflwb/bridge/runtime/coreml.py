"""A numpy reference executor of Core ML updatable neural networks (the "virtual iPhone").

Core ML only runs on Apple hardware, so xflwb executes the ``.mlmodel`` protobuf itself.
The semantics follow COREML_TRAINING.md (shared notes): rank-5 tensors (per sample C, H, W,
batched here as N, C, H, W), Core ML weight layouts, the validator's rules on what may train
and what gradients may cross, fused softmax + cross-entropy, mean-of-batch gradients, SGD
with momentum and bias-corrected Adam whose state starts at zero in every update task.
Points Apple leaves undocumented (Adam's epsilon placement, MSE reduction) are switches.

Everything is vectorised: convolutions are im2col views (``as_strided``) + matmul, their
input gradients are stride-1 correlations of the up-sampled gradient with the flipped
kernel, and pooling gradients are scattered with ``np.bincount``.
"""

from __future__ import annotations

import math
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import as_strided

from xflwb.bridge.runtime.base import CCE_EPSILON, Runtime, epoch_batches

ADAM_EPSILON_MODES = ("hat", "corrected")
MSE_REDUCTIONS = ("mean", "sum")
OVERRIDE_KEYS = ("learning_rate", "momentum", "beta1", "beta2", "eps", "mini_batch_size",
                 "epochs", "shuffle", "seed")
_NN_KINDS = ("neuralNetwork", "neuralNetworkClassifier", "neuralNetworkRegressor")
Shape = tuple[int, int, int]


# -- small helpers -------------------------------------------------------------------------
def _pair(values: Sequence[int], default: int) -> tuple[int, int]:
    """Core ML leaves repeated size fields empty for their defaults."""
    if len(values) == 0:
        return default, default
    if len(values) != 2:
        raise ValueError(f"expected 2 values, got {list(values)}")
    return int(values[0]), int(values[1])


def _runs(values: Sequence[int]) -> str:
    """An allowed set written compactly as runs, e.g. ``1..100, 150``."""
    vals = sorted(set(int(v) for v in values))
    parts: list[str] = []
    start = prev = vals[0] if vals else 0
    for v in [*vals[1:], None]:
        if v is not None and v == prev + 1:
            prev = v
            continue
        parts.append(str(start) if start == prev else f"{start}..{prev}")
        if v is not None:
            start = prev = v
    return ", ".join(parts) if vals else ""


def _same_pads(size: int, k_eff: int, stride: int, top_left_heavy: bool
               ) -> tuple[int, int, int]:
    """Output size and (before, after) padding of Core ML ``same`` padding."""
    out = -(-size // stride)
    total = max(0, (out - 1) * stride + k_eff - size)
    small = total // 2
    return (out, total - small, small) if top_left_heavy else (out, small, total - small)


def _spatial(layer_name: str, msg: Any, oneof: str, size_hw: tuple[int, int],
             k_eff: tuple[int, int], stride: tuple[int, int]
             ) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
    """(Ho, Wo) and pads (top, bottom, left, right) for a conv/pool padding message."""
    kind = msg.WhichOneof(oneof)
    if kind == "same":
        tl = msg.same.asymmetryMode == 1  # TOP_LEFT_HEAVY
        ho, pt, pb = _same_pads(size_hw[0], k_eff[0], stride[0], tl)
        wo, pl, pr = _same_pads(size_hw[1], k_eff[1], stride[1], tl)
    elif kind in ("valid", None):
        amounts = list(msg.valid.paddingAmounts.borderAmounts) if kind else []
        if amounts and len(amounts) != 2:
            raise ValueError(f"layer '{layer_name}': valid padding needs 2 border amounts")
        pt, pb = (amounts[0].startEdgeSize, amounts[0].endEdgeSize) if amounts else (0, 0)
        pl, pr = (amounts[1].startEdgeSize, amounts[1].endEdgeSize) if amounts else (0, 0)
        ho = (size_hw[0] + pt + pb - k_eff[0]) // stride[0] + 1
        wo = (size_hw[1] + pl + pr - k_eff[1]) // stride[1] + 1
    else:
        raise ValueError(f"layer '{layer_name}': padding type '{kind}' is not supported")
    if ho < 1 or wo < 1:
        raise ValueError(f"layer '{layer_name}': a {size_hw[0]}x{size_hw[1]} input is smaller "
                         f"than the {k_eff[0]}x{k_eff[1]} window")
    return (int(ho), int(wo)), (int(pt), int(pb), int(pl), int(pr))


def _pad(x: np.ndarray, pads: tuple[int, int, int, int], value: float) -> np.ndarray:
    """Pad H and W (cheaper than ``np.pad`` for the small maps this runs on)."""
    pt, pb, pl, pr = pads
    if not (pt or pb or pl or pr):
        return x
    n, c, h, w = x.shape
    out = np.full((n, c, h + pt + pb, w + pl + pr), value, dtype=x.dtype)
    out[:, :, pt:pt + h, pl:pl + w] = x
    return out


def _windows(xp: np.ndarray, k: tuple[int, int], s: tuple[int, int], d: tuple[int, int],
             out: tuple[int, int]) -> np.ndarray:
    """Read-only (N, C, Ho, Wo, kh, kw) view of every window: im2col without a copy."""
    n, c = xp.shape[:2]
    sn, sc, sh, sw = xp.strides
    return as_strided(xp, (n, c, out[0], out[1], k[0], k[1]),
                      (sn, sc, sh * s[0], sw * s[1], sh * d[0], sw * d[1]), writeable=False)


def _correlate(xp: np.ndarray, wg: np.ndarray, groups: int, k: tuple[int, int],
               s: tuple[int, int], d: tuple[int, int], out: tuple[int, int]
               ) -> tuple[np.ndarray, np.ndarray]:
    """Grouped cross-correlation of padded ``xp`` with ``wg`` (G, Cout/G, Cin/G·kh·kw).

    Returns (y as an NCHW view of a (Cout, N, Ho, Wo) array, the im2col matrix
    (G, Cin/G·kh·kw, N·Ho·Wo)). Columns are samples × pixels so the im2col copy runs along
    contiguous rows, and they are kept for dW.
    """
    n, c = xp.shape[:2]
    win = _windows(xp, k, s, d, out)
    cg = c // groups
    cols = win.reshape(n, groups, cg, out[0], out[1], k[0], k[1]).transpose(
        1, 2, 5, 6, 0, 3, 4).reshape(groups, cg * k[0] * k[1], -1)
    y = (wg[0] @ cols[0])[None] if groups == 1 else np.matmul(wg, cols)  # (G, Cout/G, M)
    return y.reshape(-1, n, *out).transpose(1, 0, 2, 3), cols


# -- layers ----------------------------------------------------------------------------------
class _Layer:
    """One Core ML layer: shape inference, forward, backward (gradients w.r.t. its input)."""

    kind = ""
    backprop = True  # does Core ML pass gradients through this layer?
    can_update = False  # may it be marked updatable?

    def __init__(self, layer: Any, dtype: np.dtype) -> None:
        self.name = layer.name
        if len(layer.input) != 1 or len(layer.output) != 1:
            raise ValueError(f"layer '{layer.name}' ({self.kind}) has {len(layer.input)} "
                             f"inputs and {len(layer.output)} outputs; the executor supports "
                             "single-input, single-output layers only")
        self.inp, self.out = layer.input[0], layer.output[0]
        self.updatable = bool(layer.isUpdatable)
        self.dtype = dtype
        self.in_shape: Shape = (0, 0, 0)
        self.out_shape: Shape = (0, 0, 0)
        if self.updatable and not self.can_update:
            raise ValueError(f"layer '{self.name}' ({self.kind}) is marked updatable, but Core "
                             "ML trains only convolution and innerProduct layers")

    def infer(self, shape: Shape) -> Shape:
        self.in_shape = shape
        self.out_shape = self._infer(shape)
        return self.out_shape

    def _infer(self, shape: Shape) -> Shape:
        return shape

    def forward(self, x: np.ndarray, keep: bool) -> np.ndarray:
        raise NotImplementedError

    def backward(self, dy: np.ndarray, need_dx: bool) -> np.ndarray | None:
        raise NotImplementedError


class _Weighted(_Layer):
    """A layer with Core ML weights (and optional bias) that may be updatable."""

    w_shape: tuple[int, ...] = ()
    can_update = True

    def __init__(self, layer: Any, params: Any, dtype: np.dtype) -> None:
        super().__init__(layer, dtype)
        self._params = params
        self.has_bias = bool(params.hasBias)
        if self.updatable and (not params.weights.isUpdatable
                               or (self.has_bias and not params.bias.isUpdatable)):
            raise ValueError(f"layer '{self.name}' is updatable but its weights/bias are not "
                             "marked updatable (Core ML rejects the model)")
        self.fp16 = {"weights": False, "bias": False}
        self.W: np.ndarray = np.zeros(0, dtype)
        self.b: np.ndarray | None = None
        self.dW: np.ndarray | None = None
        self.db: np.ndarray | None = None

    def _read(self, what: str, wp: Any, shape: tuple[int, ...]) -> np.ndarray:
        """Weights from ``floatValue`` (or fp16 in frozen layers); quantised ones refused."""
        size = math.prod(shape)
        if wp.HasField("quantization") or len(wp.rawValue) or len(wp.int8RawValue):
            raise ValueError(f"layer '{self.name}' has quantised {what}; the executor (like "
                             "Core ML's updatable models) supports float32 weights only")
        if len(wp.float16Value):
            if self.updatable:
                raise ValueError(f"layer '{self.name}' is updatable but has fp16 {what}; "
                                 "Core ML trains float32 weights only")
            arr = np.frombuffer(wp.float16Value, dtype="<f2")
            self.fp16[what] = True
        else:
            arr = np.asarray(wp.floatValue, dtype=np.float32)
        if arr.size != size:
            raise ValueError(f"layer '{self.name}' {what} has {arr.size} values, expected "
                             f"{size} (shape {list(shape)})")
        return arr.astype(self.dtype).reshape(shape)

    def _load_params(self, w_shape: tuple[int, ...], n_out: int) -> None:
        self.w_shape = w_shape
        self.W = self._read("weights", self._params.weights, w_shape)
        self.b = self._read("bias", self._params.bias, (n_out,)) if self.has_bias else None

    def write(self, params: Any) -> None:
        """Write the current values into a (copied) proto, keeping each tensor's encoding."""
        for what, arr, wp in (("weights", self.W, params.weights),
                              ("bias", self.b, params.bias)):
            if arr is None:
                continue
            if self.fp16[what]:
                wp.float16Value = np.asarray(arr, "<f2").tobytes()
            else:
                del wp.floatValue[:]
                wp.floatValue.extend(np.asarray(arr, np.float32).ravel().tolist())


class _Conv(_Weighted):
    kind = "convolution"

    def __init__(self, layer: Any, dtype: np.dtype) -> None:
        p = layer.convolution
        super().__init__(layer, p, dtype)
        if p.isDeconvolution:
            raise ValueError(f"layer '{self.name}': deconvolution is not supported")
        self.p = p
        self.cout = int(p.outputChannels)
        self.cg = int(p.kernelChannels)
        self.groups = max(1, int(p.nGroups))
        self.k = _pair(p.kernelSize, 3)
        self.s = _pair(p.stride, 1)
        self.d = _pair(p.dilationFactor, 1)
        if self.cout % self.groups:
            raise ValueError(f"layer '{self.name}': {self.cout} output channels do not split "
                             f"into {self.groups} groups")
        self.k_eff = ((self.k[0] - 1) * self.d[0] + 1, (self.k[1] - 1) * self.d[1] + 1)
        self._load_params((self.cout, self.cg, *self.k), self.cout)

    def _infer(self, shape: Shape) -> Shape:
        c, h, w = shape
        if c != self.cg * self.groups:
            raise ValueError(f"layer '{self.name}': input has {c} channels but kernelChannels "
                             f"{self.cg} x nGroups {self.groups} = {self.cg * self.groups}")
        self.hw_out, self.pads = _spatial(self.name, self.p, "ConvolutionPaddingType", (h, w),
                                          self.k_eff, self.s)
        return self.cout, *self.hw_out

    def _wg(self) -> np.ndarray:
        return self.W.reshape(self.groups, self.cout // self.groups, -1)

    def forward(self, x: np.ndarray, keep: bool) -> np.ndarray:
        y, cols = _correlate(_pad(x, self.pads, 0.0), self._wg(), self.groups, self.k, self.s,
                             self.d, self.hw_out)
        if self.b is not None:
            y += self.b[:, None, None]
        self._cols = cols if keep else None
        return y

    def backward(self, dy: np.ndarray, need_dx: bool) -> np.ndarray | None:
        n = dy.shape[0]
        g, cog = self.groups, self.cout // self.groups
        # (G, Cout/G, M): free when dy kept the (C, N, H, W) memory order of the forward pass
        dyg = dy.transpose(1, 0, 2, 3).reshape(g, cog, -1)
        if self.updatable:
            self.dW = np.matmul(dyg, self._cols.transpose(0, 2, 1)).reshape(self.w_shape)
            self.db = dyg.sum(axis=2).reshape(-1) if self.b is not None else None
        if not need_dx:
            return None
        # dx = stride-1 correlation of the stride-up-sampled, padded dy with the flipped
        # kernel, channels swapped per group: the transposed convolution, still im2col.
        (h, w), (ho, wo) = self.in_shape[1:], self.hw_out
        (keh, kew), (sh, sw) = self.k_eff, self.s
        pt, pb, pl, pr = self.pads
        big = np.zeros((n, self.cout, h + pt + pb + keh - 1, w + pl + pr + kew - 1), dy.dtype)
        big[:, :, keh - 1:keh - 1 + (ho - 1) * sh + 1:sh,
            kew - 1:kew - 1 + (wo - 1) * sw + 1:sw] = dy
        region = big[:, :, pt:pt + h + keh - 1, pl:pl + w + kew - 1]
        wt = self.W.reshape(g, cog, self.cg, *self.k)[:, :, :, ::-1, ::-1]
        wt = wt.transpose(0, 2, 1, 3, 4).reshape(g, self.cg, -1)
        return _correlate(region, wt, g, self.k, (1, 1), self.d, (h, w))[0]


class _InnerProduct(_Weighted):
    kind = "innerProduct"

    def __init__(self, layer: Any, dtype: np.dtype) -> None:
        p = layer.innerProduct
        super().__init__(layer, p, dtype)
        if p.int8DynamicQuantize:
            raise ValueError(f"layer '{self.name}': int8 dynamic quantisation is not supported")
        self.n_in, self.n_out = int(p.inputChannels), int(p.outputChannels)
        self._load_params((self.n_out, self.n_in), self.n_out)

    def _infer(self, shape: Shape) -> Shape:
        if math.prod(shape) != self.n_in:
            raise ValueError(f"layer '{self.name}': input {shape} has {math.prod(shape)} "
                             f"elements per sample, inputChannels is {self.n_in}")
        return self.n_out, 1, 1

    def forward(self, x: np.ndarray, keep: bool) -> np.ndarray:
        x2 = x.reshape(len(x), -1)  # implicit (C, H, W) flatten of a rank-5 input
        self._x = x2 if keep else None
        y = x2 @ self.W.T
        if self.b is not None:
            y += self.b
        return y[:, :, None, None]

    def backward(self, dy: np.ndarray, need_dx: bool) -> np.ndarray | None:
        dy2 = dy.reshape(len(dy), -1)
        if self.updatable:
            self.dW = dy2.T @ self._x
            self.db = dy2.sum(axis=0) if self.b is not None else None
        return (dy2 @ self.W).reshape(len(dy), *self.in_shape) if need_dx else None


class _Pool(_Layer):
    kind = "pooling"

    def __init__(self, layer: Any, dtype: np.dtype) -> None:
        super().__init__(layer, dtype)
        p = layer.pooling
        if p.type not in (0, 1):
            raise ValueError(f"layer '{self.name}': only MAX and AVERAGE pooling are supported")
        if p.WhichOneof("PoolingPaddingType") == "includeLastPixel":
            raise ValueError(f"layer '{self.name}': includeLastPixel padding is not supported")
        self.p = p
        self.is_max = p.type == 0
        self.exclude = bool(p.avgPoolExcludePadding)

    def _infer(self, shape: Shape) -> Shape:
        c, h, w = shape
        if self.p.globalPooling:
            self.k, self.s = (h, w), (1, 1)
            self.hw_out, self.pads = (1, 1), (0, 0, 0, 0)
        else:
            self.k, self.s = _pair(self.p.kernelSize, 3), _pair(self.p.stride, 1)
            self.hw_out, self.pads = _spatial(self.name, self.p, "PoolingPaddingType", (h, w),
                                              self.k, self.s)
        (ho, wo), (kh, kw), (sh, sw) = self.hw_out, self.k, self.s
        pt, pb, pl, pr = self.pads
        self.hp, self.wp = h + pt + pb, w + pl + pr
        rows = np.arange(ho)[:, None] * sh + np.arange(kh)[None, :]  # padded coordinates
        cols = np.arange(wo)[:, None] * sw + np.arange(kw)[None, :]
        if self.exclude:  # divisor: window cells inside the unpadded input (separable)
            rin = ((rows >= pt) & (rows < pt + h)).sum(1)
            cin = ((cols >= pl) & (cols < pl + w)).sum(1)
            div = np.maximum(np.outer(rin, cin), 1)
        else:
            div = np.full((ho, wo), kh * kw)
        self._inv_div = (1.0 / div).astype(self.dtype)
        # flat index of every window cell inside one padded (Hp, Wp) map: for the scatter
        self._pos = (rows[:, None, :, None] * self.wp + cols[None, :, None, :]).reshape(
            ho, wo, kh * kw)
        self._row0 = rows[:, :1] * self.wp  # (Ho, 1)
        self._col0 = cols[:, 0][None, :]  # (1, Wo)
        return c, ho, wo

    def forward(self, x: np.ndarray, keep: bool) -> np.ndarray:
        n, c = x.shape[:2]
        xp = _pad(x, self.pads, -np.inf if self.is_max else 0.0)
        win = _windows(xp, self.k, self.s, (1, 1), self.hw_out)
        # window cells first: reductions over a leading axis run along contiguous rows
        flat = win.transpose(4, 5, 0, 1, 2, 3).reshape(self.k[0] * self.k[1], n, c,
                                                         *self.hw_out)
        if not self.is_max:
            return flat.sum(axis=0) * self._inv_div
        y = flat.max(axis=0)
        if keep:  # the first arg-max, as Core ML is assumed to do (argmax(axis=0) is slower)
            cells = np.arange(len(flat), dtype=np.min_scalar_type(len(flat)))
            self._arg = np.where(flat == y, cells.reshape(-1, 1, 1, 1, 1), len(flat)).min(axis=0)
        return y

    def _scatter(self, idx: np.ndarray, vals: np.ndarray, n: int) -> np.ndarray:
        """Sum ``vals`` into a padded (N, C, Hp, Wp) map at flat ``idx``; crop the padding."""
        c, h, w = self.in_shape
        dxp = np.bincount(idx.ravel(), weights=vals.ravel(), minlength=n * c * self.hp * self.wp)
        pt, _, pl, _ = self.pads
        dxp = dxp.reshape(n, c, self.hp, self.wp)[:, :, pt:pt + h, pl:pl + w]
        return dxp.astype(self.dtype)

    def backward(self, dy: np.ndarray, need_dx: bool) -> np.ndarray | None:
        if not need_dx:
            return None
        n, c = dy.shape[:2]
        off = (np.arange(n * c) * (self.hp * self.wp)).reshape(n, c, 1, 1)
        if self.is_max:
            ai, aj = np.divmod(self._arg, self.k[1])
            idx = off + self._row0 + self._col0 + ai * self.wp + aj
            return self._scatter(idx, dy, n)
        g = dy * self._inv_div
        idx = off[..., None] + self._pos
        return self._scatter(idx, np.broadcast_to(g[..., None], idx.shape), n)


class _Flatten(_Layer):
    kind = "flatten"

    def __init__(self, layer: Any, dtype: np.dtype) -> None:
        super().__init__(layer, dtype)
        self.channel_last = layer.flatten.mode == 1

    def _infer(self, shape: Shape) -> Shape:
        return math.prod(shape), 1, 1

    def forward(self, x: np.ndarray, keep: bool) -> np.ndarray:
        if self.channel_last:
            x = x.transpose(0, 2, 3, 1)
        return x.reshape(len(x), -1, 1, 1)

    def backward(self, dy: np.ndarray, need_dx: bool) -> np.ndarray | None:
        if not need_dx:
            return None
        c, h, w = self.in_shape
        if self.channel_last:
            return dy.reshape(len(dy), h, w, c).transpose(0, 3, 1, 2)
        return dy.reshape(len(dy), c, h, w)


class _Activation(_Layer):
    kind = "activation"
    KNOWN = ("ReLU", "sigmoid", "tanh", "linear", "leakyReLU")

    def __init__(self, layer: Any, dtype: np.dtype) -> None:
        super().__init__(layer, dtype)
        a = layer.activation
        self.fn = a.WhichOneof("NonlinearityType")
        if self.fn not in self.KNOWN:
            raise ValueError(f"layer '{self.name}': activation '{self.fn}' is not supported "
                             f"(supported: {', '.join(self.KNOWN)})")
        # Core ML backpropagates through ReLU, sigmoid and tanh only (COREML_TRAINING.md)
        self.backprop = self.fn in ("ReLU", "sigmoid", "tanh")
        self.kind = f"activation {self.fn}"
        self.alpha = float(a.linear.alpha if self.fn == "linear" else a.leakyReLU.alpha)
        self.beta = float(a.linear.beta)

    def forward(self, x: np.ndarray, keep: bool) -> np.ndarray:
        fn = self.fn
        if fn == "ReLU":
            y = np.maximum(x, 0)
        elif fn == "sigmoid":
            y = 0.5 * (np.tanh(0.5 * x) + 1)  # overflow-free logistic
        elif fn == "tanh":
            y = np.tanh(x)
        elif fn == "linear":
            y = (self.alpha * x + self.beta).astype(x.dtype)
        else:
            y = np.where(x >= 0, x, self.alpha * x).astype(x.dtype)
        self._y = y if keep else None
        return y

    def backward(self, dy: np.ndarray, need_dx: bool) -> np.ndarray | None:
        if not need_dx:
            return None
        y = self._y
        if self.fn == "ReLU":
            return dy * (y > 0)  # derivative 0 at 0
        if self.fn == "sigmoid":
            return dy * (y * (1 - y))
        if self.fn == "tanh":
            return dy * (1 - y * y)
        raise ValueError(f"layer '{self.name}' ({self.kind}) blocks gradients in Core ML")


class _Softmax(_Layer):
    """Legacy softmax over C; its gradient exists only fused with cross-entropy."""

    kind = "softmax"
    backprop = False

    def forward(self, x: np.ndarray, keep: bool) -> np.ndarray:
        z = np.exp(x - x.max(axis=1, keepdims=True))
        return z / z.sum(axis=1, keepdims=True)

    def backward(self, dy: np.ndarray, need_dx: bool) -> np.ndarray | None:
        raise ValueError(f"layer '{self.name}': softmax passes gradients only fused into a "
                         "categorical cross-entropy loss")


_LAYERS: dict[str, type[_Layer]] = {
    "convolution": _Conv, "innerProduct": _InnerProduct, "pooling": _Pool,
    "flatten": _Flatten, "activation": _Activation, "softmax": _Softmax,
}


# -- the executor ----------------------------------------------------------------------------
class CoreMLExecutor:
    """Runs and trains one Core ML neural-network spec the way an iPhone update task does.

    ``x`` is in Core ML layout: (N, C, H, W) for a (C, H, W) input, (N, D) for a (D,) one.
    CCE targets are 0-based class indices; MSE targets match the output's shape.
    ``dtype=np.float64`` is for gradient checks; ``adam_epsilon`` and ``mse_reduction``
    select the undocumented variants (see module docstring).
    """

    def __init__(self, spec: Any, dtype: Any = np.float32, adam_epsilon: str = "hat",
                 mse_reduction: str = "mean") -> None:
        if adam_epsilon not in ADAM_EPSILON_MODES:
            raise ValueError(f"adam_epsilon must be one of {ADAM_EPSILON_MODES}, "
                             f"got {adam_epsilon!r}")
        if mse_reduction not in MSE_REDUCTIONS:
            raise ValueError(f"mse_reduction must be one of {MSE_REDUCTIONS}, "
                             f"got {mse_reduction!r}")
        self.spec = spec
        self.dtype = np.dtype(dtype)
        self.adam_epsilon = adam_epsilon
        self.mse_reduction = mse_reduction
        self.nn_kind = spec.WhichOneof("Type")
        if self.nn_kind not in _NN_KINDS:
            raise ValueError(f"spec holds a '{self.nn_kind}' model; the executor runs neural "
                             f"networks only ({', '.join(_NN_KINDS)})")
        self.nn = getattr(spec, self.nn_kind)
        self.layers: list[_Layer] = []
        for i, lay in enumerate(self.nn.layers):
            kind = lay.WhichOneof("layer")
            cls = _LAYERS.get(kind or "")
            if cls is None:
                raise ValueError(f"layer '{lay.name}' (#{i}) has type '{kind}', which the Core "
                                 f"ML executor does not support (supported: "
                                 f"{', '.join(_LAYERS)})")
            self.layers.append(cls(lay, self.dtype))
        if not self.layers:
            raise ValueError("the spec has no layers")
        self._proto_index = {lay.name: i for i, lay in enumerate(self.nn.layers)}
        self._infer_shapes()
        self.weighted = [lay for lay in self.layers if isinstance(lay, _Weighted)]
        self.trainable = [(lay, what) for lay in self.weighted if lay.updatable
                          for what in (("weights", "bias") if lay.has_bias else ("weights",))]
        self._keep: set[int] = set()
        self._defaults: dict[str, Any] | None = None
        self.has_update = self.nn.HasField("updateParams") and len(
            self.nn.updateParams.lossLayers) > 0
        if self.has_update:
            self._plan_training()
        self.reset_optimizer()

    # -- structure --------------------------------------------------------------------------
    def _infer_shapes(self) -> None:
        desc = self.spec.description
        if not desc.input:
            raise ValueError("the spec declares no input")
        inp = desc.input[0]
        if inp.type.WhichOneof("Type") != "multiArrayType":
            raise ValueError(f"input '{inp.name}' is not a MultiArray (image inputs are not "
                             "supported)")
        dims = tuple(int(d) for d in inp.type.multiArrayType.shape)
        if len(dims) == 1:
            shape: Shape = (dims[0], 1, 1)
        elif len(dims) == 3:
            shape = dims  # type: ignore[assignment]
        else:
            raise ValueError(f"input '{inp.name}' has shape {list(dims)}; the executor needs a "
                             "fixed (C, H, W) or (D,) shape")
        self.input_name, self.input_dims = inp.name, dims
        self.input_shape: Shape = shape
        shapes: dict[str, Shape] = {inp.name: shape}
        for lay in self.layers:
            if lay.inp not in shapes:
                raise ValueError(f"layer '{lay.name}' reads blob '{lay.inp}', which no earlier "
                                 "layer or input produces")
            shapes[lay.out] = lay.infer(shapes[lay.inp])
        self.blob_shapes = shapes
        out_name = None
        for o in desc.output:
            if o.name in shapes and o.name != inp.name:
                out_name = o.name
                break
        if out_name is None:  # e.g. a classifier whose outputs are label + dictionary
            probs = getattr(desc, "predictedProbabilitiesName", "")
            out_name = probs if probs in shapes else self.layers[-1].out
        self.output_name = out_name
        self.output_shape = shapes[out_name]

    def _plan_training(self) -> None:
        """Mirror Core ML's updatable-model validation and decide who runs backward."""
        up = self.nn.updateParams
        loss = up.lossLayers[0]
        if len(up.lossLayers) > 1:
            raise ValueError("the spec has several loss layers; Core ML supports exactly one")
        self.loss_kind = loss.WhichOneof("LossLayerType")
        if self.loss_kind == "categoricalCrossEntropyLossLayer":
            src = loss.categoricalCrossEntropyLossLayer.input
            producer = next((lay for lay in self.layers if lay.out == src), None)
            if not isinstance(producer, _Softmax):
                raise ValueError(f"loss layer '{loss.name}': categorical cross-entropy input "
                                 f"'{src}' is not the output of a (legacy) softmax layer")
            self.loss_blob, self.grad_blob = src, producer.inp
        elif self.loss_kind == "meanSquaredErrorLossLayer":
            src = loss.meanSquaredErrorLossLayer.input
            if not any(lay.out == src for lay in self.layers):
                raise ValueError(f"loss layer '{loss.name}': MSE input '{src}' is not "
                                 "produced inside the graph")
            self.loss_blob = self.grad_blob = src
        else:
            raise ValueError(f"loss layer '{loss.name}' has unsupported type {self.loss_kind}")
        if self.loss_kind == "categoricalCrossEntropyLossLayer" and self.blob_shapes[
                self.loss_blob][1:] != (1, 1):
            raise ValueError(f"loss layer '{loss.name}': input '{self.loss_blob}' has shape "
                             f"{self.blob_shapes[self.loss_blob]}, expected (classes, 1, 1)")
        if not self.trainable:
            raise ValueError("the model has update parameters but no updatable layer")
        # updatable layers at or above each blob
        upd: dict[str, bool] = {self.input_name: False}
        for lay in self.layers:
            upd[lay.out] = lay.updatable or upd.get(lay.inp, False)
        # blobs the loss gradient reaches, walking back from where it enters the graph
        needed = {self.grad_blob}
        self._bwd: list[tuple[_Layer, bool]] = []
        for lay in reversed(self.layers):
            if lay.out not in needed:
                continue
            if self.loss_kind == "categoricalCrossEntropyLossLayer" and lay.out == (
                    self.loss_blob) and isinstance(lay, _Softmax):
                continue  # fused with the loss
            need_dx = upd.get(lay.inp, False)
            if not lay.backprop and need_dx:
                raise ValueError(f"layer '{lay.name}' ({lay.kind}) does not support "
                                 "backpropagation, yet updatable layers lie between it and "
                                 "the input; Core ML rejects this model (freeze the layers "
                                 "before it)")
            if need_dx:
                needed.add(lay.inp)
            if need_dx or lay.updatable:
                self._bwd.append((lay, need_dx))
        self._keep = {id(lay) for lay, _ in self._bwd}
        # updatable layers off the loss path get zero gradients (the loss does not see them)
        self._idle = [lay for lay in self.weighted if lay.updatable and id(lay) not in self._keep]

    # -- inference --------------------------------------------------------------------------
    def _as_input(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=self.dtype)
        if len(self.input_dims) == 1 and x.ndim == 2:
            x = x.reshape(len(x), -1, 1, 1)
        if x.shape[1:] != self.input_shape:
            want = ", ".join(map(str, self.input_dims))
            raise ValueError(f"x must have shape (N, {want}) in Core ML layout, got {x.shape}")
        return x

    def _run(self, x: np.ndarray, keep: bool) -> dict[str, np.ndarray]:
        blobs = {self.input_name: x}
        for lay in self.layers:
            blobs[lay.out] = lay.forward(blobs[lay.inp], keep and id(lay) in self._keep)
        return blobs

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Model output for Core ML-layout ``x``: (N, out) for a flat output."""
        x = self._as_input(x)
        y = self._run(x, keep=False)[self.output_name]
        return np.ascontiguousarray(y.reshape(len(x), *self._out_dims()))

    def _out_dims(self) -> tuple[int, ...]:
        c, h, w = self.output_shape
        return (c,) if h == w == 1 else (c, h, w)

    # -- training ---------------------------------------------------------------------------
    def _require_training(self) -> None:
        if not self.has_update:
            raise ValueError("the spec has no update parameters (not an updatable model)")

    def loss_and_grads(self, x: np.ndarray, target: np.ndarray
                       ) -> tuple[float, list[np.ndarray | None]]:
        """Batch-mean loss and its gradients, aligned with ``get_weights`` (None = frozen)."""
        self._require_training()
        x = self._as_input(x)
        n = len(x)
        if n == 0:
            raise ValueError("empty batch")
        blobs = self._run(x, keep=True)
        out = blobs[self.loss_blob].reshape(n, -1)
        if self.loss_kind == "categoricalCrossEntropyLossLayer":
            t = np.asarray(target).reshape(-1)
            if len(t) != n:
                raise ValueError(f"got {len(t)} targets for {n} samples")
            if not np.all(np.mod(t, 1) == 0) or t.min() < 0 or t.max() >= out.shape[1]:
                raise ValueError(f"CCE targets must be class indices in [0, {out.shape[1]})")
            t = t.astype(np.int64)
            rows = np.arange(n)
            picked = np.clip(out[rows, t].astype(np.float64), CCE_EPSILON, 1 - CCE_EPSILON)
            loss = float(-np.mean(np.log(picked)))
            g = out.copy()
            g[rows, t] -= 1
            g *= 1.0 / n
        else:
            t = np.asarray(target, dtype=self.dtype)
            if t.size != out.size:
                raise ValueError(f"MSE targets have {t.size} values, expected {out.size} "
                                 f"(shape {out.shape})")
            diff = out - t.reshape(out.shape)
            per = 1 if self.mse_reduction == "sum" else out.shape[1]
            loss = float(np.sum(np.square(diff, dtype=np.float64)) / (n * per))
            g = diff * (2.0 / (n * per))
        for lay in self._idle:
            lay.dW = np.zeros_like(lay.W)
            lay.db = None if lay.b is None else np.zeros_like(lay.b)
        grads = {self.grad_blob: g.astype(self.dtype, copy=False).reshape(
            n, *self.blob_shapes[self.grad_blob])}
        for lay, need_dx in self._bwd:
            dy = grads.pop(lay.out, None)
            if dy is None:
                continue
            dx = lay.backward(dy, need_dx)
            if dx is not None:
                prev = grads.get(lay.inp)
                grads[lay.inp] = dx if prev is None else prev + dx
        result: list[np.ndarray | None] = []
        for lay in self.weighted:
            result.append(lay.dW if lay.updatable else None)
            if lay.has_bias:
                result.append(lay.db if lay.updatable else None)
        return loss, result

    def reset_optimizer(self) -> None:
        """Zero the optimiser state: every Core ML update task starts from scratch."""
        self._t = 0
        self._m = [None] * len(self.trainable)
        self._v = [None] * len(self.trainable)

    def step(self, x: np.ndarray, target: np.ndarray,
             hyper: dict[str, Any] | None = None) -> float:
        """One optimiser step on one mini-batch; returns its loss before the update."""
        hp = hyper or self.hyperparameters()
        loss, _ = self.loss_and_grads(x, target)
        self._t += 1
        t, lr = self._t, float(hp["learning_rate"])
        adam = hp["optimizer"] == "adam"
        if adam:
            b1, b2, eps = float(hp["beta1"]), float(hp["beta2"]), float(hp["eps"])
            c1, c2 = 1 - b1 ** t, 1 - b2 ** t
            alpha = lr * math.sqrt(c2) / c1
        for i, (lay, what) in enumerate(self.trainable):
            w = lay.W if what == "weights" else lay.b
            g = lay.dW if what == "weights" else lay.db
            if adam:
                if self._m[i] is None:
                    self._m[i], self._v[i] = np.zeros_like(w), np.zeros_like(w)
                m, v = self._m[i], self._v[i]
                m *= b1
                m += (1 - b1) * g
                v *= b2
                v += (1 - b2) * np.square(g)
                if self.adam_epsilon == "hat":  # Keras/TF: eps added to sqrt(v), not sqrt(v̂)
                    w -= alpha * m / (np.sqrt(v) + eps)
                else:  # Kingma & Ba, Algorithm 1
                    w -= lr * (m / c1) / (np.sqrt(v / c2) + eps)
            else:
                mu = float(hp.get("momentum", 0.0))
                if mu:
                    if self._m[i] is None:
                        self._m[i] = np.zeros_like(w)
                    vel = self._m[i]
                    vel *= mu
                    vel += g
                    w -= lr * vel
                else:
                    w -= lr * g
        return loss

    # -- update parameters -------------------------------------------------------------------
    def _opt_fields(self) -> tuple[str, Any, dict[str, str]]:
        self._require_training()
        opt = self.nn.updateParams.optimizer
        kind = opt.WhichOneof("OptimizerType")
        if kind == "sgdOptimizer":
            return "sgd", opt.sgdOptimizer, {"learning_rate": "learningRate",
                                             "mini_batch_size": "miniBatchSize",
                                             "momentum": "momentum"}
        if kind == "adamOptimizer":
            return "adam", opt.adamOptimizer, {"learning_rate": "learningRate",
                                               "mini_batch_size": "miniBatchSize",
                                               "beta1": "beta1", "beta2": "beta2",
                                               "eps": "eps"}
        raise ValueError(f"unsupported optimizer '{kind}'")

    def _fields(self) -> tuple[str, dict[str, Any]]:
        """Optimiser name and {override key: proto parameter message (or None if absent)}."""
        name, opt, keys = self._opt_fields()
        up = self.nn.updateParams
        fields: dict[str, Any] = {k: (getattr(opt, f) if opt.HasField(f) else None)
                                  for k, f in keys.items()}
        fields["epochs"] = up.epochs if up.HasField("epochs") else None
        fields["shuffle"] = up.shuffle if up.HasField("shuffle") else None
        fields["seed"] = up.seed if up.HasField("seed") else None
        return name, fields

    def hyperparameters(self, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
        """The model's defaults, replaced by ``overrides`` that lie in the allowed range/set.

        Like ``MLModelConfiguration.parameters``: an out-of-range value raises, as Core ML
        throws.
        """
        name, fields = self._fields()
        if self._defaults is None:
            hp: dict[str, Any] = {"optimizer": name}
            for key, msg in fields.items():
                if msg is not None:
                    hp[key] = msg.defaultValue
            if name == "sgd":
                hp.setdefault("momentum", 0.0)
            if "epochs" not in hp:
                raise ValueError("the spec's update parameters have no epochs (Core ML "
                                 "requires them)")
            hp.setdefault("shuffle", False)
            hp.setdefault("seed", None)
            self._defaults = hp
        hp = dict(self._defaults)
        for key, value in (overrides or {}).items():
            if value is None:
                continue
            if key not in OVERRIDE_KEYS:
                raise ValueError(f"unknown update parameter {key!r}; use one of "
                                 f"{', '.join(OVERRIDE_KEYS)}")
            if key not in fields or (fields[key] is None and key not in ("shuffle", "seed")):
                raise ValueError(f"update parameter {key!r} does not exist in this model's "
                                 f"{name} optimizer")
            hp[key] = self._check_allowed(key, value, fields[key])
        return hp

    @staticmethod
    def _check_allowed(key: str, value: Any, msg: Any) -> Any:
        if key == "shuffle":
            if not isinstance(value, bool | np.bool_):
                raise ValueError(f"shuffle must be a bool, got {value!r}")
            return bool(value)
        if key in ("mini_batch_size", "epochs", "seed"):
            if isinstance(value, bool) or not float(value).is_integer():
                raise ValueError(f"{key} must be an integer, got {value!r}")
            value = int(value)
            if key != "seed" and value < 1:
                raise ValueError(f"{key} must be >= 1, got {value}")
        else:
            value = float(value)
            if not math.isfinite(value):
                raise ValueError(f"{key} must be finite, got {value}")
        if msg is None:
            return value
        which = msg.WhichOneof("AllowedValues")
        if which == "range" and not msg.range.minValue <= value <= msg.range.maxValue:
            raise ValueError(f"{key}={value} is outside the model's allowed range "
                             f"[{msg.range.minValue}, {msg.range.maxValue}] (Core ML throws)")
        if which == "set" and value not in set(msg.set.values):
            raise ValueError(f"{key}={value} is not in the model's allowed set "
                             f"{{{_runs(msg.set.values)}}} (Core ML throws)")
        return value

    def update(self, x: np.ndarray, target: np.ndarray, epochs: int | None = None,
               batch_size: int | None = None, shuffle: bool | None = None,
               seed: int | None = None, overrides: dict[str, Any] | None = None
               ) -> list[float]:
        """One update task (MLUpdateTask): per-epoch, sample-weighted mean batch losses."""
        ov = dict(overrides or {})
        for key, value in (("epochs", epochs), ("mini_batch_size", batch_size),
                           ("shuffle", shuffle), ("seed", seed)):
            if value is not None:
                ov[key] = value
        hp = self.hyperparameters(ov)
        x = self._as_input(x)
        target = np.asarray(target)
        if len(target) != len(x):
            raise ValueError(f"x has {len(x)} samples but the target has {len(target)}")
        if len(x) == 0:
            raise ValueError("update() got no samples")
        rng = np.random.default_rng(hp["seed"])
        self.reset_optimizer()
        losses = []
        for _ in range(int(hp["epochs"])):
            total = 0.0
            for idx in epoch_batches(len(x), int(hp["mini_batch_size"]), bool(hp["shuffle"]),
                                     rng):
                total += self.step(x[idx], target[idx], hp) * len(idx)
            losses.append(total / len(x))
        return losses

    # -- weights ------------------------------------------------------------------------------
    def weight_keys(self) -> list[tuple[str, str, tuple[int, ...]]]:
        """(layer name, "weights"|"bias", Core ML shape) in proto order: what a phone sends."""
        keys = []
        for lay in self.weighted:
            keys.append((lay.name, "weights", tuple(lay.w_shape)))
            if lay.has_bias:
                keys.append((lay.name, "bias", (int(lay.w_shape[0]),)))
        return keys

    def get_weights(self) -> list[np.ndarray]:
        out = []
        for lay in self.weighted:
            out.append(lay.W.astype(np.float32, copy=True))
            if lay.b is not None:
                out.append(lay.b.astype(np.float32, copy=True))
        return out

    def set_weights(self, arrays: Sequence[np.ndarray]) -> None:
        """Load weights in proto order; flat arrays are accepted (as on the wire)."""
        keys = self.weight_keys()
        if len(arrays) != len(keys):
            raise ValueError(f"expected {len(keys)} weight tensors "
                             f"({', '.join(f'{n} {w}' for n, w, _ in keys)}), got {len(arrays)}")
        new = [self._check_array(a, *k) for a, k in zip(arrays, keys, strict=True)]
        it = iter(new)
        for lay in self.weighted:
            lay.W = next(it)
            if lay.has_bias:
                lay.b = next(it)

    def _check_array(self, arr: Any, name: str, what: str, shape: tuple[int, ...]
                     ) -> np.ndarray:
        a = np.asarray(arr, dtype=self.dtype)
        size = math.prod(shape)
        if a.size != size:
            raise ValueError(f"layer '{name}' {what}: got {a.size} values, expected {size} "
                             f"(shape {list(shape)})")
        if a.ndim > 1 and a.shape != shape:
            raise ValueError(f"layer '{name}' {what}: got shape {list(a.shape)}, expected "
                             f"{list(shape)} (or a flat array of {size})")
        return a.reshape(shape).copy()

    def to_spec(self) -> Any:
        """A copy of the spec holding the current weights (what FedKit's client writes)."""
        spec = type(self.spec)()
        spec.CopyFrom(self.spec)
        layers = getattr(spec, self.nn_kind).layers
        for lay in self.weighted:
            proto = layers[self._proto_index[lay.name]]
            lay.write(proto.convolution if isinstance(lay, _Conv) else proto.innerProduct)
        return spec


# -- the iOS runtime ---------------------------------------------------------------------------
def _load_spec(path: pathlib.Path) -> Any:
    """Parse the protobuf without importing coremltools (and with it TensorFlow)."""
    from xflwb.bridge.coreml_proto import load_spec

    return load_spec(path)


class IOSRuntime(Runtime):
    """A virtual iPhone: the exported ``.mlmodel`` run by ``CoreMLExecutor``.

    Parameters travel as Core ML tensors in ``coreml_layers`` order (FedKit's iOS client);
    ``predict``/``fit`` take Keras-layout data and transpose it, as the app does.
    """

    platform = "ios"

    def __init__(self, manifest: dict[str, Any], path: pathlib.Path,
                 adam_epsilon: str = "hat") -> None:
        super().__init__(manifest)
        self.path = pathlib.Path(path)
        self.executor = CoreMLExecutor(_load_spec(self.path), adam_epsilon=adam_epsilon)
        ex = self.executor
        shape = self.input_shape  # Keras layout: (H, W, C) is (C, H, W) in Core ML
        want = (shape[2], shape[0], shape[1]) if len(shape) == 3 else shape
        if tuple(ex.input_dims) != tuple(want):
            raise ValueError(f"{self.path.name}: Core ML input {list(ex.input_dims)} does not "
                             f"match the manifest's input {list(shape)}")
        shapes = ex.weight_keys()
        index = {(name, what): i for i, (name, what, _) in enumerate(shapes)}
        self.entries = manifest["platforms"]["ios"]["coreml_layers"]
        self._order: list[int] = []
        for e in self.entries:
            i = index.get((e["name"], e["type"]))
            if i is None:
                raise ValueError(f"{self.path.name} has no {e['type']} for layer "
                                 f"'{e['name']}' listed in the manifest")
            if tuple(e["shape"]) != shapes[i][2]:
                raise ValueError(f"layer '{e['name']}' {e['type']}: manifest shape "
                                 f"{e['shape']} but the model holds {list(shapes[i][2])}")
            self._order.append(i)

    def get_parameters(self) -> list[np.ndarray]:
        weights = self.executor.get_weights()
        return [weights[i] for i in self._order]

    def set_parameters(self, arrays: Sequence[np.ndarray]) -> None:
        if len(arrays) != len(self._order):
            raise ValueError(f"expected {len(self._order)} iOS tensors "
                             f"({', '.join(e['name'] + ' ' + e['type'] for e in self.entries)})"
                             f", got {len(arrays)}")
        current = self.executor.get_weights()
        for i, arr in zip(self._order, arrays, strict=True):
            current[i] = arr
        self.executor.set_weights(current)

    def _to_coreml(self, x: np.ndarray) -> np.ndarray:
        return x.transpose(0, 3, 1, 2) if x.ndim == 4 else x

    def predict(self, x: np.ndarray) -> np.ndarray:
        x = self._check_x(x)
        out = self.executor.forward(self._to_coreml(x))
        return out.reshape(len(x), -1).astype(np.float32, copy=False)

    def _begin_task(self) -> None:
        self.executor.reset_optimizer()

    def _train_step(self, x: np.ndarray, y: np.ndarray) -> float:
        return self.executor.step(self._to_coreml(x), y)

    def update(self, x: np.ndarray, y: np.ndarray, epochs: int | None = None,
               batch_size: int | None = None, shuffle: bool | None = None,
               seed: int | None = None, overrides: dict[str, Any] | None = None
               ) -> list[float]:
        """An update task with Core ML-style overrides, validated against the model."""
        x, y = self._check_xy(x, y)
        return self.executor.update(self._to_coreml(x), y, epochs=epochs,
                                    batch_size=batch_size, shuffle=shuffle, seed=seed,
                                    overrides=overrides)

    def to_spec(self) -> Any:
        return self.executor.to_spec()
