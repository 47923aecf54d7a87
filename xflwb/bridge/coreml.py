"""Build an updatable Core ML neural network from a ``ModelGraph``, layer by layer.

``ct.convert`` is not used: it cannot read Keras 3 models and its TF path emits
batchedMatmul/softmaxND/transpose layers that Core ML cannot train (DESIGN §3). Every layer
here is one Core ML can train or backpropagate through (COREML_TRAINING.md).
"""

from __future__ import annotations

import contextlib
import io
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from xflwb.bridge.graph import ExportError, ModelGraph
from xflwb.bridge.optim import SGD, Adam, Optimizer

INPUT_NAME = "x"
OUTPUT_NAME = "output"
LOSS_NAME = "loss"
TARGET_NAME = OUTPUT_NAME + "_true"
#: epochs and mini-batch sizes a session may ask a phone for: Core ML throws on any
#: runtime override outside the model's allowed set (COREML_TRAINING.md).
ALLOWED_EPOCHS = tuple(range(1, 101))
ALLOWED_BATCH_SIZES = tuple(range(1, 257))

_ACT = {"relu": "RELU", "sigmoid": "SIGMOID", "tanh": "TANH"}


@dataclass
class CoreMLBuild:
    spec: Any
    coreml_layers: list[dict[str, Any]] = field(default_factory=list)
    io: dict[str, Any] = field(default_factory=dict)


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


def platform_layout(spec_kind: str, shape: tuple[int, ...], chw: tuple[int, ...] | None
                    ) -> tuple[str, list[int]]:
    """Layout name and Core ML shape of a canonical kernel (see ``params``)."""
    if spec_kind == "conv2d":
        kh, kw, cin, cout = shape
        return "conv", [cout, cin, kh, kw]
    cin, cout = shape
    if chw is not None and chw[1] * chw[2] > 1:
        return "dense_chw", [cout, cin]
    return "dense", [cout, cin]


def build(graph: ModelGraph, canonical: list[np.ndarray], loss: str, optimizer: Optimizer,
          batch_size: int, epochs: int) -> CoreMLBuild:
    """Return the spec and FedKit's ``coreml_layers`` for the chain in ``graph``."""
    problems = graph.ios_problems()
    if problems:
        raise ExportError("the model cannot train on iOS (Core ML):\n  - "
                          + "\n  - ".join(problems)
                          + "\nFix these layers or export with platforms=('android',).")
    datatypes, NeuralNetworkBuilder, SgdParams, AdamParams = _quiet_import()

    if len(graph.input_shape) == 3:
        h, w, c = graph.input_shape
        in_type = datatypes.Array(c, h, w)
    else:
        in_type = datatypes.Array(graph.input_shape[0])
    out_dim = int(graph.output_shape[0])
    builder = NeuralNetworkBuilder([(INPUT_NAME, in_type)],
                                   [(OUTPUT_NAME, datatypes.Array(out_dim))])

    # Plan the ops first so the last one can write the model's output blob.
    ops: list[tuple[str, str, dict[str, Any]]] = []  # (kind, name, details)
    coreml_layers: list[dict[str, Any]] = []
    updatable: list[str] = []
    chw: tuple[int, ...] | None = None  # set by a Flatten until the next Dense consumes it
    for lay in graph.layers:
        cfg = lay.config
        if lay.kind == "conv2d":
            ops.append(("conv", lay.name, {"lay": lay}))
            chw = None
        elif lay.kind == "dense":
            ops.append(("dense", lay.name, {"lay": lay, "chw": chw}))
            chw = None
        elif lay.kind in ("maxpool", "avgpool"):
            ops.append(("pool", lay.name, {"lay": lay}))
        elif lay.kind == "flatten":
            if len(lay.in_shape) == 3:
                h, w, c = lay.in_shape
                chw = (c, h, w)
                ops.append(("flatten", lay.name, {}))
        elif lay.kind == "dropout":
            continue  # Core ML has no dropout: identity in prediction and training
        if lay.kind in ("conv2d", "dense", "activation"):
            act = cfg.get("activation", "linear")
            if act == "linear":
                continue
            act_name = lay.name if lay.kind == "activation" else f"{lay.name}__{act}"
            ops.append(("softmax" if act == "softmax" else "act", act_name, {"act": act}))

    if not ops:
        raise ExportError("the model has no layer Core ML can run")
    if loss == "categorical_crossentropy" and ops[-1][0] != "softmax":
        raise ExportError("loss 'categorical_crossentropy' needs the model to end in a "
                          "softmax; add activation='softmax' to the last layer or use "
                          "loss='mse'")
    if loss == "mse" and any(op[0] == "softmax" for op in ops) and graph.final_activation == (
            "softmax"):
        raise ExportError("loss 'mse' on a softmax output cannot train in Core ML (MSE "
                          "needs an input produced inside the graph, not a softmax); drop "
                          "the final softmax or use loss='categorical_crossentropy'")

    blob = INPUT_NAME
    for i, (kind, name, d) in enumerate(ops):
        out = OUTPUT_NAME if i == len(ops) - 1 else name
        if kind == "conv":
            lay = d["lay"]
            cfg = lay.config
            k, b = canonical[lay.params[0]], (canonical[lay.params[1]] if cfg["use_bias"]
                                               else None)
            kh, kw, cin_g, cout = k.shape
            builder.add_convolution(
                name=name, kernel_channels=int(cin_g), output_channels=int(cout),
                height=int(kh), width=int(kw), stride_height=cfg["strides"][0],
                stride_width=cfg["strides"][1], border_mode=cfg["padding"],
                groups=cfg["groups"], W=np.asarray(k, np.float32),
                b=None if b is None else np.asarray(b, np.float32), has_bias=b is not None,
                input_name=blob, output_name=out, dilation_factors=list(cfg["dilation_rate"]),
                same_padding_asymmetry_mode="BOTTOM_RIGHT_HEAVY")
            layout, shape = platform_layout("conv2d", k.shape, None)
            _add_entries(coreml_layers, name, lay, layout, shape, None)
            updatable.append(name)
        elif kind == "dense":
            lay = d["lay"]
            from xflwb.bridge.params import to_platform_array

            k = canonical[lay.params[0]]
            b = canonical[lay.params[1]] if lay.config["use_bias"] else None
            layout, shape = platform_layout("dense", k.shape, d["chw"])
            w = to_platform_array(k, layout, d["chw"])
            builder.add_inner_product(
                name=name, W=np.asarray(w, np.float32),
                b=None if b is None else np.asarray(b, np.float32),
                input_channels=int(k.shape[0]), output_channels=int(k.shape[1]),
                has_bias=b is not None, input_name=blob, output_name=out)
            _add_entries(coreml_layers, name, lay, layout, shape, d["chw"])
            updatable.append(name)
        elif kind == "pool":
            lay = d["lay"]
            cfg = lay.config
            builder.add_pooling(
                name=name, height=cfg["pool_size"][0], width=cfg["pool_size"][1],
                stride_height=cfg["strides"][0], stride_width=cfg["strides"][1],
                layer_type="MAX" if lay.kind == "maxpool" else "AVERAGE",
                padding_type=cfg["padding"].upper(), input_name=blob, output_name=out,
                exclude_pad_area=True, same_padding_asymmetry_mode="BOTTOM_RIGHT_HEAVY")
        elif kind == "flatten":
            builder.add_flatten(name=name, mode=0, input_name=blob, output_name=out)
        elif kind == "act":
            builder.add_activation(name=name, non_linearity=_ACT[d["act"]], input_name=blob,
                                   output_name=out)
        elif kind == "softmax":
            builder.add_softmax(name=name, input_name=blob, output_name=out)
        blob = out

    builder.make_updatable(updatable)
    with contextlib.redirect_stdout(io.StringIO()):  # the builder prints what it adds
        if loss == "categorical_crossentropy":
            builder.set_categorical_cross_entropy_loss(name=LOSS_NAME, input=OUTPUT_NAME)
        else:
            builder.set_mean_squared_error_loss(
                name=LOSS_NAME, input_feature=(OUTPUT_NAME, datatypes.Array(out_dim)))
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
    spec = builder.spec
    spec.description.metadata.shortDescription = "xflwb export (updatable neural network)"
    info = {"input_name": INPUT_NAME, "input_shape": list(in_type.dimensions),
          "output_name": OUTPUT_NAME, "target_name": TARGET_NAME,
          "target_dtype": "int32" if loss == "categorical_crossentropy" else "double",
          "flatten_mode": "CHANNEL_FIRST",
          "allowed_epochs": [epoch_set[0], epoch_set[-1]],
          "allowed_batch_sizes": [batches[0], batches[-1]],
          "specification_version": int(spec.specificationVersion)}
    return CoreMLBuild(spec, coreml_layers, info)


def _add_entries(entries: list[dict[str, Any]], name: str, lay: Any, layout: str,
                 shape: list[int], chw: tuple[int, ...] | None) -> None:
    entry = {"name": name, "type": "weights", "updatable": True, "shape": shape,
             "canonical": lay.params[0], "layout": layout}
    if layout == "dense_chw":
        entry["chw"] = list(chw)
    entries.append(entry)
    if lay.config["use_bias"]:
        entries.append({"name": name, "type": "bias", "updatable": True,
                        "shape": [shape[0]], "canonical": lay.params[1],
                        "layout": "identity"})


def save(spec: Any, path: Path) -> None:
    """Write the protobuf; works on Linux (only prediction needs macOS)."""
    from coremltools.models.utils import save_spec

    save_spec(spec, str(path))


def load_spec(path: Path) -> Any:
    from coremltools.models.utils import load_spec as _load

    return _load(str(path))
