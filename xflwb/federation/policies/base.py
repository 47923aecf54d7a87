"""The small protocol every policy follows, and the metric shape rounds record.

A *policy* turns a round's accepted updates (canonical ``Update``s, after the gate and the
bounds) into the next global model. It is driven in three steps, like one of Flower's
strategies' ``aggregate_fit`` cut open so that it can be streamed and wrapped:

1. ``begin(global_, round)``: a round (or FedBuff version) starts from ``global_``;
2. ``add(update)`` per accepted update, in any order (raise ``ValueError`` to refuse one:
   it costs only that update, the policy's state must be as before);
3. ``result()``: the new global model, or None when nothing changed it; then
   ``end(failures)``: the round's policy metrics (DP's ε, noise, clipping norm).

Capabilities are class attributes the driver reads instead of switching on names:
``checks_finite`` (the policy validates NaN/inf itself: StreamingFedAvg does; a robust rule
keeps raw updates, so the gate must), ``relative_norms`` (the peers' norm bound applies),
``allows_dp`` (a clipped, noised mean can be taken: ``xflwb.federation.policies.private``).
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from xflwb.bridge.arrays import Array
from xflwb.federation.update import Update

__all__ = ["Metric", "Policy", "flower_rule"]

#: (platform or "all", metric name, value or None), as rounds record them
Metric = tuple[str, str, float | None]


@runtime_checkable
class Policy(Protocol):
    """See the module docstring."""

    #: the name ``strategy=`` takes
    name: str
    checks_finite: bool
    relative_norms: bool
    allows_dp: bool
    #: the DP mechanism when the policy is private (its ledger, its last privacy event)
    dp: Any

    def begin(self, global_: list[Array], round: int) -> None: ...

    def add(self, update: Update) -> None: ...

    def result(self) -> list[Array] | None: ...

    def end(self, failures: int) -> list[Metric]: ...

    def describe(self) -> str:
        """What the policy's server update is called in messages (Flower's class name)."""
        ...


def flower_rule(name: str, initial: list[Array], options: dict[str, Any]) -> Any:
    """Flower's strategy ``name`` (``xflwb.flower_legacy.SERVER_STRATEGIES``) built from
    ``initial`` and ``options``: its constructor checks the options (FedTrimmedAvg's
    ``beta`` range, Krum's counts), and a server optimiser's update rule is its
    ``aggregate_fit`` (``xflwb.flower_legacy.server_update``)."""
    from xflwb.flower_legacy import SERVER_STRATEGIES, ndarrays_to_parameters

    return SERVER_STRATEGIES[name](initial_parameters=ndarrays_to_parameters(initial),
                                   min_fit_clients=1, min_evaluate_clients=1,
                                   min_available_clients=1, **options)
