"""FedBuff against synchronous FedAvg with stragglers: wall time to 90 % test accuracy.

    python benchmarks/async.py            # the recorded run (about 5 minutes)
    python benchmarks/async.py --quick    # fewer rounds, 80 % target
    python benchmarks/async.py --smoke    # 1 + 1 phones, 2 rounds, 50 %: checks it runs

* **Time to accuracy**: the demo CNN (``xflwb.demo.demo_model()``, exported once with
  data_type "digits", SGD(0.05, momentum 0.9)) trained by 8 virtual phones in their own
  processes (``wb.spawn_devices``: 4 Android running the ``.tflite``, 4 iOS running the
  ``.mlmodel``) on Dirichlet(0.5) partitions of digits, seed 0, ``local_epochs`` 3. Two
  phones are stragglers: slowdown 5 on the 4th Android phone, 10 on the 4th iOS phone
  (``slowdown=[1, 1, 1, 5, 1, 1, 1, 10]``; the 8 slowdowns 1,1,1,1,1,1,5,10, one slow
  phone per platform). Same workbench, export, fleet spec and seed for both arms:

  - **sync FedAvg**: ``strategy="fedavg"``, ``min_clients=8``, ``fraction_fit=1.0``,
    ``rounds=R``: every round waits for the slowest phone.
  - **FedBuff**: ``strategy="fedbuff"``, ``min_clients=8``, ``buffer_size=4``,
    ``max_staleness=20``, ``staleness="polynomial:0.5"``, ``server_lr=1.0``,
    ``rounds = R·8/4`` versions (as many applied updates as the sync arm's R rounds), a
    ``max_seconds`` cap.

  Federated evaluation is off in both (``fraction_evaluate=0``, ``evaluate_every=0``): it
  would cost phone time differently in each, and accuracy is measured here instead, the
  same way for both: every checkpointed global model (one per round / version, from the
  registry) is loaded, its canonical parameters set into the Keras model
  (``KerasRuntime.set_canonical_parameters``) and evaluated on the union of the 8 phones'
  local test splits (``xflwb.devices.partition.device_data``, 20 % of each partition),
  which no phone trains on. Its time is the checkpoint's wall time minus the moment the
  server began training (the session's progress leaves "waiting": all 8 phones joined),
  so device start-up (processes, TensorFlow imports, model download) counts in neither.
  Goals: FedBuff reaches 90 % ≥ 2× sooner; final accuracies within 1 point.

* **Server memory**: the bytes FedBuff's ``VersionBuffer`` holds with ``max_staleness``
  past versions kept and a buffer one update short of full (tracemalloc around building
  it and filling it), for the demo model and a 1M-parameter model (Dense 999×1000 +
  bias), against one model's float32 size and the arithmetic (versions + zeros + buffer).

The two arms run one after the other on the shared 2-core machine; the cores other
processes kept busy meanwhile are printed under each. Results go to stdout; record them
in ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path
from typing import Any, NamedTuple

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

import xflwb
from xflwb.demo import demo_model

NAME, DATASET, PARTITION, SEED = "bench_async", "digits", "dirichlet:0.5", 0
BUFFER_SIZE, MAX_STALENESS = 4, 20


class Fleet(NamedTuple):
    """The phones both arms train with, and FedBuff's buffer size for them."""

    android: int
    ios: int
    slowdown: list[float]  # device order: the Android phones, then the iOS ones
    buffer_size: int

    @property
    def n(self) -> int:
        return self.android + self.ios


FLEET = Fleet(4, 4, [1, 1, 1, 5, 1, 1, 1, 10], BUFFER_SIZE)
SMOKE_FLEET = Fleet(1, 1, [1, 2], 2)  # --smoke: one phone a platform, the iOS one slower


class Load:
    """Cores other processes kept busy while an arm ran: system busy CPU minus this
    process tree's (sampled every 0.5 s, so phones that exit still count)."""

    def __init__(self) -> None:
        import psutil

        self._psutil = psutil
        self._cpu: dict[int, tuple[float, float]] = {}  # pid → (first, last) cpu seconds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _busy(t: Any) -> float:
        return t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(
            t, "softirq", 0.0) + getattr(t, "steal", 0.0)

    def _sample(self) -> None:
        me = self._psutil.Process()
        for p in [me, *me.children(recursive=True)]:
            try:
                t = p.cpu_times()
            except self._psutil.Error:
                continue
            used = t.user + t.system
            first = self._cpu.get(p.pid, (used if p.pid == me.pid else 0.0, 0.0))[0]
            self._cpu[p.pid] = (first, used)

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            self._sample()

    def __enter__(self) -> Load:
        self._sample()
        self._sys, self._t0 = self._busy(self._psutil.cpu_times()), time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        wall = time.monotonic() - self._t0
        own = sum(last - first for first, last in self._cpu.values())
        total = self._busy(self._psutil.cpu_times()) - self._sys
        self.own, self.other = own / wall, max(0.0, (total - own) / wall)
        self.loadavg = os.getloadavg()[0]

    def __str__(self) -> str:
        return (f"this benchmark used {self.own:.2f} cores, other processes "
                f"{self.other:.2f} (1-min load average at the end {self.loadavg:.2f})")


def held_out(fleet: Fleet) -> tuple[np.ndarray, np.ndarray]:
    """The union of the phones' local test splits: data no phone trains on."""
    from xflwb.devices.partition import device_data

    n = fleet.n
    parts = [device_data(DATASET, PARTITION, n, k, seed=SEED) for k in range(n)]
    return (np.concatenate([p.x_test for p in parts]),
            np.concatenate([p.y_test for p in parts]))


def run_arm(wb: Any, res: Any, strategy: str, rounds: int, epochs: int,
            options: dict[str, Any], timeout: float, fleet_spec: Fleet) -> dict[str, Any]:
    """One session with a fresh fleet; the checkpoints' (seconds since training began,
    canonical arrays), the history and the arrivals."""
    from xflwb.sessions.checkpoints import load_checkpoint

    s = wb.train(NAME, rounds=rounds, strategy=strategy, strategy_options=options,
                 min_clients=fleet_spec.n, fraction_fit=1.0, fraction_evaluate=0.0,
                 local_epochs=epochs, round_timeout=120,
                 keep_checkpoints=None)  # every version's model is evaluated below
    fleet = wb.spawn_devices(android=fleet_spec.android, ios=fleet_spec.ios, dataset=DATASET,
                             partition=PARTITION, seed=SEED, slowdown=fleet_spec.slowdown)
    spawned, began = time.time(), None
    deadline = time.monotonic() + timeout
    try:
        with Load() as load:
            last_status = 0.0
            while True:
                if began is None and s.progress.get("phase") in ("fit", "fedbuff"):
                    began = time.time()
                if time.monotonic() - last_status > 0.5:
                    last_status = time.monotonic()
                    if s.status in xflwb.workbench.DONE:
                        break
                    if time.monotonic() > deadline:
                        s.stop()
                        break
                time.sleep(0.02)
        status = s.wait(timeout=120)
        fleet.wait(timeout=60)
    finally:
        fleet.stop()
    if status != "finished" or began is None:
        raise RuntimeError(f"{strategy}: session {status}: {s.error}")
    info = s.info
    manifest = s.registry.get_model(info["model_id"])["manifest"]
    ckpts = sorted(s.registry.checkpoints_newest_first(NAME, session_id=s.id),
                   key=lambda c: c["round"])
    models = [(c["round"], c["time"] - began,
               load_checkpoint(c["path"], c.get("sha256"), manifest)) for c in ckpts]
    return {"models": models, "history": s.history, "arrivals": s.arrivals, "load": load,
            "startup": began - spawned}


def accuracy_curve(res: Any, models: list[tuple[int, float, list[np.ndarray]]],
                   x: np.ndarray, y: np.ndarray) -> list[tuple[int, float, float]]:
    """(round, seconds, accuracy) of every checkpoint, evaluated in Keras on (x, y)."""
    from xflwb.bridge import runtime

    keras_rt = runtime.load(res, "keras")
    out = []
    for rnd, seconds, arrays in models:
        keras_rt.set_canonical_parameters(arrays)
        out.append((rnd, seconds, keras_rt.evaluate(x, y)[1]))
    return out


def time_to(curve: list[tuple[int, float, float]], target: float) -> tuple[int, float] | None:
    """(round, seconds) of the first checkpoint at ``target`` accuracy, or None."""
    return next(((r, t) for r, t, a in curve if a >= target), None)


def updates(arm: dict[str, Any], strategy: str) -> str:
    """Updates applied (and rejected) per platform."""
    if strategy == "fedbuff":
        a = arm["arrivals"]
        parts = []
        for p in ("android", "ios"):
            mine = a[a.platform == p]
            ok = mine[mine.status == "applied"]
            late = mine.reason.str.startswith("arrived after").sum()
            stale = mine.reason.str.startswith("stale update").sum()
            other = len(mine) - len(ok) - late - stale
            extra = [f"{n} {what}" for n, what in ((stale, "stale"), (late, "after the end"),
                                                   (other, "rejected otherwise")) if n]
            parts.append(f"{p} {len(ok)}" + (f" (+{', '.join(extra)})" if extra else ""))
        return ", ".join(parts)
    h = arm["history"]
    clients = h[h.metric == "clients"]
    return ", ".join(f"{p} {int(clients[clients.platform == p].value.sum())}"
                     for p in ("android", "ios"))


def staleness(arm: dict[str, Any]) -> str:
    """Staleness of the applied updates, and how many each phone got in (stragglers last)."""
    a = arm["arrivals"]
    ok = a[a.status == "applied"]
    if not len(ok):
        return "no update applied"
    per_phone = ok.groupby("client").size().sort_values(ascending=False)
    return (f"mean {ok.staleness.mean():.2f}, max {int(ok.staleness.max())}; applied per "
            f"phone {', '.join(str(n) for n in per_phone)}")


# -- server memory ---------------------------------------------------------------------------
def buffer_bytes(shapes: list[tuple[int, ...]], max_staleness: int,
                 buffer_size: int) -> tuple[int, int]:
    """(bytes held, peak bytes) by a ``VersionBuffer`` with ``max_staleness + 1`` versions
    and ``buffer_size - 1`` updates buffered, measured with tracemalloc (numpy reports its
    allocations to it)."""
    from xflwb.federation.fedbuff import Arrival, FedBuff, VersionBuffer

    opts = FedBuff(buffer_size=buffer_size, max_staleness=max_staleness)
    masks = {p: [True] * len(shapes) for p in ("android", "ios")}
    rng = np.random.default_rng(0)
    update = [rng.standard_normal(s).astype(np.float32) for s in shapes]  # not counted

    def arrive(vb: VersionBuffer) -> None:
        a = Arrival(vb.version + 1, "android", "c", vb.version, 0, 1.0, 10, 0.0, 0.0,
                    "applied")
        vb.add(a, update, 10)

    warm = VersionBuffer([np.zeros(s, np.float32) for s in shapes], 0, opts, masks)
    arrive(warm)  # the first add imports the BLAS axpy: not the buffer's memory
    del warm
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        vb = VersionBuffer([np.zeros(s, np.float32) for s in shapes], 0, opts, masks)
        for _ in range(max_staleness + 1):  # more versions than are kept
            for _ in range(buffer_size):
                arrive(vb)
            vb.make_version()
        for _ in range(buffer_size - 1):
            arrive(vb)
        held, peak = tracemalloc.get_traced_memory()
        assert len(vb.versions) == max_staleness + 1
        return held - base, peak - base
    finally:
        tracemalloc.stop()


def memory_report(res: Any) -> None:
    demo = [tuple(p["shape"]) for p in res.manifest["parameters"]]
    big = [(999, 1000), (1000,)]
    print(f"Server memory of FedBuff's VersionBuffer (buffer_size {BUFFER_SIZE}; "
          "tracemalloc, buffer one update short of full):")
    for label, shapes in (("demo CNN", demo), ("1M-parameter model", big)):
        size = 4 * sum(int(np.prod(s)) for s in shapes)
        for ms in (10, MAX_STALENESS):
            held, peak = buffer_bytes(shapes, ms, BUFFER_SIZE)
            # versions + the zeros it masks with + the float32 block sums of the buffer
            expect = (ms + 1) * size + size + size
            print(f"  {label:18s} ({size / 4:>9,.0f} params, {size:>10,} B)  max_staleness "
                  f"{ms:2d}: held {held:>11,} B = {held / size:5.2f} models (arithmetic "
                  f"{ms + 3} models = {expect:,} B), peak {peak / size:5.2f} models")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="8 rounds, 80 %% target")
    ap.add_argument("--smoke", action="store_true",
                    help="1 Android + 1 iOS phone, 2 rounds of 1 epoch, 50 %% target, a 60 s "
                    "cap: checks the benchmark runs")
    ap.add_argument("--workdir", type=Path,
                    help="the export and the workbench's data go here (default: a temp dir)")
    ap.add_argument("--rounds", type=int, default=None,
                    help="sync rounds (FedBuff gets rounds·8/buffer_size versions)")
    ap.add_argument("--local-epochs", type=int, default=3)
    ap.add_argument("--target", type=float, default=None, help="accuracy target")
    ap.add_argument("--max-seconds", type=float, default=600.0,
                    help="FedBuff's training cap (and each arm's timeout + 300 s)")
    args = ap.parse_args()
    fleet = FLEET
    if args.smoke:
        fleet, args.rounds, args.local_epochs = SMOKE_FLEET, 2, 1
        args.target, args.max_seconds = 0.5, 60.0
    rounds = args.rounds or (8 if args.quick else 40)
    target = args.target or (0.8 if args.quick else 0.9)
    versions = rounds * fleet.n // fleet.buffer_size
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
    tmp = args.workdir or Path(tempfile.mkdtemp(prefix="xflwb-bench-async-"))
    res = xflwb.export(demo_model(), name=NAME, data_type=DATASET, out_dir=tmp / "artifacts",
                       optimizer=xflwb.SGD(0.05, momentum=0.9))
    x, y = held_out(fleet)
    fedbuff = {"buffer_size": fleet.buffer_size, "max_staleness": MAX_STALENESS,
               "staleness": "polynomial:0.5", "server_lr": 1.0,
               "max_seconds": args.max_seconds, "evaluate_every": 0}
    arms = {"sync FedAvg": ("fedavg", rounds, {}), "FedBuff": ("fedbuff", versions, fedbuff)}
    results: dict[str, dict[str, Any]] = {}
    with xflwb.Workbench(data_dir=tmp / "xfl", port=0) as wb:
        wb.publish(res)
        for label, (strategy, n, options) in arms.items():
            arm = run_arm(wb, res, strategy, n, args.local_epochs, options,
                          timeout=args.max_seconds + 300, fleet_spec=fleet)
            arm["curve"] = accuracy_curve(res, arm["models"], x, y)
            results[label] = arm
    print(f"Dirichlet(0.5) digits, {fleet.android} Android + {fleet.ios} iOS phones "
          f"(processes), slowdowns {fleet.slowdown}, local_epochs {args.local_epochs}; "
          f"accuracy of each checkpoint on {len(y)} held-out samples; target {target:.0%}")
    print(f"  sync FedAvg: {rounds} rounds, min_clients {fleet.n}, fraction 1.0; FedBuff: up "
          f"to {versions} versions, buffer_size {fleet.buffer_size}, max_staleness "
          f"{MAX_STALENESS}, polynomial:0.5, server_lr 1.0")
    print(f"  {'arm':12s} {'to target':>16s} {'final acc':>9s} {'best':>6s} {'made':>14s} "
          f"{'train s':>8s}  updates per platform")
    reached = {}
    for label, arm in results.items():
        curve = arm["curve"]
        hit = time_to(curve, target)
        reached[label] = hit
        unit = "versions" if label == "FedBuff" else "rounds"
        when = f"{hit[1]:6.1f} s (#{hit[0]:>3d})" if hit else "not reached"
        print(f"  {label:12s} {when:>16s} {curve[-1][2]:9.3f} {max(c[2] for c in curve):6.3f} "
              f"{curve[-1][0]:>5d} {unit:8s} {curve[-1][1]:8.1f}  "
              f"{updates(arm, 'fedbuff' if label == 'FedBuff' else 'fedavg')}")
    sync, fb = reached["sync FedAvg"], reached["FedBuff"]
    if sync and fb:
        ratio = sync[1] / fb[1]
        print(f"  FedBuff reaches {target:.0%} {ratio:.2f}× sooner (goal ≥ 2×: "
              f"{'met' if ratio >= 2 else 'missed'})")
    else:
        print(f"  ratio: n/a ({' and '.join(k for k, v in reached.items() if not v)} did "
              f"not reach {target:.0%})")
    gap = 100 * (results["FedBuff"]["curve"][-1][2] - results["sync FedAvg"]["curve"][-1][2])
    print(f"  final accuracy FedBuff − sync: {gap:+.1f} points (goal within 1 point: "
          f"{'met' if abs(gap) <= 1 else 'missed'})")
    print(f"  FedBuff staleness of applied updates: {staleness(results['FedBuff'])}")
    for label, arm in results.items():
        curve = arm["curve"]
        step = max(1, len(curve) // 10)
        print(f"  {label} curve (#, s, accuracy): " + "  ".join(
            f"{r} {t:.1f} {acc:.3f}" for r, t, acc in curve[1::step] + curve[-1:]))
    for label, arm in results.items():
        print(f"  during {label}: {arm['load']}; device start-up to training "
              f"{arm['startup']:.1f} s")
    memory_report(res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
