"""``FedAvg``: the masked, example-weighted mean of the round's updates (streamed).

Parameter ``k`` is averaged over the updates whose platform trains it, weighted by their
examples (``StreamingFedAvg``: O(parameters) memory, float64 sums); one nobody trained keeps
its value. It is also the mean the server optimisers (``optimizers``) and the DP wrapper
(``private``) build on: ``mean()`` then ``step(mean)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from xflwb.bridge.arrays import Array
from xflwb.federation.aggregate import StreamingFedAvg
from xflwb.federation.policies.base import Metric, flower_rule
from xflwb.federation.update import Update

__all__ = ["FedAvg"]


class FedAvg:
    """The plain masked mean; subclasses change ``step`` (the server-side update)."""

    name = "fedavg"
    checks_finite = True  # StreamingFedAvg validates every update before it touches a sum
    relative_norms = True
    allows_dp = True
    dp: Any = None

    def __init__(self, global_: Sequence[Array], **options: Any) -> None:
        self.global_ = [np.asarray(a, np.float32) for a in global_]
        #: Flower's class of the same name: its constructor checked ``options`` (and a
        #: server optimiser's update rule is its ``aggregate_fit``)
        self.flower = flower_rule(self.name, self.global_, options)
        self.round = 0
        self._agg = StreamingFedAvg(self.global_)
        #: examples behind this round's mean (what a server optimiser tells Flower's rule)
        self.examples = 0

    def describe(self) -> str:
        return type(self.flower).__name__

    def begin(self, global_: list[Array], round: int) -> None:
        self.global_ = global_
        self.round = int(round)
        self._agg = StreamingFedAvg(global_)
        self.examples = 0

    def add(self, update: Update, weight: int | None = None) -> None:
        """Fold ``update`` in with ``weight`` (default: its examples)."""
        self._agg.add(update.tensors, update.examples if weight is None else weight,
                      update.trained)
        self.examples += int(update.examples)

    def add_sum(self, tensors: Sequence[Array], weight: int, trained: Sequence[bool],
                examples: int = 0) -> None:
        """A contribution aggregated elsewhere (SecAgg+'s unmasked sums), trusted as it is:
        ``weight`` per trained tensor, ``examples`` the clients behind it."""
        self._agg.add(tensors, weight, trained)
        self.examples += int(examples)

    @property
    def count(self) -> int:
        """Contributions in this round's mean."""
        return self._agg.count

    @property
    def weights(self) -> list[int]:
        """The weight behind each tensor's mean (0: nobody trained it)."""
        return self._agg.examples_per_parameter

    def mean(self) -> list[Array] | None:
        """The round's masked mean, or None when nothing was added."""
        return self._agg.result() if self._agg.count else None

    def step(self, mean: list[Array]) -> list[Array]:
        """The server-side update from the round's mean: FedAvg takes the mean."""
        return mean

    def result(self) -> list[Array] | None:
        mean = self.mean()
        return None if mean is None else self.step(mean)

    def end(self, failures: int) -> list[Metric]:
        return []
