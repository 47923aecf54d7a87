"""Build an updatable Core ML neural network from a ``ModelGraph``, layer by layer, as a DAG.

``ct.convert`` is not used: it cannot read Keras 3 models and its TF path emits
batchedMatmul/softmaxND/transpose layers that Core ML cannot train. The layers themselves
come from ``coreml_emit`` (one emitter per Keras class).

What iOS trains is decided here, after the network is built, by Core ML's own rule
(``coreml_rules``): a convolution / innerProduct layer holding canonical parameters trains
when the loss reaches it through back-propagating layers only. Everything else is baked.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

from xflwb.bridge import coreml_rules
from xflwb.bridge.coreml_emit import (
    INPUT_NAME,
    Emitter,
    Refused,
    WeightTensor,
    coreml_shape,
    input_dims,
)
from xflwb.bridge.graph import ExportError, ModelGraph
from xflwb.bridge.manifest import CoreMLLayer
from xflwb.bridge.optim import SGD, Adam, Optimizer
from xflwb.errors import InputError

OUTPUT_NAME = "output"
LOSS_NAME = "loss"
TARGET_NAME = OUTPUT_NAME + "_true"
#: epochs and mini-batch sizes a session may ask a phone for: Core ML throws on any
#: runtime override outside the model's allowed set (``MLModelConfiguration.parameters``).
ALLOWED_EPOCHS = tuple(range(1, 101))
ALLOWED_BATCH_SIZES = tuple(range(1, 257))
IOS_TRAINING = ("auto", "strict")



class ModelIO(TypedDict):
    """The artifact's interface, as the manifest's ``platforms.ios`` lists it."""

    input_name: str
    input_shape: list[int]
    output_name: str
    target_name: str
    target_dtype: str
    flatten_mode: str
    allowed_epochs: list[int]  # [min, max]
    allowed_batch_sizes: list[int]  # [min, max]
    specification_version: int
    layers: int


@dataclass
class CoreMLBuild:
    spec: Any
    coreml_layers: list[CoreMLLayer]
    io: ModelIO
    plan: dict[str, tuple[str, str]]  # node → (status, why)
    trained: list[int]  # canonical indices iOS trains


def _quiet_import() -> tuple[Any, Any, Any, Any]:
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
        raise InputError(f"ios_training must be one of {IOS_TRAINING}, got {ios_training!r}")
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
    e = Emitter(builder, graph)
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
    entries: list[CoreMLLayer] = []
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
    info: ModelIO = {"input_name": INPUT_NAME, "input_shape": dims,
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


def _plan(graph: ModelGraph, e: Emitter, ok: set[str], why: dict[str, str]
          ) -> dict[str, tuple[str, str]]:
    """Per graph node: what iOS does with it (trained / frozen on iOS / frozen / runs)."""
    by_node: dict[str, list[WeightTensor]] = {}
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
