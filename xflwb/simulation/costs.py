"""What one example costs on each phone runtime, measured here: the compute part of a
simulated client's fit (``xflwb.federation.fleet.Capacities``) is this cost times its
profile's slowdown.

Measured on the real runtimes a simulated client runs (TFLite interpreter for Android, the
Core ML executor for iOS), then cached on disk per artifact: a run is deterministic for its
seed only with the same costs, so every later run of the same export reads the numbers the
first one measured instead of timing again on a machine that may be busier.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from xflwb.bridge.arrays import AnyArray

__all__ = ["measured_costs"]

#: bumped when the measurement changes, so old caches are measured again
METHOD = "v1"
#: training batches timed per repetition (a few small batches: a fit is a loop of them)
TRAIN_BATCHES = 4
#: examples evaluated per repetition
EVALUATE_EXAMPLES = 256
REPEATS = 3


def measured_costs(bundle_dir: str | Path, platforms: Sequence[str], x: AnyArray,
                   y: AnyArray, cache_dir: str | Path) -> dict[str, dict[str, float]]:
    """Per platform ``{"train": s, "evaluate": s}`` per example (and epoch), from the cache
    ``cache_dir`` when this artifact was measured before, else timed on ``x, y`` (a few
    batches of training, an evaluation) and cached."""
    from xflwb.bridge import manifest as manifest_mod

    if len(x) == 0:
        raise ValueError("measuring costs needs examples")
    m = manifest_mod.load(bundle_dir)
    out: dict[str, dict[str, float]] = {}
    for plat in platforms:
        digest = _artifact_sha(manifest_mod.artifact_path(m, plat))
        path = Path(cache_dir) / f"{digest}-{plat}-{METHOD}.json"
        cached = _read(path)
        if cached is None:
            cached = _measure(bundle_dir, plat, x, y)
            _write(path, {**cached, "platform": plat, "artifact_sha256": digest,
                          "method": METHOD, "measured_at": time.time()})
        out[plat] = {"train": float(cached["train"]), "evaluate": float(cached["evaluate"])}
    return out


def _artifact_sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _read(path: Path) -> dict[str, Any] | None:
    """A cache entry, or None when absent or unreadable (then measured again)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(data, dict) and all(
        isinstance(data.get(k), int | float) and data[k] > 0 for k in ("train", "evaluate"))
    return data if ok else None


def _write(path: Path, data: dict[str, Any]) -> None:
    """Atomically: two simulations measuring at once leave one whole entry."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        json.dump(data, fh)
    os.replace(tmp, path)


def _measure(bundle_dir: str | Path, platform: str, x: AnyArray,
             y: AnyArray) -> dict[str, float]:
    """Median seconds per example over a few repetitions, after one warm-up each (the first
    call builds kernels and caches)."""
    from xflwb.bridge import runtime

    rt = runtime.load(bundle_dir, platform)
    k = min(len(x), TRAIN_BATCHES * int(rt.batch_size))
    xt, yt = x[:k], y[:k]
    rt.fit(xt[:min(k, int(rt.batch_size))], yt[:min(k, int(rt.batch_size))], epochs=1, seed=0)
    train = []
    for r in range(REPEATS):
        t0 = time.perf_counter()
        rt.fit(xt, yt, epochs=1, seed=r)
        train.append((time.perf_counter() - t0) / k)
    e = min(len(x), EVALUATE_EXAMPLES)
    rt.evaluate(x[:e], y[:e])
    evaluate = []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        rt.evaluate(x[:e], y[:e])
        evaluate.append((time.perf_counter() - t0) / e)
    # a clock that did not move (a coarse timer) must not give a free device
    return {"train": max(statistics.median(train), 1e-9),
            "evaluate": max(statistics.median(evaluate), 1e-9)}
