"""The MNIST-sized CNN's TFLite train step with and without xflwb's gradient twins, side by side.

Builds the same model's ``.tflite`` three ways and times one train step (batch 32) of each
against a Keras ``tf.function`` step, interleaved in one process (each round times 3 calls
of every runtime in turn, the order rotating):

* ``flex``: TF's own gradients, as before issue 25 (Flex ``ReluGrad``, ``MaxPoolGrad``,
  ``Conv2DBackpropFilter``);
* ``pools``: ReLU and max-pool gradients as built-in ops (``xflwb.bridge.tflite_grads``),
  kernel gradients still TF's;
* ``xflwb``: what ``xflwb.export`` builds now (also the stride-1 Conv2D kernel gradient
  as a swapped convolution).

Wall time and process CPU time are both reported: on a machine shared with other jobs the
wall time mostly measures waiting, the CPU time the work. Every variant's losses and
parameters after 5 steps are printed next to Keras's. Goal (issue 2/25): TFLite step ≤ 1.5×
Keras at equal threads. ``--smoke`` runs 2 rounds (CI: the script still works).
Run: ``PYTHONPATH=. .venv/bin/python benchmarks/tflite_step.py --threads 1``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
from export_and_runtimes import mnist_cnn, set_threads

VARIANTS = ("flex", "pools", "xflwb")


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True,
                              check=False).stdout.strip()
    except OSError:
        return "uptime unavailable"


def build(variant: str, optimizer: Any) -> bytes:
    """The ``.tflite`` of a fresh ``mnist_cnn()`` with the variant's gradients."""
    from xflwb.bridge import graph, tflite, tflite_grads

    model = mnist_cnn()
    g = graph.analyze(model)
    if variant == "xflwb":
        return tflite.build(model, g, "categorical_crossentropy", optimizer)
    twins = (tflite_grads.builtin_gradients(model, convs=False) if variant == "pools"
             else contextlib.nullcontext())  # "flex": no twin at all
    with tflite.batchnorm_inference_scope(model), twins, \
            tempfile.TemporaryDirectory(prefix="xflwb-bench-") as tmp:
        module = tflite.build_module(model, g, "categorical_crossentropy", optimizer)
        tflite.save_saved_model(module, Path(tmp) / "sm")
        return tflite.convert_saved_model(Path(tmp) / "sm")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=1, help="threads for every runtime")
    ap.add_argument("--rounds", type=int, default=21, help="interleaved timing rounds")
    ap.add_argument("--smoke", action="store_true", help="2 rounds: checks the script runs")
    args = ap.parse_args()
    rounds = 2 if args.smoke else args.rounds
    print(f"start: {_uptime()}")
    set_threads(args.threads)
    import xflwb
    from xflwb.bridge import runtime
    from xflwb.bridge.runtime.tflite import AndroidRuntime

    opt = xflwb.SGD(0.05, 0.9)
    with tempfile.TemporaryDirectory(prefix="xflwb-bench-") as tmp:
        res = xflwb.export(mnist_cnn(), name="bench_step", out_dir=tmp, optimizer=opt,
                           check_parity=False)
        rts = {"keras": runtime.load(res, "keras")}
        for v in VARIANTS:
            rts[v] = AndroidRuntime(res.manifest, build(v, opt), num_threads=args.threads)
        rng = np.random.default_rng(0)
        x = rng.random((32, 28, 28, 1), dtype=np.float32)
        y = rng.integers(0, 10, 32)
        for rt in rts.values():
            rt._begin_task()
        losses = {k: [rt._train_step(x, y) for _ in range(5)] for k, rt in rts.items()}
        ref = rts["keras"].canonical_parameters()
        for k, rt in rts.items():
            err = max(float(np.abs(a - b).max())
                      for a, b in zip(rt.canonical_parameters(), ref, strict=True))
            print(f"{k}: losses of 5 steps {np.round(losses[k], 6).tolist()}, "
                  f"max |parameter - Keras's| {err:.1e}")
        for rt in rts.values():
            rt._begin_task()
        names = list(rts)
        for n in names:
            for _ in range(3):
                rts[n]._train_step(x, y)
        wall: dict[str, list[float]] = {n: [] for n in names}
        cpu: dict[str, list[float]] = {n: [] for n in names}
        for r in range(rounds):
            for n in names[r % len(names):] + names[:r % len(names)]:
                t0, c0 = time.perf_counter(), time.process_time()
                for _ in range(3):
                    rts[n]._train_step(x, y)
                cpu[n].append((time.process_time() - c0) / 3 * 1e3)
                wall[n].append((time.perf_counter() - t0) / 3 * 1e3)
    print(f"\n## Train step, batch 32, MNIST-sized CNN: {args.threads} thread(s) each, "
          f"{rounds} interleaved rounds of 3 calls")
    print("| runtime | wall ms | wall ratio vs Keras | CPU ms | CPU ratio vs Keras |")
    print("|---|---|---|---|---|")
    for n in names:
        rw = statistics.median(a / b for a, b in zip(wall[n], wall["keras"], strict=True))
        rc = statistics.median(a / b for a, b in zip(cpu[n], cpu["keras"], strict=True))
        print(f"| {n} | {statistics.median(wall[n]):.2f} | {rw:.2f}x | "
              f"{statistics.median(cpu[n]):.2f} | {rc:.2f}x |")
    print("\nper round, wall ms: " + "; ".join(
        f"{n} " + " ".join(f"{v:.1f}" for v in wall[n]) for n in names))
    print("per round, CPU ms: " + "; ".join(
        f"{n} " + " ".join(f"{v:.1f}" for v in cpu[n]) for n in names))
    print(f"end: {_uptime()}")


if __name__ == "__main__":
    main()
