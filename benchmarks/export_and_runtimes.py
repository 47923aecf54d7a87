"""Export time, train-step time and forward time, measured side by side in one run.

* export: ``xflwb.export`` (TFLite + Core ML + manifest + parity) of an MNIST-sized CNN and
  of a transfer-learning model (frozen MobileNetV2 0.35 backbone at 96×96×3 → global
  average pooling → Dense 10 softmax head) against the bare ``TFLiteConverter`` on the same
  SavedModel, export and bare conversion alternating;
* train step (batch 32): the Android runtime (TFLite interpreter + Flex) and the iOS
  runtime (numpy Core ML executor) against a Keras ``tf.function`` step with the same
  trainability (for the transfer model: the head only, BatchNorm on moving statistics);
* forward (batch 32) of the transfer model, frozen backbone included, on each runtime
  against the Keras model in a ``tf.function``.

Every runtime gets the same number of threads (``--threads``, default: all cores): TF's
intra-op and inter-op pools (Keras, and the Flex delegate's TF kernels), the TFLite
interpreter's ``num_threads`` and the BLAS pools numpy uses (threadpoolctl). Step and
forward rows are timed interleaved: each round times a block of calls of every runtime in
turn, and ratios are the medians of the per-round ratios. On a machine shared with other
jobs use ``--threads 1``: thread pools that spin while waiting (TFLite's, OpenBLAS's)
collapse when oversubscribed (see benchmarks/README.md).

Goals on the 2-core machine: MNIST export ≤ 10 s; transfer export ≤ 30 s and ≤ 4× the bare
conversion; TFLite step ≤ 1.5× Keras; Core ML step ≤ 3× Keras; Core ML forward of the
transfer model ≤ 3× Keras.
Run: ``.venv/bin/python benchmarks/export_and_runtimes.py`` (or ``make bench``); ``--smoke``
checks it runs: one export each, one timed round of one call, and a small frozen backbone
(MobileNetV2's layer kinds, 32×32) in place of MobileNetV2.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np

PLATFORMS = ("keras", "android", "ios")
LABELS = {"keras": "Keras tf.function", "android": "TFLite interpreter",
          "ios": "Core ML executor"}


def mnist_cnn():
    keras.utils.set_random_seed(0)
    return keras.Sequential([
        keras.Input((28, 28, 1)),
        keras.layers.Conv2D(16, 3, activation="relu"),
        keras.layers.MaxPooling2D(),
        keras.layers.Conv2D(32, 3, activation="relu"),
        keras.layers.MaxPooling2D(),
        keras.layers.Flatten(),
        keras.layers.Dense(64, activation="relu"),
        keras.layers.Dense(10, activation="softmax"),
    ], name="mnist_cnn")


def digits_cnn():
    from xflwb.demo import demo_model

    return demo_model()


def transfer_mobilenet():
    """Frozen MobileNetV2 (alpha 0.35, 96×96×3, random weights) → GAP → Dense 10 softmax."""
    keras.utils.set_random_seed(0)
    backbone = keras.applications.MobileNetV2(input_shape=(96, 96, 3), alpha=0.35,
                                              include_top=False, weights=None)
    backbone.trainable = False
    inputs = keras.Input((96, 96, 3))
    x = backbone(inputs, training=False)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(10, activation="softmax")(x)
    return keras.Model(inputs, outputs, name="mobilenetv2_transfer")


def transfer_small():
    """``--smoke``'s stand-in for MobileNetV2: its layer kinds (conv, depthwise, BatchNorm,
    ReLU6) in a frozen 32×32×3 backbone of a few layers → GAP → Dense 10 softmax, so the
    transfer rows run in seconds."""
    keras.utils.set_random_seed(0)
    backbone = keras.Sequential([
        keras.Input((32, 32, 3)),
        keras.layers.Conv2D(8, 3, strides=2, padding="same", use_bias=False),
        keras.layers.BatchNormalization(),
        keras.layers.ReLU(6.0),
        keras.layers.DepthwiseConv2D(3, padding="same", use_bias=False),
        keras.layers.BatchNormalization(),
        keras.layers.ReLU(6.0),
        keras.layers.Conv2D(16, 1, use_bias=False),
        keras.layers.BatchNormalization(),
    ], name="small_backbone")
    backbone.trainable = False
    inputs = keras.Input((32, 32, 3))
    x = backbone(inputs, training=False)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(10, activation="softmax")(x)
    return keras.Model(inputs, outputs, name="small_transfer")


def set_threads(n: int) -> dict[str, Any]:
    """One thread count for every runtime in this process; call before any TF op runs."""
    import tensorflow as tf
    from threadpoolctl import threadpool_info, threadpool_limits

    tf.config.threading.set_intra_op_parallelism_threads(n)
    tf.config.threading.set_inter_op_parallelism_threads(n)
    limiter = threadpool_limits(limits=n)  # kept for the process' lifetime
    blas = sorted({f"{p['internal_api']} {p['num_threads']}" for p in threadpool_info()})
    return {"threads": n, "cores": os.cpu_count(),
            "tf_intra": tf.config.threading.get_intra_op_parallelism_threads(),
            "tf_inter": tf.config.threading.get_inter_op_parallelism_threads(),
            "blas": ", ".join(blas) or "none loaded", "_limiter": limiter}


class OtherLoad:
    """Cores other processes kept busy while a section ran (system busy CPU minus ours)."""

    def __enter__(self) -> OtherLoad:
        import psutil

        self._sys, self._own = self._busy(psutil.cpu_times()), time.process_time()
        self._t0 = time.perf_counter()
        return self

    @staticmethod
    def _busy(t: Any) -> float:
        return t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(
            t, "softirq", 0.0) + getattr(t, "steal", 0.0)

    def __exit__(self, *exc: object) -> None:
        import psutil

        wall = time.perf_counter() - self._t0
        other = (self._busy(psutil.cpu_times()) - self._sys) - (time.process_time()
                                                                - self._own)
        self.cores = max(0.0, other / wall)

    def __str__(self) -> str:
        return f"other processes used {self.cores:.2f} cores meanwhile"


def _interleaved(fns: dict[str, Callable[[], Any]], rounds: int, inner: int,
                 warmup: int = 3) -> dict[str, Any]:
    """Per-call seconds of each fn, timed side by side.

    Every round times ``inner`` calls of each fn in turn (the order rotates each round), so
    load from other processes hits all of them alike. Returns the median per-call time of
    each fn and, under ``ratio``, the median over rounds of each fn's time / the first fn's.
    """
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    per: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            fn = fns[name]
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            per[name].append((time.perf_counter() - t0) / inner)
    ref = names[0]
    out: dict[str, Any] = {n: statistics.median(v) for n, v in per.items()}
    out["ratio"] = {n: statistics.median(a / b for a, b in zip(per[n], per[ref], strict=True))
                    for n in names}
    return out


def bench_export(build, name: str, out: Path, repeat: int, optimizer: Any) -> dict[str, Any]:
    """``xflwb.export`` with parity, alternating with the bare conversion of the same
    training module (traced and saved untimed, as ``xflwb.bridge.tflite.build`` does)."""
    import xflwb
    from xflwb.bridge import graph, tflite

    model = build()
    ours, bare, saved = [], [], []
    res = None
    for _ in range(repeat):
        t0 = time.perf_counter()
        res = xflwb.export(model, name=f"bench_{name}", out_dir=out, optimizer=optimizer)
        ours.append(time.perf_counter() - t0)
        g = graph.analyze(model)
        with tflite.batchnorm_inference_scope(model), \
                tempfile.TemporaryDirectory() as tmp:
            module = tflite.build_module(model, g, "categorical_crossentropy", optimizer)
            t0 = time.perf_counter()
            sm = tflite.save_saved_model(module, Path(tmp) / "sm")
            t1 = time.perf_counter()
            tflite.convert_saved_model(sm)
            bare.append(time.perf_counter() - t1)
            saved.append(time.perf_counter() - t0)
    ratios = [o / b for o, b in zip(ours, bare, strict=True)]
    return {"export_s": statistics.median(ours), "bare_convert_s": statistics.median(bare),
            "save_convert_s": statistics.median(saved), "ratio": statistics.median(ratios),
            "export_all": ours, "res": res}


def _runtimes(res: Any, threads: int) -> dict[str, Any]:
    from xflwb.bridge import runtime

    opts = {"android": {"num_threads": threads}}
    return {p: runtime.load(res, p, **opts.get(p, {})) for p in PLATFORMS}


def _batch(res: Any, batch: int) -> tuple[np.ndarray, np.ndarray]:
    shape = res.manifest["input"]["shape"]
    rng = np.random.default_rng(0)
    x = rng.random((batch, *shape), dtype=np.float32)
    y = rng.integers(0, int(res.manifest["classes"]), size=batch)
    return x, y


def bench_steps(res: Any, threads: int, rounds: int, inner: int,
                batch: int = 32, warmup: int = 3) -> dict[str, Any]:
    rts = _runtimes(res, threads)
    x, y = _batch(res, batch)
    for rt in rts.values():
        rt._begin_task()
    return _interleaved({p: (lambda rt=rt: rt._train_step(x, y)) for p, rt in rts.items()},
                        rounds, inner, warmup)


def bench_forward(res: Any, threads: int, rounds: int, inner: int,
                  batch: int = 32, warmup: int = 3) -> dict[str, Any]:
    rts = _runtimes(res, threads)
    x, _ = _batch(res, batch)
    return _interleaved({p: (lambda rt=rt: rt.predict(x)) for p, rt in rts.items()},
                        rounds, inner, warmup)


def _verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def print_export(title: str, ex: dict[str, Any], goal_s: float,
                 goal_ratio: float | None) -> None:
    print(f"## Export, {title} (median of {len(ex['export_all'])}, alternating)")
    print("| measure | seconds |\n|---|---|")
    print(f"| xflwb.export (TFLite + Core ML + manifest + parity) | {ex['export_s']:.2f} |")
    print(f"| bare TFLiteConverter on the same SavedModel | {ex['bare_convert_s']:.2f} |")
    print(f"| SavedModel save + bare conversion | {ex['save_convert_s']:.2f} |")
    print(f"| ratio export / bare convert | {ex['ratio']:.2f}x |")
    print(f"| every export, s | {', '.join(f'{v:.2f}' for v in ex['export_all'])} |")
    print(f"| goal: export <= {goal_s:g} s | {_verdict(ex['export_s'] <= goal_s)} |")
    if goal_ratio is not None:
        print(f"| goal: export <= {goal_ratio:g}x bare convert | "
              f"{_verdict(ex['ratio'] <= goal_ratio)} |")


def print_runtimes(title: str, t: dict[str, Any], goals: dict[str, float]) -> None:
    print(f"\n## {title}")
    print("| runtime | ms/call | ratio vs Keras | goal |\n|---|---|---|---|")
    for plat in PLATFORMS:
        r = t["ratio"][plat]
        goal = goals.get(plat)
        verdict = f"<= {goal}x {_verdict(r <= goal)}" if goal else ""
        print(f"| {LABELS[plat]} | {t[plat] * 1e3:.2f} | {r:.2f}x | {verdict} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="threads for every runtime (default: all cores)")
    ap.add_argument("--rounds", type=int, default=15, help="interleaved timing rounds")
    ap.add_argument("--inner", type=int, default=3, help="calls per runtime per round")
    ap.add_argument("--export-repeat", type=int, default=3)
    ap.add_argument("--smoke", action="store_true",
                    help="one export each, one round of one call after one warm-up, a small "
                    "frozen backbone for MobileNetV2: checks the benchmark runs")
    args = ap.parse_args()
    warmup = 3
    transfer, transfer_title = (transfer_mobilenet,
                                "frozen MobileNetV2 0.35 96x96x3 -> GAP -> Dense 10")
    if args.smoke:
        args.export_repeat, args.rounds, args.inner, warmup = 1, 1, 1, 1
        transfer, transfer_title = (transfer_small, "small frozen conv/depthwise/BN/ReLU6 "
                                    "backbone 32x32x3 (smoke) -> GAP -> Dense 10")
    th = set_threads(args.threads)
    import xflwb

    print(f"threads: {th['threads']} for every runtime on {th['cores']} cores (TF intra-op "
          f"{th['tf_intra']}, inter-op {th['tf_inter']}; TFLite num_threads {th['threads']}; "
          f"BLAS: {th['blas']})\n")
    step_goals = {"android": 1.5, "ios": 3.0}
    with tempfile.TemporaryDirectory(prefix="xflwb-bench-") as tmp:
        out = Path(tmp)
        with OtherLoad() as load:
            ex = bench_export(mnist_cnn, "mnist", out, args.export_repeat,
                              xflwb.SGD(0.05, 0.9))
        print_export("MNIST-sized CNN, 28x28x1, 2 conv + 2 dense", ex, 10, None)
        print(f"({load})\n")
        with OtherLoad() as load:
            tl = bench_export(transfer, "transfer", out, args.export_repeat,
                              xflwb.SGD(0.05, 0.9))
        print_export(f"transfer: {transfer_title}", tl, 30, 4.0)
        print(f"({load})")
        for build, name in ((digits_cnn, "digits"), (mnist_cnn, "mnist")):
            # the MNIST CNN's export above serves its step timing too (the same model and
            # optimizer: one export per model)
            res = ex["res"] if name == "mnist" else xflwb.export(
                build(), name=f"bench_{name}_steps", out_dir=out,
                optimizer=xflwb.SGD(0.05, 0.9), check_parity=False)
            with OtherLoad() as load:
                t = bench_steps(res, args.threads, args.rounds, args.inner, warmup=warmup)
            print_runtimes(f"Train step, batch 32, {name} CNN (median of {args.rounds} "
                           f"interleaved rounds of {args.inner})", t, step_goals)
            print(f"({load})")
        with OtherLoad() as load:
            t = bench_steps(tl["res"], args.threads, args.rounds, args.inner, warmup=warmup)
        print_runtimes(f"Train step, batch 32, transfer model, head only (median of "
                       f"{args.rounds} interleaved rounds of {args.inner})", t, step_goals)
        print(f"({load})")
        with OtherLoad() as load:
            t = bench_forward(tl["res"], args.threads, args.rounds, args.inner, warmup=warmup)
        print_runtimes(f"Forward, batch 32, transfer model incl. frozen backbone (median of "
                       f"{args.rounds} interleaved rounds of {args.inner})", t, {"ios": 3.0})
        print(f"({load})")


if __name__ == "__main__":
    main()
