"""Core ML's rules for updatable neural networks, in one place.

Mirrors apple/coremltools ``UpdatableNeuralNetworkValidator.cpp`` and
``NeuralNetworkValidatorGraph.hpp``: which layer types may be marked updatable, which pass
gradients back, and the breadth-first walk from the loss layer that rejects any updatable
layer reached after a layer that does not back-propagate. The exporter uses ``trainable_set``
to decide what iOS trains (its per-platform plan); the executor uses ``validate`` to refuse
specs a phone would refuse. Both therefore agree with Core ML by construction.

Works on parsed protobuf messages only (no coremltools import), so virtual iPhones stay light.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from xflwb.errors import ExportFailure

#: layer types Core ML can update (weights and, if present, bias)
UPDATABLE_TYPES = ("convolution", "innerProduct")
#: layer types whose gradients Core ML computes (``isLayerSupportedForBackprop``)
BACKPROP_TYPES = ("convolution", "innerProduct", "flatten", "pooling", "batchnorm", "reshape")
#: activation functions Core ML back-propagates through
BACKPROP_ACTIVATIONS = ("ReLU", "sigmoid", "tanh")


class CoreMLRuleError(ExportFailure, ValueError):
    """A spec Core ML would refuse as an updatable model; the message names the layer."""


@dataclass(frozen=True)
class Node:
    """What the validator needs of one layer: name, type, blobs, backprop support."""

    name: str
    kind: str  # the layer oneof: convolution, activation, add, ...
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    backprop: bool
    updatable: bool = False


def supports_backprop(kind: str, activation: str | None = None) -> bool:
    """``isLayerSupportedForBackprop``: the type, and for activations the function."""
    if kind == "activation":
        return activation in BACKPROP_ACTIVATIONS
    return kind in BACKPROP_TYPES


def node_of(layer: Any) -> Node:
    """A ``Node`` for one ``NeuralNetworkLayer`` message."""
    kind = layer.WhichOneof("layer") or ""
    act = layer.activation.WhichOneof("NonlinearityType") if kind == "activation" else None
    return Node(layer.name, kind, tuple(layer.input), tuple(layer.output),
                supports_backprop(kind, act), bool(layer.isUpdatable))


def _parents(nodes: Sequence[Node]) -> dict[str, list[Node]]:
    """Parents of each node, in input order, as the validator's graph links them (a blob's
    producer is the *last* layer before this one that wrote it)."""
    producer: dict[str, Node] = {}
    parents: dict[str, list[Node]] = {}
    for n in nodes:
        parents[n.name] = [producer[b] for b in n.inputs if b in producer]
        for b in n.outputs:
            producer[b] = n
    return parents


def walk(nodes: Sequence[Node], loss_input: str, loss_is_cce: bool
         ) -> list[tuple[Node, str | None]]:
    """The validator's breadth-first walk from the loss layer.

    Returns every node the walk reaches, in visiting order, with the first
    non-backpropagable layer visited before it (None if none yet; a legacy softmax feeding a
    cross-entropy loss does not count). Core ML refuses an updatable node that has one.
    """
    loss = Node("__loss__", "loss", (loss_input,), (), False)
    parents = _parents([*nodes, loss])
    seen: set[str] = set()
    order: list[tuple[Node, str | None]] = []
    blocker: str | None = None
    queue: deque[Node] = deque([loss])
    while queue:
        cur = queue.popleft()
        for p in parents[cur.name]:
            if p.name in seen:
                continue
            seen.add(p.name)
            queue.append(p)
            order.append((p, blocker))
            fused = p.kind == "softmax" and cur is loss and loss_is_cce
            if not p.backprop and not fused and blocker is None:
                blocker = p.name
    return order


def trainable_set(nodes: Sequence[Node], loss_input: str, loss_is_cce: bool,
                  candidates: Iterable[str]) -> tuple[set[str], dict[str, str]]:
    """Which of ``candidates`` (conv / innerProduct layer names) Core ML can train.

    A candidate trains when the walk reaches it before any non-backpropagable layer. The
    others map to the name of the first such layer (the one that blocks them), or to ""
    when the loss does not reach them at all.
    """
    wanted = set(candidates)
    ok: set[str] = set()
    why: dict[str, str] = dict.fromkeys(wanted, "")
    for n, blocker in walk(nodes, loss_input, loss_is_cce):
        if n.name in wanted:
            if blocker is None:
                ok.add(n.name)
                del why[n.name]
            else:
                why[n.name] = blocker
    return ok, why


def kinds_of(nodes: Sequence[Node], name: str) -> str:
    for n in nodes:
        if n.name == name:
            return n.kind
    return "?"


def validate(layers: Sequence[Any], loss_input: str, loss_is_cce: bool) -> None:
    """Raise ``CoreMLRuleError`` where Core ML would refuse the updatable spec."""
    nodes = [node_of(lay) for lay in layers]
    names = [n.name for n in nodes]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise CoreMLRuleError(f"layer names {sorted(dup)} are used more than once (Core ML "
                              "refuses name collisions in updatable models)")
    if not any(n.updatable for n in nodes):
        raise CoreMLRuleError("the model is marked updatable, but none of its layers is")
    for n in nodes:
        if n.updatable and n.kind not in UPDATABLE_TYPES:
            raise CoreMLRuleError(f"layer '{n.name}' ({n.kind}) is marked updatable, but Core "
                                  "ML updates only convolution and innerProduct layers")
    for n, blocker in walk(nodes, loss_input, loss_is_cce):
        if n.updatable and blocker is not None:
            raise CoreMLRuleError(
                f"layer '{blocker}' ({kinds_of(nodes, blocker)}) does not support "
                f"backpropagation, yet the updatable layer '{n.name}' lies between it and "
                "the input; Core ML rejects this model (freeze the layers before it)")
