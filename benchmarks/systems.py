"""Phones at simulation scale: device profiles, the virtual clock, deadlines and FedBuff.

    python benchmarks/systems.py                  # every part (long: see README)
    python benchmarks/systems.py --part tta       # time to accuracy only
    python benchmarks/systems.py --smoke          # tiny sizes, every part (6 short simulations)

* **tta — time to accuracy.** ``--clients`` simulated clients (half Android, half iOS),
  Dirichlet(0.5) ``--dataset``, a phone-sized CNN (~300k parameters, 1.2 MB: its upload
  takes seconds), a heavy-tailed profile (Pareto compute slowdowns, lognormal uplinks with
  σ = 1.2) and diurnal availability (``available_fraction`` 0.2). Synchronous FedAvg
  (``fraction_fit`` of the available clients, ``over_select=0.3``, a ``deadline`` in
  simulated seconds) for ``--rounds`` rounds, then FedBuff (``buffer_size``,
  ``max_concurrency``) for the same simulated time, on the same fleet and seed. Every
  ``--every``-th round's / version's global model is kept and evaluated centrally in Keras
  on the dataset's test split; printed: simulated seconds until 50/70/80/90 % and
  ``--target`` accuracy, and the final accuracy of each. Goal: FedBuff ≥ 2× sooner, final
  accuracy within 1 point.
* **clock — the virtual clock's cost.** The same synchronous simulation without profiles
  and with an always-available profile (no deadline, no over-selection: the same clients
  train), alternating pairs, the median wall-time ratio and every pair. Goal ≤ 1.2×.
* **memory — flat in the fleet.** Peak summed RSS of every process this script started
  (the simulation process, the Ray head and its workers), sampled every 0.25 s, for a
  profiled simulation of ``--small`` and ``--clients`` clients. Goal ≤ 1.1×.
* **determinism.** One profiled simulation (diurnal, deadline, over-selection) run twice
  with the same seed: the histories (every metric but the wall-clock ones) and the global
  models must be identical. ``--smoke`` takes the memory part's ``--small`` run (the same
  settings but the seed) as the first of the two and runs it again, one simulation fewer.

One Ray head serves every run (``privacy.start_ray``; or the running one ``--ray-address``
names, neither started nor stopped: its processes are then not this script's descendants,
so the memory part leaves them out); nothing is downloaded. Results go to stdout; record
them in ``benchmarks/README.md``.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from privacy import add_common_arguments, ray_head, workdir

NAME = "systems_bench"
PARTITION = "dirichlet:0.5"
#: heavy-tailed compute (Pareto, α = 1.2: a few phones 10–100× the median) and uplinks
#: (lognormal σ = 1.2: one phone in twenty ~7× slower than the median), 20 % of the fleet
#: available at a time (a diurnal mix of time zones)
HEAVY = {"android_slowdown": "pareto:3,1.2", "ios_slowdown": "pareto:2,1.2",
         "android_uplink": "lognormal:150000,1.2", "ios_uplink": "lognormal:250000,1.2",
         "availability": "diurnal", "available_fraction": 0.2}
#: metrics measured on this machine's wall clock: they differ run to run by nature
WALL = ("fit_seconds", "aggregate_seconds")


def phone_model() -> Any:
    """The demo CNN widened to ~300k parameters (1.2 MB as float32): a model whose upload
    takes seconds on a phone's uplink, so the profile's slow tail shows (the 4.5k-parameter
    demo CNN would be all latency)."""
    import keras

    keras.utils.set_random_seed(0)
    return keras.Sequential([
        keras.Input((8, 8, 1)),
        keras.layers.Conv2D(32, 3, padding="same", activation="relu", name="conv"),
        keras.layers.MaxPooling2D(name="pool"),
        keras.layers.Flatten(name="flatten"),
        keras.layers.Dense(512, activation="relu", name="hidden"),
        keras.layers.Dense(10, activation="softmax", name="probs"),
    ], name="systems_cnn")


def simulate(res: Any, data_dir: Path, address: str, *, clients: int, seed: int = 0,
             **options: Any) -> Any:
    import xflwb

    return xflwb.simulate(res, android=clients // 2, ios=clients - clients // 2,
                          partition=PARTITION, seed=seed, ray_address=address,
                          data_dir=data_dir, round_timeout=3600, progress=False, **options)


def all_metric(session: Any, metric: str) -> dict[int, float]:
    h = session.history
    part = h[(h.platform == "all") & (h.metric == metric)]
    return {int(r): float(v) for r, v in zip(part["round"], part["value"], strict=True)}


def central_curve(res: Any, session: Any, dataset: str) -> list[tuple[int, float, float]]:
    """(round, simulated seconds, accuracy on the test split) for every kept checkpoint."""
    import xflwb
    from xflwb.bridge import runtime
    from xflwb.sessions.checkpoints import load_checkpoint

    ds = xflwb.load_dataset(dataset)
    keras_rt = runtime.load(res, "keras")
    sim = all_metric(session, "sim_seconds")
    out = []
    info = session.info
    for row in session.registry.checkpoints_newest_first(info["model_name"],
                                                         session_id=session.id):
        rnd = int(row["round"])
        keras_rt.set_canonical_parameters(load_checkpoint(row["path"], row["sha256"]))
        acc = float(keras_rt.evaluate(ds.x_test, ds.y_test)[1])
        out.append((rnd, sim.get(rnd, 0.0), acc))
    return sorted(out)


def hours_to(curve: list[tuple[int, float, float]], target: float) -> float:
    for _, secs, acc in curve:
        if acc >= target:
            return secs / 3600
    return float("inf")


def part_tta(res: Any, tmp: Path, address: str, a: argparse.Namespace) -> None:
    import xflwb

    profile = xflwb.DeviceProfiles(**HEAVY)
    common = dict(clients=a.clients, dataset=a.dataset, profiles=profile,
                  keep_checkpoints=2, keep_every=a.every, fraction_evaluate=0.0,
                  local_epochs=a.epochs)
    t0 = time.perf_counter()
    sync = simulate(res, tmp / "sync", address, rounds=a.rounds, fraction_fit=a.fraction,
                    over_select=0.3, deadline=a.deadline, **common)
    t_sync = time.perf_counter() - t0
    horizon = max(all_metric(sync, "sim_seconds").values())
    t0 = time.perf_counter()
    # FedBuff for the same simulated time as the synchronous arm took
    buff = simulate(res, tmp / "fedbuff", address, rounds=1_000_000, strategy="fedbuff",
                    strategy_options=xflwb.FedBuff(buffer_size=a.buffer,
                                                   max_concurrency=a.concurrency,
                                                   max_seconds=horizon, evaluate_every=0),
                    **common)
    t_buff = time.perf_counter() - t0
    curves = {"sync + deadline": central_curve(res, sync, a.dataset),
              "fedbuff": central_curve(res, buff, a.dataset)}
    print(f"tta: {a.clients} clients ({a.dataset}, {PARTITION}), heavy-tailed profile, "
          f"{HEAVY['available_fraction']:.0%} available (diurnal); target "
          f"{a.target:.0%}")
    print(f"  {'arm':18s} {'rounds':>7s} {'sim s':>9s} {'s to target':>12s} "
          f"{'final acc':>9s} {'wall s':>8s}")
    walls = {"sync + deadline": t_sync, "fedbuff": t_buff}
    for arm, curve in curves.items():
        marks = ", ".join(f"{t:.0%}: {3600 * hours_to(curve, t):.0f} s"
                          for t in (0.5, 0.7, 0.8, 0.9))
        print(f"  {arm}: simulated seconds to {marks}")
    for arm, curve in curves.items():
        last = curve[-1]
        print(f"  {arm:18s} {last[0]:>7d} {last[1]:>9.1f} "
              f"{3600 * hours_to(curve, a.target):>12.1f} {last[2]:>9.3f} "
              f"{walls[arm]:>8.0f}")
    if a.plot:
        plot_curves(curves, a.target, a.plot)
        print(f"  plot: {a.plot}")
    s, b = (hours_to(curves[k], a.target) for k in curves)
    # "within 1 point": FedBuff may not end more than a point below the synchronous arm
    gap = 100 * (curves["fedbuff"][-1][2] - curves["sync + deadline"][-1][2])
    print(f"  goal FedBuff ≥ 2× sooner: {s / b if np.isfinite(b) and b else float('nan'):.2f}× "
          f"— {'met' if np.isfinite(b) and s >= 2 * b else 'missed'}; final accuracy "
          f"{gap:+.1f} points against sync (goal ≥ −1) — {'met' if gap >= -1 else 'missed'}")
    sync_h = sync.history
    lost = sync_h[sync_h.metric.isin(["selected", "clients", "stragglers", "dropouts"])
                  & (sync_h.platform != "all")]
    print("  sync rounds, per platform, total:")
    print(lost.pivot_table(index="platform", columns="metric", values="value",
                           aggfunc="sum").to_string())


def plot_curves(curves: dict[str, list[tuple[int, float, float]]], target: float,
                path: str) -> None:
    """Accuracy of every round's / version's global model against simulated time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.4))
    for (arm, curve), style in zip(curves.items(), ("-", "--"), strict=False):
        secs = np.array([c[1] for c in curve])
        unit, scale = ("h", 3600) if secs.max() > 7200 else ("min", 60) \
            if secs.max() > 120 else ("s", 1)
        ax.plot(secs / scale, [c[2] for c in curve], style, label=arm)
    ax.axhline(target, color="grey", lw=0.8, ls=":")
    ax.set_xlabel(f"simulated time ({unit})")
    ax.set_ylabel("accuracy (test split)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def part_clock(res: Any, tmp: Path, address: str, a: argparse.Namespace) -> None:
    import xflwb

    always = xflwb.DeviceProfiles(availability="always")
    ratios = []
    print(f"clock: {a.small} clients, {a.clock_rounds} rounds, fraction {a.fraction}, "
          f"pairs without / with profiles (wall seconds)")
    for k in range(a.pairs):
        walls = []
        for arm, profiles in (("plain", None), ("profiled", always)):
            t0 = time.perf_counter()
            simulate(res, tmp / f"clock-{k}-{arm}", address, clients=a.small,
                     dataset=a.dataset, rounds=a.clock_rounds, fraction_fit=a.fraction,
                     profiles=profiles)
            walls.append(time.perf_counter() - t0)
        ratios.append(walls[1] / walls[0])
        print(f"  pair {k + 1}: {walls[0]:.1f} s / {walls[1]:.1f} s = {ratios[-1]:.2f}×")
    median = statistics.median(ratios)
    print(f"  median {median:.2f}× — goal ≤ 1.2×: {'met' if median <= 1.2 else 'missed'}")


class PeakRSS:
    """Peak summed RSS of this process's descendants, sampled in a thread."""

    def __init__(self) -> None:
        import psutil

        self.me = psutil.Process()
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        while not self._stop.wait(0.25):
            total = 0
            for p in self.me.children(recursive=True):
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    continue
            self.peak = max(self.peak, total)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


def part_memory(res: Any, tmp: Path, address: str, a: argparse.Namespace) -> None:
    import xflwb

    profile = xflwb.DeviceProfiles(**HEAVY)
    peaks = {}
    for n in sorted({a.small, a.clients}):  # --smoke: one fleet size (the ratio is 1)
        with PeakRSS() as m:
            session = simulate(res, tmp / f"mem-{n}", address, clients=n, dataset=a.dataset,
                               rounds=a.clock_rounds, fraction_fit=a.fraction,
                               over_select=0.3, deadline=a.deadline, profiles=profile)
        if n == a.small:  # --smoke: the determinism part's first run (see part_determinism)
            a.memory_run = (session, tmp / f"mem-{n}", 0)
        peaks[n] = m.peak
        print(f"memory: {n} clients: peak {m.peak / 2**20:.0f} MiB")
    ratio = peaks[a.clients] / peaks[a.small]
    print(f"  {a.clients} / {a.small} clients: {ratio:.2f}× — goal ≤ 1.1×: "
          f"{'met' if ratio <= 1.1 else 'missed'}")


def comparable(session: Any) -> Any:
    h = session.history
    return h[~h.metric.isin(WALL)].sort_values(["round", "platform", "metric"]
                                               ).reset_index(drop=True)


def part_determinism(res: Any, tmp: Path, address: str, a: argparse.Namespace) -> None:
    import xflwb

    profile = xflwb.DeviceProfiles(**HEAVY)
    # one data directory: its cost cache holds the per-example costs measured by the first
    # run, so both runs use the same (a run is deterministic for its seed and costs).
    # --smoke: the memory part's small run (these settings, seed 0) is the first of the two
    reuse = getattr(a, "memory_run", None) if a.smoke else None
    first, data_dir, seed = reuse or (None, tmp / "det", 7)
    runs = [first] if first is not None else []
    while len(runs) < 2:
        runs.append(simulate(res, data_dir, address, clients=a.small, dataset=a.dataset,
                             rounds=a.clock_rounds, fraction_fit=a.fraction, over_select=0.3,
                             deadline=a.deadline, profiles=profile, seed=seed))
    same_history = comparable(runs[0]).equals(comparable(runs[1]))
    same_model = all(np.array_equal(x, y) for x, y in zip(runs[0].global_parameters(),
                                                          runs[1].global_parameters(),
                                                          strict=True))
    print(f"determinism: {a.small} clients, seed {seed}, twice: history identical: "
          f"{same_history}; global model identical: {same_model}")
    if not (same_history and same_model):
        raise SystemExit("determinism: two runs of one seed differ")


PARTS = {"tta": part_tta, "clock": part_clock, "memory": part_memory,
         "determinism": part_determinism}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--part", choices=sorted(PARTS), action="append",
                   help="run only this part (repeatable; default: all)")
    p.add_argument("--smoke", action="store_true",
                   help="tiny sizes (one fleet of 20 for every part), 1-2 rounds, one pair, "
                   "the memory part's run reused by the determinism part: every part, "
                   "checks the script runs")
    p.add_argument("--clients", type=int, default=1000)
    p.add_argument("--small", type=int, default=100, help="the smaller fleet (clock, memory)")
    p.add_argument("--dataset", default="digits")
    p.add_argument("--rounds", type=int, default=300,
                   help="sync rounds (tta; FedBuff runs for the simulated time they took)")
    p.add_argument("--fraction", type=float, default=0.25,
                   help="share of the available clients a sync round selects")
    p.add_argument("--deadline", type=float, default=30.0, help="simulated seconds")
    p.add_argument("--buffer", type=int, default=10, help="FedBuff buffer_size")
    p.add_argument("--concurrency", type=int, default=50, help="FedBuff max_concurrency")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--every", type=int, default=5,
                   help="tta: evaluate every this many rounds / versions (kept checkpoints)")
    p.add_argument("--target", type=float, default=0.9)
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--plot", help="tta: save the accuracy / simulated time plot here")
    p.add_argument("--clock-rounds", type=int, default=10)
    add_common_arguments(p)
    a = p.parse_args()
    if a.smoke:
        a.clients, a.small, a.rounds, a.every = 20, 20, 2, 1
        a.clock_rounds, a.pairs, a.buffer, a.concurrency, a.target = 1, 1, 2, 4, 0.2
        a.fraction = 0.5
    import xflwb
    from xflwb.demo import demo_model

    tmp = workdir(a.workdir, "xflwb-bench-systems-")
    res = xflwb.export(demo_model() if a.smoke else phone_model(), name=NAME,
                       data_type=a.dataset,
                       out_dir=tmp / "artifacts", optimizer=xflwb.SGD(0.05, momentum=0.9))
    print(f"load average {os.getloadavg()[0]:.2f} at the start; {os.cpu_count()} CPUs")
    with ray_head(tmp, a.ray_address) as address:
        for name in a.part or list(PARTS):
            PARTS[name](res, tmp, address, a)
    print(f"load average {os.getloadavg()[0]:.2f} at the end")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
