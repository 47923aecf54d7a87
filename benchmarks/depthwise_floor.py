"""How fast can a numpy depthwise convolution be? The executor's kernel against TF and
against numpy's own floor, side by side in one run.

The Core ML executor's MobileNetV2 forward misses its goal (≤ 3× Keras) mostly in the
depthwise convolution. This measures the largest depthwise layer of MobileNetV2 alpha 0.35
at 96×96 (32 × 96 channels × 48 × 48, 3×3, stride 1, "same") four ways, interleaved:

* ``tf``: ``tf.nn.depthwise_conv2d`` in a ``tf.function`` (what Keras runs, oneDNN);
* ``executor``: the Core ML executor's forward of a one-layer Core ML model holding the
  layer (the real spec, built with coremltools; a few samples at a time, as it runs a
  frozen backbone);
* ``floor``: the passes any numpy formulation without a fused multiply-add needs, 9
  multiplies and 8 adds, each over one contiguous array of a sample's output size with a
  scalar, one sample at a time — numpy's fastest case: no broadcasting, no strides, in
  cache;
* ``bcast``: one tap as the executor must do it, a multiply by a per-channel weight
  (a (C, 1, 1) array broadcast over the map).

It prints ms per call and ratios to ``tf``. Run: ``.venv/bin/python
benchmarks/depthwise_floor.py [--threads 1]`` (``--smoke``: a batch of 2, 2 rounds).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np

B, C, H = 32, 96, 48


def _coreml_depthwise(w: np.ndarray) -> object:
    """A one-layer Core ML model: the depthwise convolution as the builder emits it."""
    from coremltools.models import datatypes
    from coremltools.models.neural_network import NeuralNetworkBuilder

    b = NeuralNetworkBuilder([("x", datatypes.Array(C, H, H))],
                             [("y", datatypes.Array(C, H, H))])
    b.add_convolution("dw", kernel_channels=1, output_channels=C, height=3, width=3,
                      stride_height=1, stride_width=1, border_mode="same", groups=C,
                      W=np.ascontiguousarray(w.transpose(1, 2, 0)[:, :, None, :]), b=None,
                      has_bias=False, input_name="x", output_name="y")
    return b.spec


def _interleaved(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    for f in fns.values():
        f()
    per: dict[str, list[float]] = {n: [] for n in fns}
    for _ in range(rounds):
        for n, f in fns.items():
            t0 = time.perf_counter()
            f()
            per[n].append(time.perf_counter() - t0)
    return {n: statistics.median(v) for n, v in per.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--batch", type=int, default=B, help="samples per call")
    ap.add_argument("--smoke", action="store_true",
                    help="a batch of 2, 2 rounds: checks the benchmark runs (seconds)")
    args = ap.parse_args()
    if args.smoke:
        args.batch, args.rounds = 2, 2
    batch = args.batch

    import tensorflow as tf
    from threadpoolctl import threadpool_limits

    from xflwb.bridge.coreml_exec import CoreMLExecutor

    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    threadpool_limits(args.threads)

    rng = np.random.default_rng(0)
    x = rng.random((batch, C, H, H), dtype=np.float32)
    w = rng.random((C, 3, 3), dtype=np.float32)

    ex = CoreMLExecutor(_coreml_depthwise(w))
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))

    xt = tf.constant(np.ascontiguousarray(x.transpose(0, 2, 3, 1)))
    wt = tf.constant(w.transpose(1, 2, 0)[:, :, :, None])
    tf_dw = tf.function(lambda: tf.nn.depthwise_conv2d(xt, wt, [1, 1, 1, 1], "SAME"))

    # same numbers three ways before timing anything
    ref = tf_dw().numpy().transpose(0, 3, 1, 2)
    got = ex.forward(x)
    assert np.allclose(got, ref, atol=1e-4), "executor disagrees with TF"

    # one sample at a time, as the executor's gradient-free prefix runs (cache-sized)
    flats = list(x.reshape(batch, -1))
    acc, tmp = np.empty_like(flats[0]), np.empty_like(flats[0])
    scalars = [np.float32(v) for v in w[0].ravel()]

    def floor() -> None:
        for flat in flats:
            np.multiply(flat, scalars[0], out=acc)
            for s in scalars[1:]:
                np.multiply(flat, s, out=tmp)
                np.add(acc, tmp, out=acc)

    out4 = np.empty_like(x)

    def bcast() -> None:
        np.multiply(xp[:, :, 1:1 + H, 1:1 + H], w[:, 1, 1, None, None], out=out4)

    t = _interleaved({
        "tf": lambda: tf_dw().numpy(),
        "executor": lambda: ex.forward(x),
        "floor": floor,
        "bcast": bcast,
    }, args.rounds)
    print(f"threads: {args.threads}; layer: {batch}×{C}×{H}×{H}, 3×3 depthwise, stride 1")
    print("| variant | ms/call | ratio to tf |\n|---|---|---|")
    labels = {"tf": "TF depthwise_conv2d (Keras's kernel)",
              "executor": "Core ML executor depthwise kernel",
              "floor": "numpy floor: 9 scalar multiplies + 8 adds, contiguous",
              "bcast": "one tap as broadcast (C,1,1) multiply (×17 ops per layer)"}
    for n, v in t.items():
        print(f"| {labels[n]} | {v * 1e3:.2f} | {v / t['tf']:.2f}x |")
    n_el = batch * C * H * H
    print(f"\nnumpy throughput: floor {17 * n_el / t['floor'] / 1e9:.2f} G elements/s; "
          f"broadcast multiply {n_el / t['bcast'] / 1e9:.2f} G elements/s")


if __name__ == "__main__":
    main()
