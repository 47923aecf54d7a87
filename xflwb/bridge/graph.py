"""Read a Keras model into one platform-neutral graph of layer nodes.

Functional models with branches, Sequential models inside functional ones and nested models
(a ``keras.applications`` backbone used as a layer) are read into a single topologically
ordered list of nodes; node names keep the nesting path (``backbone/block_1_expand``).
Both artifact builders, the trainability plan and the manifest work from this graph, so what
counts as "supported" is decided in exactly one place: ``SUPPORTED`` below for every platform,
and the Core ML builder's emitters for iOS.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from xflwb.errors import ExportFailure

if TYPE_CHECKING:
    from xflwb.bridge.manifest import FrozenDigest, Parameter

#: Keras layer classes xflwb exports (both platforms run their forward pass).
SUPPORTED = (
    "InputLayer", "Dense", "Conv1D", "Conv2D", "DepthwiseConv2D", "SeparableConv2D",
    "MaxPooling1D", "MaxPooling2D", "AveragePooling1D", "AveragePooling2D",
    "GlobalAveragePooling1D", "GlobalAveragePooling2D", "GlobalMaxPooling1D",
    "GlobalMaxPooling2D", "ZeroPadding1D", "ZeroPadding2D", "Flatten", "Reshape", "Dropout",
    "BatchNormalization", "Rescaling", "Normalization", "Activation", "ReLU", "LeakyReLU",
    "ELU", "Softmax", "Add", "Multiply", "Concatenate", "Embedding", "LSTM", "GRU",
    # arithmetic written with operators on symbolic tensors (``x + 3.0``, ``a * b``), as
    # keras.applications' MobileNetV3 does for its hard sigmoid
    "ops.Add", "ops.Subtract", "ops.Multiply", "ops.TrueDivide",
)
#: keras.ops classes read as graph nodes, by class name
OPS = {"Add": "ops.Add", "Subtract": "ops.Subtract", "Multiply": "ops.Multiply",
       "Divide": "ops.TrueDivide", "TrueDivide": "ops.TrueDivide"}
#: activation functions (by Keras name) the exporter knows
ACTIVATIONS = ("linear", "relu", "relu6", "sigmoid", "tanh", "softmax", "elu", "leaky_relu",
               "silu", "hard_sigmoid", "hard_silu", "gelu")
#: what to suggest for layers users often try
REPLACEMENTS = {
    "GroupNormalization": "replace GroupNormalization by BatchNormalization",
    "LayerNormalization": "replace LayerNormalization by BatchNormalization",
    "SimpleRNN": "use LSTM or GRU(reset_after=False)",
    "Bidirectional": "use a single LSTM (set go_backwards=True for the reverse direction)",
    "Conv2DTranspose": "use UpSampling-free encoders (Conv2D with strides) for on-device models",
    "TimeDistributed": "apply Dense directly to the (time, features) tensor",
    "Lambda": "use built-in Keras layers (Add, Multiply, Rescaling, Reshape ...)",
}


class ExportError(ExportFailure, ValueError):
    """The model cannot be exported as asked; the message names each layer and the fix."""

    __module__ = "xflwb"  # public as xflwb.ExportError in every process (xflwb/__init__.py)


@dataclass
class Node:
    """One Keras layer call in the flattened graph."""

    name: str  # nesting path joined by "/", unique
    keras_class: str
    layer: Any  # the Keras layer object (never serialised)
    inputs: list[str]  # names of producing nodes, or INPUT
    in_shapes: list[tuple[int, ...]]  # per-sample Keras shapes
    out_shape: tuple[int, ...]
    params: list[int] = field(default_factory=list)  # canonical indices of its weights
    frozen: bool = False  # has weights, none of them canonical (trainable=False)
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def in_shape(self) -> tuple[int, ...]:
        return self.in_shapes[0]

    @property
    def has_weights(self) -> bool:
        return bool(getattr(self.layer, "weights", None))


INPUT = "x"


@dataclass
class ModelGraph:
    """The nodes in topological order, the canonical parameter list and the I/O shapes."""

    nodes: list[Node]
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    output: str  # name of the node producing the model output
    parameters: list[Parameter]  # canonical, in trainable_weights order
    final_activation: str
    frozen: FrozenDigest  # digest of the non-trainable weights

    @property
    def ids_below(self) -> int | None:
        """Vocabulary size when the input feeds an Embedding (inputs are token ids)."""
        sizes = [int(n.layer.input_dim) for n in self.nodes
                 if n.keras_class == "Embedding" and INPUT in n.inputs]
        return min(sizes) if sizes else None

    @property
    def layers(self) -> list[Node]:  # older name, kept for callers
        return self.nodes

    @property
    def has_dropout(self) -> bool:
        return any(n.keras_class == "Dropout" for n in self.nodes)

    def node(self, name: str) -> Node:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    def consumers(self, name: str) -> list[Node]:
        return [n for n in self.nodes if name in n.inputs]


def _as_tuple(shape: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in shape)


def _check_keras_model(model: Any) -> Any:
    import keras

    if not isinstance(model, keras.Model):
        kind = f"{type(model).__module__}.{type(model).__name__}"
        hint = ""
        if type(model).__module__.startswith("tf_keras") or "tensorflow.python.keras" in kind:
            hint = " (a tf_keras / Keras 2 model: rebuild it with Keras 3, `import keras`)"
        raise ExportError(f"expected a Keras 3 model (keras.Model), got {kind}{hint}")
    return keras


def _input_shape(model: Any) -> tuple[int, ...]:
    try:
        inputs = model.inputs
    except (AttributeError, ValueError):
        inputs = None
    if inputs is not None and len(inputs) != 1:
        raise ExportError(f"model '{model.name}' has {len(inputs)} inputs; phones feed one "
                          "input tensor: merge them into one keras.Input")
    shape = inputs[0].shape if inputs else None
    if shape is None or any(d is None for d in list(shape)[1:]):
        raise ExportError(
            f"model '{model.name}' has no fixed input shape; start it with "
            "keras.Input(shape=(H, W, C)), keras.Input(shape=(steps, features)) or "
            "keras.Input(shape=(features,))")
    return _as_tuple(list(shape)[1:])


def activation_name(fn: Any) -> str:
    return getattr(fn, "__name__", None) or str(fn)


def _functional(model: Any) -> Any:
    """The functional graph behind a Functional or Sequential model (None if unbuilt)."""
    import keras

    if isinstance(model, keras.Sequential):
        return getattr(model, "_functional", None)
    return model


def _ordered_nodes(fn: Any) -> list[Any]:
    """Keras nodes of a functional model, inputs first (deepest depth first)."""
    out = []
    for depth in sorted(fn._nodes_by_depth, reverse=True):
        out.extend(fn._nodes_by_depth[depth])
    return out


class _Reader:
    """Walks nested functional graphs, giving every layer call one node."""

    def __init__(self, model: Any) -> None:
        import keras

        self.keras = keras
        self.model = model
        self.nodes: list[Node] = []
        self.names: set[str] = set()
        self.layer_calls: dict[int, str] = {}

    def _unique(self, name: str) -> str:
        base, i = name, 1
        while name in self.names:
            i += 1
            name = f"{base}_{i}"
        self.names.add(name)
        return name

    def read(self, fn: Any, prefix: str, tensor_src: dict[int, str]) -> dict[int, str]:
        """Add the nodes of ``fn``; ``tensor_src`` maps its input tensors to node names."""
        keras = self.keras
        for knode in _ordered_nodes(fn):
            op = knode.operation
            if isinstance(op, keras.layers.InputLayer):
                continue
            srcs = []
            for t in knode.input_tensors:
                if id(t) not in tensor_src:
                    raise ExportError(f"layer '{prefix}{op.name}' reads a tensor from outside "
                                      "the model's graph")
                srcs.append(tensor_src[id(t)])
            if isinstance(op, keras.Model):
                inner = _functional(op)
                if inner is None:
                    raise ExportError(f"nested model '{prefix}{op.name}' is not built; give "
                                      "it a keras.Input (or call it once) before exporting")
                if len(inner.inputs) != len(srcs):
                    raise ExportError(f"nested model '{prefix}{op.name}' takes "
                                      f"{len(inner.inputs)} inputs, got {len(srcs)}")
                inner_src = {id(t): s for t, s in zip(inner.inputs, srcs, strict=True)}
                inner_src = self.read(inner, f"{prefix}{op.name}/", inner_src)
                for outer_t, inner_t in zip(knode.output_tensors, inner.outputs, strict=True):
                    tensor_src[id(outer_t)] = inner_src[id(inner_t)]
                continue
            config: dict[str, Any] = {}
            cls = type(op).__name__
            if not isinstance(op, keras.layers.Layer):
                if cls not in OPS or not type(op).__module__.startswith("keras"):
                    raise ExportError(
                        f"operation '{prefix}{op.name}' ({cls}) is a keras.ops call on "
                        "symbolic tensors, not a layer; use the equivalent layer (Add, "
                        "Multiply, Rescaling, Reshape, Activation ...)")
                cls = OPS[cls]
                args = list(knode.arguments.args)
                if len(args) != 2 or knode.arguments.kwargs:
                    raise ExportError(f"operation '{prefix}{op.name}' ({cls}) takes "
                                      f"{len(args)} arguments; xflwb reads binary arithmetic")
                consts = [a for a in args if not isinstance(a, keras.KerasTensor)]
                if consts:
                    value = np.asarray(consts[0], np.float32)
                    if value.size != 1:
                        raise ExportError(f"operation '{prefix}{op.name}' ({cls}) uses a "
                                          f"constant of shape {value.shape}; use a scalar or "
                                          "a layer with weights")
                    config = {"scalar": float(value.reshape(())),
                              "tensor_first": isinstance(args[0], keras.KerasTensor)}
            if id(op) in self.layer_calls:
                raise ExportError(
                    f"layer '{prefix}{op.name}' ({type(op).__name__}) is called more than once "
                    f"(also as '{self.layer_calls[id(op)]}'): shared weights cannot be "
                    "exported; use a separate layer per call")
            name = self._unique(prefix + op.name)
            self.layer_calls[id(op)] = name
            if len(knode.output_tensors) != 1:
                raise ExportError(f"layer '{name}' ({type(op).__name__}) returns "
                                  f"{len(knode.output_tensors)} tensors; return_state and "
                                  "other multi-output layers are not supported")
            in_shapes = [_as_tuple(t.shape[1:]) for t in knode.input_tensors]
            out_t = knode.output_tensors[0]
            if any(d is None for d in out_t.shape[1:]):
                raise ExportError(f"layer '{name}' ({type(op).__name__}) has a variable "
                                  f"output shape {tuple(out_t.shape)}; fix every dimension")
            self.nodes.append(Node(name, cls, op, srcs, in_shapes,
                                   _as_tuple(out_t.shape[1:]), config=config))
            tensor_src[id(out_t)] = name
        return tensor_src


def _frozen_digest(model: Any) -> FrozenDigest:
    """sha256 of every non-trainable weight (name, shape, float32 bytes), in model order.

    Frozen weights are baked into both artifacts and never travel, so the digest is how an
    update computed on another backbone is told apart.
    """
    h = hashlib.sha256()
    count = size = 0
    for v in model.non_trainable_weights:
        arr = np.ascontiguousarray(np.asarray(v.numpy(), dtype="<f4"))
        h.update(f"{v.path}:{list(arr.shape)};".encode())
        h.update(arr.tobytes())
        count += 1
        size += arr.size
    return {"sha256": h.hexdigest(), "tensors": count, "elements": int(size)}


def _refuse_unsupported(nodes: list[Node]) -> None:
    bad = []
    for n in nodes:
        if n.keras_class in SUPPORTED:
            continue
        fix = REPLACEMENTS.get(n.keras_class, f"replace it by one of the supported layers "
                                              f"({', '.join(SUPPORTED[1:])})")
        bad.append(f"layer '{n.name}' ({n.keras_class}) is not supported on any platform: {fix}")
    for n in nodes:
        fn = getattr(n.layer, "activation", None)
        if fn is not None and n.keras_class != "Activation" and callable(fn):
            act = activation_name(fn)
            if act not in ACTIVATIONS and n.keras_class not in ("LSTM", "GRU"):
                bad.append(f"layer '{n.name}' ({n.keras_class}) uses activation '{act}', "
                           f"which xflwb does not export; use one of {', '.join(ACTIVATIONS)}")
        if n.keras_class == "Activation":
            act = activation_name(n.layer.activation)
            if act not in ACTIVATIONS:
                bad.append(f"layer '{n.name}' (Activation) uses '{act}', which xflwb does not "
                           f"export; use one of {', '.join(ACTIVATIONS)}")
        cfg = n.layer.get_config() if not n.keras_class.startswith("ops.") else {}
        if cfg.get("data_format", "channels_last") != "channels_last":
            bad.append(f"layer '{n.name}' ({n.keras_class}) uses data_format="
                       f"'{cfg['data_format']}'; use the default 'channels_last'")
        if n.keras_class in ("LSTM", "GRU") and (cfg.get("stateful") or cfg.get("unroll")):
            bad.append(f"layer '{n.name}' ({n.keras_class}) is stateful or unrolled; use "
                       "stateful=False, unroll=False")
    if bad:
        raise ExportError("the model cannot be exported:\n  - " + "\n  - ".join(bad))


def analyze(model: Any) -> ModelGraph:
    """Describe ``model`` as one graph; raise ``ExportError`` for anything no platform runs."""
    keras = _check_keras_model(model)
    in_shape = _input_shape(model)
    if len(in_shape) not in (1, 2, 3):
        raise ExportError(
            f"input shape {in_shape} is not supported; use (features,), (steps, features) or "
            "(height, width, channels)")
    fn = _functional(model)
    if fn is None:
        raise ExportError(f"model '{model.name}' is not built; start it with keras.Input(...)")
    if len(fn.outputs) != 1:
        raise ExportError(f"model '{model.name}' has {len(fn.outputs)} outputs; phones train "
                          "one output: keep one (a second head can be a separate model)")
    reader = _Reader(model)
    src = reader.read(fn, "", {id(fn.inputs[0]): INPUT})
    nodes = reader.nodes
    if not nodes:
        raise ExportError(f"model '{model.name}' has no layers")
    out_name = src[id(fn.outputs[0])]
    if out_name == INPUT:
        raise ExportError(f"model '{model.name}' returns its input unchanged")
    _refuse_unsupported(nodes)

    # canonical parameters: the model's trainable weights, named by nesting path
    index = {id(v): i for i, v in enumerate(model.trainable_weights)}
    parameters: list[dict[str, Any]] = [
        {"name": v.path, "shape": list(_as_tuple(v.shape)), "dtype": "float32", "layer": None,
         "role": None} for v in model.trainable_weights]
    for n in nodes:
        for w in getattr(n.layer, "weights", []):
            i = index.get(id(w))
            if i is None:
                continue
            n.params.append(i)
            role = w.name
            parameters[i].update(name=f"{n.name}/{role}", layer=n.name, role=role)
        n.frozen = n.has_weights and not n.params
    missing = [p["name"] for p in parameters if p["layer"] is None]
    if missing:
        raise ExportError(f"trainable weights {missing} belong to no exported layer")
    out_node = next(n for n in nodes if n.name == out_name)
    final = "linear"
    cur = out_node
    while cur.keras_class == "Dropout" and cur.inputs[0] != INPUT:
        cur = next(n for n in nodes if n.name == cur.inputs[0])
    if cur.keras_class == "Softmax":
        final = "softmax"
    elif getattr(cur.layer, "activation", None) is not None and cur.keras_class not in (
            "LSTM", "GRU"):
        final = activation_name(cur.layer.activation)
    del keras
    # every entry now names its layer and role (checked above): a manifest Parameter
    return ModelGraph(nodes, in_shape, out_node.out_shape, out_name,
                      cast("list[Parameter]", parameters), final, _frozen_digest(model))
