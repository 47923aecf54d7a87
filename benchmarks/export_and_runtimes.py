"""Export time and train-step time, measured side by side in one run.

* export: ``xflwb.export`` (TFLite + Core ML + manifest + parity) of an MNIST-sized CNN
  against the bare ``TFLiteConverter`` on the same SavedModel;
* train step (batch 32): the Android runtime (TFLite interpreter + Flex) and the iOS
  runtime (numpy Core ML executor) against a Keras ``tf.function`` step.

Goals on the 2-core machine: export ≤ 10 s; TFLite step ≤ 1.5× Keras; Core ML ≤ 3× Keras.
Run: ``.venv/bin/python benchmarks/export_and_runtimes.py`` (or ``make bench``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np


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


def _time(fn, repeat: int) -> float:
    """Median seconds of ``repeat`` calls after two warm-up calls."""
    fn()
    fn()
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def bench_export(out: Path, repeat: int) -> dict[str, float]:
    import xflwb
    from xflwb.bridge import graph, tflite
    from xflwb.bridge.optim import SGD

    model = mnist_cnn()
    ours, bare = [], []
    for i in range(repeat):
        t0 = time.perf_counter()
        xflwb.export(model, name="bench_mnist", out_dir=out, optimizer=SGD(0.05, 0.9))
        ours.append(time.perf_counter() - t0)
        g = graph.analyze(model)
        with tempfile.TemporaryDirectory() as tmp:
            sm = tflite.save_saved_model(tflite.build_module(model, g, "categorical_crossentropy",
                                                             SGD(0.05, 0.9)), Path(tmp) / "sm")
            t0 = time.perf_counter()
            tflite.convert_saved_model(sm)
            bare.append(time.perf_counter() - t0)
        del i
    return {"export_s": statistics.median(ours), "bare_convert_s": statistics.median(bare)}


def bench_steps(build, name: str, out: Path, repeat: int, batch: int = 32) -> dict[str, float]:
    import xflwb
    from xflwb.bridge import runtime

    model = build()
    res = xflwb.export(model, name=f"bench_{name}", out_dir=out,
                       optimizer=xflwb.SGD(0.05, 0.9), check_parity=False)
    shape = res.manifest["input"]["shape"]
    rng = np.random.default_rng(0)
    x = rng.random((batch, *shape), dtype=np.float32)
    y = rng.integers(0, 10, size=batch)
    times = {}
    for plat in ("keras", "android", "ios"):
        rt = runtime.load(res, plat)
        rt._begin_task()
        times[plat] = _time(lambda rt=rt: rt._train_step(x, y), repeat)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeat", type=int, default=30, help="timed train steps per runtime")
    ap.add_argument("--export-repeat", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="xflwb-bench-") as tmp:
        out = Path(tmp)
        ex = bench_export(out, args.export_repeat)
        print("## Export (MNIST-sized CNN, 28x28x1, 2 conv + 2 dense)")
        print("| measure | seconds |\n|---|---|")
        print(f"| xflwb.export (TFLite + Core ML + manifest + parity) | {ex['export_s']:.2f} |")
        print(f"| bare TFLiteConverter on the same SavedModel | {ex['bare_convert_s']:.2f} |")
        print(f"| ratio export / bare convert | {ex['export_s'] / ex['bare_convert_s']:.2f}x |")
        print(f"| goal: export <= 10 s | {'met' if ex['export_s'] <= 10 else 'MISSED'} |")
        for build, name in ((digits_cnn, "digits"), (mnist_cnn, "mnist")):
            t = bench_steps(build, name, out, args.repeat)
            print(f"\n## Train step, batch 32, {name} CNN (median of {args.repeat})")
            print("| runtime | ms/step | ratio vs Keras | goal |\n|---|---|---|---|")
            print(f"| keras tf.function | {t['keras'] * 1e3:.2f} | 1.00x | |")
            for plat, goal in (("android", 1.5), ("ios", 3.0)):
                r = t[plat] / t["keras"]
                label = "TFLite interpreter" if plat == "android" else "Core ML executor"
                print(f"| {label} | {t[plat] * 1e3:.2f} | {r:.2f}x | <= {goal}x "
                      f"{'met' if r <= goal else 'MISSED'} |")


if __name__ == "__main__":
    main()
