"""A simulation's options turned into a virtual fleet: each client's capacities, the
fleet's availability, how many examples each client trains and evaluates on, and the
measured per-example costs — everything the virtual clock needs, computed once in the
simulation process (vectorised: a 1,000-client fleet takes a fraction of a second beyond
the cost measurement, which is cached per artifact).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from xflwb.federation import profiles as profiles_mod
from xflwb.federation.fleet import (
    AlwaysAvailable,
    Availability,
    Capacities,
    NoClientAvailable,
)
from xflwb.simulation.client import ClientSpec, _partitions
from xflwb.simulation.config import SimulationConfig
from xflwb.simulation.costs import EVALUATE_EXAMPLES, measured_costs

__all__ = ["IDEAL_BANDWIDTH", "VirtualFleet", "example_counts", "virtual_fleet"]

Ints = npt.NDArray[np.int64]

#: bytes/s of the ideal fleet (no profile): transfers take no simulated time to speak of
IDEAL_BANDWIDTH = 1e15


@dataclass
class VirtualFleet:
    """What the virtual clock knows about a simulated fleet (client ``i`` = partition
    ``i``)."""

    caps: Capacities
    availability: Availability
    train_examples: Ints
    test_examples: Ints
    costs: dict[str, dict[str, float]]  # platform → {"train", "evaluate"}: s per example


def example_counts(sizes: Ints | list[int], test_fraction: float) -> tuple[Ints, Ints]:
    """(train, test) examples per client from its partition's size, as
    ``xflwb.devices.partition.local_data`` splits it (vectorised: no permutation needed to
    count): ``round(n × test_fraction)`` test rows, at least one and at most ``n - 1`` when
    ``test_fraction > 0`` and ``n >= 2``."""
    n = np.asarray(sizes, np.int64)
    # numpy rounds halves to even, as Python's round does
    test = np.rint(n.astype(np.float64) * float(test_fraction)).astype(np.int64)
    if test_fraction > 0:
        clamp = n >= 2
        test[clamp] = np.clip(test[clamp], 1, n[clamp] - 1)
    return n - test, test


def virtual_fleet(cfg: SimulationConfig, bundle_dir: Path, spec: ClientSpec,
                  data_dir: str) -> VirtualFleet:
    """The fleet of ``cfg``: capacities drawn from ``cfg.profiles`` (none: the ideal fleet —
    slowdown 1, no latency, bandwidth ``IDEAL_BANDWIDTH``, always available) over costs
    measured on this export's runtimes (cached in ``DATA_DIR/costs``). ``NoClientAvailable``
    when nobody is available at the start."""
    n = cfg.num_clients
    platforms = np.where(np.arange(n) < cfg.android, "android", "ios")
    parts = _partitions(spec.dataset, spec.partition, n, spec.seed, spec.indices)
    sizes = np.fromiter((len(p[1]) for p in parts), np.int64, count=n)
    train, test = example_counts(sizes, spec.test_fraction)
    # a batch-sized sample of the dataset's own examples, from the first partitions
    need = EVALUATE_EXAMPLES
    take = int(np.searchsorted(np.cumsum(sizes), need)) + 1
    x = np.concatenate([p[0] for p in parts[:take]])[:need]
    y = np.concatenate([p[1] for p in parts[:take]])[:need]
    wanted = [p for p in ("android", "ios") if (platforms == p).any()]
    costs = measured_costs(bundle_dir, wanted, x, y, Path(data_dir) / "costs")
    train_cost = {p: c["train"] for p, c in costs.items()}
    evaluate_cost = {p: c["evaluate"] for p, c in costs.items()}
    avail: Availability
    if cfg.profiles is None:
        ones = np.ones(n)
        caps = Capacities(platform=tuple(platforms.tolist()), slowdown=ones,
                          uplink=ones * IDEAL_BANDWIDTH, downlink=ones * IDEAL_BANDWIDTH,
                          latency=np.zeros(n), train_cost=train_cost,
                          evaluate_cost=evaluate_cost)
        avail = AlwaysAvailable(n)
    else:
        caps = profiles_mod.sample_capacities(cfg.profiles, platforms.tolist(), train_cost,
                                              evaluate_cost, cfg.seed)
        avail = profiles_mod.availability(cfg.profiles, n, cfg.seed)
    if not avail.available(0.0).any():
        nxt = avail.next_change(0.0)
        when = f"; the first becomes available at {nxt:g} s" if math.isfinite(nxt) else ""
        raise NoClientAvailable(f"no client of the {n}-client fleet is available at the "
                                f"start (t=0){when}: change the profile's availability so "
                                "that some client is available at 0")
    return VirtualFleet(caps=caps, availability=avail, train_examples=train,
                        test_examples=test, costs=costs)
