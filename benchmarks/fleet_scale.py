"""Fleet scale: many lightweight virtual devices against xflwb's server and stock Flower.

Issue 4 asks for the largest number of concurrent virtual devices (tiny MLP) the bundled
server and fleet sustain on the 2-core machine, with the server-side round overhead at
10/50/100/200 devices, side by side with Flower's stock ``start_server`` + ``FedAvg``
serving the same devices. Goals: ≥ 200 devices, and no slower than stock Flower per round.

* Model: ``Input(8) → Dense(8, relu) → Dense(3, softmax)``, exported once for iOS in a
  child process (the main process, which hosts the workbench's HTTP API, never imports
  TensorFlow); iOS devices run the numpy Core ML executor. 20 synthetic samples a device.
* Devices: ``xflwb.devices.device.Device`` objects as THREADS inside at most 4 spawned
  worker processes, warmed up before any run (a process per device cannot reach 200 on 2
  cores: loading the iOS runtime imports coremltools, hence TensorFlow, ~0.5 GiB each).
  All devices send ``.npy`` tensors (Flower's own format, which stock ``FedAvg`` decodes)
  and post no FedKit telemetry, in both arms, so neither side is biased. Each device has
  its own model cache folder (devices sharing one race on the same ``.part`` file).
* xflwb arm: ``Workbench(port=0)`` + ``publish`` + ``train(min_clients=N,
  fraction_evaluate=0)``; the devices follow the full FedKit flow (advertise, manifest,
  download + sha256, ``train/server``, gRPC ``Join``). Round times come from the
  per-round checkpoint timestamps the session writes at the end of every ``aggregate_fit``.
* stock arm: ``flwr.server.start_server`` in a spawned process (it needs the main thread)
  with ``FedAvg(min_fit_clients=N, min_available_clients=N, fraction_evaluate=0)``, whose
  ``aggregate_fit`` only adds a timestamp at its end. The same devices load the same
  runtime from the export and join its port directly (``Device._serve``).

Round 1 includes waiting for the N devices to join, so s/round is the median of rounds
2..R, each measured from the end of one aggregation to the end of the next. Overhead =
round time minus the slowest device's fit (FitIns received → FitRes handed to gRPC).
Each run also prints where a round goes: lead (end of the last aggregation → first FitIns
at a device), fits (first FitIns → last FitRes) and tail (→ end of this aggregation).
Sizes beyond 200 run xflwb alone while the time budget allows, to find the largest N.

Each size runs ``--pairs`` alternating pairs (xflwb, stock, xflwb, stock, ...): a busy
spell on the shared machine hits both arms of a pair, so the ratio printed is the median of
the pairs' ratios, with every pair's; the load average is printed at the start and the end.

Run: ``.venv/bin/python benchmarks/fleet_scale.py`` (about 10 minutes);
``--sizes 10,50 --max-sizes ''`` for a quick check; ``--smoke`` (6 devices, 2 rounds, one
pair, about 20 s, most of it the export) checks that it runs and prints its tables (the
exit status is 1 when a compared run did not finish every round);
``--answer-delay 0.3 --sizes 24 --max-sizes ''`` makes every device take 0.3 s per answer,
like a slow phone; ``--stock-max-workers 1024`` gives stock Flower's ``Server`` as many fit
threads as xflwb's sessions (Flower's default is 6 here).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import multiprocessing as mp
import os
import socket
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from xflwb.devices.device import Device, DeviceOptions

MODEL = "fleet_mlp"
FEATURES, CLASSES, SAMPLES, TEST_SAMPLES = 8, 3, 20, 4
DEVICES_PER_WORKER = 100
MAX_WORKERS = 4  # each holds ~0.7 GiB (coremltools imports TensorFlow)
# Flower's own telemetry would post to the internet from start_server; keep both arms local
os.environ["FLWR_TELEMETRY_ENABLED"] = "0"


# -- the model (a child process: the main process never imports TensorFlow) -------------
def export_model(out_dir: str) -> str:
    """Export the tiny MLP for iOS; returns the export directory."""
    import keras

    import xflwb

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((FEATURES,)),
                              keras.layers.Dense(8, activation="relu"),
                              keras.layers.Dense(CLASSES, activation="softmax")])
    res = xflwb.export(model, MODEL, data_type=MODEL, out_dir=out_dir, platforms=("ios",),
                       batch_size=SAMPLES)
    return str(res.directory)


# -- devices (worker processes) -----------------------------------------------------------
class BenchDevice(Device):
    """A ``Device`` that timestamps each fit and posts no telemetry (same in both arms)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fits: list[tuple[float, float]] = []  # (FitIns received, FitRes ready)

    def _answer(self, pb: Any, kind: str, msg: Any) -> Any:
        if kind != "fit_ins":
            return super()._answer(pb, kind, msg)
        t0 = time.time()
        reply = super()._answer(pb, kind, msg)
        self.fits.append((t0, time.time()))
        return reply

    def _after(self, kind: str, session_id: int) -> None:
        return None

    def serve_direct(self, port: int) -> None:
        """Stock arm: join ``port`` with the runtime already loaded (no HTTP flow)."""
        try:
            self._serve({"port": port, "session_id": 0})
            self._set(status="finished")
        except Exception as exc:
            self._set(status="failed", error=f"{type(exc).__name__}: {exc}")


def _device_data(device_id: int) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(device_id)
    x = rng.standard_normal((SAMPLES + TEST_SAMPLES, FEATURES), dtype=np.float32)
    y = rng.integers(0, CLASSES, SAMPLES + TEST_SAMPLES)
    return x[:SAMPLES], y[:SAMPLES], x[SAMPLES:], y[SAMPLES:]


def run_devices(job: dict[str, Any]) -> dict[str, Any]:
    """Run ``job["ids"]`` devices as threads of this worker until they finish or time out.

    ``job``: arm ("xflwb" | "stock"), url (backend), port (stock), export_dir, cache,
    ids, deadline and answer_delay (seconds each device waits before every answer).
    """
    from xflwb.bridge import manifest as manifest_mod
    from xflwb.bridge import runtime

    manifest = manifest_mod.load(job["export_dir"])
    devices: list[BenchDevice] = []
    threads: list[threading.Thread] = []
    for device_id in job["ids"]:
        x, y, xt, yt = _device_data(device_id)
        device = BenchDevice(job["url"], "ios", MODEL, x, y, xt, yt, device_id=device_id,
                             cache_dir=Path(job["cache"]) / f"device-{device_id}",
                             options=DeviceOptions(encoding="npy", max_wait=job["deadline"],
                                                   network_delay=job["answer_delay"],
                                                   seed=device_id))
        target: Callable[[], Any]
        if job["arm"] == "stock":
            device.manifest = manifest
            device.runtime = runtime.load(manifest, "ios")
            target = lambda d=device: d.serve_direct(job["port"])  # noqa: E731
        else:
            target = device.run
        devices.append(device)
        threads.append(threading.Thread(target=target, name=f"device-{device_id}",
                                        daemon=True))
    rss = RssSampler(os.getpid())
    for t in threads:
        t.start()
    end = time.monotonic() + job["deadline"]
    for t in threads:
        t.join(max(0.0, end - time.monotonic()))
    for d in devices:  # stragglers: ask them to stop; daemon threads die with the worker
        d.stop()
    return {"devices": [{"id": d.status.device_id, "status": d.status.status,
                         "rounds_done": d.status.rounds_done, "fits": d.fits,
                         "error": d.status.error} for d in devices],
            "alive_threads": sum(t.is_alive() for t in threads),
            "peak_rss": rss.stop()}


# -- stock Flower (its own process: start_server needs the main thread) ---------------------
def stock_server(port: int, n: int, rounds: int, round_timeout: float,
                 initial: list[np.ndarray], out: Any, max_workers: int | None = None) -> None:
    """Flower's ``start_server`` + ``FedAvg``; puts [(round, end of aggregate_fit, ok,
    failures)] on ``out``. ``max_workers``: fit threads of its ``Server`` (None: Flower's
    default, min(32, cores + 4))."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from flwr.server import ServerConfig, start_server
    logging.getLogger("flwr").setLevel(logging.ERROR)  # a page of INFO per round otherwise

    from xflwb.flower_legacy import FedAvg, Server, SimpleClientManager, ndarrays_to_parameters

    stamps: list[tuple[int, float, int, int]] = []

    class TimedFedAvg(FedAvg):
        def aggregate_fit(self, server_round: int, results: Any, failures: Any) -> Any:
            res = super().aggregate_fit(server_round, results, failures)
            stamps.append((server_round, time.time(), len(results), len(failures)))
            return res

    strategy = TimedFedAvg(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=n,
                           min_available_clients=n,
                           initial_parameters=ndarrays_to_parameters(initial))
    server = Server(client_manager=SimpleClientManager(), strategy=strategy)
    server.set_max_workers(max_workers)
    try:
        start_server(server_address=f"127.0.0.1:{port}", server=server,
                     config=ServerConfig(num_rounds=rounds, round_timeout=round_timeout))
    finally:
        out.put(stamps)


# -- measurement helpers --------------------------------------------------------------------
class RssSampler:
    """Peak RSS of one process, sampled every 0.1 s on a thread (psutil)."""

    def __init__(self, pid: int) -> None:
        import psutil

        self.proc = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, self.proc.memory_info().rss)
            except psutil.Error:
                return
            self._stop.wait(0.1)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(2)
        return self.peak


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_listening(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s, contextlib.suppress(OSError):
            s.connect(("127.0.0.1", port))
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on port {port} after {timeout} s")


@dataclass
class Run:
    """One arm at one fleet size."""

    arm: str
    n: int
    rounds: int
    round_ends: dict[int, float] = field(default_factory=dict)  # round → end of aggregation
    devices: list[dict[str, Any]] = field(default_factory=list)
    server_rss: int = 0
    fleet_rss: int = 0
    seconds: float = 0.0
    error: str | None = None

    @property
    def completed(self) -> int:
        return sum(d["rounds_done"] >= self.rounds for d in self.devices)

    def round_seconds(self) -> list[float]:
        e = self.round_ends
        return [e[r] - e[r - 1] for r in range(2, self.rounds + 1) if r in e and r - 1 in e]

    def slowest_fit(self, rnd: int) -> float:
        """Slowest device fit of round ``rnd`` (every device fits every round)."""
        spans = [d["fits"][rnd - 1] for d in self.devices if len(d["fits"]) >= rnd]
        return max((b - a for a, b in spans), default=0.0)

    def overheads(self) -> list[float]:
        e = self.round_ends
        return [e[r] - e[r - 1] - self.slowest_fit(r) for r in range(2, self.rounds + 1)
                if r in e and r - 1 in e]

    def phases(self) -> tuple[float | None, float | None, float | None]:
        """Medians over rounds 2..R of: end of the previous aggregation → first FitIns at a
        device; first FitIns → last FitRes ready; last FitRes → end of this aggregation."""
        lead, spread, tail = [], [], []
        for r in range(2, self.rounds + 1):
            spans = [d["fits"][r - 1] for d in self.devices if len(d["fits"]) >= r]
            if not spans or r not in self.round_ends or r - 1 not in self.round_ends:
                continue
            first, last = min(a for a, _ in spans), max(b for _, b in spans)
            lead.append(first - self.round_ends[r - 1])
            spread.append(last - first)
            tail.append(self.round_ends[r] - last)
        return _median(lead), _median(spread), _median(tail)

    @property
    def ok(self) -> bool:
        return (self.error is None and self.completed == self.n
                and len(self.round_seconds()) == self.rounds - 1)


def _median(values: list[float]) -> float | None:
    """Median: one round disturbed by another job on the 2 cores should not move it."""
    return statistics.median(values) if values else None


class Workers:
    """Persistent device worker processes, warmed up once before any run.

    Loading the first iOS runtime imports coremltools (and through it TensorFlow) in each
    worker; doing that up front keeps seconds of import CPU out of every measured run.
    """

    def __init__(self, count: int, export_dir: str, timeout: float = 300.0) -> None:
        ctx = mp.get_context("spawn")
        self.conns: list[Any] = []
        self.procs: list[Any] = []
        for k in range(count):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=worker_main, args=(child, export_dir),
                               name=f"fleet-worker-{k}", daemon=True)
            proc.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(proc)
        for conn in self.conns:
            if not conn.poll(timeout) or conn.recv() != "ready":
                self.close()
                raise RuntimeError("a device worker did not warm up")

    def run(self, run: Run, arm: str, first_id: int, timeout: float,
            **common: Any) -> Callable[[], None]:
        """Start ``run.n`` devices spread over the workers; returns a function that waits
        for them and fills ``run``."""
        used = min(len(self.conns), max(1, math.ceil(run.n / DEVICES_PER_WORKER)))
        ids = list(range(first_id, first_id + run.n))
        for k in range(used):
            self.conns[k].send({"arm": arm, "ids": ids[k::used], **common})

        def collect() -> None:
            end = time.monotonic() + timeout
            for conn in self.conns[:used]:
                if not conn.poll(max(1.0, end - time.monotonic())):
                    raise TimeoutError("a device worker did not report back")
                out = conn.recv()
                run.devices += out["devices"]
                run.fleet_rss += out["peak_rss"]
                if out["alive_threads"]:
                    run.error = (run.error or "") + f"{out['alive_threads']} threads hung; "

        return collect

    def close(self) -> None:
        for conn in self.conns:
            with contextlib.suppress(OSError):
                conn.send(None)
        for proc in self.procs:
            proc.join(10)
            if proc.is_alive():
                proc.terminate()
                proc.join(5)


def worker_main(conn: Any, export_dir: str) -> None:
    """A device worker: warm up, then run one job at a time until it receives None."""
    from xflwb.bridge import manifest as manifest_mod
    from xflwb.bridge import runtime

    runtime.load(manifest_mod.load(export_dir), "ios")
    conn.send("ready")
    while (job := conn.recv()) is not None:
        conn.send(run_devices({**job, "export_dir": export_dir}))


# -- the two arms ---------------------------------------------------------------------------
def run_xflwb(wb: Any, workers: Workers, cache: str, n: int, rounds: int,
              round_timeout: float, deadline: float, first_id: int,
              answer_delay: float = 0.0) -> Run:
    """xflwb's session process serving ``n`` devices that follow the full FedKit flow."""
    import sqlalchemy as sa

    from xflwb.sessions import registry as reg

    run = Run("xflwb", n, rounds)
    t0 = time.perf_counter()
    session = wb.train(MODEL, rounds=rounds, min_clients=n, fraction_fit=1.0,
                       fraction_evaluate=0.0, local_epochs=1, round_timeout=round_timeout)
    rss = RssSampler(session.info["pid"])
    collect = workers.run(run, "xflwb", first_id, deadline + 30, url=wb.url, port=0,
                          cache=cache, deadline=deadline, answer_delay=answer_delay)
    try:
        status = session.wait(timeout=deadline, poll=1.0)
        if status != "finished":
            run.error = f"session {status}: {session.info['error']}"
    except TimeoutError as exc:
        run.error = str(exc)
        session.stop()
    run.server_rss = rss.stop()
    try:
        collect()
    except TimeoutError as exc:
        run.error = (run.error or "") + str(exc)
    q = (sa.select(reg.checkpoints.c.round, reg.checkpoints.c.time)
         .where(reg.checkpoints.c.session_id == session.id))
    with wb.registry.engine.connect() as c:
        run.round_ends = {int(r): float(t) for r, t in c.execute(q).all()}
    run.seconds = time.perf_counter() - t0
    return run


def run_stock(workers: Workers, export_dir: str, cache: str, n: int, rounds: int,
              round_timeout: float, deadline: float, first_id: int,
              answer_delay: float = 0.0, max_workers: int | None = None) -> Run:
    """Flower's start_server + FedAvg in a spawned process, the same devices joining it."""
    from xflwb.bridge import manifest as manifest_mod
    from xflwb.bridge import params

    run = Run("stock", n, rounds)
    t0 = time.perf_counter()
    m = manifest_mod.load(export_dir)
    # FedAvg is platform-blind: start it from the iOS layout the devices train in
    initial = params.to_platform(manifest_mod.initial_parameters(m), m, "ios")
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = _free_port()
    proc = ctx.Process(target=stock_server, args=(port, n, rounds, round_timeout, initial, out,
                                                    max_workers),
                       name="stock-flower")
    proc.start()
    try:
        _wait_listening(port, 60)
        rss = RssSampler(proc.pid)
        collect = workers.run(run, "stock", first_id, deadline + 30, url="http://127.0.0.1:1",
                              port=port, cache=cache, deadline=deadline,
                              answer_delay=answer_delay)
        stamps = out.get(timeout=deadline)
        run.server_rss = rss.stop()
        run.round_ends = {r: t for r, t, _ok, _fail in stamps}
        collect()
    except Exception as exc:
        run.error = f"{type(exc).__name__}: {exc}"
    finally:
        proc.join(15)
        if proc.is_alive():
            proc.terminate()
            proc.join(5)
    run.seconds = time.perf_counter() - t0
    return run


# -- report ---------------------------------------------------------------------------------
def _fmt(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _mib(value: int) -> str:
    return f"{value / 2**20:.0f}" if value else "–"


def _ms(value: float | None) -> str:
    return "–" if value is None else f"{value * 1000:.0f}"


@dataclass
class Size:
    """Every run at one fleet size: alternating (xflwb, stock) pairs, or xflwb alone."""

    n: int
    pairs: list[tuple[Run, Run | None]] = field(default_factory=list)

    def arm(self, k: int) -> list[Run]:
        return [p[k] for p in self.pairs if p[k] is not None]  # type: ignore[misc]

    def ratios(self) -> list[float]:
        """Per pair: median s/round of xflwb over that of stock (the pair's two runs ran
        back to back, so a busy spell on the shared machine hits both)."""
        out = []
        for x, s in self.pairs:
            xs, ss = _median(x.round_seconds()), _median(s.round_seconds()) if s else None
            if xs and ss:
                out.append(xs / ss)
        return sorted(out)

    def ratio(self) -> str:
        r = self.ratios()
        if not r:
            return "–"
        pairs = f" (pairs {', '.join(f'{v:.2f}' for v in r)})" if len(r) > 1 else ""
        return f"{statistics.median(r):.2f}×{pairs}"


def _arm_median(runs: list[Run], of: Callable[[Run], float | None]) -> float | None:
    return _median([v for v in map(of, runs) if v is not None])


def table(results: list[Size]) -> str:
    """Markdown: one row per fleet size, xflwb and stock Flower side by side (medians over
    the pairs; the ratio is the median of the per-pair ratios)."""
    lines = ["| devices | pairs | xflwb s/round | stock s/round | xflwb / stock "
             "| xflwb overhead s | stock overhead s | slowest fit s (x / s) "
             "| completed all rounds (x / s) | server peak RSS MiB (x / s) | fleet RSS MiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for size in results:
        xr, sr = size.arm(0), size.arm(1)

        def med(runs: list[Run], of: Callable[[Run], float | None]) -> float | None:
            return _arm_median(runs, of) if runs else None

        def rs(r: Run) -> float | None:
            return _median(r.round_seconds())

        def ov(r: Run) -> float | None:
            return _median(r.overheads())

        def fit(r: Run) -> float | None:
            return _median([r.slowest_fit(k) for k in range(2, r.rounds + 1)])

        done = (f"{min(r.completed for r in xr)}/{size.n} / "
                + (f"{min(r.completed for r in sr)}/{size.n}" if sr else "–"))
        rss = (f"{_mib(max(r.server_rss for r in xr))} / "
               + (_mib(max(r.server_rss for r in sr)) if sr else "–"))
        lines.append(
            f"| {size.n} | {len(size.pairs) if sr else '–'} | {_fmt(med(xr, rs))} "
            f"| {_fmt(med(sr, rs))} | {size.ratio()} | {_fmt(med(xr, ov))} "
            f"| {_fmt(med(sr, ov))} | {_fmt(med(xr, fit))} / {_fmt(med(sr, fit))} | {done} "
            f"| {rss} | {_mib(max(r.fleet_rss for r in xr))} |")
    return "\n".join(lines)


def phase_table(results: list[Size]) -> str:
    """Markdown: where a round goes, per arm (medians over the pairs of each run's medians
    over rounds 2..R, in ms)."""
    lines = ["| devices | xflwb lead / fits / tail ms | stock lead / fits / tail ms |",
             "|---|---|---|"]
    for size in results:
        cells = []
        for runs in (size.arm(0), size.arm(1)):
            if not runs:
                cells.append("–")
                continue
            phases = [r.phases() for r in runs]
            cells.append(" / ".join(_ms(_median([p[k] for p in phases if p[k] is not None]))
                                    for k in range(3)))
        lines.append(f"| {size.n} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def _describe(run: Run) -> str:
    secs = ", ".join(f"{v:.3f}" for v in run.round_seconds())
    bad = [d for d in run.devices if d["rounds_done"] < run.rounds]
    note = f" error: {run.error}" if run.error else ""
    if bad:
        note += f" e.g. device {bad[0]['id']}: {bad[0]['status']} {bad[0]['error'] or ''}"
    lead, spread, tail = (_ms(v) for v in run.phases())
    return (f"{run.arm:5s} N={run.n:4d}: rounds 2..{run.rounds} [{secs}] s (phases ms: lead "
            f"{lead}, fits {spread}, tail {tail}), completed {run.completed}/{run.n}, took "
            f"{run.seconds:.1f} s{note}")


def _load() -> str:
    """The 1/5/15-minute load averages: every figure this prints depends on them."""
    return ", ".join(f"{v:.2f}" for v in os.getloadavg())


def main() -> None:
    """Run the sizes; exits non-zero when a run of a compared size did not finish."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="10,50,100,200",
                    help="fleet sizes run in both arms")
    ap.add_argument("--max-sizes", default="300,400,600,800",
                    help="larger sizes run with xflwb alone while the budget lasts")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--pairs", type=int, default=3,
                    help="alternating (xflwb, stock) pairs per size; the ratio printed is "
                         "the median of the pairs' ratios, with every pair's")
    ap.add_argument("--round-timeout", type=float, default=120.0)
    ap.add_argument("--answer-delay", type=float, default=0.0,
                    help="seconds every device waits before each answer (slow phones); "
                         "shows how many devices a round really serves at once")
    ap.add_argument("--stock-max-workers", type=int, default=None,
                    help="fit threads of the stock Server (default: Flower's, min(32, cores "
                         "+ 4) = 6 here; xflwb's sessions use max_workers=1024): shows what "
                         "serving every device at once costs on CPU-bound virtual devices")
    ap.add_argument("--budget", type=float, default=900.0,
                    help="seconds; no larger size starts when it would likely overrun")
    ap.add_argument("--smoke", action="store_true",
                    help="6 devices, 2 rounds, 1 pair, no largest-fleet probe: checks that "
                         "the benchmark runs and prints its tables (its numbers mean nothing)")
    args = ap.parse_args()
    if args.smoke:
        args.sizes, args.max_sizes, args.rounds, args.pairs = "6", "", 2, 1
    if args.pairs < 1 or args.rounds < 2:
        ap.error("--pairs must be ≥ 1 and --rounds ≥ 2 (round 1 includes joining)")
    sizes = [int(v) for v in args.sizes.split(",") if v]
    extra = [int(v) for v in args.max_sizes.split(",") if v]
    started = time.perf_counter()
    print(f"load average at start: {_load()}", flush=True)

    import xflwb

    ctx = mp.get_context("spawn")
    results: list[Size] = []
    with tempfile.TemporaryDirectory(prefix="xflwb-fleet-") as tmp:
        with ctx.Pool(1) as exporter:
            export_dir = exporter.apply(export_model, (str(Path(tmp) / "artifacts"),))
        count = min(MAX_WORKERS, math.ceil(max([*sizes, *extra]) / DEVICES_PER_WORKER))
        workers = Workers(count, export_dir)
        print(f"exported {MODEL}, {count} device workers ready in "
              f"{time.perf_counter() - started:.1f} s", flush=True)
        wb = xflwb.Workbench(data_dir=Path(tmp) / "xfl-data", port=0).start()
        try:
            wb.publish(export_dir)
            first_id = 1
            cache = str(Path(tmp) / "cache")
            for n in [*sizes, *extra]:
                if results and (n in extra or not results[-1].arm(0)[-1].ok):
                    last = results[-1].arm(0)[-1]
                    elapsed = time.perf_counter() - started
                    # an xflwb-only run takes about as long as the last one, scaled by N
                    guess = last.seconds * n / last.n
                    if not last.ok or elapsed + guess > args.budget:
                        print(f"stopping before N={n}: last run ok={last.ok}, {elapsed:.0f} s "
                              f"used, next ~{guess:.0f} s", flush=True)
                        break
                deadline = 60.0 + 0.3 * n + args.rounds * 10.0
                deadline += 2 * n * args.answer_delay * args.rounds
                size = Size(n)
                results.append(size)
                for k in range(args.pairs if n in sizes else 1):
                    x = run_xflwb(wb, workers, cache, n, args.rounds, args.round_timeout,
                                  deadline, first_id, args.answer_delay)
                    print(_describe(x), flush=True)
                    first_id += n
                    s = None
                    if n in sizes:
                        s = run_stock(workers, export_dir, cache, n, args.rounds,
                                      args.round_timeout, deadline, first_id,
                                      args.answer_delay, args.stock_max_workers)
                        print(_describe(s), flush=True)
                        first_id += n
                    size.pairs.append((x, s))
                    if s is not None:
                        r = Size(n, [(x, s)]).ratios()
                        print(f"  pair {k + 1} at N={n}: xflwb / stock = "
                              f"{f'{r[0]:.2f}×' if r else '–'}", flush=True)
                    if not x.ok:
                        break
                if n in sizes:
                    print(f"N={n}: xflwb / stock = {size.ratio()}", flush=True)
        finally:
            wb.stop()
            workers.close()
    largest = max((r.n for size in results for r in size.arm(0) if r.ok), default=0)
    print()
    print(table(results))
    print()
    print(phase_table(results))
    print(f"\nlargest fleet xflwb served with every device finishing every round: {largest}"
          f"; total {time.perf_counter() - started:.0f} s; load average at end: {_load()}")
    # a compared size whose runs did not all finish is a broken benchmark (or xflwb), not a
    # figure: exit non-zero so a smoke run in CI fails (the largest-fleet probe may fail)
    broken = [f"{r.arm} N={r.n}" for size in results if size.n in sizes
              for r in (*size.arm(0), *size.arm(1)) if not r.ok]
    if broken:
        raise SystemExit(f"runs that did not complete every round: {', '.join(broken)}")


if __name__ == "__main__":
    main()
