"""Phones at simulation scale (issue 24): simulated time to accuracy, clock cost, memory.

    python benchmarks/systems.py            # the recorded run (1,000 clients)
    python benchmarks/systems.py --quick    # a smoke run: 100 clients, few rounds, 80 %

SKELETON: written against the shared design of issue 24 (``xflwb.DeviceProfiles``,
``over_select``, ``deadline``, ``strategy="fedbuff"`` in ``xflwb.simulate``) before those
parts were merged; not run yet. Run it once they are, then record the numbers in
``benchmarks/README.md``.

* **Fleet**: 1,000 simulated clients (500 Android running the ``.tflite``, 500 iOS running
  the ``.mlmodel``), the demo CNN (``xflwb.demo.demo_model()``, data_type "digits") on
  Dirichlet(0.5) partitions of digits, seed 0. Profile :data:`PROFILE`: heavy-tailed
  compute (Pareto slowdowns on the measured per-example costs), log-normal bandwidths, a
  diurnal availability with 20 % of the fleet available on average.
* **Arms** (same export, fleet, profile and seed):

  - **sync**: FedAvg, ``fraction_fit`` :data:`FRACTION` of the available clients,
    ``over_select=0.3``, ``deadline`` :data:`DEADLINE` simulated seconds;
  - **fedbuff**: ``strategy="fedbuff"``, ``buffer_size`` :data:`BUFFER`,
    ``max_concurrency`` :data:`CONCURRENCY`, as many applied updates as the sync arm
    aggregates.

  Accuracy is the federated evaluation's (platform "all"); time to accuracy is the
  virtual clock at the first round (version) reaching :data:`TARGET`
  (``xflwb.style.time_to_accuracy``). Goal: FedBuff ≥ 2× sooner, final accuracies within
  1 point.
* **Clock cost**: wall time of the sync arm with the profile against the same simulation
  without profiles, deadline or over-selection (goal ≤ 1.2×).
* **Memory**: peak summed RSS of the simulation's process tree at 100 and at 1,000
  clients (goal ≤ 1.1×), sampled as ``simulation_scale.py`` does.
* **Determinism**: the sync arm twice with one seed gives the same history (wall-time
  metrics aside).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ["FLWR_TELEMETRY_ENABLED"] = "0"

import pandas as pd

import xflwb
from xflwb.demo import demo_model
from xflwb.style import time_to_accuracy

sys.path.insert(0, str(Path(__file__).resolve().parent))
from simulation_scale import TreeSampler  # the same RSS sampling

NAME, DATASET, PARTITION, SEED = "bench_systems", "digits", "dirichlet:0.5", 0
TARGET, QUICK_TARGET = 0.90, 0.80
FRACTION, DEADLINE, OVER_SELECT = 0.1, 600.0, 0.3
BUFFER, CONCURRENCY = 10, 40
#: heavy tails on compute and network, 20 % of the fleet available on average (diurnal)
PROFILE: dict[str, Any] = {
    "android_slowdown": "pareto:1,1.5", "ios_slowdown": "pareto:1,1.5",
    "android_uplink": "lognormal:1000000,1.0", "ios_uplink": "lognormal:2000000,1.0",
    "android_downlink": "lognormal:5000000,1.0", "ios_downlink": "lognormal:8000000,1.0",
    "availability": "diurnal", "available_fraction": 0.2}
#: wall-clock metrics differ between identical runs; everything else must not
WALL_METRICS = {"seconds", "fit_seconds", "aggregate_seconds", "evaluate_seconds"}


@dataclass
class Arm:
    name: str
    wall: float
    history: pd.DataFrame
    peak_rss: int

    def accuracy(self) -> float | None:
        acc = self.history[(self.history["metric"] == "accuracy")
                           & (self.history["platform"] == "all")].dropna(subset=["value"])
        return float(acc.sort_values("round")["value"].iloc[-1]) if len(acc) else None


def run_arm(wb: Any, res: Any, name: str, clients: int, **options: Any) -> Arm:
    """One simulation to its end in ``wb``; its wall time, history and peak RSS."""
    sampler = TreeSampler()
    t0 = time.monotonic()
    session = wb.simulate(res, android=clients // 2, ios=clients - clients // 2,
                          dataset=DATASET, partition=PARTITION, seed=SEED, progress=False,
                          **options)
    wall = time.monotonic() - t0
    sampler.stop()
    if session.status != "finished":
        raise RuntimeError(f"{name}: the simulation ended {session.status}: {session.error}")
    return Arm(name, wall, session.history, sampler.peak)


def same_history(a: pd.DataFrame, b: pd.DataFrame) -> bool:
    """Equal histories once the wall-clock metrics are left out."""
    def keep(h: pd.DataFrame) -> pd.DataFrame:
        return h[~h["metric"].isin(WALL_METRICS)].reset_index(drop=True)

    return keep(a).equals(keep(b))


def hours(seconds: float | None) -> str:
    return "not reached" if seconds is None else f"{seconds / 3600:.2f} h"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="100 clients, few rounds")
    args = parser.parse_args()
    clients, rounds = (100, 5) if args.quick else (1000, 60)
    target = QUICK_TARGET if args.quick else TARGET
    profiles = xflwb.DeviceProfiles(**PROFILE)
    sync = {"rounds": rounds, "fraction_fit": FRACTION, "over_select": OVER_SELECT,
            "deadline": DEADLINE, "profiles": profiles}
    with tempfile.TemporaryDirectory() as tmp, xflwb.Workbench(data_dir=Path(tmp) / "x",
                                                               port=0) as wb:
        res = xflwb.export(demo_model(), name=NAME, data_type=DATASET,
                           out_dir=Path(tmp) / "export")
        wb.publish(res)
        arms = [run_arm(wb, res, "sync", clients, **sync)]
        updates = int(arms[0].history.query("metric == 'clients' and platform == 'all'")
                      ["value"].sum())
        arms.append(run_arm(wb, res, "fedbuff", clients, rounds=max(1, updates // BUFFER),
                            strategy="fedbuff", profiles=profiles,
                            strategy_options=xflwb.FedBuff(buffer_size=BUFFER,
                                                           max_concurrency=CONCURRENCY)))
        ideal = run_arm(wb, res, "sync, no profiles", clients, rounds=rounds,
                        fraction_fit=FRACTION)
        again = run_arm(wb, res, "sync again", clients, **sync)
        small = run_arm(wb, res, "sync, 100 clients", 100, **sync)
    print(f"{clients} clients, target accuracy {target:.0%}")
    for arm in arms:
        print(f"  {arm.name:8s} time to target {hours(time_to_accuracy(arm.history, target))}"
              f", final accuracy {arm.accuracy()}, wall {arm.wall:.0f} s")
    print(f"  clock cost: {arms[0].wall / ideal.wall:.2f}× the wall time without profiles")
    print(f"  peak RSS: {small.peak_rss / 1e6:.0f} MB at 100 clients, "
          f"{arms[0].peak_rss / 1e6:.0f} MB at {clients} "
          f"({arms[0].peak_rss / max(small.peak_rss, 1):.2f}×)")
    print(f"  same seed, same history: {same_history(arms[0].history, again.history)}")


if __name__ == "__main__":
    main()
