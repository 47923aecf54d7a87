"""Build an updatable Core ML neural network from a ``ModelGraph``, layer by layer, as a DAG.

``ct.convert`` is not used: it cannot read Keras 3 models and its TF path emits
batchedMatmul/softmaxND/transpose layers that Core ML cannot train. The network keeps the
legacy rank-5 mapping (layers of specification 4+ such as ``clip``, ``erf`` or ``gelu`` are
invalid there), so a Keras layer Core ML lacks is composed from legacy layers it has, each
composition commented where it is emitted.

Tensor layout: a Keras tensor of per-sample shape (D,) is Core ML (D, 1, 1); (T, F) is
(F, 1, T) (time along the width, so Conv1D is a 1×k convolution); (H, W, C) is (C, H, W).

What iOS trains is decided here, after the network is built, by Core ML's own rule
(``coreml_rules``): a convolution / innerProduct layer holding canonical parameters trains
when the loss reaches it through back-propagating layers only. Everything else is baked.
"""

from __future__ import annotations

import contextlib
import io
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from xflwb.bridge import coreml_rules
from xflwb.bridge.graph import INPUT, ExportError, ModelGraph, Node, activation_name
from xflwb.bridge.optim import SGD, Adam, Optimizer

INPUT_NAME = "x"
OUTPUT_NAME = "output"
LOSS_NAME = "loss"
TARGET_NAME = OUTPUT_NAME + "_true"
#: epochs and mini-batch sizes a session may ask a phone for: Core ML throws on any
#: runtime override outside the model's allowed set (COREML_TRAINING.md).
ALLOWED_EPOCHS = tuple(range(1, 101))
ALLOWED_BATCH_SIZES = tuple(range(1, 257))
IOS_TRAINING = ("auto", "strict")

# Abramowitz & Stegun 7.1.26: erfc(z) ≈ t·(a1 + t·(a2 + … + t·a5))·exp(-z²), t = 1/(1+p·z),
# |error| ≤ 1.5e-7 for z ≥ 0 — how GELU's erf is built from legacy layers.
_AS_P = 0.3275911
_AS_A = (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429)


class Refused(Exception):
    """A layer iOS cannot run; carries the reason and the fix."""


@dataclass
class CoreMLBuild:
    spec: Any
    coreml_layers: list[dict[str, Any]] = field(default_factory=list)
    io: dict[str, Any] = field(default_factory=dict)
    plan: dict[str, tuple[str, str]] = field(default_factory=dict)  # node → (status, why)
    trained: list[int] = field(default_factory=list)  # canonical indices iOS trains


def coreml_shape(shape: tuple[int, ...]) -> tuple[int, int, int]:
    """Core ML (C, H, W) of a Keras per-sample shape."""
    if len(shape) == 1:
        return int(shape[0]), 1, 1
    if len(shape) == 2:
        return int(shape[1]), 1, int(shape[0])
    if len(shape) == 3:
        return int(shape[2]), int(shape[0]), int(shape[1])
    raise Refused(f"has a rank-{len(shape)} tensor {shape}; iOS supports ranks 1 to 3")


def input_dims(shape: tuple[int, ...]) -> list[int]:
    """The declared Core ML input shape for a Keras input shape."""
    return [int(shape[0])] if len(shape) == 1 else list(coreml_shape(shape))


def _quiet_import():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import logging

        logging.getLogger("coremltools").setLevel(logging.ERROR)
        import coremltools  # noqa: F401
        from coremltools.models import datatypes
        from coremltools.models.neural_network import (
            AdamParams,
            NeuralNetworkBuilder,
            SgdParams,
        )
    return datatypes, NeuralNetworkBuilder, SgdParams, AdamParams


@dataclass
class _Tensor:
    """A weight tensor of an emitted conv/innerProduct layer and where it comes from."""

    layer: str
    kind: str  # weights | bias
    canonical: int | None
    layout: str
    shape: list[int]


class _Emitter:
    """Emits the Core ML layers of one graph, tracking blob names and weight tensors."""

    def __init__(self, builder: Any, graph: ModelGraph) -> None:
        self.b = builder
        self.graph = graph
        self.blob: dict[str, str] = {INPUT: INPUT_NAME}
        self.tensors: list[_Tensor] = []
        self.owner: dict[str, str] = {}  # Core ML layer → graph node
        self.node: Node | None = None
        self.node_names = {n.name for n in graph.nodes}

    # -- helpers ---------------------------------------------------------------------------
    def weights(self, n: Node) -> dict[str, np.ndarray]:
        return {w.name: np.asarray(w.numpy(), np.float32) for w in n.layer.weights}

    def canon(self, n: Node, role: str) -> int | None:
        for i in n.params:
            if self.graph.parameters[i]["role"] == role:
                return i
        return None

    def track(self, layer: str, n: Node) -> None:
        self.owner[layer] = n.name

    def add_tensors(self, layer: str, n: Node, kernel_role: str, layout: str,
                    w_shape: list[int], bias_role: str | None, n_out: int) -> None:
        self.tensors.append(_Tensor(layer, "weights", self.canon(n, kernel_role), layout,
                                    w_shape))
        if bias_role is not None:
            self.tensors.append(_Tensor(layer, "bias", self.canon(n, bias_role), "identity",
                                        [n_out]))

    def act(self, name: str, act: str, src: str, channels: int) -> str:
        """Emit activation ``act`` on blob ``src``; returns the output blob."""
        b = self.b
        if act == "linear":
            return src
        simple = {"relu": ("RELU", None), "sigmoid": ("SIGMOID", None),
                  "tanh": ("TANH", None), "elu": ("ELU", 1.0),
                  "leaky_relu": ("LEAKYRELU", [0.2])}
        if act in simple:
            kind, param = simple[act]
            b.add_activation(name, kind, src, name, params=param)
        elif act == "softmax":
            b.add_softmax(name, src, name)
        elif act == "relu6":
            # no clip in rank-5 networks: relu6(x) = 6·hardSigmoid(x/6) (sigmoidHard clips
            # alpha·x+beta to [0, 1])
            b.add_activation(f"{name}__clip", "SIGMOID_HARD", src, f"{name}__clip",
                             params=[1.0 / 6.0, 0.0])
            b.add_activation(name, "LINEAR", f"{name}__clip", name, params=[6.0, 0.0])
        elif act == "hard_sigmoid":  # Keras 3: relu6(x + 3) / 6 = clip(x/6 + 1/2, 0, 1)
            b.add_activation(name, "SIGMOID_HARD", src, name, params=[1.0 / 6.0, 0.5])
        elif act in ("silu", "hard_silu"):  # x · sigmoid(x), x · hard_sigmoid(x)
            gate = f"{name}__gate"
            if act == "silu":
                b.add_activation(gate, "SIGMOID", src, gate)
            else:
                b.add_activation(gate, "SIGMOID_HARD", src, gate, params=[1.0 / 6.0, 0.5])
            b.add_elementwise(name, [src, gate], name, "MULTIPLY")
        elif act == "gelu":
            self.gelu(name, src)
        else:  # graph._refuse_unsupported lets only known activations through
            raise Refused(f"uses activation '{act}', which has no Core ML form")
        return name

    def gelu(self, name: str, src: str) -> None:
        """Exact GELU, x·Φ(x) = ½x + ½|x|·(1 - erfc(|x|/√2)), from legacy layers.

        Core ML's ``gelu``/``erf`` layers exist only in ND (spec 4+) networks, which cannot
        train; erfc comes from Abramowitz & Stegun 7.1.26 (error ≤ 1.5e-7), so the
        composition matches Keras' erf-based GELU to ~1e-7·|x|.
        """
        b = self.b
        p = f"{name}__"
        b.add_unary(p + "abs", src, p + "abs", "abs")
        b.add_unary(p + "t", p + "abs", p + "t", "inverse", scale=_AS_P / math.sqrt(2.0),
                    shift=1.0, epsilon=0.0)
        a1, a2, a3, a4, a5 = _AS_A
        b.add_activation(p + "h4", "LINEAR", p + "t", p + "h4", params=[a5, a4])
        cur = p + "h4"
        for k, coef in ((3, a3), (2, a2), (1, a1)):
            b.add_elementwise(f"{p}m{k}", [cur, p + "t"], f"{p}m{k}", "MULTIPLY")
            b.add_activation(f"{p}h{k}", "LINEAR", f"{p}m{k}", f"{p}h{k}", params=[1.0, coef])
            cur = f"{p}h{k}"
        b.add_elementwise(p + "poly", [cur, p + "t"], p + "poly", "MULTIPLY")
        b.add_unary(p + "sq", p + "abs", p + "sq", "power", alpha=2.0)
        b.add_unary(p + "gauss", p + "sq", p + "gauss", "exp", scale=-0.5)
        b.add_elementwise(p + "erfc", [p + "poly", p + "gauss"], p + "erfc", "MULTIPLY")
        b.add_activation(p + "erf", "LINEAR", p + "erfc", p + "erf", params=[-1.0, 1.0])
        b.add_elementwise(p + "r", [p + "abs", p + "erf"], p + "r", "MULTIPLY")
        b.add_elementwise(p + "sum", [src, p + "r"], p + "sum", "ADD")
        b.add_activation(name, "LINEAR", p + "sum", name, params=[0.5, 0.0])

    # -- per Keras class -----------------------------------------------------------------
    def emit(self, n: Node) -> str:
        self.node = n
        fn = EMITTERS.get(n.keras_class)
        if fn is None:  # pragma: no cover - graph.SUPPORTED and EMITTERS agree
            raise Refused("has no Core ML emitter")
        before = len(self.b.spec.neuralNetwork.layers)
        out = fn(self, n, [self.blob[i] for i in n.inputs])
        for lay in self.b.spec.neuralNetwork.layers[before:]:
            self.owner[lay.name] = n.name
        self.blob[n.name] = out
        return out


def _fused(e: _Emitter, n: Node, out: str) -> str:
    act = activation_name(n.layer.activation)
    return e.act(f"{n.name}__{act}", act, out, 0) if act != "linear" else out


def _dense(e: _Emitter, n: Node, src: list[str]) -> str:
    w = e.weights(n)
    k, bias = w["kernel"], w.get("bias")
    cin, cout = k.shape
    name = n.name
    if len(n.in_shape) == 1:
        e.b.add_inner_product(name, W=np.ascontiguousarray(k.T), b=bias, input_channels=cin,
                              output_channels=cout, has_bias=bias is not None,
                              input_name=src[0], output_name=name)
        e.add_tensors(name, n, "kernel", "dense", [cout, cin], "bias" if bias is not None
                      else None, cout)
    else:  # Dense on (T, F) or (H, W, C) acts on the channels: a 1×1 convolution
        e.b.add_convolution(name, kernel_channels=cin, output_channels=cout, height=1, width=1,
                            stride_height=1, stride_width=1, border_mode="valid", groups=1,
                            W=k.reshape(1, 1, cin, cout), b=bias, has_bias=bias is not None,
                            input_name=src[0], output_name=name)
        e.add_tensors(name, n, "kernel", "dense_conv", [cout, cin, 1, 1],
                      "bias" if bias is not None else None, cout)
    return _fused(e, n, name)


def _conv_common(e: _Emitter, n: Node, src: str, k4: np.ndarray, bias: np.ndarray | None,
                 groups: int, strides: tuple[int, int], dilation: tuple[int, int],
                 padding: str, name: str, pads: tuple[int, int, int, int] = (0, 0, 0, 0)
                 ) -> None:
    kh, kw, cin_g, cout = k4.shape
    e.b.add_convolution(name, kernel_channels=int(cin_g), output_channels=int(cout),
                        height=int(kh), width=int(kw), stride_height=int(strides[0]),
                        stride_width=int(strides[1]), border_mode=padding, groups=int(groups),
                        W=np.ascontiguousarray(k4), b=bias, has_bias=bias is not None,
                        input_name=src, output_name=name, dilation_factors=list(dilation),
                        padding_top=pads[0], padding_bottom=pads[1], padding_left=pads[2],
                        padding_right=pads[3], same_padding_asymmetry_mode="BOTTOM_RIGHT_HEAVY")


def _conv2d(e: _Emitter, n: Node, src: list[str]) -> str:
    lay, w = n.layer, e.weights(n)
    k, bias = w["kernel"], w.get("bias")
    _conv_common(e, n, src[0], k, bias, lay.groups, lay.strides, lay.dilation_rate,
                 lay.padding, n.name)
    kh, kw, cin_g, cout = k.shape
    e.add_tensors(n.name, n, "kernel", "conv", [cout, cin_g, kh, kw],
                  "bias" if bias is not None else None, cout)
    return _fused(e, n, n.name)


def _conv1d(e: _Emitter, n: Node, src: list[str]) -> str:
    lay, w = n.layer, e.weights(n)
    k, bias = w["kernel"], w.get("bias")
    ksz, cin_g, cout = k.shape
    d = int(lay.dilation_rate[0])
    padding, pads = lay.padding, (0, 0, 0, 0)
    if padding == "causal":  # zeros on the left of the time axis only
        padding, pads = "valid", (0, 0, (ksz - 1) * d, 0)
    _conv_common(e, n, src[0], k[None], bias, lay.groups, (1, lay.strides[0]), (1, d),
                 padding, n.name, pads)
    e.add_tensors(n.name, n, "kernel", "conv1d", [cout, cin_g, 1, ksz],
                  "bias" if bias is not None else None, cout)
    return _fused(e, n, n.name)


def _depthwise(e: _Emitter, n: Node, src: list[str]) -> str:
    lay, w = n.layer, e.weights(n)
    k, bias = w["kernel"], w.get("bias")
    kh, kw, cin, mult = k.shape
    # grouped convolution, one group per input channel: output c·mult + j = Keras order
    _conv_common(e, n, src[0], k.reshape(kh, kw, 1, cin * mult), bias, cin, lay.strides,
                 lay.dilation_rate, lay.padding, n.name)
    e.add_tensors(n.name, n, "kernel", "depthwise", [cin * mult, 1, kh, kw],
                  "bias" if bias is not None else None, cin * mult)
    return _fused(e, n, n.name)


def _separable(e: _Emitter, n: Node, src: list[str]) -> str:
    lay, w = n.layer, e.weights(n)
    dk, pk, bias = w["depthwise_kernel"], w["pointwise_kernel"], w.get("bias")
    kh, kw, cin, mult = dk.shape
    dw, pw = f"{n.name}__depthwise", f"{n.name}__pointwise"
    _conv_common(e, n, src[0], dk.reshape(kh, kw, 1, cin * mult), None, cin, lay.strides,
                 lay.dilation_rate, lay.padding, dw)
    e.add_tensors(dw, n, "depthwise_kernel", "depthwise", [cin * mult, 1, kh, kw], None, 0)
    cout = pk.shape[-1]
    _conv_common(e, n, dw, pk, bias, 1, (1, 1), (1, 1), "valid", pw)
    e.add_tensors(pw, n, "pointwise_kernel", "conv", [cout, cin * mult, 1, 1],
                  "bias" if bias is not None else None, cout)
    return _fused(e, n, pw)


def _channels_axis(n: Node) -> None:
    axis = n.layer.get_config().get("axis", -1)
    axis = axis[0] if isinstance(axis, list | tuple) and len(axis) == 1 else axis
    if axis not in (-1, len(n.in_shape)):
        raise Refused(f"works on axis {axis}; iOS supports the channel (last) axis only")


def _batchnorm_layer(e: _Emitter, name: str, src: str, gamma: np.ndarray, beta: np.ndarray,
                     mean: np.ndarray, var: np.ndarray, eps: float) -> str:
    c = len(gamma)
    e.b.add_batchnorm(name, c, gamma.astype(np.float32), beta.astype(np.float32),
                      mean=mean.astype(np.float32), variance=var.astype(np.float32),
                      input_name=src, output_name=name, compute_mean_var=False,
                      instance_normalization=False, epsilon=float(eps))
    return name


def _batchnorm(e: _Emitter, n: Node, src: list[str]) -> str:
    _channels_axis(n)
    lay, w = n.layer, e.weights(n)
    c = n.in_shape[-1]
    gamma = w.get("gamma", np.ones(c, np.float32))
    beta = w.get("beta", np.zeros(c, np.float32))
    return _batchnorm_layer(e, n.name, src[0], gamma, beta, w["moving_mean"],
                            w["moving_variance"], lay.epsilon)


def _per_channel(value: Any, c: int) -> np.ndarray:
    arr = np.asarray(value, np.float32).reshape(-1)
    if arr.size == 1:
        return np.full(c, arr[0], np.float32)
    if arr.size != c:
        raise Refused(f"has {arr.size} values for {c} channels; iOS needs one per channel")
    return arr


def _rescaling(e: _Emitter, n: Node, src: list[str]) -> str:
    # a batchnorm with unit statistics is a per-channel affine map that Core ML
    # back-propagates through (a linear activation would block gradients)
    c = coreml_shape(n.in_shape)[0]
    cfg = n.layer.get_config()
    gamma, beta = _per_channel(cfg["scale"], c), _per_channel(cfg["offset"], c)
    return _batchnorm_layer(e, n.name, src[0], gamma, beta, np.zeros(c), np.ones(c), 0.0)


def _normalization(e: _Emitter, n: Node, src: list[str]) -> str:
    lay = n.layer
    cfg = lay.get_config()
    if cfg.get("invert"):
        raise Refused("has invert=True; iOS supports the forward normalisation only")
    _channels_axis(n)
    c = coreml_shape(n.in_shape)[0]
    mean = _per_channel(np.asarray(lay.mean), c)
    var = _per_channel(np.asarray(lay.variance), c)
    # Keras: (x - mean) / max(sqrt(var), 1e-7); as batchnorm with unit statistics
    gamma = (1.0 / np.maximum(np.sqrt(var), 1e-7)).astype(np.float32)
    return _batchnorm_layer(e, n.name, src[0], gamma, -mean * gamma, np.zeros(c), np.ones(c),
                            0.0)


def _pool(e: _Emitter, n: Node, src: list[str]) -> str:
    lay = n.layer
    kind = "MAX" if "Max" in n.keras_class else "AVERAGE"
    if "Global" in n.keras_class:
        e.b.add_pooling(n.name, height=1, width=1, stride_height=1, stride_width=1,
                        layer_type=kind, padding_type="VALID", input_name=src[0],
                        output_name=n.name, is_global=True)
        return n.name
    if n.keras_class.endswith("1D"):
        size, stride = (1, lay.pool_size[0]), (1, lay.strides[0])
    else:
        size, stride = tuple(lay.pool_size), tuple(lay.strides)
    e.b.add_pooling(n.name, height=size[0], width=size[1], stride_height=stride[0],
                    stride_width=stride[1], layer_type=kind, padding_type=lay.padding.upper(),
                    input_name=src[0], output_name=n.name, exclude_pad_area=True,
                    same_padding_asymmetry_mode="BOTTOM_RIGHT_HEAVY")
    return n.name


def _zero_padding(e: _Emitter, n: Node, src: list[str]) -> str:
    pad = n.layer.padding
    if n.keras_class == "ZeroPadding1D":
        (top, bottom), (left, right) = (0, 0), tuple(pad)
    else:
        (top, bottom), (left, right) = pad
    e.b.add_padding(n.name, left=int(left), right=int(right), top=int(top),
                    bottom=int(bottom), value=0.0, input_name=src[0], output_name=n.name)
    return n.name


def _flatten(e: _Emitter, n: Node, src: list[str]) -> str:
    if len(n.in_shape) == 1:
        return src[0]
    # CHANNEL_LAST flattens (H, W, C) order: exactly Keras' Flatten (and (T, F) for 1-D)
    e.b.add_flatten(n.name, mode=1, input_name=src[0], output_name=n.name)
    return n.name


def _reshape(e: _Emitter, n: Node, src: list[str]) -> str:
    target = coreml_shape(n.out_shape)
    if coreml_shape(n.in_shape) == target and len(n.in_shape) == len(n.out_shape):
        return src[0]
    # CHANNEL_LAST reshapes in (H, W, C) order, which is Keras' row-major order
    e.b.add_reshape(n.name, src[0], n.name, target, 1)
    return n.name


def _identity(e: _Emitter, n: Node, src: list[str]) -> str:
    return src[0]  # Dropout: Core ML has none, identity in prediction and training


def _activation_layer(e: _Emitter, n: Node, src: list[str]) -> str:
    lay, cls = n.layer, n.keras_class
    if cls == "Activation":
        act = activation_name(lay.activation)
    elif cls == "ReLU":
        cfg = lay.get_config()
        mx, slope, th = cfg.get("max_value"), float(cfg.get("negative_slope") or 0), float(
            cfg.get("threshold") or 0)
        if th != 0 or (mx is not None and slope != 0):
            raise Refused("has a threshold or max_value with negative_slope; iOS supports "
                          "ReLU, ReLU(max_value=m) and ReLU(negative_slope=a)")
        if mx is not None:
            m = float(mx)
            # min(relu(x), m) = m·hardSigmoid(x/m): no clip layer in rank-5 networks
            e.b.add_activation(f"{n.name}__clip", "SIGMOID_HARD", src[0], f"{n.name}__clip",
                               params=[1.0 / m, 0.0])
            e.b.add_activation(n.name, "LINEAR", f"{n.name}__clip", n.name, params=[m, 0.0])
            return n.name
        if slope:
            e.b.add_activation(n.name, "LEAKYRELU", src[0], n.name, params=[slope])
            return n.name
        act = "relu"
    elif cls == "LeakyReLU":
        e.b.add_activation(n.name, "LEAKYRELU", src[0], n.name,
                           params=[float(lay.negative_slope)])
        return n.name
    elif cls == "ELU":
        e.b.add_activation(n.name, "ELU", src[0], n.name, params=float(lay.alpha))
        return n.name
    else:  # Softmax
        _channels_axis(n)
        act = "softmax"
    return e.act(n.name, act, src[0], 0)


def _merge(e: _Emitter, n: Node, src: list[str]) -> str:
    if n.keras_class == "Concatenate":
        _channels_axis(n)
        if len({coreml_shape(s)[1:] for s in n.in_shapes}) != 1:
            raise Refused("concatenates maps of different sizes")
        e.b.add_elementwise(n.name, src, n.name, "CONCAT")
        return n.name
    shapes = {coreml_shape(s) for s in n.in_shapes}
    big = coreml_shape(n.out_shape)
    for s in shapes:
        ok = s == big or s == (big[0], 1, 1) or s == (1, 1, 1)
        if not ok:
            raise Refused(f"broadcasts {s} against {big}; iOS broadcasts only (C, 1, 1) "
                          "and scalars against (C, H, W)")
    e.b.add_elementwise(n.name, src, n.name, "ADD" if n.keras_class == "Add" else "MULTIPLY")
    return n.name


def _embedding(e: _Emitter, n: Node, src: list[str]) -> str:
    lay = n.layer
    if lay.mask_zero:
        raise Refused("has mask_zero=True; Core ML layers ignore masks (pool without it)")
    if len(n.in_shape) != 1:
        raise Refused(f"takes ids of shape {n.in_shape}; iOS supports (steps,) id sequences")
    table = e.weights(n)["embeddings"]
    vocab, dim = table.shape
    steps = n.in_shape[0]
    p = f"{n.name}__"
    # ids (T,1,1) → (1,1,T); one-hot as relu(1 - |id - v|) for v in 0..V-1 (a 1×1 conv
    # from 1 to V channels with bias -v, then abs, 1-·, relu); the lookup is then a 1×1
    # convolution V → D whose weights are the table — updatable, so iOS trains embeddings.
    e.b.add_reshape(p + "ids", src[0], p + "ids", (1, 1, steps), 1)
    e.b.add_convolution(p + "diff", kernel_channels=1, output_channels=vocab, height=1,
                        width=1, stride_height=1, stride_width=1, border_mode="valid",
                        groups=1, W=np.ones((1, 1, 1, vocab), np.float32),
                        b=-np.arange(vocab, dtype=np.float32), has_bias=True,
                        input_name=p + "ids", output_name=p + "diff")
    e.b.add_unary(p + "abs", p + "diff", p + "abs", "abs")
    e.b.add_activation(p + "near", "LINEAR", p + "abs", p + "near", params=[-1.0, 1.0])
    e.b.add_activation(p + "onehot", "RELU", p + "near", p + "onehot")
    e.b.add_convolution(n.name, kernel_channels=vocab, output_channels=dim, height=1, width=1,
                        stride_height=1, stride_width=1, border_mode="valid", groups=1,
                        W=table.reshape(1, 1, vocab, dim), b=None, has_bias=False,
                        input_name=p + "onehot", output_name=n.name)
    e.add_tensors(n.name, n, "embeddings", "dense_conv", [dim, vocab, 1, 1], None, dim)
    return n.name


def _recurrent(e: _Emitter, n: Node, src: list[str]) -> str:
    lay, cls = n.layer, n.keras_class
    cell = getattr(lay, "cell", lay)
    if activation_name(cell.activation) != "tanh" or activation_name(
            cell.recurrent_activation) != "sigmoid":
        raise Refused("uses activations other than tanh / sigmoid; iOS supports the defaults")
    if lay.go_backwards and lay.return_sequences:
        raise Refused("has go_backwards=True with return_sequences=True; use one of them")
    if cls == "GRU" and cell.reset_after:
        raise Refused("has reset_after=True (the Keras default), which Core ML's GRU cannot "
                      "express; build it as keras.layers.GRU(..., reset_after=False)")
    w = e.weights(n)
    k, r, bias = w["kernel"], w["recurrent_kernel"], w.get("bias")
    units, feats = int(r.shape[0]), int(k.shape[0])
    p = f"{n.name}__"
    # time lives on the width axis; Core ML's recurrent layers read the sequence axis
    e.b.add_permute(p + "seq", (3, 1, 2, 0), src[0], p + "seq")

    def gates(m: np.ndarray, order: tuple[int, ...]) -> list[np.ndarray]:
        parts = np.split(m, len(order), axis=-1)
        return [np.ascontiguousarray(parts[i].T) if m.ndim == 2 else parts[i].copy()
                for i in order]

    out = p + "y" if lay.return_sequences else n.name
    if cls == "LSTM":  # Keras i, f, c, o → Core ML i, f, o, z
        order = (0, 1, 3, 2)
        e.b.add_unilstm(n.name, W_h=gates(r, order), W_x=gates(k, order),
                        b=None if bias is None else gates(bias, order), hidden_size=units,
                        input_size=feats, input_names=[p + "seq"],
                        output_names=[out, p + "h", p + "c"], output_all=lay.return_sequences,
                        reverse_input=bool(lay.go_backwards))
    else:  # Keras z, r, h → Core ML z, r, o
        order = (0, 1, 2)
        e.b.add_gru(n.name, W_h=gates(r, order), W_x=gates(k, order),
                    b=None if bias is None else gates(bias, order), hidden_size=units,
                    input_size=feats, input_names=[p + "seq"], output_names=[out, p + "h"],
                    activation="TANH", inner_activation="SIGMOID",
                    output_all=lay.return_sequences, reverse_input=bool(lay.go_backwards))
    if lay.return_sequences:
        e.b.add_permute(n.name + "__unseq", (3, 1, 2, 0), out, n.name)
        return n.name
    return out


EMITTERS: dict[str, Callable[[_Emitter, Node, list[str]], str]] = {
    "Dense": _dense, "Conv2D": _conv2d, "Conv1D": _conv1d, "DepthwiseConv2D": _depthwise,
    "SeparableConv2D": _separable, "BatchNormalization": _batchnorm,
    "Rescaling": _rescaling, "Normalization": _normalization,
    "MaxPooling1D": _pool, "MaxPooling2D": _pool, "AveragePooling1D": _pool,
    "AveragePooling2D": _pool, "GlobalAveragePooling1D": _pool,
    "GlobalAveragePooling2D": _pool, "GlobalMaxPooling1D": _pool, "GlobalMaxPooling2D": _pool,
    "ZeroPadding1D": _zero_padding, "ZeroPadding2D": _zero_padding, "Flatten": _flatten,
    "Reshape": _reshape, "Dropout": _identity, "Activation": _activation_layer,
    "ReLU": _activation_layer, "LeakyReLU": _activation_layer, "ELU": _activation_layer,
    "Softmax": _activation_layer, "Add": _merge, "Multiply": _merge, "Concatenate": _merge,
    "Embedding": _embedding, "LSTM": _recurrent, "GRU": _recurrent,
}


def _rename_blob(layers: Any, old: str, new: str) -> None:
    for lay in layers:
        for field_ in (lay.input, lay.output):
            for i, name in enumerate(field_):
                if name == old:
                    field_[i] = new


def build(graph: ModelGraph, loss: str, optimizer: Optimizer, batch_size: int, epochs: int,
          ios_training: str = "auto") -> CoreMLBuild:
    """The updatable spec, FedKit's ``coreml_layers`` and iOS's trainability plan.

    Raises ``ExportError`` naming every layer iOS cannot run, and — with
    ``ios_training="strict"`` — every trainable layer iOS would have to freeze.
    """
    if ios_training not in IOS_TRAINING:
        raise ValueError(f"ios_training must be one of {IOS_TRAINING}, got {ios_training!r}")
    datatypes, NeuralNetworkBuilder, SgdParams, AdamParams = _quiet_import()
    out_shape = graph.output_shape
    if len(out_shape) != 1:
        raise ExportError(f"the model's output has shape {out_shape}; the iOS artifact needs "
                          "a flat output (end with Flatten/GlobalAveragePooling/Dense), or "
                          "export with platforms=('android',)")
    out_dim = int(out_shape[0])
    dims = input_dims(graph.input_shape)
    builder = NeuralNetworkBuilder([(INPUT_NAME, datatypes.Array(*dims))],
                                   [(OUTPUT_NAME, datatypes.Array(out_dim))])
    e = _Emitter(builder, graph)
    refused: list[str] = []
    for n in graph.nodes:
        try:
            coreml_shape(n.out_shape)
            with contextlib.redirect_stdout(io.StringIO()):
                e.emit(n)
        except Refused as exc:
            refused.append(f"layer '{n.name}' ({n.keras_class}) {exc}")
            e.blob[n.name] = f"__refused__{n.name}"
    if refused:
        raise ExportError("the model cannot run on iOS (Core ML):\n  - " + "\n  - ".join(refused)
                          + "\nChange these layers as suggested, or export for Android only "
                          "with platforms=('android',).")
    nn = builder.spec.neuralNetwork
    final = e.blob[graph.output]
    if final == INPUT_NAME:
        raise ExportError("the model's output is its input")
    _rename_blob(nn.layers, final, OUTPUT_NAME)
    last = next(lay for lay in nn.layers if OUTPUT_NAME in lay.output)
    is_cce = loss == "categorical_crossentropy"
    if is_cce and last.WhichOneof("layer") != "softmax":
        raise ExportError("loss 'categorical_crossentropy' needs the model to end in a "
                          "softmax; add activation='softmax' to the last layer or use "
                          "loss='mse'")
    if not is_cce and last.WhichOneof("layer") == "softmax":
        raise ExportError("loss 'mse' on a softmax output cannot train in Core ML (MSE needs "
                          "an input produced inside the graph, not a softmax); drop the final "
                          "softmax or use loss='categorical_crossentropy'")

    # -- what iOS trains: Core ML's own rule over the built network --------------------------
    candidates = {t.layer for t in e.tensors if t.canonical is not None}
    nodes = [coreml_rules.node_of(lay) for lay in nn.layers]
    ok, why = coreml_rules.trainable_set(nodes, OUTPUT_NAME, is_cce, candidates)
    # the builder names blobs after layers, except the model output
    e.owner.setdefault(OUTPUT_NAME, graph.output)
    plan = _plan(graph, e, ok, why)
    if ios_training == "strict":
        bad = [f"layer '{name}' ({graph.node(name).keras_class}): {reason}"
               for name, (status, reason) in plan.items() if status.startswith("frozen on iOS")]
        if bad:
            raise ExportError(
                "ios_training='strict': these trainable layers cannot train on iOS:\n  - "
                + "\n  - ".join(bad) + "\nFreeze them (layer.trainable = False), use "
                "ios_training='auto' (iOS freezes them, Android trains them), or export with "
                "platforms=('android',).")
    if not ok:
        raise ExportError(
            "nothing can train on iOS: Core ML updates only convolution / innerProduct layers "
            "that the loss reaches through back-propagating layers, and here none does ("
            + "; ".join(f"'{e.owner.get(k, k)}' is blocked by '{e.owner.get(v, v)}'"
                        for k, v in sorted(why.items()) if v) + "). Add a trainable "
            "Dense head after the last such layer, or export with platforms=('android',).")
    entries = []
    trained: set[int] = set()
    for t in e.tensors:
        if t.layer in ok and t.canonical is not None:
            entries.append({"name": t.layer, "type": t.kind, "updatable": True,
                            "shape": t.shape, "canonical": t.canonical, "layout": t.layout})
            trained.add(t.canonical)
    builder.make_updatable(sorted(ok, key=[lay.name for lay in nn.layers].index))
    with contextlib.redirect_stdout(io.StringIO()):  # the builder prints what it adds
        if is_cce:
            builder.set_categorical_cross_entropy_loss(name=LOSS_NAME, input=OUTPUT_NAME)
        else:
            builder.set_mean_squared_error_loss(
                name=LOSS_NAME, input_feature=(OUTPUT_NAME, datatypes.Array(out_dim)))
    _set_optimizer(builder, optimizer, batch_size, epochs, SgdParams, AdamParams)
    spec = builder.spec
    spec.description.metadata.shortDescription = "xflwb export (updatable neural network)"
    coreml_rules.validate(spec.neuralNetwork.layers, OUTPUT_NAME, is_cce)
    up = spec.neuralNetwork.updateParams
    info = {"input_name": INPUT_NAME, "input_shape": dims,
            "output_name": OUTPUT_NAME, "target_name": TARGET_NAME,
            "target_dtype": "int32" if is_cce else "double",
            "flatten_mode": "CHANNEL_LAST",
            "allowed_epochs": [min(up.epochs.set.values), max(up.epochs.set.values)],
            "allowed_batch_sizes": _batch_range(up),
            "specification_version": int(spec.specificationVersion),
            "layers": len(spec.neuralNetwork.layers)}
    return CoreMLBuild(spec, entries, info, plan, sorted(trained))


def _batch_range(up: Any) -> list[int]:
    opt = up.optimizer
    kind = opt.WhichOneof("OptimizerType")
    values = getattr(opt, kind).miniBatchSize.set.values
    return [min(values), max(values)]


def _plan(graph: ModelGraph, e: _Emitter, ok: set[str], why: dict[str, str]
          ) -> dict[str, tuple[str, str]]:
    """Per graph node: what iOS does with it (trained / frozen on iOS / frozen / runs)."""
    by_node: dict[str, list[_Tensor]] = {}
    for t in e.tensors:
        by_node.setdefault(e.owner.get(t.layer, ""), []).append(t)
    plan: dict[str, tuple[str, str]] = {}
    for n in graph.nodes:
        if n.frozen:
            plan[n.name] = ("frozen", "trainable=False: baked into the artifact")
            continue
        if not n.params:
            plan[n.name] = ("runs", "")
            continue
        ts = [t for t in by_node.get(n.name, []) if t.canonical is not None]
        covered = {t.canonical for t in ts if t.layer in ok}
        if covered and covered == set(n.params):
            plan[n.name] = ("trained", "")
            continue
        if not ts:
            reason = (f"Core ML updates only convolution and innerProduct layers, not a "
                      f"{n.keras_class}; Android trains it")
        else:
            blockers = sorted({why.get(t.layer, "") for t in ts if t.layer not in ok})
            parts = []
            for blk in blockers:
                if not blk:
                    parts.append("the loss does not reach it")
                    continue
                src = e.owner.get(blk, blk)
                cls = graph.node(src).keras_class if src in e.node_names else "layer"
                parts.append(f"the loss reaches it only through '{src}' ({cls}), which Core ML "
                             "does not back-propagate through")
            reason = "; ".join(parts) + "; Android trains it"
        status = "partly trained on iOS" if covered else "frozen on iOS"
        plan[n.name] = (status, reason)
    return plan


def _set_optimizer(builder: Any, optimizer: Optimizer, batch_size: int, epochs: int,
                   SgdParams: Any, AdamParams: Any) -> None:
    # contiguous sets, so the manifest's [min, max] describes them exactly
    batches = list(range(1, max(ALLOWED_BATCH_SIZES[-1], int(batch_size)) + 1))
    if isinstance(optimizer, SGD):
        p = SgdParams(lr=optimizer.learning_rate, batch=int(batch_size),
                      momentum=optimizer.momentum)
        p.set_lr(optimizer.learning_rate, 0.0, 1.0)
        p.set_batch(int(batch_size), batches)
        p.set_momentum(optimizer.momentum, 0.0, 1.0)
        builder.set_sgd_optimizer(p)
    elif isinstance(optimizer, Adam):
        p = AdamParams(lr=optimizer.learning_rate, batch=int(batch_size),
                       beta1=optimizer.beta_1, beta2=optimizer.beta_2, eps=optimizer.epsilon)
        p.set_lr(optimizer.learning_rate, 0.0, 1.0)
        p.set_batch(int(batch_size), batches)
        builder.set_adam_optimizer(p)
    else:  # pragma: no cover - resolve_optimizer guarantees the type
        raise ExportError(f"unsupported optimizer {optimizer!r}")
    epoch_set = list(range(1, max(ALLOWED_EPOCHS[-1], int(epochs)) + 1))
    builder.set_epochs(int(epochs), epoch_set)
    builder.set_shuffle()


def save(spec: Any, path: Path) -> None:
    """Write the protobuf; works on Linux (only prediction needs macOS)."""
    from coremltools.models.utils import save_spec

    save_spec(spec, str(path))


def load_spec(path: Path) -> Any:
    from coremltools.models.utils import load_spec as _load

    return _load(str(path))
