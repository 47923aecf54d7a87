"""FedBuff's rules (Nguyen et al., AISTATS 2022), transport-free: its options, the staleness
weights and ``VersionBuffer``, the aggregation state of buffered asynchronous training.

* ``FedBuff``: the option set (declared once, ``xflwb._options``), passed as the session's
  ``strategy_options`` when ``strategy="fedbuff"``.
* ``staleness_rule``: "constant", "polynomial:a" (``(1+s)^-a``, FedBuff's default a=0.5)
  or "hinge:a,b" (FedAsync's: 1 up to ``b`` versions, then ``1/(a(s-b)+1)``).
* ``VersionBuffer``: the last ``max_staleness + 1`` versions in canonical space (bounded
  memory), the buffer (a ``StreamingFedAvg`` of weighted deltas: a tensor a platform does
  not train is masked out exactly as in a round), and ``add`` / ``make_version``.
* ``Arrival``: what became of one update (a row of ``session.arrivals``).

Who gets work and what happens to each returned update is decided by
``xflwb.federation.versions``; ``xflwb.server.fedbuff`` hosts it on phones.
"""

from __future__ import annotations

import dataclasses
import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from xflwb import _options
from xflwb._options import option
from xflwb.bridge.arrays import Array
from xflwb.errors import UpdateRejected
from xflwb.federation.aggregate import StreamingFedAvg

__all__ = ["Arrival", "FedBuff", "StaleUpdate", "VersionBuffer", "fedbuff_options",
           "staleness_rule"]


@_options.declared  # unknown keywords: did you mean
@dataclass
class FedBuff:
    """FedBuff's options (``strategy="fedbuff"``, passed as ``strategy_options``)."""

    buffer_size: int = option(4, "accepted updates per new model version (FedBuff's K)",
                              ge=1, le=100_000)
    max_concurrency: int | None = option(
        None, "phones training at once (none: every connected phone that is idle)",
        ge=1, le=1_000_000)
    staleness: str = option(
        "polynomial:0.5", 'weight of an update trained on a model s versions old: '
        '"constant", "polynomial:a" ((1+s)^-a) or "hinge:a,b" (1 up to b, then '
        "1/(a(s-b)+1))")
    max_staleness: int = option(
        10, "updates trained on a model more than this many versions old are rejected (the "
        "server keeps this many past versions)", ge=0, le=10_000)
    server_lr: float = option(1.0, "server learning rate on the buffered mean delta", gt=0,
                              le=1000)
    max_versions: int | None = option(
        None, "stop after this many new versions (none: the session's rounds)", ge=1,
        le=1_000_000)
    max_seconds: float | None = option(
        None, "stop after this many seconds of training (simulated seconds on the "
        "Simulation Engine; none: no time limit)", gt=0)
    evaluate_every: int = option(
        1, "evaluate every this many versions on idle phones (0: never)", ge=0,
        le=1_000_000)

    def __post_init__(self) -> None:
        _options.check(self)
        staleness_rule(self.staleness)  # ValueError naming the spelling


def fedbuff_options(value: Any) -> FedBuff:
    """A session's ``strategy_options`` under ``strategy="fedbuff"`` (a ``FedBuff`` or its
    dict) as a checked ``FedBuff``; ``ValueError`` naming the option otherwise."""
    if isinstance(value, FedBuff):
        return value
    if not isinstance(value, dict):
        raise ValueError(f"strategy_options of fedbuff must be xflwb.FedBuff(...) or its "
                         f"dict, got {value!r}")
    try:
        return FedBuff(**value)
    except (TypeError, ValueError) as exc:  # one line naming the option (OptionError)
        raise _options.OptionError(f"strategy_options: {exc}") from None


def staleness_rule(spec: str) -> Callable[[int], float]:
    """The weight function ``s → w`` of a ``staleness`` spelling, or ``ValueError``."""
    fix = ('use "constant", "polynomial:a" with a ≥ 0 (e.g. "polynomial:0.5") or '
           '"hinge:a,b" with a, b ≥ 0 (e.g. "hinge:10,4")')
    if not isinstance(spec, str):
        raise ValueError(f"staleness must be a string; {fix}")
    name, _, args = spec.strip().lower().partition(":")
    try:
        values = [float(a) for a in args.split(",")] if args else []
    except ValueError:
        raise ValueError(f"staleness {spec!r}: {args!r} is not a number list; {fix}") from None
    if any(not math.isfinite(v) or v < 0 for v in values):
        raise ValueError(f"staleness {spec!r}: parameters must be finite and ≥ 0; {fix}")
    if name == "constant" and not values:
        return lambda s: 1.0
    if name == "polynomial" and len(values) == 1:
        a = values[0]
        return lambda s: float((1.0 + s) ** -a)
    if name == "hinge" and len(values) == 2:
        a, b = values
        return lambda s: 1.0 if s <= b else float(1.0 / (a * (s - b) + 1.0))
    raise ValueError(f"staleness {spec!r} is not understood; {fix}")


@dataclass
class Arrival:
    """What became of one update that reached the server (a row of ``session.arrivals``)."""

    version: int  # the version it went into (or would have)
    platform: str
    client: str
    base_version: int
    staleness: int
    weight: float
    examples: int
    fit_seconds: float
    seconds: float
    status: str  # "applied" | "rejected"
    reason: str = ""
    bytes_up: int = 0
    bytes_down: int = 0
    capped: bool = False
    #: what the update and its model would have cost as float32 (compression's reference)
    bytes_up_float32: int = 0
    bytes_down_float32: int = 0

    def row(self) -> dict[str, Any]:
        """The registry's row (``Registry.add_arrivals``)."""
        d = dataclasses.asdict(self)
        for k in ("bytes_up", "bytes_down", "capped", "bytes_up_float32",
                  "bytes_down_float32"):
            d.pop(k)
        return d


class StaleUpdate(UpdateRejected):
    """An update trained on a version older than ``max_staleness`` allows (a ``ValueError``,
    as before the error tree)."""


class VersionBuffer:
    """FedBuff's aggregation state: past versions, the buffer, the staleness rule. No
    validation here: the caller maps and checks each update against its base version first
    (the injected ``accept`` of ``xflwb.federation.versions``), so a bad update never
    reaches ``add``."""

    def __init__(self, initial: list[Array], version: int, options: FedBuff,
                 masks: dict[str, list[bool]]) -> None:
        self.options = options
        self.weight_of = staleness_rule(options.staleness)
        self.version = int(version)
        #: version → canonical float32 model; the newest ``max_staleness + 1``
        self.versions: OrderedDict[int, list[Array]] = OrderedDict()
        self.versions[self.version] = [np.asarray(a, np.float32) for a in initial]
        self.masks = masks
        self._zeros = [np.zeros(a.shape, np.float32) for a in initial]
        self.buffer = StreamingFedAvg(self._zeros)
        self.pending: list[Arrival] = []  # applied arrivals in the current buffer

    @property
    def current(self) -> list[Array]:
        return self.versions[self.version]

    def base(self, version: int, platform: str, client: str) -> list[Array]:
        """The model ``version`` (raises ``StaleUpdate`` when it is too old)."""
        staleness = self.version - version
        if staleness > self.options.max_staleness or version not in self.versions:
            raise StaleUpdate(
                f"stale update: {platform} client {client} trained on version {version}, "
                f"the model is at version {self.version} (staleness {staleness} > "
                f"max_staleness {self.options.max_staleness}); rejected")
        return self.versions[version]

    def add(self, arrival: Arrival, canonical: list[Array], examples: int) -> None:
        """Buffer one accepted update: its delta to its base version, scaled by its
        staleness weight, weighted by its examples, over the tensors its platform trains."""
        base = self.versions[arrival.base_version]
        mask = self.masks[arrival.platform]
        w = np.float32(arrival.weight)
        with np.errstate(over="ignore", invalid="ignore"):  # inf: refused by add below
            deltas = [(np.subtract(c, b, dtype=np.float32) * w) if t else z
                      for c, b, t, z in zip(canonical, base, mask, self._zeros, strict=True)]
        self.buffer.add(deltas, examples, mask)  # validates: NaN/inf rejects only this one
        self.pending.append(arrival)

    @property
    def full(self) -> bool:
        return self.buffer.count >= self.options.buffer_size

    def make_version(self) -> tuple[list[Array], list[Arrival]]:
        """Apply the buffer: ``new = current + server_lr · Σ n·s·Δ / Σ n`` per tensor (over
        the updates whose platform trains it; untouched tensors keep their value). Returns
        the new model and the arrivals it holds; raises ``FloatingPointError`` (and keeps
        the model) when the step is not finite."""
        mean = self.buffer.result()
        lr = np.float32(self.options.server_lr)
        new = [np.add(g, lr * d, dtype=np.float32) for g, d in zip(self.current, mean,
                                                                    strict=True)]
        applied, self.pending = self.pending, []
        self.buffer = StreamingFedAvg(self._zeros)
        if not all(np.isfinite(a).all() for a in new):
            raise FloatingPointError("the buffered step produced NaN or inf")
        self.version += 1
        self.versions[self.version] = new
        while len(self.versions) > self.options.max_staleness + 1:
            self.versions.popitem(last=False)
        return new, applied
