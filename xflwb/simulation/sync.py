"""Who a simulated synchronous round samples, and in which order its results count: the
``Scheduler`` a simulation gives its ``CrossPlatformStrategy``.

* ``SeededSampling`` (no profiles, deadline or over-selection): the usual round, but
  deterministic for the seed: ``NodeClientManager.sample`` draws with
  ``np.random.default_rng([seed, round, phase])`` over the partition ids, and results are
  aggregated sorted by partition id.
* ``VirtualRounds`` (``profiles``, ``deadline`` or ``over_select`` set): the round rules of
  ``xflwb.federation.schedule`` on the virtual clock. Only the kept clients get a ``FitIns``
  (the stragglers' and drop-outs' outcome is known from their simulated durations); their
  results are aggregated in report order; the round's metrics (``sim_seconds``, per platform
  ``available``, ``selected``, ``stragglers``, ``dropouts``) are recorded with it.
  Evaluation samples the clients available at the round's end.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from xflwb.federation.rounds import Round
from xflwb.federation.schedule import RoundPlan, SyncScheduler
from xflwb.flower_legacy import ClientManager, ClientProxy, FitRes

Metric = tuple[str, str, float | None]
PHASES = {"fit": 0, "evaluate": 1}


def _cid_key(cid: str) -> tuple[int, int | str]:
    return (0, int(cid)) if str(cid).isdigit() else (1, str(cid))


def _wait_all(client_manager: ClientManager, core: Round, server_round: int) -> int:
    """Wait for every simulated node (they register at once, before round 1)."""
    expected = len(getattr(client_manager, "nodes", ())) or core.min_clients
    while not client_manager.wait_for(expected, timeout=1):
        core.progress(phase="waiting", round=server_round,
                      connected=client_manager.num_available(), needed=expected)
    return client_manager.num_available()


class SeededSampling:
    """The usual sampling (the core's fraction and ``min_clients``), seeded."""

    def sample(self, server_round: int, phase: str, fraction: float,
               client_manager: ClientManager, core: Round) -> list[ClientProxy]:
        available = _wait_all(client_manager, core, server_round)
        n = min(core.sample_size(available, fraction), available)
        if phase == "fit":  # raises PrivacyBudgetSpent before anyone trains
            core.admit(server_round, available, n)
        clients: list[ClientProxy] = client_manager.sample(  # type: ignore[call-arg]
            num_clients=n, min_num_clients=core.min_clients, server_round=server_round,
            phase=PHASES[phase])
        core.progress(phase=phase, round=server_round, connected=available,
                      needed=core.min_clients, selected=len(clients))
        return clients

    def order(self, server_round: int, results: Sequence[tuple[ClientProxy, FitRes]]
              ) -> list[tuple[ClientProxy, FitRes]]:
        return sorted(results, key=lambda cr: _cid_key(cr[0].cid))

    def metrics(self, server_round: int) -> list[Metric]:
        return []


class VirtualRounds:
    """The virtual clock's round rules over a ``SyncScheduler`` (module docstring)."""

    def __init__(self, scheduler: SyncScheduler) -> None:
        self.scheduler = scheduler
        self.plans: dict[int, RoundPlan] = {}

    def sample(self, server_round: int, phase: str, fraction: float,
               client_manager: ClientManager, core: Round) -> list[ClientProxy]:
        _wait_all(client_manager, core, server_round)
        by_cid = {str(c): p for c, p in client_manager.all().items()}

        def size(available: int) -> int:
            return core.sample_size(available, fraction)

        if phase == "fit":
            plan = self.scheduler.fit(
                server_round, size,
                lambda selected, available: core.admit(server_round, available, selected))
            self.plans[server_round] = plan
            chosen: list[int] = plan.kept.tolist()
            core.progress(phase=phase, round=server_round, connected=len(plan.available),
                          needed=core.min_clients, selected=len(plan.selected),
                          sim_seconds=plan.end)
        else:
            chosen = self.scheduler.evaluate(server_round, size).tolist()
        missing = [i for i in chosen if str(i) not in by_cid]
        if missing:
            raise RuntimeError(f"simulated clients {missing[:5]} are not registered")
        return [by_cid[str(i)] for i in chosen]

    def order(self, server_round: int, results: Sequence[tuple[ClientProxy, FitRes]]
              ) -> list[tuple[ClientProxy, FitRes]]:
        plan = self.plans.get(server_round)
        rank = ({} if plan is None
                else {str(c): k for k, c in enumerate(plan.kept.tolist())})
        return sorted(results, key=lambda cr: (rank.get(str(cr[0].cid), math.inf),
                                               _cid_key(cr[0].cid)))

    def metrics(self, server_round: int) -> list[Metric]:
        plan = self.plans.pop(server_round, None)
        return [] if plan is None else list(plan.metrics)


def up_bytes(core: Round, platform: str) -> float:
    """Bytes of one update of ``platform`` as its negotiated up codec encodes it (every
    simulated client is capable of every codec): float32 is 4 × its elements."""
    from xflwb.bridge import params

    n = core.negotiate(None)
    if n.up is None:
        return float(core.gate.float32_bytes(platform))
    shapes = params.platform_shapes(core.manifest, platform)
    rng = np.random.default_rng(0)
    return float(sum(len(n.up.encode(np.zeros(s, np.float32), rng)) for s in shapes))


def down_bytes(core: Round, platform: str) -> float:
    """Bytes of the model sent to a client of ``platform`` (its negotiated down codec)."""
    n = core.negotiate(None)
    codec: Any = n.down if n.down is not None else "raw"
    return float(sum(len(t) for t in core.encode(platform, codec)))


def uses_virtual_clock(cfg: Any) -> bool:
    """Whether a simulation's rounds run on the virtual clock: a device profile, a deadline
    or over-selection asks for it (without them ``sim_seconds`` is not recorded)."""
    return (getattr(cfg, "profiles", None) is not None or cfg.deadline is not None
            or bool(cfg.over_select))


def scheduler_for(cfg: Any, core: Round, spec: Any, data_dir: str
                  ) -> SeededSampling | VirtualRounds:
    """The scheduler of a simulation's synchronous rounds (module docstring). With the
    virtual clock, the fleet (``xflwb.simulation.virtual.virtual_fleet``: capacities,
    availability, examples, measured costs) is built here, and a deadline no client can
    meet is refused (``check_deadline``) before anyone trains."""
    if not uses_virtual_clock(cfg):
        return SeededSampling()
    from xflwb.federation.profiles import check_deadline
    from xflwb.simulation.client import _bundle_dir
    from xflwb.simulation.virtual import virtual_fleet

    fleet = virtual_fleet(cfg, _bundle_dir(spec), spec, data_dir)
    platforms = sorted(set(fleet.caps.platform))
    down = {p: down_bytes(core, p) for p in platforms}
    up = {p: up_bytes(core, p) for p in platforms}
    scheduler = SyncScheduler(
        fleet.caps, fleet.availability, seed=cfg.seed, examples=fleet.train_examples,
        epochs=cfg.local_epochs, bytes_down=down, bytes_up=up, over_select=cfg.over_select,
        deadline=cfg.deadline, min_clients=core.min_clients)
    if cfg.deadline is not None:
        check_deadline(fleet.caps, cfg.deadline, fleet.train_examples, cfg.local_epochs,
                       scheduler.bytes_down, scheduler.bytes_up)
    return VirtualRounds(scheduler)


__all__ = ["SeededSampling", "VirtualRounds", "down_bytes", "scheduler_for", "up_bytes",
           "uses_virtual_clock"]
