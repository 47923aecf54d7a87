"""Can the exported model learn at all? Checks run at export on a deterministic probe batch.

Parity proves the artifacts compute what Keras computes; it cannot tell that what Keras
computes is useless. A frozen ``keras.applications`` backbone built with ``weights=None``
(random weights, BatchNormalization at its initial statistics) maps every image to ~1e-11:
the export is "parity ok" and training stays at chance. These checks turn such a model into
an ``ExportWarning`` at export instead of a week of flat curves.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from xflwb.bridge.arrays import AnyArray
from xflwb.bridge.graph import INPUT, ModelGraph, Node

#: the frozen part's output counts as constant when its largest spread across the probe
#: batch is below this (absolute) ...
CONSTANT_ABS = 1e-6
#: ... or below this fraction of its mean magnitude
CONSTANT_REL = 1e-5
#: one full-batch step that changes the loss by less than this (relative) does not learn
STILL_REL = 1e-6


class ExportWarning(UserWarning):
    """The export succeeded, but the model (or its data type) will not train as expected."""

    __module__ = "xflwb"  # public as xflwb.ExportWarning in every process (xflwb/__init__.py)


def frozen_boundary(graph: ModelGraph) -> list[Node]:
    """The frozen part's outputs: nodes computed from the input through layers without
    trainable weights, at least one of them frozen, that feed a node outside that part."""
    inside: dict[str, bool] = {INPUT: False}  # name → has a frozen node upstream (or is one)
    for n in graph.nodes:
        if not n.params and all(s in inside for s in n.inputs):
            inside[n.name] = n.frozen or any(inside[s] for s in n.inputs)
    return [n for n in graph.nodes if inside.get(n.name) and any(
        c.name not in inside for c in graph.consumers(n.name))]


def _call(node: Node, args: list[Any]) -> Any:
    """One layer call in inference mode, as the exported graph reads it."""
    if node.keras_class.startswith("ops."):
        if "scalar" in node.config:
            s = node.config["scalar"]
            args = [args[0], s] if node.config["tensor_first"] else [s, args[0]]
        return node.layer(*args)
    return node.layer(args if len(args) > 1 else args[0], training=False)


def frozen_outputs(graph: ModelGraph, x: AnyArray) -> dict[str, AnyArray]:
    """The frozen part's outputs on ``x``, evaluated layer by layer (they may sit inside a
    nested backbone, where no Keras sub-model can reach them)."""
    import keras

    boundary = frozen_boundary(graph)
    if not boundary:
        return {}
    last = max(graph.nodes.index(n) for n in boundary)
    values: dict[str, Any] = {INPUT: keras.ops.convert_to_tensor(x)}
    for n in graph.nodes[:last + 1]:
        if all(s in values for s in n.inputs) and not n.params:
            values[n.name] = _call(n, [values[s] for s in n.inputs])
    return {n.name: np.asarray(keras.ops.convert_to_numpy(values[n.name]), np.float64)
            for n in boundary}


def constant_backbone(graph: ModelGraph, x: AnyArray) -> str | None:
    """The warning for a frozen part whose output does not depend on the input, else None."""
    outputs = frozen_outputs(graph, x)
    flat = [(name, v.reshape(len(v), -1)) for name, v in outputs.items()]
    if not flat:
        return None
    spread = max(float(v.std(axis=0).max()) if v.size else 0.0 for _, v in flat)
    scale = max(float(np.abs(v).mean()) if v.size else 0.0 for _, v in flat)
    if spread > CONSTANT_ABS and spread > CONSTANT_REL * scale:
        return None
    names = ", ".join(f"'{name}'" for name, _ in flat[:3]) + (" …" if len(flat) > 3 else "")
    return (f"the frozen backbone's output is constant (std {spread:.2g} across a probe "
            f"batch of {len(x)}, mean |value| {scale:.2g}, at {names}): the head cannot "
            "learn; were the weights loaded? (keras.applications models built with "
            "weights=None have random weights whose BatchNormalization statistics shrink "
            "every input to ~0: load pretrained weights, or unfreeze the backbone)")


def still_loss(before: float, after: float, learning_rate: float) -> str | None:
    """The warning for one full-batch step that leaves the loss unchanged, else None."""
    change = abs(after - before)
    if not np.isfinite(before) or not np.isfinite(after):
        return (f"one training step on a probe batch gives a non-finite loss ({before:.4g} → "
                f"{after:.4g}); lower the learning rate ({learning_rate:g}) or check the "
                "inputs' scale")
    if change > STILL_REL * max(abs(before), 1e-12):
        return None
    return (f"one training step on a probe batch leaves the loss at {before:.6g} (change "
            f"{change:.2g}): the trainable layers get no useful gradient; check the "
            f"learning rate ({learning_rate:g}), frozen layers, and activations that are "
            "never active")
