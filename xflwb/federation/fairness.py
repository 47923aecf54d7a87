"""Fairness across clients, transport-free: how the accuracy of a round's clients spreads,
not only its example-weighted mean.

A mean hides the clients the global model serves badly (the old phones, the clients with a
rare label). From each client's own accuracy this module summarises the spread per platform
and over every client (platform ``"all"``):

* ``accuracy_p10``, ``accuracy_p50``, ``accuracy_p90``: percentiles of the client
  accuracies, numpy's default (linear interpolation between the closest ranks:
  ``np.percentile(a, q)``); every client counts once, whatever its number of examples;
* ``accuracy_worst10``: the mean accuracy of the worst decile — the ``k = ceil(m / 10)``
  clients with the lowest accuracy, of the ``m`` that reported one (counted in
  integers: 10 clients → the worst 1, 11 → the worst 2, 1 → that client itself; ties at the
  boundary are interchangeable, the mean is the same whichever is taken);
* ``eval_clients``: ``m``, the number of clients these are computed over.

A client that reported no accuracy (NaN: FedKit phones send it as telemetry, matched later,
or a value that was not a number in [0, 1]) is left out; a platform none of whose clients
reported one gets no row at all (not a row of NaN), and neither does ``"all"`` then.

Hosts call ``fairness_metrics`` with a round's evaluations (``Round.aggregate_evaluate``
does, for synchronous rounds and FedBuff versions alike); ``fairness_by_round`` does it for
many rounds at once (the per-client rows of a session, e.g. accuracy that arrived as
telemetry). Both are vectorised: numpy sorts per platform, no per-client Python loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["FAIRNESS_METRICS", "PERCENTILES", "fairness_by_round", "fairness_metrics",
           "worst_count"]

#: the percentiles reported, and their metric names
PERCENTILES = {10: "accuracy_p10", 50: "accuracy_p50", 90: "accuracy_p90"}
#: every metric name this module emits (per platform and ``"all"``)
FAIRNESS_METRICS = (*PERCENTILES.values(), "accuracy_worst10", "eval_clients")


def worst_count(m: int) -> int:
    """How many clients the worst decile of ``m`` holds: ``ceil(m / 10)`` (in integers, no
    float rounding to reason about), at least 1 when ``m`` ≥ 1."""
    return (int(m) + 9) // 10


def _summary(sorted_acc: npt.NDArray[np.float64]) -> list[tuple[str, float]]:
    """The metrics of one group of finite accuracies, sorted ascending (non-empty)."""
    p = np.percentile(sorted_acc, list(PERCENTILES))
    worst = float(sorted_acc[:worst_count(sorted_acc.size)].mean())
    return ([(name, float(v)) for name, v in zip(PERCENTILES.values(), p, strict=True)]
            + [("accuracy_worst10", worst), ("eval_clients", float(sorted_acc.size))])


def fairness_metrics(platforms: Sequence[str] | npt.NDArray[Any],
                     accuracy: Sequence[float | None] | npt.NDArray[Any]
                     ) -> list[tuple[str, str, float]]:
    """``(platform, metric, value)`` rows for one round's client evaluations: each client's
    ``platforms[i]`` and ``accuracy[i]`` (None or NaN: none reported). Platforms sorted, then
    ``"all"``; nothing for a platform without any accuracy."""
    acc = np.asarray(accuracy, dtype=np.float64)  # None → NaN
    plat = np.asarray(platforms, dtype=object)
    if acc.shape != plat.shape or acc.ndim != 1:
        raise ValueError(f"one platform per accuracy: {plat.shape} platforms, "
                         f"{acc.shape} accuracies")
    keep = np.isfinite(acc)
    acc, plat = acc[keep], plat[keep]
    if not acc.size:
        return []
    order = np.argsort(acc, kind="stable")
    acc, plat = acc[order], plat[order]  # sorted once: every group stays sorted
    rows: list[tuple[str, str, float]] = []
    for name in sorted({str(p) for p in np.unique(plat)}):  # a handful of platforms
        rows += [(name, metric, v) for metric, v in _summary(acc[plat == name])]
    rows += [("all", metric, v) for metric, v in _summary(acc)]
    return rows


def fairness_by_round(rounds: Sequence[int] | npt.NDArray[Any],
                      platforms: Sequence[str] | npt.NDArray[Any],
                      accuracy: Sequence[float | None] | npt.NDArray[Any]
                      ) -> list[dict[str, Any]]:
    """``fairness_metrics`` of every round at once, as history rows ``{"round", "platform",
    "metric", "value"}`` (rounds ascending; a round without any accuracy: no rows)."""
    rnd = np.asarray(rounds, dtype=np.int64)
    acc = np.asarray(accuracy, dtype=np.float64)  # None → NaN
    plat = np.asarray(platforms, dtype=object)
    if not rnd.shape == acc.shape == plat.shape:
        raise ValueError(f"one round and platform per accuracy: {rnd.shape} rounds, "
                         f"{plat.shape} platforms, {acc.shape} accuracies")
    keep = np.isfinite(acc)
    rnd, acc, plat = rnd[keep], acc[keep], plat[keep]
    order = np.argsort(rnd, kind="stable")
    rnd, acc, plat = rnd[order], acc[order], plat[order]
    numbers, starts = np.unique(rnd, return_index=True)
    ends = np.append(starts[1:], rnd.size)[:starts.size]  # (no rounds: none)
    return [{"round": int(n), "platform": p, "metric": m, "value": v}
            for n, a, b in zip(numbers, starts, ends, strict=True)
            for p, m, v in fairness_metrics(plat[a:b], acc[a:b])]
