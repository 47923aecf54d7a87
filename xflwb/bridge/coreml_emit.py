"""Keras layers → legacy (rank-5) Core ML layers: one emitter per Keras class.

Tensor layout: a Keras tensor of per-sample shape (D,) is Core ML (D, 1, 1); (T, F) is
(F, 1, T) (time along the width, so Conv1D is a 1×k convolution); (H, W, C) is (C, H, W).
The network keeps the legacy rank-5 mapping (layers of specification 4+ such as ``clip``,
``erf`` or ``gelu`` are invalid there), so a Keras layer Core ML lacks is composed from
legacy layers it has, each composition commented where it is emitted.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from xflwb.bridge.arrays import AnyArray
from xflwb.bridge.graph import INPUT, ModelGraph, Node, activation_name

INPUT_NAME = "x"
#: Core ML reads an epsilon of 0 as its default (batchnorm 1e-5, unary 1e-6); compositions
#: that want none use this, so √(1 + ε) and 1/(x + ε) are exact in float32
UNIT_EPS = 1e-12

# Abramowitz & Stegun 7.1.26: erfc(z) ≈ t·(a1 + t·(a2 + … + t·a5))·exp(-z²), t = 1/(1+p·z),
# |error| ≤ 1.5e-7 for z ≥ 0 — how GELU's erf is built from legacy layers.
_AS_P = 0.3275911
_AS_A = (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429)


class Refused(Exception):
    """A layer iOS cannot run; carries the reason and the fix."""


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


@dataclass
class WeightTensor:
    """A weight tensor of an emitted conv/innerProduct layer and where it comes from."""

    layer: str
    kind: str  # weights | bias
    canonical: int | None
    layout: str
    shape: list[int]


class Emitter:
    """Emits the Core ML layers of one graph, tracking blob names and weight tensors."""

    def __init__(self, builder: Any, graph: ModelGraph) -> None:
        self.b = builder
        self.graph = graph
        self.blob: dict[str, str] = {INPUT: INPUT_NAME}
        self.tensors: list[WeightTensor] = []
        self.owner: dict[str, str] = {}  # Core ML layer → graph node
        self.node_names = {n.name for n in graph.nodes}
        self.folded: dict[str, tuple[int, int, int, int]] = {}  # ZeroPadding → its pads
        self.absorbed: dict[str, str] = {}  # frozen BatchNorm → the convolution holding it
        self.prescale: dict[str, float] = {}  # clipped ReLU → factor its convolutions take

    # -- helpers ---------------------------------------------------------------------------
    def weights(self, n: Node) -> dict[str, AnyArray]:
        return {w.name: np.asarray(w.numpy(), np.float32) for w in n.layer.weights}

    def canon(self, n: Node, role: str) -> int | None:
        for i in n.params:
            if self.graph.parameters[i]["role"] == role:
                return i
        return None

    def add_tensors(self, layer: str, n: Node, kernel_role: str, layout: str,
                    w_shape: list[int], bias_role: str | None, n_out: int) -> None:
        self.tensors.append(WeightTensor(layer, "weights", self.canon(n, kernel_role), layout,
                                    w_shape))
        if bias_role is not None:
            self.tensors.append(WeightTensor(layer, "bias", self.canon(n, bias_role), "identity",
                                        [n_out]))

    def act(self, name: str, act: str, src: str) -> str:
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
                    shift=1.0, epsilon=UNIT_EPS)
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
        fn = EMITTERS.get(n.keras_class)
        if fn is None:  # pragma: no cover - graph.SUPPORTED and EMITTERS agree
            raise Refused("has no Core ML emitter")
        before = len(self.b.spec.neuralNetwork.layers)
        out = fn(self, n, [self.blob[i] for i in n.inputs])
        for lay in self.b.spec.neuralNetwork.layers[before:]:
            self.owner[lay.name] = n.name
        self.blob[n.name] = out
        return out


def _clipped_relu(e: Emitter, n: Node, name: str, src: str, m: float) -> str:
    """min(relu(x), m) = m·hardSigmoid(x/m) (sigmoidHard clips alpha·x + beta to [0, 1]):
    rank-5 networks have no clip layer. When every reader of ``n`` is a frozen convolution,
    the factor m moves into their weights (a convolution is linear in its input, zero
    padding included): one layer less, as in MobileNetV2's ReLU6 → depthwise/project."""
    clip = f"{name}__clip"
    e.b.add_activation(clip, "SIGMOID_HARD", src, clip, params=[1.0 / m, 0.0])

    def frozen_convs(node: Node) -> bool:
        users = e.graph.consumers(node.name)
        return bool(users) and node.name != e.graph.output and all(
            (u.keras_class in _CONVS and not u.params)
            or (u.keras_class.startswith("ZeroPadding") and _pad_folds(e, u)
                and frozen_convs(u)) for u in users)

    if frozen_convs(n):
        e.prescale[n.name] = m
        return clip
    e.b.add_activation(name, "LINEAR", clip, name, params=[m, 0.0])
    return name


def _fused(e: Emitter, n: Node, out: str) -> str:
    act = activation_name(n.layer.activation)
    if act == "relu6":
        return _clipped_relu(e, n, f"{n.name}__{act}", out, 6.0)
    return e.act(f"{n.name}__{act}", act, out) if act != "linear" else out


def _dense(e: Emitter, n: Node, src: list[str]) -> str:
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


def _absorb_batchnorm(e: Emitter, n: Node, k4: AnyArray, bias: AnyArray | None,
                      name: str) -> tuple[AnyArray, AnyArray | None]:
    """Fold a frozen BatchNorm into the frozen convolution before it.

    A frozen backbone (MobileNet, ResNet) is conv → BatchNorm pairs whose weights never
    change or travel, so the pair is one affine convolution: one layer less to run on the
    phone and in the executor, exact up to float rounding.
    """
    users = e.graph.consumers(n.name)
    if (n.params or len(users) != 1 or users[0].keras_class != "BatchNormalization"
            or users[0].params or n.name == e.graph.output
            or activation_name(n.layer.activation) != "linear"):
        return k4, bias
    bn = users[0]
    axis = bn.layer.get_config().get("axis", -1)
    axis = axis[0] if isinstance(axis, list | tuple) and len(axis) == 1 else axis
    if axis not in (-1, len(bn.in_shape)):
        return k4, bias
    w = {v.name: np.asarray(v.numpy(), np.float64) for v in bn.layer.weights}
    cout = k4.shape[-1]
    gamma = w.get("gamma", np.ones(cout))
    scale = gamma / np.sqrt(w["moving_variance"] + float(bn.layer.epsilon))
    shift = w.get("beta", np.zeros(cout)) - w["moving_mean"] * scale
    b = np.zeros(cout) if bias is None else np.asarray(bias, np.float64)
    e.absorbed[bn.name] = name
    return ((np.asarray(k4, np.float64) * scale).astype(np.float32),
            (b * scale + shift).astype(np.float32))


def _conv_common(e: Emitter, n: Node, src: str, k4: AnyArray, bias: AnyArray | None,
                 groups: int, strides: tuple[int, int], dilation: tuple[int, int],
                 padding: str, name: str, pads: tuple[int, int, int, int] = (0, 0, 0, 0)
                 ) -> None:
    scale = e.prescale.get(n.inputs[0]) if src == e.blob.get(n.inputs[0]) else None
    if scale is not None:  # the reader of a clipped ReLU takes its factor (see above)
        k4 = (np.asarray(k4, np.float64) * scale).astype(np.float32)
    if name == n.name or name.endswith("__pointwise"):
        k4, bias = _absorb_batchnorm(e, n, k4, bias, name)
    kh, kw, cin_g, cout = k4.shape
    folded = e.folded.get(n.inputs[0]) if src == e.blob.get(n.inputs[0]) else None
    if folded is not None:  # a ZeroPadding before a valid convolution: its own padding
        pt, pb, pl, pr = (a + f for a, f in zip(pads, folded, strict=True))
        pads = (pt, pb, pl, pr)
    e.b.add_convolution(name, kernel_channels=int(cin_g), output_channels=int(cout),
                        height=int(kh), width=int(kw), stride_height=int(strides[0]),
                        stride_width=int(strides[1]), border_mode=padding, groups=int(groups),
                        W=np.ascontiguousarray(k4), b=bias, has_bias=bias is not None,
                        input_name=src, output_name=name, dilation_factors=list(dilation),
                        padding_top=pads[0], padding_bottom=pads[1], padding_left=pads[2],
                        padding_right=pads[3], same_padding_asymmetry_mode="BOTTOM_RIGHT_HEAVY")


def _conv2d(e: Emitter, n: Node, src: list[str]) -> str:
    lay, w = n.layer, e.weights(n)
    k, bias = w["kernel"], w.get("bias")
    _conv_common(e, n, src[0], k, bias, lay.groups, lay.strides, lay.dilation_rate,
                 lay.padding, n.name)
    kh, kw, cin_g, cout = k.shape
    e.add_tensors(n.name, n, "kernel", "conv", [cout, cin_g, kh, kw],
                  "bias" if bias is not None else None, cout)
    return _fused(e, n, n.name)


def _conv1d(e: Emitter, n: Node, src: list[str]) -> str:
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


def _depthwise(e: Emitter, n: Node, src: list[str]) -> str:
    lay, w = n.layer, e.weights(n)
    k, bias = w["kernel"], w.get("bias")
    kh, kw, cin, mult = k.shape
    # grouped convolution, one group per input channel: output c·mult + j = Keras order
    _conv_common(e, n, src[0], k.reshape(kh, kw, 1, cin * mult), bias, cin, lay.strides,
                 lay.dilation_rate, lay.padding, n.name)
    e.add_tensors(n.name, n, "kernel", "depthwise", [cin * mult, 1, kh, kw],
                  "bias" if bias is not None else None, cin * mult)
    return _fused(e, n, n.name)


def _separable(e: Emitter, n: Node, src: list[str]) -> str:
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


def _batchnorm_layer(e: Emitter, name: str, src: str, gamma: AnyArray, beta: AnyArray,
                     mean: AnyArray, var: AnyArray, eps: float) -> str:
    c = len(gamma)
    e.b.add_batchnorm(name, c, gamma.astype(np.float32), beta.astype(np.float32),
                      mean=mean.astype(np.float32), variance=var.astype(np.float32),
                      input_name=src, output_name=name, compute_mean_var=False,
                      instance_normalization=False, epsilon=float(eps))
    return name


def _batchnorm(e: Emitter, n: Node, src: list[str]) -> str:
    if n.name in e.absorbed:  # folded into the convolution before it
        return src[0]
    _channels_axis(n)
    lay, w = n.layer, e.weights(n)
    c = n.in_shape[-1]
    gamma = w.get("gamma", np.ones(c, np.float32))
    beta = w.get("beta", np.zeros(c, np.float32))
    return _batchnorm_layer(e, n.name, src[0], gamma, beta, w["moving_mean"],
                            w["moving_variance"], lay.epsilon)


def _per_channel(value: Any, c: int) -> AnyArray:
    arr = np.asarray(value, np.float32).reshape(-1)
    if arr.size == 1:
        return np.full(c, arr[0], np.float32)
    if arr.size != c:
        raise Refused(f"has {arr.size} values for {c} channels; iOS needs one per channel")
    return arr


def _rescaling(e: Emitter, n: Node, src: list[str]) -> str:
    # a batchnorm with unit statistics is a per-channel affine map that Core ML
    # back-propagates through (a linear activation would block gradients)
    c = coreml_shape(n.in_shape)[0]
    cfg = n.layer.get_config()
    gamma, beta = _per_channel(cfg["scale"], c), _per_channel(cfg["offset"], c)
    return _batchnorm_layer(e, n.name, src[0], gamma, beta, np.zeros(c), np.ones(c), UNIT_EPS)


def _normalization(e: Emitter, n: Node, src: list[str]) -> str:
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
                            UNIT_EPS)


def _pool(e: Emitter, n: Node, src: list[str]) -> str:
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


_CONVS = ("Conv1D", "Conv2D", "DepthwiseConv2D", "SeparableConv2D")


def _pad_folds(e: Emitter, n: Node) -> bool:
    """A ZeroPadding read only by valid/causal convolutions becomes their padding."""
    users = e.graph.consumers(n.name)
    return bool(users) and n.name != e.graph.output and all(
        u.keras_class in _CONVS and u.layer.padding in ("valid", "causal") for u in users)


def _zero_padding(e: Emitter, n: Node, src: list[str]) -> str:
    pad = n.layer.padding
    if n.keras_class == "ZeroPadding1D":
        (top, bottom), (left, right) = (0, 0), tuple(pad)
    else:
        (top, bottom), (left, right) = pad
    pads = (int(top), int(bottom), int(left), int(right))
    if _pad_folds(e, n):
        # Core ML's padding layer blocks gradients, a convolution's own padding does not:
        # fold the zeros into the convolutions that read them (ResNet/MobileNet stems)
        e.folded[n.name] = pads
        if n.inputs[0] in e.prescale:  # zeros scale to zeros: the factor passes through
            e.prescale[n.name] = e.prescale[n.inputs[0]]
        return src[0]
    e.b.add_padding(n.name, left=pads[2], right=pads[3], top=pads[0], bottom=pads[1],
                    value=0.0, input_name=src[0], output_name=n.name)
    return n.name


def _flatten(e: Emitter, n: Node, src: list[str]) -> str:
    if len(n.in_shape) == 1:
        return src[0]
    # CHANNEL_LAST flattens (H, W, C) order: exactly Keras' Flatten (and (T, F) for 1-D)
    e.b.add_flatten(n.name, mode=1, input_name=src[0], output_name=n.name)
    return n.name


def _reshape(e: Emitter, n: Node, src: list[str]) -> str:
    target = coreml_shape(n.out_shape)
    if coreml_shape(n.in_shape) == target and len(n.in_shape) == len(n.out_shape):
        return src[0]
    # CHANNEL_LAST reshapes in (H, W, C) order, which is Keras' row-major order
    e.b.add_reshape(n.name, src[0], n.name, target, 1)
    return n.name


def _identity(e: Emitter, n: Node, src: list[str]) -> str:
    return src[0]  # Dropout: Core ML has none, identity in prediction and training


def _activation_layer(e: Emitter, n: Node, src: list[str]) -> str:
    lay, cls = n.layer, n.keras_class
    if cls == "Activation":
        act = activation_name(lay.activation)
        if act == "relu6":
            return _clipped_relu(e, n, n.name, src[0], 6.0)
    elif cls == "ReLU":
        cfg = lay.get_config()
        mx, slope, th = cfg.get("max_value"), float(cfg.get("negative_slope") or 0), float(
            cfg.get("threshold") or 0)
        if th != 0 or (mx is not None and slope != 0):
            raise Refused("has a threshold or max_value with negative_slope; iOS supports "
                          "ReLU, ReLU(max_value=m) and ReLU(negative_slope=a)")
        if mx is not None:
            return _clipped_relu(e, n, n.name, src[0], float(mx))
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
    return e.act(n.name, act, src[0])


def _check_broadcast(n: Node) -> None:
    big = coreml_shape(n.out_shape)
    for s in {coreml_shape(s) for s in n.in_shapes}:
        if not (s == big or s == (big[0], 1, 1) or s == (1, 1, 1)):
            raise Refused(f"broadcasts {s} against {big}; iOS broadcasts only (C, 1, 1) "
                          "and scalars against (C, H, W)")


def _merge(e: Emitter, n: Node, src: list[str]) -> str:
    if n.keras_class == "Concatenate":
        _channels_axis(n)
        if len({coreml_shape(s)[1:] for s in n.in_shapes}) != 1:
            raise Refused("concatenates maps of different sizes")
        e.b.add_elementwise(n.name, src, n.name, "CONCAT")
        return n.name
    _check_broadcast(n)
    e.b.add_elementwise(n.name, src, n.name, "ADD" if n.keras_class == "Add" else "MULTIPLY")
    return n.name


def _arith(e: Emitter, n: Node, src: list[str]) -> str:
    """``x + c``, ``x * c``, ``a + b`` … written with operators on symbolic tensors."""
    op = n.keras_class.split(".", 1)[1]
    if "scalar" in n.config:
        c, first = n.config["scalar"], n.config["tensor_first"]
        if op == "TrueDivide" and not first:
            raise Refused("divides a constant by a tensor; Core ML has no such layer")
        scale, shift = {"Add": (1.0, c), "Multiply": (c, 0.0),
                        "Subtract": (1.0, -c) if first else (-1.0, c),
                        "TrueDivide": (1.0 / c if c else float("inf"), 0.0)}[op]
        if not np.isfinite(scale):
            raise Refused("divides by zero")
        ch = coreml_shape(n.in_shape)[0]
        # an affine map as batchnorm with unit statistics: Core ML back-propagates through it
        return _batchnorm_layer(e, n.name, src[0], np.full(ch, scale), np.full(ch, shift),
                                np.zeros(ch), np.ones(ch), UNIT_EPS)
    if op == "TrueDivide":
        raise Refused("divides two tensors; Core ML's legacy layers cannot")
    if op == "Subtract":  # a - b = a + (-1)·b
        neg = f"{n.name}__neg"
        e.b.add_activation(neg, "LINEAR", src[1], neg, params=[-1.0, 0.0])
        src = [src[0], neg]
    _check_broadcast(n)
    e.b.add_elementwise(n.name, src, n.name, "MULTIPLY" if op == "Multiply" else "ADD")
    return n.name


def _embedding(e: Emitter, n: Node, src: list[str]) -> str:
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


def _recurrent(e: Emitter, n: Node, src: list[str]) -> str:
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

    def gates(m: AnyArray, order: tuple[int, ...]) -> list[AnyArray]:
        parts = np.split(m, len(order), axis=-1)
        return [np.ascontiguousarray(parts[i].T) if m.ndim == 2 else parts[i].copy()
                for i in order]

    out = p + "y" if lay.return_sequences else n.name
    if cls == "LSTM":  # Keras i, f, c, o → Core ML i, f, o, z
        order: tuple[int, ...] = (0, 1, 3, 2)
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


EMITTERS: dict[str, Callable[[Emitter, Node, list[str]], str]] = {
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
    "ops.Add": _arith, "ops.Subtract": _arith, "ops.Multiply": _arith,
    "ops.TrueDivide": _arith,
}


