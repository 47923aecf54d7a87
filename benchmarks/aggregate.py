"""Aggregation: ``StreamingFedAvg`` against Flower's FedAvg, side by side in one run.

100 client updates of a 1M-parameter float32 model (five tensors, like a real model) are
generated once up front; every approach reads the same in-memory updates.

* Flower: ``flwr.server.strategy.aggregate.aggregate`` on ``[(arrays, num_examples)]``;
* ours: ``StreamingFedAvg.add`` per update (validation included) then ``result()``: float32
  block sums of 16 updates folded into float64 sums. Twice: as in a session process
  (``pin_blas_threads``: BLAS on one thread, one call per tensor), and as anywhere else
  (BLAS calls in slices of 10,000 elements, which OpenBLAS keeps on the calling thread);
* plain read: one ``a.sum()`` over every update's arrays, the floor of any aggregation;
* float32 sums: the same validated streaming loop with float32 sums only, the design we
  rejected (its error grows with the number of clients), shown for its speed and its error.

Peak extra memory is traced with ``tracemalloc`` (numpy reports its buffers to it) from just
before aggregating to just after ``result()``, so the updates themselves are excluded and
the returned model is included. Accuracy is the largest error against a float64 reference,
relative to the largest magnitude of each tensor.

Goals on the 2-core machine: ours ≥ 3× faster than Flower, within 2× of a plain read, peak
extra memory ≤ 3× one model; for the aggregation the product runs, i.e. in a session
process (the benchmark pins BLAS as session processes do).
Run: ``.venv/bin/python benchmarks/aggregate.py`` (``--smoke``: 6 updates, one timed run).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
import tracemalloc
from collections.abc import Callable

import numpy as np
from flwr.server.strategy.aggregate import aggregate as flower_aggregate

from xflwb.federation import aggregate as agg_mod
from xflwb.federation.aggregate import StreamingFedAvg, pin_blas_threads

# 800k + ~150k + 40k + ~10k = 1,000,000 float32 parameters (4 MB)
SHAPES = [(1000, 800), (3, 3, 64, 260), (200, 200), (1024, 10)]

Update = tuple[list[np.ndarray], int]


def make_updates(n_updates: int, seed: int = 0) -> tuple[list[np.ndarray], list[Update]]:
    rng = np.random.default_rng(seed)
    previous = [rng.standard_normal(s, dtype=np.float32) for s in SHAPES]
    updates = [([p + 0.01 * rng.standard_normal(p.shape, dtype=np.float32) for p in previous],
                int(rng.integers(10, 5000))) for _ in range(n_updates)]
    return previous, updates


def ours(previous: list[np.ndarray], updates: list[Update]) -> list[np.ndarray]:
    agg = StreamingFedAvg(previous)
    for arrays, n in updates:
        agg.add(arrays, n)
    return agg.result()


def ours_sliced(previous: list[np.ndarray], updates: list[Update]) -> list[np.ndarray]:
    """The same, with the BLAS calls in slices, as in a process that did not pin BLAS."""
    whole = agg_mod._blas_slice
    agg_mod._blas_slice = agg_mod._SLICE_THREADED
    try:
        return ours(previous, updates)
    finally:
        agg_mod._blas_slice = whole


def flower(previous: list[np.ndarray], updates: list[Update]) -> list[np.ndarray]:
    return flower_aggregate(updates)


def plain_read(previous: list[np.ndarray], updates: list[Update]) -> float:
    return sum(float(a.sum()) for arrays, _ in updates for a in arrays)


def float32_sums(previous: list[np.ndarray], updates: list[Update]) -> list[np.ndarray]:
    """The rejected design: the same validated streaming loop, float32 running sums."""
    sums = [np.zeros(p.size, np.float32) for p in previous]
    scratch = np.empty(max(p.size for p in previous), np.float32)
    total = 0
    for arrays, n in updates:
        for k, a in enumerate(arrays):  # the same validation as ours
            agg_mod._check_finite(k, a)
        for s, a in zip(sums, arrays, strict=True):
            buf = scratch[: a.size]
            np.multiply(a.reshape(-1), np.float32(n), out=buf)
            s += buf
        total += n
    return [(s / np.float32(total)).reshape(p.shape) for s, p in zip(sums, previous, strict=True)]


def reference(previous: list[np.ndarray], updates: list[Update]) -> list[np.ndarray]:
    total = sum(n for _, n in updates)
    out = []
    for k in range(len(previous)):
        acc = np.zeros(previous[k].shape)
        for arrays, n in updates:
            acc += arrays[k].astype(np.float64) * n
        out.append(acc / total)
    return out


def rel_error(got: list[np.ndarray], ref: list[np.ndarray]) -> float:
    return max(float(np.abs(g - r).max() / np.abs(r).max()) for g, r in zip(got, ref, strict=True))


def peak_bytes(fn: Callable, previous: list[np.ndarray], updates: list[Update]) -> int:
    gc.collect()
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        out = fn(previous, updates)
        peak = tracemalloc.get_traced_memory()[1] - before
        del out
    finally:
        tracemalloc.stop()
    return peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--updates", type=int, default=100)
    ap.add_argument("--repeat", type=int, default=7, help="timed runs of each (median)")
    ap.add_argument("--smoke", action="store_true",
                    help="6 updates, one timed run: checks the benchmark runs (seconds)")
    args = ap.parse_args()
    if args.smoke:
        args.updates, args.repeat = 6, 1

    pin_blas_threads()  # as a session process does: whole-tensor BLAS calls on one thread
    previous, updates = make_updates(args.updates)
    n_params = sum(p.size for p in previous)
    model_bytes = 4 * n_params
    approaches: dict[str, Callable] = {
        "Flower `aggregate` (FedAvg)": flower,
        "xflwb `StreamingFedAvg`, session process (pinned BLAS)": ours,
        "xflwb `StreamingFedAvg`, BLAS in slices (any process)": ours_sliced,
        "plain read (`a.sum()` of every array)": plain_read,
        "float32 sums only (rejected design)": float32_sums,
    }
    for fn in approaches.values():  # warm-up: imports, BLAS threads, page faults
        fn(previous, updates[:3])
    times: dict[str, list[float]] = {name: [] for name in approaches}
    for _ in range(args.repeat):  # interleaved, so drifts in machine load hit all alike
        for name, fn in approaches.items():
            gc.collect()
            t0 = time.perf_counter()
            fn(previous, updates)
            times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    ref = reference(previous, updates)
    errors = {name: rel_error(fn(previous, updates), ref)
              for name, fn in approaches.items() if fn is not plain_read}
    peaks = {name: peak_bytes(fn, previous, updates) / model_bytes
             for name, fn in approaches.items()}

    f_name, o_name, s_name, r_name = list(approaches)[:4]
    print(f"## {args.updates} updates × {n_params:,} float32 parameters "
          f"({model_bytes / 2**20:.1f} MiB per model), median of {args.repeat}, "
          f"numpy {np.__version__}\n")
    print("| approach | ms | vs Flower | vs plain read | peak extra memory | max rel. error |")
    print("|---|---|---|---|---|---|")
    for name in approaches:
        err = f"{errors[name]:.1e}" if name in errors else "–"
        print(f"| {name} | {med[name] * 1e3:.1f} | {med[f_name] / med[name]:.2f}× faster | "
              f"{med[name] / med[r_name]:.2f}× | {peaks[name]:.2f}× model | {err} |")
    speedup = med[f_name] / med[o_name]
    vs_read = med[o_name] / med[r_name]
    vs_read_sliced = med[s_name] / med[r_name]
    print("\n| goal | measured | |\n|---|---|---|")
    print(f"| ≥ 3× faster than Flower | {speedup:.2f}× | {'met' if speedup >= 3 else 'MISSED'} |")
    print(f"| within 2× of a plain read (session process) | {vs_read:.2f}× | "
          f"{'met' if vs_read <= 2 else 'MISSED'} |")
    print(f"| (not a goal) BLAS in slices, as in an unpinned process | {vs_read_sliced:.2f}× "
          "of a plain read | – |")
    print(f"| peak extra memory ≤ 3× one model | {peaks[o_name]:.2f}× | "
          f"{'met' if peaks[o_name] <= 3 else 'MISSED'} |")


if __name__ == "__main__":
    main()
