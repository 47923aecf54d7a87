"""Robust rules: Flower's FedMedian, FedTrimmedAvg and Krum, applied per tensor group.

A robust rule replaces the mean: it needs every update of the round at once (memory
O(clients × parameters)), bounds outliers itself (so the peers' norm bound is off) and is
no mean DP could noise. ``aggregate_robust`` applies Flower's own functions to the groups
of tensors trained by the same clients, so a platform's frozen copy never pulls a median
back. The options (``beta``, ``num_malicious_clients``, ``num_clients_to_keep``) are
checked by Flower's class of the same name, and read from it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from xflwb.bridge.arrays import Array
from xflwb.federation.aggregate import aggregate_robust
from xflwb.federation.policies.base import Metric, flower_rule
from xflwb.federation.update import Update

__all__ = ["FedMedian", "FedTrimmedAvg", "Krum", "RobustRule"]


class RobustRule:
    """Keeps the round's updates; ``result`` applies the rule ``name``."""

    name = ""
    checks_finite = False  # raw updates are kept: the gate checks them
    relative_norms = False
    allows_dp = False
    dp: Any = None

    def __init__(self, global_: Sequence[Array], **options: Any) -> None:
        self.global_ = [np.asarray(a, np.float32) for a in global_]
        self.flower = flower_rule(self.name, self.global_, options)
        self.round = 0
        self._kept: list[tuple[list[Array], int, list[bool]]] = []

    def describe(self) -> str:
        return type(self.flower).__name__

    def begin(self, global_: list[Array], round: int) -> None:
        self.global_ = global_
        self.round = int(round)
        self._kept = []

    def add(self, update: Update) -> None:
        self._kept.append((update.tensors, int(update.examples), list(update.trained)))

    def result(self) -> list[Array] | None:
        if not self._kept:
            return None
        kept, self._kept = self._kept, []  # the round's updates are freed with it
        # the options as Flower's constructor accepted them
        return aggregate_robust(
            self.global_, kept, self.name, beta=getattr(self.flower, "beta", 0.2),
            num_malicious_clients=getattr(self.flower, "num_malicious_clients", 0),
            num_clients_to_keep=getattr(self.flower, "num_clients_to_keep", 0))

    def end(self, failures: int) -> list[Metric]:
        return []


class FedMedian(RobustRule):
    name = "fedmedian"


class FedTrimmedAvg(RobustRule):
    name = "fedtrimmedavg"


class Krum(RobustRule):
    name = "krum"
