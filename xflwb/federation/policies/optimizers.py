"""Server optimisers: Flower's FedAvgM, FedAdam, FedYogi and FedAdagrad on the masked mean.

Each takes the round's masked mean (``FedAvg.mean``) and hands it to Flower's own strategy
as the round's single result, so the server-side update acts on the canonical
pseudo-gradient exactly as Flower defines it (its momentum / second-moment state lives in
that Flower object across rounds). The rule is reached through ``xflwb.flower_legacy``
(``server_update``), never Flower's transport.
"""

from __future__ import annotations

from xflwb.bridge.arrays import Array
from xflwb.federation.policies.fedavg import FedAvg

__all__ = ["FedAdagrad", "FedAdam", "FedAvgM", "FedYogi", "ServerOptimizer"]


class ServerOptimizer(FedAvg):
    """The masked mean, then Flower's server-side update rule of ``name``."""

    def step(self, mean: list[Array]) -> list[Array]:
        from xflwb.flower_legacy import server_update

        return server_update(self.flower, self.round, mean, max(1, self.examples))


class FedAvgM(ServerOptimizer):
    name = "fedavgm"


class FedAdam(ServerOptimizer):
    name = "fedadam"


class FedYogi(ServerOptimizer):
    name = "fedyogi"


class FedAdagrad(ServerOptimizer):
    name = "fedadagrad"
