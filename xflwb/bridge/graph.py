"""Read a Keras model into a small, platform-neutral chain of layer descriptions.

Both artifact builders and the manifest work from this chain, so what counts as "supported"
is decided in exactly one place.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

SUPPORTED = (
    "InputLayer, Dense, Conv2D, MaxPooling2D, AveragePooling2D, Flatten, Dropout, ReLU, "
    "Activation(relu|sigmoid|tanh|softmax|linear), Softmax"
)
ACTIVATIONS = ("relu", "sigmoid", "tanh", "softmax", "linear")


class ExportError(ValueError):
    """The model cannot be exported as asked; the message names each layer and the fix."""


@dataclass
class LayerSpec:
    """One Keras layer as the builders see it."""

    name: str
    keras_class: str
    kind: str  # conv2d | dense | maxpool | avgpool | flatten | dropout | activation | other
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    config: dict[str, Any] = field(default_factory=dict)
    trainable: bool = True
    params: list[int] = field(default_factory=list)  # canonical indices: kernel, bias
    ios_problem: str | None = None  # why iOS cannot run/train this layer

    @property
    def has_weights(self) -> bool:
        return self.kind in ("conv2d", "dense")


@dataclass
class ModelGraph:
    """The chain, the canonical parameter list and the per-sample input/output shapes."""

    layers: list[LayerSpec]
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    parameters: list[dict[str, Any]]  # canonical: name, shape, dtype, layer, role
    final_activation: str

    @property
    def has_dropout(self) -> bool:
        return any(layer.kind == "dropout" for layer in self.layers)

    def ios_problems(self) -> list[str]:
        return [f"layer '{lay.name}' ({lay.keras_class}) {lay.ios_problem}"
                for lay in self.layers if lay.ios_problem]


def _as_tuple(shape: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in shape)


def _check_keras_model(model: Any):
    import keras

    if not isinstance(model, keras.Model):
        kind = f"{type(model).__module__}.{type(model).__name__}"
        hint = ""
        if type(model).__module__.startswith("tf_keras") or "tensorflow.python.keras" in kind:
            hint = " (a tf_keras / Keras 2 model: rebuild it with Keras 3, `import keras`)"
        raise ExportError(f"expected a Keras 3 model (keras.Model), got {kind}{hint}")
    return keras


def _chain(model: Any) -> list[Any]:
    """The layers of a Sequential or single-chain functional model, input layer excluded."""
    import keras

    if isinstance(model, keras.Sequential):
        layers = list(model.layers)
    else:
        if len(model.inputs) != 1 or len(model.outputs) != 1:
            raise ExportError(
                f"model '{model.name}' has {len(model.inputs)} inputs and "
                f"{len(model.outputs)} outputs; only single-input, single-output chains "
                "are supported")
        layers = [lay for lay in model.layers if not isinstance(lay, keras.layers.InputLayer)]
        prev = None
        for lay in layers:
            nodes = [n for n in lay._inbound_nodes if n.operation is lay]
            tensors = nodes[0].input_tensors if len(nodes) == 1 else []
            if len(nodes) != 1 or len(tensors) != 1:
                raise ExportError(
                    f"layer '{lay.name}' ({type(lay).__name__}) is not part of a single "
                    "chain (it is shared or takes several inputs); only Sequential and "
                    "single-chain functional models are supported")
            src = tensors[0]._keras_history.operation
            ok = isinstance(src, keras.layers.InputLayer) if prev is None else src is prev
            if not ok:
                raise ExportError(
                    f"layer '{lay.name}' ({type(lay).__name__}) does not take the previous "
                    "layer's output; only single-chain models are supported")
            prev = lay
    for lay in layers:
        if isinstance(lay, keras.Model):
            raise ExportError(
                f"layer '{lay.name}' is a nested model; flatten it into one Sequential or "
                "functional chain")
    return layers


def _input_shape(model: Any) -> tuple[int, ...]:
    try:
        shape = model.inputs[0].shape if model.inputs else None
    except (AttributeError, ValueError):
        shape = None
    if shape is None:
        try:
            shape = model.input_shape
        except (AttributeError, ValueError):
            shape = None
    if shape is None or any(d is None for d in list(shape)[1:]):
        raise ExportError(
            f"model '{model.name}' has no fixed input shape; start it with "
            "keras.Input(shape=(H, W, C)) or keras.Input(shape=(features,))")
    return _as_tuple(list(shape)[1:])


def _activation_name(fn: Any) -> str:
    name = getattr(fn, "__name__", None) or str(fn)
    return name


def analyze(model: Any) -> ModelGraph:
    """Describe ``model`` as a chain; raise ``ExportError`` for anything no platform can run."""
    keras = _check_keras_model(model)
    L = keras.layers
    in_shape = _input_shape(model)
    if len(in_shape) not in (1, 3):
        raise ExportError(
            f"input shape {in_shape} is not supported; use (features,) or (height, width, "
            "channels)")
    layers = _chain(model)
    if not layers:
        raise ExportError(f"model '{model.name}' has no layers")

    trainable_ids = {id(v): i for i, v in enumerate(model.trainable_weights)}
    parameters = [
        {"name": v.path, "shape": list(_as_tuple(v.shape)), "dtype": "float32", "layer": None,
         "role": None}
        for v in model.trainable_weights
    ]
    specs: list[LayerSpec] = []
    shape = in_shape
    for lay in layers:
        cls = type(lay).__name__
        out = _as_tuple(lay.compute_output_shape((1, *shape))[1:])
        spec = LayerSpec(lay.name, cls, "other", shape, out, trainable=bool(lay.trainable))
        if isinstance(lay, L.Conv2D) and type(lay) is L.Conv2D:
            cfg = lay.get_config()
            if cfg.get("data_format", "channels_last") != "channels_last":
                raise ExportError(f"layer '{lay.name}' (Conv2D) uses channels_first; "
                                  "use the default channels_last")
            spec.kind = "conv2d"
            spec.config = {
                "filters": int(lay.filters), "kernel_size": list(lay.kernel_size),
                "strides": list(lay.strides), "padding": lay.padding,
                "dilation_rate": list(lay.dilation_rate), "groups": int(lay.groups),
                "use_bias": bool(lay.use_bias),
                "activation": _activation_name(lay.activation),
            }
        elif type(lay) is L.Dense:
            spec.kind = "dense"
            spec.config = {"units": int(lay.units), "use_bias": bool(lay.use_bias),
                           "activation": _activation_name(lay.activation)}
            if len(shape) != 1:
                spec.ios_problem = (
                    f"is applied to a rank-{len(shape)} input {shape}; Core ML's "
                    "innerProduct needs a flat input: add a Flatten layer before it")
        elif type(lay) in (L.MaxPooling2D, L.AveragePooling2D):
            cfg = lay.get_config()
            if cfg.get("data_format", "channels_last") != "channels_last":
                raise ExportError(f"layer '{lay.name}' ({cls}) uses channels_first; "
                                  "use the default channels_last")
            spec.kind = "maxpool" if type(lay) is L.MaxPooling2D else "avgpool"
            spec.config = {"pool_size": list(lay.pool_size), "strides": list(lay.strides),
                           "padding": lay.padding}
        elif type(lay) is L.Flatten:
            spec.kind = "flatten"
        elif type(lay) is L.Dropout:
            spec.kind = "dropout"
            spec.config = {"rate": float(lay.rate)}
        elif type(lay) is L.Activation:
            spec.kind = "activation"
            spec.config = {"activation": _activation_name(lay.activation)}
        elif type(lay) is L.ReLU:
            cfg = lay.get_config()
            if (cfg.get("max_value") is not None or float(cfg.get("negative_slope", 0)) != 0
                    or float(cfg.get("threshold", 0)) != 0):
                spec.ios_problem = ("has max_value/negative_slope/threshold; Core ML trains "
                                    "only through a plain ReLU")
            spec.kind = "activation"
            spec.config = {"activation": "relu"}
        elif type(lay) is L.Softmax:
            axis = lay.get_config().get("axis", -1)
            if axis not in (-1, len(shape)):
                spec.ios_problem = f"normalises over axis {axis}; Core ML's softmax uses channels"
            spec.kind = "activation"
            spec.config = {"activation": "softmax"}
        else:
            spec.ios_problem = (
                "has no trainable Core ML equivalent (Core ML trains convolution and "
                "innerProduct layers, with gradients passing only through ReLU/sigmoid/tanh, "
                f"pooling and flatten; xflwb supports {SUPPORTED}); remove it or drop the "
                "'ios' platform")
        act = spec.config.get("activation")
        if act is not None and act not in ACTIVATIONS:
            spec.ios_problem = (
                f"uses activation '{act}', which Core ML cannot train through; use one of "
                f"{', '.join(ACTIVATIONS)} or drop the 'ios' platform")
        for w in lay.trainable_weights:
            idx = trainable_ids.get(id(w))
            if idx is None:
                continue
            spec.params.append(idx)
            parameters[idx]["layer"] = lay.name
            role = "kernel" if w is getattr(lay, "kernel", None) else (
                "bias" if w is getattr(lay, "bias", None) else w.name)
            parameters[idx]["role"] = role
        if spec.has_weights and not lay.trainable:
            spec.ios_problem = (
                "is frozen (trainable=False); frozen weighted layers are not part of the "
                "canonical parameters, which the iOS artifact needs for every convolution / "
                "innerProduct; unfreeze it or drop the 'ios' platform")
        if not spec.has_weights and lay.weights:
            spec.ios_problem = spec.ios_problem or "has weights xflwb cannot map to Core ML"
        specs.append(spec)
        shape = out

    # legacy softmax passes gradients only straight into the loss: it must be the last
    # layer that emits anything (trailing Dropout and no-op Flatten emit no Core ML layer)
    last = len(specs) - 1
    while last > 0 and (specs[last].kind == "dropout" or (
            specs[last].kind == "flatten" and len(specs[last].in_shape) == 1)):
        last -= 1
    for spec in specs[:last]:
        if spec.config.get("activation") == "softmax" and not spec.ios_problem:
            spec.ios_problem = ("applies softmax before the last layer; Core ML's softmax "
                                "passes gradients only directly into the loss")
    final = specs[last].config.get("activation", "linear")
    if specs[last].kind in ("dropout", "flatten"):
        final = "linear"
    if len(shape) != 1:
        specs[-1].ios_problem = specs[-1].ios_problem or (
            f"produces a rank-{len(shape)} output {shape}; the iOS artifact needs a flat "
            "output (end with Flatten/Dense)")
    return ModelGraph(specs, in_shape, shape, parameters, final)
