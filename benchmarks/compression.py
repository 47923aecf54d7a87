"""What compression saves and costs, measured side by side in one run.

    python benchmarks/compression.py                 # part A (codecs), then part B (training)
    python benchmarks/compression.py --part a        # part A only (a minute)
    python benchmarks/compression.py --smoke         # tiny sizes: both parts, 2 arms, 2 rounds

* **Part A, codec speed and size** (``xflwb.federation.codecs``, no TensorFlow): per codec,
  the bytes of a 1M-parameter update (N(0, 0.01) values, the scale of a delta) against
  float32's 4 MB, and the encode + decode time (median of ``--repeat`` runs, codecs
  interleaved so a busy second of the machine hits all; stochastic rounding as clients
  use it, and round-to-nearest as the server's down-link does), with BLAS and OpenMP held
  to one thread. Goal: int8 ≤ 10 ms. Then the **server side**: decoding ``--clients``
  updates of that model (int8 deltas added to the reference the clients received, or raw
  float32) and folding them into ``StreamingFedAvg``, float32 against int8 (goal ≤ 1.3×;
  the same work ``UpdateGate.accept`` + the streamed average do for each arriving update,
  less the layout mapping both arms share).
* **Part B, training** (needs ``xflwb.Compression``): Dirichlet(0.5) digits, the demo CNN
  (``xflwb.demo.demo_model()``, SGD(0.05, momentum 0.9)), 20 rounds, per codec (float32,
  fp16, int8, topk:0.01, rotate+int8 up; the down-link in the same codec where it can
  carry a model, fp16 under top-k): (1) 4 Android + 4 iOS virtual phones (processes,
  ``wb.spawn_devices``, ``wb.train(..., compression=...)``), every phone every round;
  (2) a 200-client simulation (``xflwb.simulate(..., compression=...)``, ``--fraction`` of
  the clients per round). Printed: bytes up and down per round and their ratio to the
  float32 arm, the final global model's accuracy on digits' test split (Keras) and its
  difference to float32's, and the server's aggregation seconds per round
  (``aggregate_seconds``: decode + validate + average) against float32. Goals: int8 ≥ 3.5×
  fewer uplink bytes within 1 accuracy point; topk:0.01 ≥ 20× within 3 points; int8's
  aggregation time ≤ 1.3× float32's.

Part B's simulations share one Ray head: one started for the run, or the running one
``--ray-address`` names (neither started nor stopped). Results go to stdout; record them in
``benchmarks/README.md``.
"""

from __future__ import annotations

import os

# one thread for BLAS and OpenMP (the goal is per core), set before numpy loads
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from privacy import add_common_arguments, ray_head, workdir  # noqa: E402  (the house helpers)

from xflwb.bridge import params  # noqa: E402
from xflwb.federation import codecs  # noqa: E402
from xflwb.federation.aggregate import StreamingFedAvg  # noqa: E402

UP_CODECS = ["fp16", "int8", "topk:0.01", "rotate+int8"]
ARMS = ["float32", *UP_CODECS]


# -- part A -----------------------------------------------------------------------------------
def codec_speed(n: int, repeat: int) -> dict[str, dict[str, float]]:
    """Per codec: wire bytes of an n-value update, and median encode + decode ms with
    stochastic (client) and nearest (server down-link) rounding, interleaved."""
    x = np.random.default_rng(0).normal(0, 0.01, n).astype(np.float32)
    raw = params.encode_tensors([x], "raw")
    times: dict[str, dict[str, list[float]]] = {
        a: {"rng": [], "nearest": [], "cpu": []} for a in ARMS}
    sizes: dict[str, int] = {"float32": len(raw[0])}
    errors: dict[str, tuple[float, float]] = {}
    for r in range(repeat + 1):  # the first pass warms caches and BLAS; not counted
        for arm in ARMS:
            if arm == "float32":  # FedKit's raw bytes: what every phone speaks today
                t, c = time.perf_counter(), time.process_time()
                params.decode_tensors(params.encode_tensors([x], "raw"))
                if r:
                    times[arm]["cpu"].append(time.process_time() - c)
                    times[arm]["rng"].append(time.perf_counter() - t)
                    times[arm]["nearest"].append(time.perf_counter() - t)
                continue
            codec = codecs.parse(arm)
            assert codec is not None
            for mode in ("rng", "nearest"):
                rng = np.random.default_rng(r) if mode == "rng" else None
                t, c = time.perf_counter(), time.process_time()
                blob = codec.encode(x, rng)
                back = codec.decode(blob, n)
                if r:
                    times[arm][mode].append(time.perf_counter() - t)
                    if mode == "rng":
                        times[arm]["cpu"].append(time.process_time() - c)
            sizes[arm] = len(blob)
            errors[arm] = (float(np.linalg.norm(back - x)), codec.bound(x))
    out = {}
    for arm in ARMS:
        out[arm] = {"bytes": sizes[arm], "ratio": sizes["float32"] / sizes[arm],
                    "ms": 1e3 * float(np.median(times[arm]["rng"])),
                    "cpu_ms": 1e3 * float(np.median(times[arm]["cpu"])),
                    "ms_nearest": 1e3 * float(np.median(times[arm]["nearest"])),
                    "err": errors.get(arm, (0.0, 0.0))[0],
                    "bound": errors.get(arm, (0.0, 0.0))[1]}
    return out


def server_side(n: int, clients: int, repeat: int) -> dict[str, float]:
    """Seconds to decode ``clients`` updates of an n-parameter model and fold them into the
    streamed average: raw float32 against int8 deltas (decoded against the reference the
    clients received). Median over ``repeat`` interleaved passes."""
    rng = np.random.default_rng(1)
    shapes = [(n - n // 1000, ), (n // 1000,)]
    received = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    trained = [[r + rng.normal(0, 0.01, r.shape).astype(np.float32) for r in received]
               for _ in range(clients)]
    int8 = codecs.parse("int8")
    assert int8 is not None
    raw = [params.encode_tensors(t, "raw") for t in trained]
    packed = [codecs.encode_arrays(t, int8, reference=received, rng=np.random.default_rng(k))
              for k, t in enumerate(trained)]

    def float32_arm() -> None:
        avg = StreamingFedAvg(received)
        for blobs in raw:
            arrays, _ = params.decode_tensors(blobs)
            avg.add(arrays, 10)
        avg.result()

    def int8_arm() -> None:
        avg = StreamingFedAvg(received)
        for blobs in packed:
            avg.add(codecs.decode_arrays(blobs, int8, shapes, reference=received), 10)
        avg.result()

    seconds: dict[str, list[float]] = {"float32": [], "int8": [], "float32 cpu": [],
                                       "int8 cpu": []}
    for r in range(repeat + 1):
        for label, arm in (("float32", float32_arm), ("int8", int8_arm)):
            t, c = time.perf_counter(), time.process_time()
            arm()
            if r:
                seconds[label].append(time.perf_counter() - t)
                seconds[f"{label} cpu"].append(time.process_time() - c)
    return {k: float(np.median(v)) for k, v in seconds.items()}


def part_a(n: int, repeat: int, clients: int) -> None:
    print(f"Part A: codec speed and size, {n:,} parameters (N(0, 0.01)), one thread "
          f"(OMP/OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS')}), median of "
          f"{repeat}; load average {os.getloadavg()[0]:.2f} at the start")
    res = codec_speed(n, repeat)
    print("  enc+dec: wall ms with stochastic rounding (a client's up-link), its CPU ms (what "
          "the one thread spent: steady when other jobs share the cores), and wall ms "
          "rounding to nearest (the server's down-link)")
    print(f"  {'codec':12s} {'bytes':>11s} {'vs float32':>10s} {'enc+dec ms':>10s} "
          f"{'CPU ms':>7s} {'nearest':>8s} {'L2 error':>9s} {'bound':>9s}")
    for arm, r in res.items():
        print(f"  {arm:12s} {r['bytes']:>11,d} {r['ratio']:>9.2f}× {r['ms']:>10.2f} "
              f"{r['cpu_ms']:>7.2f} {r['ms_nearest']:>8.2f} {r['err']:>9.3g} "
              f"{r['bound']:>9.3g}")
    ms, cpu = res["int8"]["ms"], res["int8"]["cpu_ms"]
    print(f"  goal int8 encode + decode ≤ 10 ms on one core: {cpu:.2f} ms CPU ({ms:.2f} ms "
          f"wall) — {'met' if cpu <= 10 else 'missed'}")
    s = server_side(n, clients, repeat)
    ratio, cpu_ratio = s["int8"] / s["float32"], s["int8 cpu"] / s["float32 cpu"]
    print(f"  server: decode + streamed average of {clients} updates: float32 "
          f"{s['float32'] * 1e3:.1f} ms ({s['float32 cpu'] * 1e3:.1f} CPU), int8 "
          f"{s['int8'] * 1e3:.1f} ms ({s['int8 cpu'] * 1e3:.1f} CPU) → {ratio:.2f}× "
          f"({cpu_ratio:.2f}× CPU); load average {os.getloadavg()[0]:.2f} at the end")


# -- part B -----------------------------------------------------------------------------------
NAME, DATASET, PARTITION, SEED, ROUNDS = "bench_compression", "digits", "dirichlet:0.5", 0, 20


def compression_for(up: str) -> dict[str, Any]:
    """The ``compression=`` keyword of an arm (none for float32: today's call)."""
    import xflwb

    if up == "float32":
        return {}
    down = up if up.split(":")[0] in codecs.DOWN_CODECS else "fp16"
    return {"compression": xflwb.Compression(up=up, down=down)}


def per_round(hist: Any, metric: str) -> float:
    """Mean per round (rounds after the first) of an all-platform history metric."""
    allp = hist[hist.platform == "all"].pivot_table(index="round", columns="metric",
                                                     values="value")
    return float(allp[metric].iloc[1:].mean()) if metric in allp else float("nan")


def accuracy(res: Any, session: Any) -> float:
    """The final global model's accuracy on digits' test split (Keras)."""
    import xflwb
    from xflwb.bridge import runtime

    ds = xflwb.load_dataset(DATASET)
    keras_rt = runtime.load(res, "keras")
    keras_rt.set_canonical_parameters(session.global_parameters())
    return float(keras_rt.evaluate(ds.x_test, ds.y_test)[1])


def fleet_arm(wb: Any, res: Any, up: str, rounds: int, epochs: int,
              phones: int = 4) -> dict[str, float]:
    """``phones`` Android and as many iOS virtual phones, every phone every round."""
    s = wb.train(NAME, rounds=rounds, min_clients=2 * phones, fraction_fit=1.0,
                 local_epochs=epochs, fraction_evaluate=0.0, round_timeout=300,
                 **compression_for(up))
    fleet = wb.spawn_devices(android=phones, ios=phones, dataset=DATASET, partition=PARTITION,
                             seed=SEED)
    try:
        status = s.wait(timeout=3600)
        fleet.wait(timeout=60)
    finally:
        fleet.stop()
    if status != "finished":
        raise RuntimeError(f"fleet, {up}: session {status}: {s.error}")
    return summary(res, s)


def sim_arm(res: Any, up: str, rounds: int, clients: int, fraction: float, data_dir: Path,
            ray_address: str, epochs: int) -> dict[str, float]:
    import xflwb

    s = xflwb.simulate(res, android=clients // 2, ios=clients - clients // 2,
                       dataset=DATASET, partition=PARTITION, rounds=rounds,
                       fraction_fit=fraction, fraction_evaluate=0.0, seed=SEED,
                       local_epochs=epochs,
                       ray_address=ray_address, data_dir=data_dir, round_timeout=3600,
                       progress=False, **compression_for(up))
    return summary(res, s)


def summary(res: Any, s: Any) -> dict[str, float]:
    h = s.history
    return {"up": per_round(h, "bytes_up"), "down": per_round(h, "bytes_down"),
            "aggregate": per_round(h, "aggregate_seconds"), "accuracy": accuracy(res, s)}


def report(label: str, rows: dict[str, dict[str, float]]) -> None:
    base = rows["float32"]
    print(f"  {label}")
    print(f"  {'codec':12s} {'up B/round':>12s} {'fewer':>7s} {'down B/round':>13s} "
          f"{'fewer':>7s} {'accuracy':>8s} {'Δ points':>8s} {'aggregate':>10s} {'ratio':>6s}")
    for arm, r in rows.items():
        gap = 100 * (r["accuracy"] - base["accuracy"])
        print(f"  {arm:12s} {r['up']:>12,.0f} {base['up'] / r['up']:>6.1f}× "
              f"{r['down']:>13,.0f} {base['down'] / r['down']:>6.1f}× {r['accuracy']:>8.3f} "
              f"{gap:>+8.1f} {r['aggregate'] * 1e3:>8.1f}ms "
              f"{r['aggregate'] / base['aggregate']:>5.2f}×")
    for arm, fewer, points in (("int8", 3.5, 1.0), ("topk:0.01", 20.0, 3.0)):
        if arm in rows:
            r = rows[arm]
            ok = base["up"] / r["up"] >= fewer and abs(100 * (r["accuracy"] -
                                                             base["accuracy"])) <= points
            print(f"  goal {arm}: ≥ {fewer:g}× fewer uplink bytes within {points:g} points — "
                  f"{'met' if ok else 'missed'}")
    if "int8" in rows:
        ratio = rows["int8"]["aggregate"] / base["aggregate"]
        print(f"  goal int8 aggregation ≤ 1.3× float32: {ratio:.2f}× — "
              f"{'met' if ratio <= 1.3 else 'missed'}")


def part_b(rounds: int, clients: int, fraction: float, arms: list[str], epochs: int = 1,
           only: str | None = None, phones: int = 4, ray_address: str | None = None,
           tmp: Path | None = None) -> None:
    import xflwb
    from xflwb.demo import demo_model

    if set(arms) != {"float32"} and not hasattr(xflwb, "Compression"):
        raise SystemExit("part B needs xflwb.Compression (issue 23's session option)")
    tmp = workdir(tmp, "xflwb-bench-compression-")
    res = xflwb.export(demo_model(), name=NAME, data_type=DATASET, out_dir=tmp / "artifacts",
                       optimizer=xflwb.SGD(0.05, momentum=0.9))
    print(f"Part B: training, Dirichlet(0.5) {DATASET}, demo CNN, {rounds} rounds; "
          f"accuracy of the final model on the test split; load average "
          f"{os.getloadavg()[0]:.2f} at the start")
    print(f"  local epochs per round: {epochs}")
    if only != "sim":
        fleet_rows: dict[str, dict[str, float]] = {}
        with xflwb.Workbench(data_dir=tmp / "xfl", port=0) as wb:
            wb.publish(res)
            for arm in arms:
                fleet_rows[arm] = fleet_arm(wb, res, arm, rounds, epochs, phones)
        report(f"{phones} Android + {phones} iOS virtual phones, every phone every round",
               fleet_rows)
    if only == "fleet":
        return
    sim_rows: dict[str, dict[str, float]] = {}
    with ray_head(tmp, ray_address) as address:
        for k, arm in enumerate(arms):
            sim_rows[arm] = sim_arm(res, arm, rounds, clients, fraction, tmp / f"sim{k}",
                                    address, epochs)
    report(f"{clients}-client simulation, {fraction:.0%} of the clients per round", sim_rows)
    print(f"  load average {os.getloadavg()[0]:.2f} at the end")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true",
                    help="tiny sizes: part A on 20,000 values; part B with float32 and int8, "
                    "2 rounds, 1 + 1 phones and 4 simulated clients")
    ap.add_argument("--part", choices=["a", "b", "ab"], default="ab")
    ap.add_argument("--params", type=int, default=1_000_000, help="part A's tensor size")
    ap.add_argument("--repeat", type=int, default=21, help="part A's timed repeats")
    ap.add_argument("--clients", type=int, default=200, help="simulated clients (part B); "
                    "part A's server measurement aggregates a tenth as many updates")
    ap.add_argument("--rounds", type=int, default=ROUNDS)
    ap.add_argument("--fraction", type=float, default=0.1,
                    help="part B simulation: fraction of the clients trained per round")
    ap.add_argument("--arms", default=",".join(ARMS),
                    help="part B's up-link codecs, comma-separated (float32 first: the "
                    "ratios are against it)")
    ap.add_argument("--local-epochs", type=int, default=1, help="part B: epochs per fit")
    ap.add_argument("--only", choices=["fleet", "sim"], default=None,
                    help="part B: run only the phones or only the simulation")
    ap.add_argument("--phones", type=int, default=4,
                    help="part B: Android phones, and as many iOS ones")
    add_common_arguments(ap)
    args = ap.parse_args()
    if args.smoke:
        args.params, args.repeat, args.clients, args.rounds = 20_000, 3, 4, 2
        args.fraction, args.arms, args.phones = 1.0, "float32,int8", 1
    if "a" in args.part:
        part_a(args.params, args.repeat, max(2, args.clients // 10))
    if "b" in args.part:
        arms = [a.strip() for a in args.arms.split(",") if a.strip()]
        if arms[:1] != ["float32"]:
            ap.error("--arms must start with float32 (the ratios are against it)")
        if args.rounds < 2:
            ap.error(f"--rounds {args.rounds}: part B's figures are per round after the "
                     "first; use --rounds 2 or more")
        part_b(args.rounds, args.clients, args.fraction, arms, args.local_epochs, args.only,
               args.phones, args.ray_address, args.workdir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
