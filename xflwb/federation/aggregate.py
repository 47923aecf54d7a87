"""Masked, example-weighted FedAvg, streamed: the aggregation rule (DESIGN §4.5, §5).

It sees canonical arrays only; decoding, platform mapping and per-platform masks belong to
the gate and the round around it (``xflwb.federation.gate``, ``xflwb.federation.rounds``).

Why it is shaped this way:

* per-parameter weights, because Core ML trains only its updatable layers: a frozen copy
  (``trained[k]`` False) must not pull the average of parameter ``k`` towards the old value;
* streamed, because a round's memory should be O(parameters), not O(clients × parameters);
* float64 running sums, because float32 sums drift further with every client; but each
  update first lands in a float32 block sum (one fused ``y += w·x`` at float32 memory
  speed) that is folded into the float64 sum every ``_BLOCK`` updates. The float32 error is
  then bounded by ``_BLOCK`` roundings whatever the number of clients (measured 9.8e-8
  relative on 100 clients vs 5e-7 for Flower's float32 FedAvg), and the hot path moves half
  the bytes a float64 sum would (benchmarks/aggregate.py);
* validate first, because a NaN that reached a sum could not be taken out again.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any, cast

import numpy as np

from xflwb.bridge.arrays import AnyArray
from xflwb.bridge.params import update_norm

__all__ = ["DEFAULT_MAX_EXAMPLES", "ROBUST_RULE_NAMES", "StreamingFedAvg", "aggregate_masked",
           "aggregate_robust", "pin_blas_threads", "update_norm"]

#: the most examples one update counts for unless a session says otherwise
#: (``max_examples``): FedKit phones hold hundreds to a few thousand samples, and an
#: honest device never declares more than it trained on; the cap keeps one client that
#: claims 2^63 − 1 from weighing as much as the rest of the fleet times a billion.
DEFAULT_MAX_EXAMPLES = 1_000_000
#: the robust rules ``aggregate_robust`` applies (Flower's names)
ROBUST_RULE_NAMES = ("fedmedian", "fedtrimmedavg", "krum")

# Updates per float32 block sum before it is folded into the float64 sum: the error bound
# grows with it (16 roundings of a float32 sum of 16 updates, ~1e-7 relative at worst),
# the folding cost shrinks with it (a fold is ~1.5 plain reads of one model; at 8 it was
# 12 % of the time, at 16 it is 6 %, measured in benchmarks/aggregate.py).
_BLOCK = 16
# Elements per slice where a loop needs scratch (≤ 256 KiB, stays in L2).
_CHUNK = 32_768
# Longest vector handed to BLAS in one call. OpenBLAS runs n ≤ 10,000 on the calling thread
# and spreads longer ones over its threads, which then spin-wait and take a core from the
# devices or Ray workers that share the machine. ``pin_blas_threads`` (called by session and
# simulation processes) makes whole-tensor calls single-threaded; only then are they used.
_SLICE_THREADED = 10_000
_blas_slice = _SLICE_THREADED


def pin_blas_threads() -> None:
    """Run this process's BLAS on the calling thread, and aggregate with whole-tensor calls.

    For processes whose numeric work is aggregation (a session or simulation server): one
    BLAS call per tensor instead of one per 10,000 elements saves ~1 µs of call overhead
    per slice, ~0.1 ms per 1M-parameter update, and no BLAS thread ever spins beside them.
    """
    global _blas_slice
    from threadpoolctl import threadpool_limits

    _find_axpy()  # load SciPy's BLAS first: a limit reaches only the libraries loaded
    threadpool_limits(1, user_api="blas")
    _blas_slice = 1 << 62

_Axpy = Callable[[AnyArray, AnyArray, float], None]


def _numpy_axpy(x: AnyArray, y: AnyArray, w: float) -> None:
    """``y += w·x`` on float32 vectors with numpy ufuncs (two passes, a slice of scratch)."""
    scratch = np.empty(min(_CHUNK, x.size), np.float32)
    for lo in range(0, x.size, _CHUNK):
        hi = min(lo + _CHUNK, x.size)
        buf = scratch[: hi - lo]
        np.multiply(x[lo:hi], np.float32(w), out=buf)
        np.add(y[lo:hi], buf, out=y[lo:hi])


@functools.cache
def _find_axpy() -> _Axpy:
    """BLAS ``saxpy`` (one fused pass, faster than numpy's two) if SciPy has it.

    SciPy arrives with scikit-learn; the numpy fallback keeps this module numpy-only.
    Resolved on first use (importing scipy.linalg costs ~0.2 s). Calls go in slices of
    ``_blas_slice`` elements unless ``pin_blas_threads`` ran: OpenBLAS spreads longer
    vectors over threads, which is a little faster on an idle machine and several times
    slower when another process holds a core (measured with one busy: median 589 ms against
    101 ms for 100 updates of 1M). The probe checks that saxpy updates ``y`` in place, which
    the hot path relies on.
    """
    try:
        from scipy.linalg.blas import saxpy
    except ImportError:  # pragma: no cover - scipy ships with scikit-learn
        return _numpy_axpy

    def blas_axpy(x: AnyArray, y: AnyArray, w: float) -> None:
        step = _blas_slice
        for lo in range(0, x.size, step):
            n = min(step, x.size - lo)
            saxpy(x[lo:lo + n], y[lo:lo + n], n, w)

    probe = np.zeros(_SLICE_THREADED + 4, np.float32)
    blas_axpy(np.ones(_SLICE_THREADED + 2, np.float32), probe[1:-1], 2.0)
    in_place = probe[0] == 0 and probe[-1] == 0 and bool(np.all(probe[1:-1] == 2))
    return blas_axpy if in_place else _numpy_axpy


def _square_norm(flat: AnyArray) -> np.floating[Any]:
    """``flat·flat`` in float32, in one read and on the calling thread.

    BLAS ``sdot`` is 3× numpy's einsum on cached data, but long vectors run on OpenBLAS's
    threads unless ``pin_blas_threads`` ran; slicing it costs more in calls than it saves,
    so an unpinned process keeps einsum (never threaded)."""
    square: np.floating[Any]  # numpy's stubs type einsum and a 1-D dot as Any
    if _blas_slice == _SLICE_THREADED:
        square = np.einsum("i,i->", flat, flat)
    else:
        square = np.dot(flat, flat)
    return square


def _check_finite(k: int, a: AnyArray) -> bool:
    """Raise if ``a`` holds NaN or ±inf; return whether ``w·a`` sums safely in float32.

    ``a·a`` is non-finite whenever an element is (NaN and inf propagate, squares never
    cancel), and when finite it bounds every |value| by 1.8e19, far from float32 overflow
    even times a weight. It takes one read at memory speed, without allocating. Only when
    it overflows does the exact element-wise check run, and such an update then goes to the
    float64 sum directly instead of through the float32 block sum.
    """
    flat = a.reshape(-1)
    with np.errstate(all="ignore"):
        if np.isfinite(_square_norm(flat)):
            return True
    if not np.isfinite(a).all():
        raise ValueError(f"parameter {k} contains NaN or inf (in float32)")
    return False


class StreamingFedAvg:
    """Running per-parameter weighted average of canonical client updates.

    ``add`` each accepted client's canonical arrays as results arrive (from any thread);
    ``result`` gives the new global model. Parameter ``k`` is averaged over the clients with
    ``trained[k]`` true, weighted by ``num_examples``; one nobody trained keeps its value in
    ``previous_global``. ``previous_global`` is read, not copied: replace it, don't mutate
    it in place while aggregating.

    Memory: float64 sums (two models' worth) plus float32 block sums (one model), whatever
    the number of clients; ``result`` frees each block sum before allocating its output.
    """

    def __init__(self, previous_global: Sequence[AnyArray]) -> None:
        self._previous = [np.asarray(p) for p in previous_global]
        self._shapes = [p.shape for p in self._previous]
        n = len(self._previous)
        # allocated on first trained contribution: frozen-everywhere parameters (Core ML's
        # non-updatable layers) cost nothing
        self._sums: list[AnyArray | None] = [None] * n  # float64, flat
        self._blocks: list[AnyArray | None] = [None] * n  # float32, flat
        self._in_block = [0] * n  # updates in each block sum since it was last folded
        self._weights = [0] * n  # exact: Python ints
        self._count = 0
        self._examples = 0
        self._lock = threading.Lock()

    @property
    def count(self) -> int:
        """Number of accepted updates."""
        return self._count

    @property
    def total_examples(self) -> int:
        """Examples over all accepted updates (trained or not)."""
        return self._examples

    @property
    def examples_per_parameter(self) -> list[int]:
        """Total weight behind each parameter's average; 0 means it keeps its previous value."""
        with self._lock:
            return list(self._weights)

    def add(self, arrays: Sequence[AnyArray], num_examples: int,
            trained: Sequence[bool] | None = None) -> None:
        """Fold one client's update into the running sums, or raise ``ValueError``.

        Everything is validated (outside the lock, so threads validate concurrently) before
        any sum is touched, so a rejected update leaves the aggregate exactly as it was and
        the round can go on without it.
        """
        checked, weight, mask = self._validate(arrays, num_examples, trained)
        axpy = _find_axpy()
        with self._lock:
            for k, (a, fits_float32) in enumerate(checked):
                if not mask[k]:
                    continue
                flat = a.reshape(-1)
                if not fits_float32:  # |values| ≳ 1e19: a float32 block sum could overflow
                    self._add_float64(k, flat, weight)
                elif self._in_block[k] == 0:
                    if self._blocks[k] is None:
                        self._blocks[k] = np.empty(flat.size, np.float32)
                    np.multiply(flat, np.float32(weight), out=self._blocks[k])
                    self._in_block[k] = 1
                else:  # in_block > 0: the block sum exists
                    axpy(flat, cast(AnyArray, self._blocks[k]), float(weight))
                    self._in_block[k] += 1
                if self._in_block[k] >= _BLOCK:
                    self._fold(k)
                self._weights[k] += weight
            self._count += 1
            self._examples += weight

    def _validate(self, arrays: Sequence[AnyArray], num_examples: int,
                  trained: Sequence[bool] | None,
                  ) -> tuple[list[tuple[AnyArray, bool]], int, list[bool]]:
        n = len(self._shapes)
        if (isinstance(num_examples, bool) or not isinstance(num_examples, int | np.integer)
                or num_examples <= 0):
            raise ValueError(f"num_examples must be a positive int, got {num_examples!r}")
        if len(arrays) != n:
            raise ValueError(f"expected {n} arrays (one per canonical parameter), "
                             f"got {len(arrays)}")
        if trained is None:
            mask = [True] * n
        else:
            mask = [bool(t) for t in trained]
            if len(mask) != n:
                raise ValueError(f"trained has {len(mask)} flags, expected {n} "
                                 "(one per canonical parameter)")
        checked = []
        for k, (x, shape) in enumerate(zip(arrays, self._shapes, strict=True)):
            a = np.asarray(x)
            if a.dtype.kind not in "fiu":
                raise ValueError(f"parameter {k} has dtype {a.dtype}; expected real numbers")
            if a.shape != shape:
                raise ValueError(f"parameter {k} has shape {a.shape}, expected {shape}")
            if a.dtype != np.float32 or not a.flags.c_contiguous:
                # canonical arrays are float32 already; anything else is converted once
                # here, and what overflows float32 becomes inf and is rejected just below
                with np.errstate(over="ignore", invalid="ignore"):
                    a = np.ascontiguousarray(a, dtype=np.float32)
            checked.append((a, _check_finite(k, a)))
        return checked, int(num_examples), mask

    def _fold(self, k: int) -> None:
        """Add parameter ``k``'s float32 block sum into its float64 sum (lock held)."""
        block = self._blocks[k]
        if self._in_block[k] == 0 or block is None:
            return
        sums = self._sums[k]
        if sums is None:
            self._sums[k] = block.astype(np.float64)
        else:
            np.add(sums, block, out=sums)
        self._in_block[k] = 0

    def _add_float64(self, k: int, flat: AnyArray, weight: int) -> None:
        """``sum += weight·flat`` straight in float64, for values too large for float32."""
        total = self._sums[k]
        if total is None:
            total = self._sums[k] = np.zeros(flat.size)
        scratch = np.empty(min(_CHUNK, flat.size))
        for lo in range(0, flat.size, _CHUNK):
            hi = min(lo + _CHUNK, flat.size)
            buf = scratch[: hi - lo]
            np.copyto(buf, flat[lo:hi])  # widen first: a float32 product would overflow
            buf *= weight
            np.add(total[lo:hi], buf, out=total[lo:hi])

    def result(self) -> list[AnyArray]:
        """The current average as new float32 arrays; repeatable, does not consume state."""
        out = []
        with self._lock:
            for k, (prev, weight, shape) in enumerate(
                    zip(self._previous, self._weights, self._shapes, strict=True)):
                self._fold(k)
                self._blocks[k] = None  # freed before the output exists: peak stays 3 models
                total = self._sums[k]
                if total is None or weight == 0:
                    out.append(np.array(prev, dtype=np.float32))  # always a fresh copy
                    continue
                avg = np.empty(shape, dtype=np.float32)
                # divide in float64 and round once to float32, without a float64 temporary
                np.divide(total, float(weight), out=avg.reshape(-1))
                out.append(avg)
        return out


def aggregate_masked(
    previous: Sequence[AnyArray],
    updates: Iterable[tuple[Sequence[AnyArray], int, Sequence[bool] | None]],
) -> list[AnyArray]:
    """One-shot form: ``(arrays, num_examples, trained)`` updates in, new global model out.

    Raises ``ValueError`` on the first bad update; use ``StreamingFedAvg`` directly to skip
    bad updates and go on.
    """
    agg = StreamingFedAvg(previous)
    for arrays, num_examples, trained in updates:
        agg.add(arrays, num_examples, trained)
    return agg.result()


def aggregate_robust(previous: Sequence[AnyArray],
                     updates: Sequence[tuple[Sequence[AnyArray], int, Sequence[bool]]],
                     rule: str, *, beta: float = 0.2, num_malicious_clients: int = 0,
                     num_clients_to_keep: int = 0) -> list[AnyArray]:
    """A robust rule of Flower's applied with the masked rule: ``(arrays, num_examples,
    trained)`` updates in, new global model out.

    ``rule`` is ``fedmedian`` (coordinate-wise median), ``fedtrimmedavg`` (mean after
    cutting ``beta`` of the values at each end) or ``krum`` (the update closest to its
    ``n − f − 2`` nearest others, ``f = num_malicious_clients``; MultiKrum averages the
    ``num_clients_to_keep`` best, weighted by examples). Flower's own functions
    (``aggregate_median``, ``aggregate_trimmed_avg``, ``aggregate_krum``) do the work, once
    per *tensor group*: the parameters trained by exactly the same clients. So a tensor a
    platform does not train never takes part for that platform's clients (its frozen copy
    would otherwise pull the median back to the old value), and one nobody trained keeps
    its value. Where this differs from Flower's strategies: Krum scores and selects clients
    per group rather than on the whole vector (the whole vector of an iOS client includes
    copies it did not train), and values are aggregated in float64, rounded once to
    float32. Memory is O(clients × parameters), unlike the streamed average.
    """
    from xflwb.flower_legacy import (
        aggregate_krum,
        aggregate_median,
        aggregate_trimmed_avg,
    )

    if rule not in ROBUST_RULE_NAMES:
        raise ValueError(f"unknown robust rule {rule!r}; use one of {ROBUST_RULE_NAMES}")
    out = [np.array(p, dtype=np.float32) for p in previous]
    groups: dict[tuple[int, ...], list[int]] = {}
    for k in range(len(out)):
        who = tuple(i for i, (_, _, trained) in enumerate(updates) if trained[k])
        if who:
            groups.setdefault(who, []).append(k)
    for who, ks in groups.items():
        results = [([np.asarray(updates[i][0][k], np.float64) for k in ks], int(updates[i][1]))
                   for i in who]
        if rule == "fedmedian":
            new = aggregate_median(results)
        elif rule == "fedtrimmedavg":
            new = aggregate_trimmed_avg(results, beta)
        else:
            new = aggregate_krum(results, num_malicious_clients,
                                 min(num_clients_to_keep, len(results)))
        for k, a in zip(ks, new, strict=True):
            out[k] = np.asarray(a, np.float32).reshape(out[k].shape)
    return out
