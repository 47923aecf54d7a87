"""Synchronous rounds on a virtual clock, transport-free: who is eligible, who is selected,
who reports in time, and when the round ends (the production rules of Bonawitz et al. 2019:
select more clients than needed, keep the first that report before a deadline).

* ``advance``: the first time from ``now`` at which at least ``min_clients`` are available
  (the round waits for them), ``NoClientAvailable`` when that never happens.
* ``plan_round``: one round's outcome from the fleet's ``Capacities`` and ``Availability``:
  select ``ceil(n·(1+over_select))`` of the clients available at ``now`` (seeded), compute
  each fit's end (``Capacities.fit_seconds`` + ``fit_outcomes``) and split the selected into
  the kept (the first ``n`` reports no later than ``now + deadline``, in report order), the
  stragglers (reports after the deadline or after ``n`` were kept) and the drop-outs (their
  client became unavailable mid-fit). Vectorised over clients.
* ``SyncScheduler``: the plans of a session's rounds on one ``VirtualClock`` (round ``r``
  selects with ``np.random.default_rng([seed, r, 0])``, its evaluation samples the clients
  available at the round's end with ``[seed, r, 1]``).

The outcome of every selected client is known from its simulated duration: a host trains
only the kept clients, and aggregates them in report order (deterministic for a seed).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from xflwb.federation.fleet import (
    Availability,
    Capacities,
    NoClientAvailable,
    VirtualClock,
    fit_outcomes,
)

__all__ = ["RoundPlan", "SyncScheduler", "advance", "plan_round"]

Floats = npt.NDArray[np.float64]
Ints = npt.NDArray[np.int64]
Metric = tuple[str, str, float]

#: the availability changes a round may wait through before the fleet is called empty
MAX_WAIT_STEPS = 1_000_000


def advance(availability: Availability, now: float, min_clients: int) -> float:
    """The first time ``t >= now`` at which at least ``min_clients`` clients are available
    (the round waits until then); ``NoClientAvailable`` when it never comes."""
    need = max(1, int(min_clients))
    if need > availability.n:
        raise NoClientAvailable(f"a round needs {need} clients but the fleet has only "
                                f"{availability.n}: lower min_clients or add clients")
    t = float(now)
    for _ in range(MAX_WAIT_STEPS):
        if int(availability.available(t).sum()) >= need:
            return t
        nxt = availability.next_change(t)
        if not math.isfinite(nxt) or nxt <= t:
            break
        t = float(nxt)
    raise NoClientAvailable(
        f"from t={now:g} s on, never {need} client(s) of the fleet available at once "
        f"(searched until t={t:g} s): lower min_clients, or widen the availability "
        "(available_fraction, window, session_minutes or the trace)")


def _per_client(value: Floats | Sequence[float] | float, n: int, name: str) -> Floats:
    """A scalar or a per-client (whole fleet) array, as a fleet-length array."""
    arr = np.asarray(value, np.float64)
    if arr.ndim == 0:
        return np.full(n, float(arr))
    if arr.shape != (n,):
        raise ValueError(f"{name} must be a number or one value per client ({n}), "
                         f"got shape {arr.shape}")
    return arr


@dataclass(frozen=True)
class RoundPlan:
    """One synchronous round on the virtual clock. Arrays hold client indices (== partition
    ids); ``kept`` is in report order, ``report`` its report times."""

    start: float
    end: float
    n: int
    available: Ints
    selected: Ints
    kept: Ints
    report: Floats
    stragglers: Ints
    dropouts: Ints
    metrics: list[Metric] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        """Simulated seconds from the round's start to its end."""
        return self.end - self.start


def _counts(names: list[str], inverse: Ints, groups: dict[str, Ints]) -> list[Metric]:
    """Per platform and "all": the size of each group of clients."""
    out: list[Metric] = []
    for key, members in groups.items():
        per = np.bincount(inverse[members], minlength=len(names))
        out += [(p, key, float(c)) for p, c in zip(names, per, strict=True)]
        out.append(("all", key, float(len(members))))
    return out


def plan_round(caps: Capacities, availability: Availability, now: float, n: int,
               over_select: float, deadline: float | None, rng: np.random.Generator,
               examples: Floats | Sequence[float] | float, epochs: int,
               bytes_down: Floats | Sequence[float] | float,
               bytes_up: Floats | Sequence[float] | float, *,
               waited_from: float | None = None) -> RoundPlan:
    """The round starting at ``now`` that needs ``n`` updates (module docstring).

    ``examples``, ``bytes_down``, ``bytes_up``: per client of the fleet (or one number);
    ``rng`` selects; ``waited_from``: when the round began waiting for available clients
    (its ``round_sim_seconds`` count the wait). The plan's ``metrics``: ("all",
    "sim_seconds"), ("all", "round_sim_seconds") and per platform and "all" the counts
    ``available``, ``selected``, ``stragglers``, ``dropouts``."""
    size = len(caps)
    if availability.n != size:
        raise ValueError(f"the availability covers {availability.n} clients, the "
                         f"capacities {size}")
    if over_select < 0 or (deadline is not None and not deadline > 0):
        raise ValueError("over_select must be >= 0 and deadline > 0")
    eligible = np.flatnonzero(availability.available(now)).astype(np.int64)
    want = max(0, min(int(n), len(eligible)))
    n_sel = min(len(eligible), math.ceil(want * (1.0 + float(over_select)) - 1e-9))
    selected = np.sort(rng.choice(eligible, size=n_sel, replace=False)).astype(np.int64) \
        if n_sel else np.zeros(0, np.int64)
    ex = _per_client(examples, size, "examples")[selected]
    down = _per_client(bytes_down, size, "bytes_down")[selected]
    up = _per_client(bytes_up, size, "bytes_up")[selected]
    seconds = caps.fit_seconds(selected, ex, epochs, down, up)
    ends, dropped = fit_ends(availability, selected, now, seconds)
    reporters = selected[~dropped]
    times = ends[~dropped]
    order = np.lexsort((reporters, times))  # by report time, ties by client id
    reporters, times = reporters[order], times[order]
    limit = math.inf if deadline is None else float(now) + float(deadline)
    in_time = np.flatnonzero(times <= limit)[:want]
    keep = np.zeros(len(reporters), bool)
    keep[in_time] = True
    kept, report = reporters[keep], times[keep]
    stragglers = np.sort(reporters[~keep])
    dropouts = np.sort(selected[dropped])
    if want == 0:
        end = float(now)
    elif len(kept) == want:
        end = float(report[-1])
    elif deadline is not None:
        end = limit
    else:
        end = float(ends.max()) if len(ends) else float(now)
    end = max(end, float(now))
    plats = np.asarray(caps.platform, dtype=str)
    names_arr, inverse = np.unique(plats, return_inverse=True)
    names = [str(p) for p in names_arr]
    began = float(now) if waited_from is None else float(waited_from)
    metrics: list[Metric] = [("all", "sim_seconds", end),
                             ("all", "round_sim_seconds", end - began)]
    metrics += _counts(names, inverse.astype(np.int64),
                       {"available": eligible, "selected": selected,
                        "stragglers": stragglers, "dropouts": dropouts})
    return RoundPlan(float(now), end, want, eligible, selected, kept, report, stragglers,
                     dropouts, metrics)


def fit_ends(availability: Availability, clients: Ints, start: float,
             seconds: Floats) -> tuple[Floats, npt.NDArray[np.bool_]]:
    """``fleet.fit_outcomes`` that also accepts no client."""
    if len(clients) == 0:
        return np.zeros(0, np.float64), np.zeros(0, bool)
    return fit_outcomes(availability, clients, start, seconds)


class SyncScheduler:
    """The plans of one session's synchronous rounds on one ``VirtualClock``.

    ``examples``: each client's training examples; ``bytes_down`` / ``bytes_up``: per
    platform, the bytes of the model sent and of an update returned; ``sample_size``: the
    round's ``n`` from the count of available clients (the core's ``sample_size``)."""

    def __init__(self, caps: Capacities, availability: Availability, *, seed: int,
                 examples: Floats | Ints | Sequence[float], epochs: int,
                 bytes_down: Mapping[str, float], bytes_up: Mapping[str, float],
                 over_select: float = 0.0, deadline: float | None = None,
                 min_clients: int = 1, clock: VirtualClock | None = None) -> None:
        self.caps, self.availability = caps, availability
        self.seed = int(seed)
        self.examples = np.asarray(examples, np.float64)
        self.epochs = int(epochs)
        plats = np.asarray(caps.platform, dtype=object)
        self.bytes_down = self._spread(bytes_down, plats, "bytes_down")
        self.bytes_up = self._spread(bytes_up, plats, "bytes_up")
        self.over_select = float(over_select)
        self.deadline = None if deadline is None else float(deadline)
        self.min_clients = max(1, int(min_clients))
        self.clock = clock if clock is not None else VirtualClock()
        self.plans: dict[int, RoundPlan] = {}

    @staticmethod
    def _spread(values: Mapping[str, float], plats: npt.NDArray[np.object_],
                name: str) -> Floats:
        out = np.zeros(len(plats), np.float64)
        for p in set(plats.tolist()):
            if p not in values:
                raise ValueError(f"{name}: no value for platform {p!r}")
            out[plats == p] = float(values[p])
        return out

    def fit(self, server_round: int, sample_size: Callable[[int], int],
            admit: Callable[[int, int], None] | None = None) -> RoundPlan:
        """Round ``server_round``: wait for ``min_clients``, select, and move the clock to
        the round's end. ``admit(selected, available)`` runs before the plan is kept (DP's
        budget check: it may raise)."""
        waited_from = self.clock.now
        start = advance(self.availability, waited_from, self.min_clients)
        available = int(self.availability.available(start).sum())
        n = min(sample_size(available), available)
        rng = np.random.default_rng([self.seed, int(server_round), 0])
        plan = plan_round(self.caps, self.availability, start, n, self.over_select,
                          self.deadline, rng, self.examples, self.epochs, self.bytes_down,
                          self.bytes_up, waited_from=waited_from)
        if admit is not None:
            admit(len(plan.selected), available)
        self.clock.advance_to(plan.end)
        self.plans[int(server_round)] = plan
        return plan

    def evaluate(self, server_round: int, sample_size: Callable[[int], int]) -> Ints:
        """The clients evaluating after round ``server_round``: a seeded sample of those
        available now (the round's end); the clock does not move."""
        eligible = np.flatnonzero(self.availability.available(self.clock.now))
        n = min(sample_size(len(eligible)), len(eligible))
        if n <= 0:
            return np.zeros(0, np.int64)
        rng = np.random.default_rng([self.seed, int(server_round), 1])
        return np.sort(rng.choice(eligible, size=n, replace=False)).astype(np.int64)
