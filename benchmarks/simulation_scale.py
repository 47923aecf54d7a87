"""Simulation scale: a 1,000-client mixed Android/iOS fleet on Flower's Simulation Engine.

Issue 6 asks for ``xflwb.simulate`` with 1,000 mixed-platform clients, 10 % participation
and 20 rounds on the 2-core machine: wall time, per-round server overhead and peak memory,
side by side with Flower's own simulation of a plain ``NumPyClient`` doing the same Keras
training on the same partitions. Goals: no slower than that baseline by more than 1.5×, and
peak memory flat in the number of clients.

* Model: ``Input(60) → Dense(32, relu) → Dense(10, softmax)``, SGD(lr 0.05), batch 32, one
  local epoch; exported once for Android (TFLite) and iOS (Core ML) into a temp directory.
* Data: ``synthetic:1,1`` (FedProx Synthetic(α=1, β=1): every device draws its own model
  and input shift, 50..500 samples, 60 features, 10 classes), partition ``dirichlet:0.5``.
  For synthetic data a label-based scheme is validated and then ignored, so every client
  keeps its own FedProx device (non-IID by construction); ``iid`` would pool and reshuffle
  all devices. Each client trains on 80 % of its device and evaluates on the other 20 %
  (``xflwb.devices.partition._local_split``, seed 0).
* xflwb arm: ``xflwb.simulate(export, android=N/2, ios=N/2, rounds=R, fraction_fit=0.1,
  fraction_evaluate=0.1, seed=0, wait=False)``. Clients 0..N/2-1 run the ``.tflite`` in
  TF's interpreter, the rest the ``.mlmodel`` in xflwb's Core ML executor; the server is
  Flower's legacy ``Server`` with ``CrossPlatformStrategy`` (``StreamingFedAvg``).
* Flower arm: ``flwr.simulation.run_simulation`` of a ``ServerApp(server_fn=...)`` returning
  stock ``FedAvg(fraction_fit=0.1, fraction_evaluate=0.1, min_available_clients=N,
  initial_parameters=<the export's initial weights>)`` and a ``ClientApp(client_fn=...)``
  returning a plain ``NumPyClient`` whose ``fit`` / ``evaluate`` are Keras ``model.fit(x, y,
  epochs=1, batch_size=32)`` / ``model.evaluate(xt, yt, batch_size=256)`` (xflwb's
  runtimes evaluate in batches of 256 too) on exactly the same per-client data. The Keras
  model is built and compiled once per Ray worker and cached in a module-level global (the
  common pattern; building it per client would retrace ``fit`` for every client), and the
  partitions are cached per worker as xflwb's ``client_data`` does. The only addition to
  ``FedAvg`` is a timer around ``aggregate_fit`` and an accuracy average for evaluation.
  Flower's legacy ``Server`` keeps its default thread pool here (xflwb raises it to 256).
* Both arms: Ray started locally by the simulation process with 2 CPUs and
  ``client_resources = {"num_cpus": 1, "num_gpus": 0.0}`` (2 actors), each arm in its own
  fresh process (xflwb's session process; ``--baseline-child`` here), nothing downloaded,
  ``FLWR_TELEMETRY_ENABLED=0``. With ``--ray-address HOST:PORT`` both arms attach to that
  running head instead (neither started nor stopped here); its processes are then not this
  benchmark's descendants, so the peak RSS and CPU columns leave Ray out.

Measures. Wall time runs from the call (``simulate`` / starting the baseline process) to
the simulation returning from ``run_simulation`` (xflwb's ``finished`` status, the
baseline's timestamp right after the call), so both include interpreter start, imports,
Ray start-up and the Ray workers importing TensorFlow. s/round is the median over rounds
2..R of the time between the ends of successive ``aggregate_fit`` calls (xflwb: its
per-round checkpoint timestamps; Flower: the timer), i.e. one round's fit + evaluate.
Server overhead per round is given two ways: the strategy's ``aggregate_fit`` time
(xflwb's ``all/aggregate_seconds``: decode, validate, platform layouts, average; Flower:
``FedAvg.aggregate_fit``), and the CPU seconds the simulation process (the ServerApp,
strategy, Flower's message routing and the Ray driver; not the Ray workers) used per round
between the end of round 1 and the end of round R. Peak memory is the peak of the summed
RSS of every descendant of this benchmark process (the simulation process, Ray's GCS,
raylet and workers), sampled every 0.25 s with psutil; shared pages (libraries, Ray's
object store) count once per process, so it overstates the true footprint a little.
Accuracy is the final global model evaluated in Keras on the union of all N clients' test
splits (weighted like a federated evaluation of every client).

Run: ``.venv/bin/python benchmarks/simulation_scale.py`` (about 13 minutes);
``--quick`` for a 60-client, 3-round check of both arms; ``--smoke`` for 4 clients, 2 rounds
(both arms, no memory scan).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

# Before anything imports TensorFlow or Flower; Ray workers inherit the environment.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ["FLWR_TELEMETRY_ENABLED"] = "0"
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

MODEL = "sim_mlp"
FEATURES, HIDDEN, CLASSES = 60, 32, 10
LEARNING_RATE, BATCH_SIZE = 0.05, 32
DATASET, PARTITION, SEED, TEST_FRACTION = "synthetic:1,1", "dirichlet:0.5", 0, 0.2
BACKEND = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0}}
SAMPLE_EVERY = 0.25


def build_model() -> Any:
    import keras

    return keras.Sequential([keras.Input((FEATURES,)),
                             keras.layers.Dense(HIDDEN, activation="relu"),
                             keras.layers.Dense(CLASSES, activation="softmax")])


# -- the plain Flower baseline's client (runs in the Ray workers) ---------------------------
# This module is imported by name (``simulation_scale``) in the workers: Flower pickles the
# ClientApp with every message, so a ``__main__`` function would be pickled by value and
# its globals (the caches below) rebuilt for every message.
_KERAS: dict[str, Any] = {}


def _keras_model() -> Any:
    """This worker's compiled Keras model, built on first use."""
    if "model" not in _KERAS:
        import keras

        model = build_model()
        model.compile(optimizer=keras.optimizers.SGD(learning_rate=LEARNING_RATE),
                      loss="sparse_categorical_crossentropy", metrics=["accuracy"])
        _KERAS["model"] = model
    return _KERAS["model"]


@functools.lru_cache(maxsize=4)
def _fleet(dataset: str, partition: str, num_partitions: int, seed: int) -> Any:
    """Every device's (x, y), once per worker (the same call xflwb's client makes)."""
    from xflwb.devices.partition import dataset_partitions

    return dataset_partitions(dataset, partition, num_partitions, seed)[0]


def client_data(n: int, pid: int, dataset: str = DATASET, partition: str = PARTITION,
                seed: int = SEED, test_fraction: float = TEST_FRACTION
                ) -> tuple[np.ndarray, ...]:
    """(x_train, y_train, x_test, y_test) of client ``pid``: as ``xflwb.simulation.client``."""
    from xflwb.devices.partition import _local_split

    x, y = _fleet(dataset, partition, n, seed)[pid]
    train, test = _local_split(len(y), test_fraction, seed, pid)
    return x[train], y[train], x[test], y[test]


def _numpy_client_class() -> type:
    from flwr.client import NumPyClient

    class KerasClient(NumPyClient):  # type: ignore[misc]
        """A plain Flower ``NumPyClient`` training the Keras model on its partition."""

        def __init__(self, n: int, pid: int) -> None:
            self.x, self.y, self.xt, self.yt = client_data(n, pid)

        def fit(self, parameters: list[np.ndarray], config: dict[str, Any]) -> Any:
            model = _keras_model()
            model.set_weights(parameters)
            model.fit(self.x, self.y, epochs=1, batch_size=BATCH_SIZE, verbose=0)
            return model.get_weights(), len(self.x), {}

        def evaluate(self, parameters: list[np.ndarray], config: dict[str, Any]) -> Any:
            model = _keras_model()
            model.set_weights(parameters)
            loss, acc = model.evaluate(self.xt, self.yt, batch_size=256, verbose=0)
            return float(loss), len(self.xt), {"accuracy": float(acc)}

    return KerasClient


def baseline_client_fn(n: int, context: Any) -> Any:
    """Flower's ``client_fn`` for the baseline: a ``NumPyClient`` for this node's partition."""
    if "cls" not in _KERAS:
        _KERAS["cls"] = _numpy_client_class()
    return _KERAS["cls"](n, int(context.node_config["partition-id"])).to_client()


# -- the baseline process --------------------------------------------------------------------
def baseline_child(job_path: str) -> None:
    """``--baseline-child JOB.json``: run Flower's simulation and write the result JSON."""
    import logging
    import warnings

    job = json.loads(Path(job_path).read_text())
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import simulation_scale as me  # the importable copy of this file, for the workers

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from flwr.client import ClientApp
        from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
        from flwr.server import ServerApp, ServerAppComponents, ServerConfig
        from flwr.server.strategy import FedAvg
        from flwr.simulation import run_simulation
    logging.getLogger("flwr").setLevel(logging.WARNING)  # an INFO page per round otherwise

    n, rounds, fraction = int(job["n"]), int(job["rounds"]), float(job["fraction"])
    init_args: dict[str, Any] = {"logging_level": logging.WARNING}
    if job.get("ray_address"):  # a running head: attach (Ray refuses num_cpus then)
        init_args["address"] = job["ray_address"]
    else:
        init_args["num_cpus"] = os.cpu_count() or 1
    with np.load(job["initial"]) as data:
        initial = [data[f"arr_{i}"] for i in range(len(data.files))]
    stamps: list[dict[str, float]] = []
    accuracy: dict[int, float] = {}
    final: dict[str, Any] = {}

    def weighted_accuracy(metrics: list[tuple[int, dict[str, Any]]]) -> dict[str, Any]:
        total = sum(k for k, _ in metrics)
        return {"accuracy": sum(k * m["accuracy"] for k, m in metrics) / total} if total else {}

    class TimedFedAvg(FedAvg):
        def aggregate_fit(self, server_round: int, results: Any, failures: Any) -> Any:
            t0 = time.perf_counter()
            out = super().aggregate_fit(server_round, results, failures)
            stamps.append({"round": server_round, "end": time.time(),
                           "aggregate": time.perf_counter() - t0, "clients": len(results),
                           "failures": len(failures)})
            if out[0] is not None:
                final["params"] = out[0]
            return out

        def aggregate_evaluate(self, server_round: int, results: Any, failures: Any) -> Any:
            out = super().aggregate_evaluate(server_round, results, failures)
            if "accuracy" in out[1]:
                accuracy[server_round] = float(out[1]["accuracy"])
            return out

    def server_fn(context: Any) -> Any:
        strategy = TimedFedAvg(fraction_fit=fraction, fraction_evaluate=fraction,
                               min_fit_clients=2, min_evaluate_clients=2,
                               min_available_clients=n,
                               initial_parameters=ndarrays_to_parameters(initial),
                               evaluate_metrics_aggregation_fn=weighted_accuracy)
        return ServerAppComponents(strategy=strategy,
                                   config=ServerConfig(num_rounds=rounds))

    run_simulation(server_app=ServerApp(server_fn=server_fn),
                   client_app=ClientApp(client_fn=functools.partial(me.baseline_client_fn, n)),
                   num_supernodes=n,
                   backend_config={**BACKEND, "init_args": init_args})
    ended = time.time()
    if "params" in final:
        np.savez(job["final"], *parameters_to_ndarrays(final["params"]))
    Path(job["out"]).write_text(json.dumps({"ended": ended, "stamps": stamps,
                                            "accuracy": accuracy}))


# -- measurement -----------------------------------------------------------------------------
class TreeSampler:
    """Summed RSS of every descendant of this process, the CPU time of its direct children
    (the simulation process) and of the whole tree, sampled every ``SAMPLE_EVERY`` s on a
    thread; and the machine's busy CPU time, to see what other jobs took meanwhile."""

    def __init__(self) -> None:
        import psutil

        self.me = psutil.Process(os.getpid())
        self.peak = 0
        self.peak_procs = 0
        self.cpu: list[tuple[float, float]] = []  # (time, CPU s of the direct children)
        self._cpu_of: dict[int, float] = {}  # direct children
        self._tree_cpu: dict[int, float] = {}  # every descendant, last seen
        self._me0 = self._own_cpu()
        self._busy0, self._t0 = self._busy(), time.monotonic()
        self.tree_cpu = self.machine_cpu = self.seconds = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss", daemon=True)
        self._thread.start()

    def _own_cpu(self) -> float:
        t = self.me.cpu_times()
        return t.user + t.system

    @staticmethod
    def _busy() -> float:
        import psutil

        t = psutil.cpu_times()
        return t.user + t.nice + t.system + t.irq + t.softirq + getattr(t, "steal", 0.0)

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            total, count = 0, 0
            for proc in self.me.children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    total += proc.memory_info().rss
                    t = proc.cpu_times()
                    self._tree_cpu[proc.pid] = t.user + t.system
                    count += 1
            if total > self.peak:
                self.peak, self.peak_procs = total, count
            for proc in self.me.children(recursive=False):
                with contextlib.suppress(psutil.Error):
                    t = proc.cpu_times()
                    self._cpu_of[proc.pid] = t.user + t.system
            self.cpu.append((time.time(), sum(self._cpu_of.values())))
            self._stop.wait(SAMPLE_EVERY)

    @property
    def other_load(self) -> float:
        """Cores' worth of CPU used outside this benchmark's process tree during the run
        (other jobs on the machine); approximate: a process's last 0.25 s is missed."""
        if not self.seconds:
            return 0.0
        ours = self.tree_cpu + self._own_cpu() - self._me0
        return max(0.0, self.machine_cpu - ours) / self.seconds

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.tree_cpu = sum(self._tree_cpu.values())
        self.machine_cpu = self._busy() - self._busy0
        self.seconds = time.monotonic() - self._t0

    def cpu_between(self, t0: float, t1: float) -> float | None:
        """CPU seconds of the simulation process between two wall-clock times (nearest
        samples)."""
        if not self.cpu or t1 <= t0:
            return None

        def at(t: float) -> float:
            return min(self.cpu, key=lambda s: abs(s[0] - t))[1]

        return at(t1) - at(t0)


@dataclass
class Run:
    """One arm at one fleet size."""

    arm: str
    n: int
    rounds: int
    start: float = 0.0  # time.time() at the call
    wall: float = 0.0
    round_ends: dict[int, float] = field(default_factory=dict)
    aggregate: list[float] = field(default_factory=list)  # seconds per round
    clients: list[float] = field(default_factory=list)  # fit results per round
    fed_accuracy: float | None = None  # weighted over the last round's evaluated clients
    accuracy: float | None = None  # final global model on every client's test split
    peak_rss: int = 0
    peak_procs: int = 0
    driver_cpu: float | None = None  # CPU s per round of the simulation process
    tree_cpu: float = 0.0  # CPU s of the whole process tree over the run
    other_load: float = 0.0  # cores busy with other jobs meanwhile (mean)
    error: str | None = None
    notes: list[str] = field(default_factory=list)

    def round_seconds(self) -> list[float]:
        e = self.round_ends
        return [e[r] - e[r - 1] for r in range(2, self.rounds + 1) if r in e and r - 1 in e]

    @property
    def per_round(self) -> float | None:
        return _median(self.round_seconds())

    @property
    def ok(self) -> bool:
        return self.error is None and len(self.round_seconds()) == self.rounds - 1


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _finish(run: Run, sampler: TreeSampler) -> None:
    run.peak_rss, run.peak_procs = sampler.peak, sampler.peak_procs
    run.tree_cpu, run.other_load = sampler.tree_cpu, sampler.other_load
    e = run.round_ends
    if 1 in e and run.rounds in e and run.rounds > 1:
        cpu = sampler.cpu_between(e[1], e[run.rounds])
        run.driver_cpu = None if cpu is None else cpu / (run.rounds - 1)


def evaluate_global(arrays: list[np.ndarray], n: int) -> float:
    """Accuracy of a global model on the union of all ``n`` clients' test splits."""
    xs, ys = [], []
    for pid in range(n):
        _, _, xt, yt = client_data(n, pid)
        xs.append(xt)
        ys.append(yt)
    x, y = np.concatenate(xs), np.concatenate(ys)
    model = build_model()
    model.set_weights(arrays)
    pred = np.argmax(model.predict(x, batch_size=4096, verbose=0), axis=1)
    return float(np.mean(pred == y))


def run_xflwb(res: Any, data_dir: Path, n: int, rounds: int, fraction: float,
              timeout: float, ray_address: str | None = None) -> Run:
    """``xflwb.simulate`` of ``n`` clients, half Android and half iOS."""
    import sqlalchemy as sa

    import xflwb
    from xflwb.sessions import registry as reg
    from xflwb.sessions.status import DONE

    run = Run("xflwb", n, rounds)
    sampler = TreeSampler()
    t0 = run.start = time.time()
    session = None
    try:
        session = xflwb.simulate(res, android=n // 2, ios=n - n // 2, dataset=DATASET,
                                 partition=PARTITION, rounds=rounds, fraction_fit=fraction,
                                 fraction_evaluate=fraction, seed=SEED,
                                 test_fraction=TEST_FRACTION, backend_config=BACKEND,
                                 round_timeout=3600, data_dir=data_dir, wait=False,
                                 ray_address=ray_address)
        deadline = time.monotonic() + timeout
        while (status := session.status) not in DONE:
            if time.monotonic() > deadline:
                session.stop()
                raise TimeoutError(f"not done after {timeout:.0f} s")
            time.sleep(0.2)
        info = session.info
        run.wall = float(info["ended"] or time.time()) - t0
        if status != "finished":
            run.error = f"session {status}: {(info.get('error') or '')[-600:]}"
    except Exception as exc:
        run.error = f"{type(exc).__name__}: {exc}"
    finally:
        if session is not None:
            # the process writes "finished" then shuts Ray down: wait for its descendants
            _wait_children(60)
        sampler.stop()
    if session is None:
        return run
    q = (sa.select(reg.checkpoints.c.round, reg.checkpoints.c.time)
         .where(reg.checkpoints.c.session_id == session.id))
    with session.registry.engine.connect() as c:
        run.round_ends = {int(r): float(t) for r, t in c.execute(q).all() if int(r) > 0}
    hist = session.history
    for metric, target in (("aggregate_seconds", run.aggregate), ("clients", run.clients)):
        rows = hist[(hist.platform == "all") & (hist.metric == metric)].sort_values("round")
        target += [float(v) for v in rows.value]
    acc = hist[(hist.platform == "all") & (hist.metric == "accuracy")].sort_values("round")
    if len(acc):
        run.fed_accuracy = float(acc.value.iloc[-1])
    _finish(run, sampler)
    log = data_dir / "logs" / f"session-{session.id}.log"
    run.notes += _log_notes(log)
    if run.ok:
        run.accuracy = evaluate_global(session.global_parameters(), n)
    return run


def _wait_children(timeout: float) -> None:
    import psutil

    def alive() -> bool:
        for proc in psutil.Process(os.getpid()).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                if proc.status() != psutil.STATUS_ZOMBIE:
                    return True
        return False

    deadline = time.monotonic() + timeout
    while alive() and time.monotonic() < deadline:
        time.sleep(0.2)


def _log_notes(path: Path) -> list[str]:
    """Lines of a simulation log that look like trouble (counted by kind)."""
    if not path.exists():
        return [f"no log at {path}"]
    counts: dict[str, int] = {}
    first: dict[str, str] = {}
    for line in path.read_text(errors="replace").splitlines():
        for word in ("Traceback", "ERROR", "Error", "WARNING", "WARN"):
            if word in line:
                counts[word] = counts.get(word, 0) + 1
                first.setdefault(word, line.strip()[:200])
                break
    return [f"{path.name}: {k} ×{v}, first: {first[k]}" for k, v in counts.items()]


def run_baseline(tmp: Path, initial: list[np.ndarray], n: int, rounds: int, fraction: float,
                 timeout: float, ray_address: str | None = None) -> Run:
    """Flower's own simulation of a plain Keras ``NumPyClient``, in a fresh process."""
    run = Run("flower", n, rounds)
    folder = tmp / f"baseline-{n}"
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / "initial.npz", *initial)
    job = {"n": n, "rounds": rounds, "fraction": fraction,
           "initial": str(folder / "initial.npz"), "final": str(folder / "final.npz"),
           "out": str(folder / "out.json"), "ray_address": ray_address}
    (folder / "job.json").write_text(json.dumps(job))
    log_path = folder / "baseline.log"
    sampler = TreeSampler()
    t0 = run.start = time.time()
    with open(log_path, "wb") as logf:
        proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()),
                                 "--baseline-child", str(folder / "job.json")],
                                stdin=subprocess.DEVNULL, stdout=logf,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        code = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
        code = None
        run.error = f"not done after {timeout:.0f} s"
    _wait_children(60)
    sampler.stop()
    out = Path(job["out"])
    if code != 0 or not out.exists():
        tail = log_path.read_text(errors="replace")[-1500:]
        run.error = run.error or f"baseline exited with {code}: {tail}"
        return run
    result = json.loads(out.read_text())
    run.wall = float(result["ended"]) - t0
    run.round_ends = {int(s["round"]): float(s["end"]) for s in result["stamps"]}
    run.aggregate = [float(s["aggregate"]) for s in result["stamps"]]
    run.clients = [float(s["clients"]) for s in result["stamps"]]
    acc = {int(k): v for k, v in result["accuracy"].items()}
    if acc:
        run.fed_accuracy = acc[max(acc)]
    _finish(run, sampler)
    run.notes += _log_notes(log_path)
    if run.ok and Path(job["final"]).exists():
        with np.load(job["final"]) as data:
            run.accuracy = evaluate_global([data[f"arr_{i}"] for i in range(len(data.files))],
                                           n)
    return run


# -- report ----------------------------------------------------------------------------------
def _fmt(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def table(runs: list[Run]) -> str:
    lines = ["| arm | clients | wall s | start → end of round 1 s | s/round "
             "| aggregate_fit ms/round | sim-process CPU s/round | peak RSS MiB (processes) "
             "| accuracy (fed. eval) | fits/round |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        agg = _median(r.aggregate)
        rss = f"{r.peak_rss / 2**20:.0f} ({r.peak_procs})" if r.peak_rss else "–"
        acc = f"{_fmt(r.accuracy)} ({_fmt(r.fed_accuracy)})"
        first = r.round_ends[1] - r.start if 1 in r.round_ends else None
        lines.append(f"| {r.arm} | {r.n} | {_fmt(r.wall, 1)} | {_fmt(first, 1)} "
                     f"| {_fmt(r.per_round)} "
                     f"| {_fmt(None if agg is None else agg * 1000, 2)} | {_fmt(r.driver_cpu)} "
                     f"| {rss} | {acc} | {_fmt(_median(r.clients), 0)} |")
    return "\n".join(lines)


def describe(r: Run) -> str:
    secs = ", ".join(f"{v:.2f}" for v in r.round_seconds())
    first = r.round_ends[1] - r.start if 1 in r.round_ends else None
    text = (f"{r.arm:6s} N={r.n:5d}: wall {r.wall:.1f} s, start → end of round 1 "
            f"{_fmt(first, 1)} s, rounds 2..{r.rounds} [{secs}] s; process tree CPU "
            f"{r.tree_cpu:.0f} s; other jobs on the machine: {r.other_load:.2f} cores")
    if r.error:
        text += f"\n    error: {r.error}"
    for note in r.notes:
        text += f"\n    log: {note}"
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, default=1000,
                    help="the fleet both arms run (the ratio is taken here)")
    ap.add_argument("--sizes", default="100,500",
                    help="further fleet sizes for the memory scan")
    ap.add_argument("--baseline-sizes", default="100",
                    help="further sizes the Flower arm also runs")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--fraction", type=float, default=0.1)
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per run")
    ap.add_argument("--quick", action="store_true",
                    help="60 clients, sizes 20, 3 rounds: a check that both arms work")
    ap.add_argument("--smoke", action="store_true",
                    help="4 clients, 2 rounds, half of them per round, both arms, no memory "
                    "scan: checks the benchmark runs")
    ap.add_argument("--workdir", help="keep exports, registry, session and baseline logs "
                                      "here (default: a temp dir, removed at the end)")
    ap.add_argument("--ray-address", metavar="HOST:PORT",
                    help="run both arms on this running Ray head (neither started nor "
                    "stopped); default: each simulation process starts its own Ray")
    ap.add_argument("--baseline-child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.baseline_child:
        baseline_child(args.baseline_child)
        return
    if args.quick:
        args.clients, args.sizes, args.baseline_sizes, args.rounds = 60, "20", "", 3
    if args.smoke:
        args.clients, args.sizes, args.baseline_sizes, args.rounds = 4, "", "", 2
        args.fraction = 0.5
    sizes = sorted({*(int(v) for v in args.sizes.split(",") if v), args.clients})
    baseline_sizes = sorted({*(int(v) for v in args.baseline_sizes.split(",") if v),
                             args.clients})
    started = time.perf_counter()

    import keras

    import xflwb
    from xflwb.bridge import manifest as manifest_mod

    runs: list[Run] = []
    with contextlib.ExitStack() as stack:
        if args.workdir:
            tmp = Path(args.workdir).resolve()
            tmp.mkdir(parents=True, exist_ok=True)
        else:
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="xflwb-sim-")))
        keras.utils.set_random_seed(SEED)
        res = xflwb.export(build_model(), MODEL, data_type=MODEL, out_dir=tmp / "artifacts",
                           optimizer=xflwb.SGD(learning_rate=LEARNING_RATE),
                           batch_size=BATCH_SIZE, epochs=1, platforms=("android", "ios"))
        initial = manifest_mod.initial_parameters(manifest_mod.load(res.directory))
        print(f"exported {MODEL} in {time.perf_counter() - started:.1f} s; sizes {sizes}, "
              f"Flower at {baseline_sizes}, {args.rounds} rounds, fraction {args.fraction}",
              flush=True)
        if args.ray_address:
            print(f"both arms on the running Ray head {args.ray_address}: its processes are "
                  "not counted in the peak RSS and CPU columns", flush=True)
        # The 1,000-client comparison first, xflwb then Flower, so both see the same machine;
        # then the smaller fleets.
        order = [args.clients] + [n for n in sizes if n != args.clients]
        for n in order:
            run = run_xflwb(res, tmp / "xfl-data", n, args.rounds, args.fraction, args.timeout,
                            args.ray_address)
            print(describe(run), flush=True)
            runs.append(run)
            if n in baseline_sizes:
                run = run_baseline(tmp, initial, n, args.rounds, args.fraction, args.timeout,
                                   args.ray_address)
                print(describe(run), flush=True)
                runs.append(run)
    runs.sort(key=lambda r: (r.n, r.arm != "xflwb"))
    print()
    print(table(runs))
    x = next((r for r in runs if r.arm == "xflwb" and r.n == args.clients), None)
    f = next((r for r in runs if r.arm == "flower" and r.n == args.clients), None)
    print()
    if x and f and x.ok and f.ok and x.per_round and f.per_round:
        wall, per = x.wall / f.wall, x.per_round / f.per_round
        print(f"xflwb / Flower at {args.clients} clients: wall {wall:.2f}×, per round "
              f"{per:.2f}×")
        print(f"goal ≤ 1.5× plain Flower: {'met' if max(wall, per) <= 1.5 else 'missed'}")
    else:
        print(f"no ratio: a run at {args.clients} clients failed")
    ok = [r for r in runs if r.arm == "xflwb" and r.ok]
    if len(ok) >= 2:
        small, large = ok[0], ok[-1]
        ratio = large.peak_rss / small.peak_rss
        print(f"memory: xflwb peak RSS at {large.n} / {small.n} clients = {ratio:.2f}× "
              f"({large.peak_rss / 2**20:.0f} / {small.peak_rss / 2**20:.0f} MiB) for "
              f"{large.n / small.n:.0f}× the clients; flat (≤ 1.1×): "
              f"{'met' if ratio <= 1.1 else 'missed'}")
    print(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
