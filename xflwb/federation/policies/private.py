"""``Private``: central DP as a wrapper around any mean policy (FedAvg, a server optimiser),
in the manner of Flower's ``DifferentialPrivacyServerSide*Clipping`` wrappers.

Each update's delta to the round's model is clipped to C over the tensors its platform
trains and counts once (weight 1: sensitivity C); the masked mean gets Gaussian noise per
tensor, calibrated to the clients behind that tensor; then the wrapped policy's server
update runs on the noised mean (post-processing). ``xflwb.federation.dp`` holds the
mechanism (``CentralDP``: clipping norm, noise, ε ledger) and says why Flower's wrappers
themselves cannot be used on a canonical, masked mean.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any

from xflwb.bridge.arrays import Array
from xflwb.errors import InputError
from xflwb.federation.dp import CentralDP
from xflwb.federation.policies.base import Metric
from xflwb.federation.update import Update

__all__ = ["Private"]


class Private:
    """``inner`` (a mean policy: ``allows_dp``) made differentially private by ``dp``."""

    checks_finite = True  # the wrapped mean validates every clipped update
    relative_norms = False  # weights are 1 and clipped; a peer-dependent rejection would
    #                         break the noise's sensitivity
    allows_dp = False  # once is enough

    def __init__(self, inner: Any, dp: CentralDP | dict[str, Any]) -> None:
        if not getattr(inner, "allows_dp", False):
            raise InputError(f"privacy (central DP) cannot be combined with strategy "
                             f"{inner.name!r}: use fedavg or a server optimiser")
        self.inner = inner
        self.name = inner.name
        self.dp = dp if isinstance(dp, CentralDP) else CentralDP(dp)
        self.global_: list[Array] = list(getattr(inner, "global_", []))
        self._released = False
        self._noise_std = 0.0

    def describe(self) -> str:
        return str(self.inner.describe())

    def begin(self, global_: list[Array], round: int) -> None:
        self.global_ = global_
        self.dp.begin()
        self.inner.begin(global_, round)
        self._released, self._noise_std = False, 0.0

    def add(self, update: Update) -> None:
        """Clip ``update``'s delta (its reported ``norm_bit`` checked), add it with weight
        1, count its bit."""
        clipped, bit = self.dp.clip(update.tensors, self.global_, update.trained,
                                    update.metrics)
        self.inner.add(dataclasses.replace(update, tensors=clipped), weight=1)
        self.dp.counted(bit)

    def add_sum(self, tensors: Sequence[Array], weight: int, trained: Sequence[bool],
                examples: int = 0) -> None:
        """Sums the clients clipped themselves (SecAgg+): added as they are."""
        self.inner.add_sum(tensors, weight, trained, examples)

    def reported(self, bits: Iterable[float | None]) -> None:
        """The norm bits clients reported where the server cannot check them (SecAgg+):
        counted as reported (a missing one as 1, not clipped)."""
        for bit in bits:
            self.dp.counted(1.0 if bit is None else bit)

    def result(self) -> list[Array] | None:
        mean = self.inner.mean()
        if mean is None:
            return None
        self._released = True  # the noised mean, before any server optimiser
        self._noise_std = self.dp.add_noise(mean, self.inner.weights)
        stepped: list[Array] = self.inner.step(mean)
        return stepped

    def end(self, failures: int) -> list[Metric]:
        """Compose the round into the ledger (if it released a model): epsilon, noise_std,
        clipping_norm."""
        return self.dp.end_round(self._released, self._noise_std, failures)
