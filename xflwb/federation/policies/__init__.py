"""Policies: what turns a round's accepted updates into the next global model.

One module per policy, each following the small protocol of ``base.Policy``
(``begin`` / ``add`` / ``result`` / ``end``); DP wraps a mean policy (``private``);
SecAgg+ sums enter a mean (``secure_sums``). Adding a strategy is one module plus one line in
``POLICIES``: the choices of ``strategy=`` (``xflwb.server.config.STRATEGIES``) derive from
it. Importing this package imports no Flower: the policies reach Flower's update rules and
aggregate functions through ``xflwb.flower_legacy`` when they are built.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from xflwb.bridge.arrays import Array
from xflwb.federation.policies.base import Metric, Policy
from xflwb.federation.policies.fedavg import FedAvg
from xflwb.federation.policies.optimizers import FedAdagrad, FedAdam, FedAvgM, FedYogi
from xflwb.federation.policies.private import Private
from xflwb.federation.policies.robust import FedMedian, FedTrimmedAvg, Krum
from xflwb.federation.policies.secure_sums import add_secure_sums

__all__ = ["POLICIES", "ROBUST", "SYNCHRONOUS", "FedAvg", "Metric", "Policy", "Private",
           "add_secure_sums", "build"]

#: every synchronous strategy by the name ``strategy=`` takes (its class builds it from the
#: initial model and ``strategy_options``)
POLICIES: dict[str, type[Any]] = {
    "fedavg": FedAvg, "fedavgm": FedAvgM, "fedadam": FedAdam, "fedyogi": FedYogi,
    "fedadagrad": FedAdagrad, "fedmedian": FedMedian, "fedtrimmedavg": FedTrimmedAvg,
    "krum": Krum,
}
SYNCHRONOUS = tuple(POLICIES)
#: the policies that replace the mean (no DP, no relative norm bound, the gate checks NaN)
ROBUST = tuple(name for name, cls in POLICIES.items() if not cls.allows_dp)


def build(name: str, initial: Sequence[Array], options: dict[str, Any] | None = None,
          privacy: Any = None) -> Any:
    """The policy ``name`` over ``initial`` with ``options`` (checked by Flower's class of
    that name), wrapped in ``Private`` when ``privacy`` (a ``DP``, its dict or a
    ``CentralDP``) is given. ``ValueError`` for an unknown name or options that do not fit."""
    key = str(name).lower()
    if key not in POLICIES:
        raise ValueError(f"unknown strategy {name!r}; use one of {sorted(POLICIES)}")
    policy = POLICIES[key](initial, **(options or {}))
    return policy if privacy is None else Private(policy, privacy)
