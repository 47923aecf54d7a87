"""What privacy costs in the Simulation Engine, measured side by side in one run.

    python benchmarks/privacy.py            # DP at 100 clients; SecAgg+ at 20, 50, 100
    python benchmarks/privacy.py --quick    # DP at 20 clients; SecAgg+ at 10, 20
    python benchmarks/privacy.py --smoke    # 4 clients, 2 rounds, one pair of each (3 runs)

* **DP overhead**: the same simulation (demo CNN on digits, half Android half iOS,
  ``fraction_fit`` of the fleet per round) with and without ``privacy=xflwb.DP(...)``;
  the ratio of the wall time per round (rounds after the first, so Ray's start-up and the
  workers' first model load do not count) and of the server's aggregation time
  (``aggregate_seconds``). Goal: ≤ 1.2×.
* **SecAgg+ overhead**: the same simulation with and without ``secagg=xflwb.SecAgg()`` at
  several fleet sizes (every client trains every round); the ratio of the wall time per
  round and the bytes each client sends per round. Goal: ≤ 3× at 100 clients.

Every arm runs on one local Ray head started here (or the running one ``--ray-address``
names, which is neither started nor stopped), so each pays the same start-up, and the
arms alternate (plain, private, plain, private, …) so a slower minute of the machine hits
both; each setting runs ``--repeat`` such pairs and reports the median ratio with every
pair's (one pair of runs was not enough: the same code gave 2.9× and 3.5×). ``--smoke``
trains every client every round in both settings, so DP's and SecAgg+'s plain arms are the
same simulation, run once (its numbers mean nothing anyway). Results go to stdout; record
them in ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

import xflwb
from xflwb.demo import demo_model


def stop_ray(head: subprocess.Popen[bytes]) -> None:
    """Stop the Ray head this script started (SIGTERM, then kill after 60 s)."""
    head.send_signal(signal.SIGTERM)
    try:
        head.wait(60)
    except subprocess.TimeoutExpired:
        head.kill()


def start_ray(tmp: Path) -> tuple[subprocess.Popen, str]:
    """One Ray head in its own session (stopped by this script alone, never Ray's CLI)."""
    import socket

    def free() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])

    temp = Path(tempfile.mkdtemp(prefix="xflbench", dir="/tmp"))
    ray = str(Path(sys.executable).with_name("ray"))
    gcs = free()
    with open(tmp / "ray.log", "wb") as log:
        head = subprocess.Popen([ray, "start", "--head", "--block", "--port", str(gcs),
                                 "--num-cpus", str(os.cpu_count() or 2), "--temp-dir",
                                 str(temp), "--ray-client-server-port", str(free()),
                                 "--dashboard-agent-listen-port", str(free()),
                                 "--include-dashboard", "false", "--disable-usage-stats"],
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    record = temp / "ray_current_cluster"
    deadline = time.monotonic() + 300
    while not (record.exists() and record.read_text().strip()):
        if head.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the Ray head did not start: {(tmp / 'ray.log').read_text()}")
        time.sleep(0.2)
    return head, f"127.0.0.1:{gcs}"


@contextlib.contextmanager
def ray_head(tmp: Path, address: str | None) -> Iterator[str]:
    """The GCS address every simulation arm uses: ``address`` (a running head: neither
    started nor stopped here), else a head started for this run and stopped at its end."""
    if address:
        yield address
        return
    head, started = start_ray(tmp)
    try:
        yield started
    finally:
        stop_ray(head)


def add_common_arguments(ap: argparse.ArgumentParser) -> None:
    """``--ray-address`` and ``--workdir``, as every benchmark that runs simulations takes
    them."""
    ap.add_argument("--ray-address", metavar="HOST:PORT",
                    help="a running Ray head's GCS address to run every simulation on (it "
                    "is neither started nor stopped); default: start one for this run")
    ap.add_argument("--workdir", type=Path,
                    help="exports, registries and logs go here (default: a new temp dir)")


def workdir(path: Path | None, prefix: str) -> Path:
    """``--workdir`` (created if missing), else a new temp dir named ``prefix``…"""
    if path is None:
        return Path(tempfile.mkdtemp(prefix=prefix))
    path.mkdir(parents=True, exist_ok=True)
    return path.resolve()


def run_arm(res: Any, data_dir: Path, ray_address: str, clients: int, rounds: int,
            fraction: float, **extra: Any) -> dict[str, float]:
    """One simulation; wall seconds per round after the first, the server's aggregation
    seconds per round, bytes each client sent per round, and the final accuracy."""
    sim = xflwb.simulate(res, android=clients // 2, ios=clients - clients // 2,
                         dataset="digits", partition="iid", rounds=rounds,
                         fraction_fit=fraction, fraction_evaluate=fraction, seed=0,
                         ray_address=ray_address, data_dir=data_dir, wait=False,
                         round_timeout=3600, progress=False, **extra)
    marks: dict[int, float] = {}
    while True:
        status, rnd = sim.status, sim.round
        marks.setdefault(rnd, time.monotonic())
        if status in xflwb.workbench.DONE:
            break
        time.sleep(0.1)
    if status != "finished":
        raise RuntimeError(f"{extra or 'plain'} at {clients} clients: {status}: {sim.error}")
    hist = sim.history
    allp = hist[hist.platform == "all"].pivot_table(index="round", columns="metric",
                                                     values="value")
    per_round = (marks[rounds] - marks[1]) / (rounds - 1)
    clients_per_round = float(allp["clients"].iloc[1:].mean()) if "clients" in allp else np.nan
    up = allp["bytes_up"].iloc[1:].mean() if "bytes_up" in allp else np.nan
    return {"round_seconds": per_round,
            "aggregate_seconds": float(allp["aggregate_seconds"].iloc[1:].mean()),
            "bytes_per_client": float(up / clients_per_round) if clients_per_round else np.nan,
            "accuracy": float(allp["accuracy"].iloc[-1]) if "accuracy" in allp else np.nan,
            "epsilon": float(allp["epsilon"].iloc[-1]) if "epsilon" in allp else np.nan}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small fleets (a smoke run)")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=3,
                    help="alternating (plain, private) pairs per setting; the ratio printed "
                    "is the median of the pairs' ratios, with their range")
    ap.add_argument("--smoke", action="store_true",
                    help="4 clients, 2 rounds, one pair per setting sharing its plain run: "
                    "checks the benchmark runs")
    add_common_arguments(ap)
    args = ap.parse_args()
    dp_clients, dp_fraction = (20, 0.5) if args.quick else (100, 0.2)
    secagg_sizes: tuple[int, ...] = (10, 20) if args.quick else (20, 50, 100)
    if args.smoke:
        args.rounds, args.repeat, dp_clients, dp_fraction, secagg_sizes = 2, 1, 4, 1.0, (4,)
    if args.rounds < 2:
        ap.error(f"--rounds {args.rounds}: the wall time per round is taken over rounds "
                 "2..R; use --rounds 2 or more")
    tmp = workdir(args.workdir, "xflwb-bench-privacy-")
    res = xflwb.export(demo_model(), name="bench_dp", data_type="digits",
                       out_dir=tmp / "artifacts", optimizer=xflwb.SGD(0.05, momentum=0.9))
    runs = 0
    #: --smoke: plain runs by (clients, fraction), shared by DP's and SecAgg+'s pairs (the
    #: same settings; a full run alternates fresh pairs instead, so a slow minute hits both)
    plain_runs: dict[tuple[int, float], dict[str, float]] = {}

    def arm(clients: int, fraction: float, **extra: Any) -> dict[str, float]:
        nonlocal runs
        if args.smoke and not extra and (clients, fraction) in plain_runs:
            return plain_runs[clients, fraction]
        runs += 1
        out = run_arm(res, tmp / f"d{runs}", address, clients, args.rounds, fraction, **extra)
        if not extra:
            plain_runs[clients, fraction] = out
        return out

    def pairs(clients: int, fraction: float, **extra: Any
              ) -> tuple[dict[str, float], dict[str, float], str]:
        """``--repeat`` alternating (plain, private) runs: the medians of each arm, and the
        median (range) of the per-pair wall-per-round ratios — the Ray-bound round time of
        a 2-core machine varies ±10–30 % between runs of the same code."""
        runs = [(arm(clients, fraction), arm(clients, fraction, **extra))
                for _ in range(args.repeat)]
        ratios = sorted(s["round_seconds"] / p["round_seconds"] for p, s in runs)
        med = {k: [float(np.median([r[i][k] for r in runs])) for i in (0, 1)]
               for k in runs[0][0]}
        span = (f"{float(np.median(ratios)):.2f}× (pairs {', '.join(f'{r:.2f}' for r in ratios)})"
                if len(ratios) > 1 else f"{ratios[0]:.2f}×")
        return ({k: v[0] for k, v in med.items()}, {k: v[1] for k, v in med.items()}, span)

    with ray_head(tmp, args.ray_address) as address:
        dp = xflwb.DP(noise_multiplier=1.0, clipping_norm=1.0)
        plain, private, span = pairs(dp_clients, dp_fraction, privacy=dp)
        print(f"DP at {dp_clients} clients ({dp_fraction:.0%} per round), {args.rounds} "
              f"rounds, {args.repeat} alternating pairs (medians):")
        print(f"  wall per round   plain {plain['round_seconds']:.2f} s, DP "
              f"{private['round_seconds']:.2f} s → {span}  (goal ≤ 1.2×)")
        print(f"  aggregation      plain {plain['aggregate_seconds'] * 1e3:.1f} ms, DP "
              f"{private['aggregate_seconds'] * 1e3:.1f} ms → "
              f"{private['aggregate_seconds'] / plain['aggregate_seconds']:.2f}×")
        print(f"  final accuracy   plain {plain['accuracy']:.3f}, DP {private['accuracy']:.3f} "
              f"(ε = {private['epsilon']:.2f} at δ = 1e-5)")
        # under SecAgg+ the strategy sees one aggregate, not the clients' messages: a client's
        # masked vector is its canonical update + one weight per tensor + 1, as int64
        # (Flower's quantisation), plus .npy headers; the key stages add a few hundred bytes
        canon = res.manifest["parameters"]
        values = sum(int(np.prod(p["shape"])) for p in canon) + len(canon) + 1
        masked_bytes = 8 * values + 128 * (len(canon) + 1)
        print(f"SecAgg+ vs plain, every client every round (a SecAgg+ client sends ≈ "
              f"{masked_bytes:,} B of masked vector; a plain one its bytes_up):")
        for n in secagg_sizes:
            p, s, span = pairs(n, 1.0, secagg=xflwb.SecAgg())
            print(f"  {n:4d} clients   wall per round {p['round_seconds']:.2f} s → "
                  f"{s['round_seconds']:.2f} s = {span}"
                  f"   bytes per client {p['bytes_per_client']:,.0f} → ≈{masked_bytes:,}"
                  f"   accuracy {p['accuracy']:.3f} / "
                  f"{s['accuracy']:.3f}" + ("   (goal ≤ 3×)" if n == 100 else ""))
    print(f"{runs} simulations")
    return 0


if __name__ == "__main__":
    sys.exit(main())
