"""Prove that Keras, the TFLite artifact and the Core ML artifact compute the same thing.

Checks: forward outputs, exact parameter round trips (canonical ↔ platform, runtime set/get,
the weights stored in the artifacts) and one training step from identical weights, compared
in canonical space. Dropout is random in Keras/TFLite training and absent in Core ML, so for
models with dropout the iOS step is compared with a dropout-free Keras step and the Android
step is reported as not comparable.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from xflwb.bridge import params
from xflwb.bridge.arrays import AnyArray
from xflwb.bridge.manifest import Manifest, class_count
from xflwb.bridge.params import PLATFORMS
from xflwb.bridge.runtime.base import Runtime
from xflwb.errors import ExportFailure

TOLERANCE = 1e-4
COLUMNS = ["platform", "check", "max_abs_err", "tol", "ok", "note"]


class ParityError(ExportFailure):
    """The exported artifacts do not compute what the Keras model computes."""

    __module__ = "xflwb"  # public as xflwb.ParityError in every process (xflwb/__init__.py)

    def __init__(self, message: str, report: pd.DataFrame) -> None:
        super().__init__(message)
        self.report = report


def _max_err(a: list[AnyArray] | AnyArray, b: list[AnyArray] | AnyArray) -> float:
    if isinstance(a, list):
        if len(a) != len(b):
            return float("inf")
        errs = [_max_err(x, y) for x, y in zip(a, b, strict=True)]
        return max(errs) if errs else 0.0
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if a.shape != b.shape:
        return float("inf")
    return float(np.max(np.abs(a - b))) if a.size else 0.0


def sample_data(manifest: Manifest, n: int = 16, seed: int = 0
                ) -> tuple[AnyArray, AnyArray]:
    """Seeded inputs in [0, 1) and labels/targets for the checks."""
    rng = np.random.default_rng(seed)
    ids = manifest["input"].get("ids_below")
    if ids:  # token ids for an Embedding: integers, as the model will see
        x = rng.integers(0, int(ids), (n, *manifest["input"]["shape"])).astype(np.float32)
    else:
        x = rng.random((n, *manifest["input"]["shape"]), dtype=np.float32)
    if manifest["loss"] == "categorical_crossentropy":
        y = rng.integers(0, class_count(manifest), size=n)
    else:
        y = rng.standard_normal((n, *manifest["output_shape"])).astype(np.float32)
    return x, y


def check(manifest: Manifest, runtimes: dict[str, Runtime],
          references: dict[str, Runtime] | None = None, tol: float = TOLERANCE,
          seed: int = 0) -> pd.DataFrame:
    """Run every check; ``runtimes`` holds ``keras`` plus the exported platforms.

    ``references`` maps a platform to the Keras runtime its training is compared with
    (default: ``runtimes["keras"]``): iOS is compared with Keras trained under iOS's plan
    (only what Core ML updates, and without dropout).
    """
    rows: list[dict[str, Any]] = []
    references = dict(references or {})

    def add(platform: str, name: str, err: float, tolerance: float, note: str = "") -> None:
        rows.append({"platform": platform, "check": name, "max_abs_err": err, "tol": tolerance,
                     "ok": bool(err <= tolerance), "note": note})

    keras_rt = runtimes["keras"]
    start = keras_rt.get_parameters()
    x, y = sample_data(manifest, seed=seed)
    ref_pred = keras_rt.predict(x)
    has_dropout = bool(manifest.get("has_dropout"))

    for platform in PLATFORMS:
        rt = runtimes.get(platform)
        if rt is None:
            continue
        # exact round trips: canonical ↔ platform layout, and through the runtime
        plat = params.to_platform(start, manifest, platform)
        add(platform, "params_layout_roundtrip",
            _max_err(params.from_platform(plat, manifest, platform, base=start), start), 0.0)
        add(platform, "params_in_artifact", _max_err(rt.get_parameters(), plat), 0.0,
            "weights stored in the file equal the Keras weights in platform layout")
        flat = [a.reshape(-1) for a in plat]
        rt.set_parameters(flat)
        add(platform, "params_runtime_roundtrip", _max_err(rt.get_parameters(), plat), 0.0,
            "flat wire tensors in, tensors out")
        add(platform, "forward", _max_err(rt.predict(x), ref_pred), tol)

    # training from identical weights: one full-batch step, then three steps over uneven
    # mini-batches (momentum / Adam moments and the partial last batch come into play)
    for check_name, batch in (("train_step", len(x)), ("train_3_steps", -(-len(x) // 3))):
        def run(rt: Runtime, batch: int = batch) -> tuple[float, list[AnyArray]]:
            rt.set_canonical_parameters(start)
            loss = rt.fit(x, y, epochs=1, batch_size=batch, shuffle=False)[0]
            after = rt.canonical_parameters()
            rt.set_canonical_parameters(start)
            return loss, after

        done: dict[int, tuple[float, list[AnyArray]]] = {}
        for platform in PLATFORMS:
            rt = runtimes.get(platform)
            if rt is None:
                continue
            if has_dropout and platform == "android":
                rows.append({"platform": platform, "check": check_name,
                             "max_abs_err": float("nan"), "tol": tol, "ok": True,
                             "note": "not comparable: dropout is random in Keras and TFLite"})
                continue
            ref = references.get(platform, keras_rt)
            if id(ref) not in done:
                done[id(ref)] = run(ref)
            want_loss, want_after = done[id(ref)]
            loss, after = run(rt)
            note = ""
            if platform == "ios" and ref is not keras_rt:
                note = "vs Keras trained under iOS's plan"
                if has_dropout:
                    note += " (no dropout: Core ML trains without it)"
            add(platform, f"{check_name}_loss", abs(loss - want_loss), tol, note)
            add(platform, check_name, _max_err(after, want_after), tol,
                note or "canonical parameters after training")
    return pd.DataFrame(rows, columns=COLUMNS)


def assert_ok(report: pd.DataFrame) -> None:
    bad = report[~report["ok"].astype(bool)]
    if len(bad):
        lines = [f"{r.platform} {r.check}: max_abs_err={r.max_abs_err:.3g} > tol={r.tol:g}"
                 for r in bad.itertuples()]
        raise ParityError("parity failed:\n  " + "\n  ".join(lines)
                          + "\n(pass strict=False to keep the export anyway)", report)


def loss_step(rt: Runtime, x: AnyArray, y: AnyArray) -> tuple[float, float]:
    """The loss on ``(x, y)`` before and after one full-batch training step; ``rt``'s
    parameters are restored (export reuses parity's Keras runtime: no second copy)."""
    start = rt.canonical_parameters()
    try:
        before = rt.evaluate(x, y)[0]
        rt.fit(x, y, epochs=1, batch_size=len(x), shuffle=False)
        after = rt.evaluate(x, y)[0]
    finally:
        rt.set_canonical_parameters(start)
    return float(before), float(after)
