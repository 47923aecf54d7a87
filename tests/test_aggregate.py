"""StreamingFedAvg: masked example-weighted averaging, validation, streaming, threads."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from flwr.server.strategy.aggregate import aggregate as flower_aggregate

from tests.conftest import run_python
from xflwb.federation import aggregate as agg_mod
from xflwb.federation.aggregate import StreamingFedAvg, aggregate_masked

# a larger-than-one-chunk tensor, so chunk boundaries are exercised
SHAPES = [(3, 3, 1, 4), (4,), (agg_mod._CHUNK + 1_001,), (36, 10), (10,), ()]


@pytest.fixture(params=["blas", "blas-pinned", "numpy"])
def kernel(request, monkeypatch):
    """Run each test with the BLAS saxpy hot path in slices (a kernel's threaded BLAS), with
    whole-tensor calls on single-threaded BLAS (what ``pin_blas_threads`` sets up in session
    processes), and with the pure-numpy fallback."""
    if request.param == "numpy":
        monkeypatch.setattr(agg_mod, "_find_axpy", lambda: agg_mod._numpy_axpy)
    if request.param == "blas-pinned":
        from threadpoolctl import threadpool_limits

        monkeypatch.setattr(agg_mod, "_blas_slice", 1 << 62)
        with threadpool_limits(1, user_api="blas"):
            yield request.param
        return
    yield request.param


def model(rng, scale=1.0):
    return [(rng.standard_normal(s) * scale).astype(np.float32) for s in SHAPES]


def reference(previous, updates):
    """Direct float64 masked weighted average, parameter by parameter."""
    out = []
    for k, prev in enumerate(previous):
        num = np.zeros(prev.shape)
        den = 0
        for arrays, n, mask in updates:
            if mask is None or mask[k]:
                num += arrays[k].astype(np.float64) * n
                den += n
        out.append(prev.astype(np.float32) if den == 0 else (num / den).astype(np.float32))
    return out


def test_masked_average_matches_direct_numpy(kernel):
    rng = np.random.default_rng(0)
    previous = model(rng)
    updates = []
    for i in range(3 * agg_mod._BLOCK + 3):  # several float32 blocks folded, one partial
        mask = None if i % 3 == 0 else [bool(b) for b in rng.integers(0, 2, len(SHAPES))]
        updates.append((model(rng), int(rng.integers(1, 500)), mask))
    agg = StreamingFedAvg(previous)
    for arrays, n, mask in updates:
        agg.add(arrays, n, mask)
    got, want = agg.result(), reference(previous, updates)
    assert agg.count == len(updates)
    assert agg.total_examples == sum(n for _, n, _ in updates)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == np.float32 and g.shape == w.shape
        # float32 block sums: a few float32 roundings of values of magnitude ~1
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6)


def test_unmasked_equals_flower_fedavg(kernel):
    rng = np.random.default_rng(1)
    results = [(model(rng), int(rng.integers(1, 1000))) for _ in range(10)]
    agg = StreamingFedAvg(model(rng))
    for arrays, n in results:
        agg.add(arrays, n)
    for ours, flowers in zip(agg.result(), flower_aggregate(results), strict=True):
        np.testing.assert_allclose(ours, flowers, rtol=1e-6, atol=1e-6)


def test_parameter_nobody_trained_keeps_previous_value(kernel):
    rng = np.random.default_rng(2)
    previous = model(rng)
    mask = [k != 1 for k in range(len(SHAPES))]
    agg = StreamingFedAvg(previous)
    agg.add(model(rng), 5, mask)
    agg.add(model(rng), 7, mask)
    out = agg.result()
    np.testing.assert_array_equal(out[1], previous[1])
    assert out[1] is not previous[1]
    assert agg.examples_per_parameter[1] == 0
    assert agg.examples_per_parameter[0] == 12


def test_frozen_copies_do_not_dilute(kernel):
    previous = [np.zeros((2, 2), np.float32), np.zeros(3, np.float32)]
    agg = StreamingFedAvg(previous)
    # android trains both parameters; iOS trains only the second and ships a frozen copy
    agg.add([np.ones((2, 2), np.float32), np.ones(3, np.float32)], 10, [True, True])
    agg.add([np.zeros((2, 2), np.float32), np.full(3, 4.0, np.float32)], 1000, [False, True])
    out = agg.result()
    np.testing.assert_array_equal(out[0], np.ones((2, 2), np.float32))  # exactly 1.0
    np.testing.assert_allclose(out[1], (10 * 1.0 + 1000 * 4.0) / 1010, rtol=1e-7)
    assert agg.examples_per_parameter == [10, 1010]


def test_no_updates_gives_previous_model():
    previous = [np.arange(6, dtype=np.float64).reshape(2, 3)]
    out = StreamingFedAvg(previous).result()
    assert out[0].dtype == np.float32
    np.testing.assert_array_equal(out[0], previous[0])


def _nan_last(arrays):
    bad = [a.copy() for a in arrays]
    bad[-2].flat[-1] = np.nan  # after every other parameter has been read
    return bad


def _with(arrays, k, value):
    bad = [a.copy() for a in arrays]
    bad[k].flat[0] = value
    return bad


@pytest.mark.parametrize("case, match", [
    ("too_few", r"expected 6 arrays .* got 5"),
    ("too_many", r"expected 6 arrays .* got 7"),
    ("shape", r"parameter 3 has shape \(10, 36\), expected \(36, 10\)"),
    ("nan", r"parameter 4 contains NaN or inf"),
    ("nan_late", r"parameter 4 contains NaN or inf"),
    ("inf", r"parameter 2 contains NaN or inf"),
    ("-inf", r"parameter 0 contains NaN or inf"),
    ("scalar_nan", r"parameter 5 contains NaN or inf"),
    ("n_zero", r"num_examples must be a positive int"),
    ("n_negative", r"num_examples must be a positive int"),
    ("n_float", r"num_examples must be a positive int"),
    ("n_bool", r"num_examples must be a positive int"),
    ("n_str", r"num_examples must be a positive int"),
    ("mask_short", r"trained has 5 flags, expected 6"),
    ("mask_long", r"trained has 7 flags, expected 6"),
    ("dtype", r"parameter 1 has dtype <U1; expected real numbers"),
])
def test_bad_update_rejected_and_sum_untouched(kernel, case, match):
    rng = np.random.default_rng(3)
    agg = StreamingFedAvg(model(rng))
    agg.add(model(rng), 40, [True, False, True, True, True, True])
    before, weights = agg.result(), agg.examples_per_parameter
    good = model(rng)
    args: tuple = {
        "too_few": (good[:-1], 5),
        "too_many": ([*good, good[0]], 5),
        "shape": ([*good[:3], good[3].reshape(10, 36), *good[4:]], 5),
        "nan": (_with(good, 4, np.nan), 5),
        "nan_late": (_nan_last(good), 5),
        "inf": (_with(good, 2, np.inf), 5),
        "-inf": (_with(good, 0, -np.inf), 5),
        "scalar_nan": ([*good[:5], np.float32(np.nan)], 5),
        "n_zero": (good, 0),
        "n_negative": (good, -3),
        "n_float": (good, 2.5),
        "n_bool": (good, True),
        "n_str": (good, "5"),
        "mask_short": (good, 5, [True] * 5),
        "mask_long": (good, 5, [True] * 7),
        "dtype": ([good[0], np.array(list("abcd")), *good[2:]], 5),
    }[case]
    with pytest.raises(ValueError, match=match):
        agg.add(*args)
    assert agg.count == 1
    assert agg.examples_per_parameter == weights
    for a, b in zip(agg.result(), before, strict=True):
        np.testing.assert_array_equal(a, b)
    # the round goes on: a good update after a rejected one is still taken
    agg.add(good, 5)
    assert agg.count == 2


def test_huge_finite_values_are_accepted_and_summed_in_float64(kernel):
    """|x| ~ 1e30 overflows the fast a·a check (and would overflow a float32 sum); the exact
    check must still accept it, and its sum must not overflow."""
    previous = [np.zeros(4, np.float32), np.zeros(2, np.float32)]
    agg = StreamingFedAvg(previous)
    agg.add([np.full(4, 3e38, np.float32), np.ones(2, np.float32)], 1000)
    agg.add([np.full(4, 1e38, np.float32), np.full(2, 3.0, np.float32)], 1000)
    agg.add([np.full(4, 2e38, np.float32), np.full(2, 2.0, np.float32)], 1000)
    out = agg.result()
    np.testing.assert_allclose(out[0], 2e38, rtol=1e-6)
    np.testing.assert_allclose(out[1], 2.0, rtol=1e-6)


def test_values_beyond_float32_range_are_rejected(kernel):
    agg = StreamingFedAvg([np.zeros(3, np.float32)])
    with pytest.raises(ValueError, match="parameter 0 contains NaN or inf"):
        agg.add([np.array([1.0, 1e300, 2.0])], 1)
    assert agg.count == 0


def test_many_updates_stay_close_to_float64(kernel):
    """Float32 block sums folded into float64: error does not grow with the client count."""
    rng = np.random.default_rng(7)
    previous = [rng.standard_normal(5_000).astype(np.float32)]
    updates = [([previous[0] + 0.01 * rng.standard_normal(5_000).astype(np.float32)],
                int(rng.integers(1, 5000)), None) for _ in range(1_000)]
    got = aggregate_masked(previous, updates)[0]
    want = reference(previous, updates)[0]
    assert np.abs(got - want).max() / np.abs(want).max() < 1e-6


def test_accepts_non_contiguous_float64_and_integer_arrays(kernel):
    previous = [np.zeros((3, 4), np.float32), np.zeros(2, np.float32)]
    base = np.arange(32, dtype=np.float64).reshape(4, 8)
    strided = base[:3, ::2]
    assert not strided.flags.c_contiguous
    agg = StreamingFedAvg(previous)
    agg.add([strided, np.array([2, 4])], 2)
    out = agg.result()
    np.testing.assert_array_equal(out[0], strided.astype(np.float32))
    np.testing.assert_array_equal(out[1], [2.0, 4.0])


def test_concurrent_adds_match_sequential(kernel):
    rng = np.random.default_rng(4)
    previous = model(rng)
    # multiples of 2**-8 in [-4, 4) with small integer weights: float64 sums are exact in
    # any order, so threads must give bit-identical results
    updates = [([np.round(a * 64) / 256 for a in model(rng)], int(rng.integers(1, 50)),
                None if i % 2 else [k % 2 == 0 for k in range(len(SHAPES))])
               for i in range(24)]
    sequential = StreamingFedAvg(previous)
    for u in updates:
        sequential.add(*u)
    concurrent = StreamingFedAvg(previous)
    barrier = threading.Barrier(4)

    def worker(part):
        barrier.wait()
        for u in part:
            concurrent.add(*u)

    threads = [threading.Thread(target=worker, args=(updates[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert concurrent.count == sequential.count == 24
    assert concurrent.examples_per_parameter == sequential.examples_per_parameter
    for a, b in zip(concurrent.result(), sequential.result(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_result_is_idempotent_float32_and_fresh(kernel):
    rng = np.random.default_rng(5)
    agg = StreamingFedAvg(model(rng))
    agg.add(model(rng), 3)
    agg.add(model(rng), 9, [False, True, True, False, True, True])
    first = agg.result()
    for a in first:
        a[...] = 123.0  # mutating a result must not reach the aggregator
    second, third = agg.result(), agg.result()
    assert agg.count == 2
    for s, t, shape in zip(second, third, SHAPES, strict=True):
        assert s.dtype == np.float32 and s.shape == shape
        np.testing.assert_array_equal(s, t)
        assert not np.any(s == 123.0)


def test_aggregate_masked_convenience(kernel):
    rng = np.random.default_rng(6)
    previous = model(rng)
    updates = [(model(rng), 4, None), (model(rng), 6, [True, False, True, False, True, True])]
    for g, w in zip(aggregate_masked(previous, iter(updates)), reference(previous, updates),
                    strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="contains NaN"):
        aggregate_masked(previous, [(_with(updates[0][0], 0, np.nan), 1, None)])


def test_pin_blas_threads_makes_this_process_single_threaded():
    """A session process calls ``pin_blas_threads``: its BLAS runs on one thread, whole-tensor
    calls are used, and the average is the one the sliced calls give (to float32 rounding)."""
    code = (
        "import numpy as np\n"
        "from threadpoolctl import threadpool_info\n"
        "from xflwb.federation import aggregate as agg\n"
        "agg.pin_blas_threads()  # first, before SciPy's BLAS is loaded (it must be reached)\n"
        "rng = np.random.default_rng(3)\n"
        "prev = [rng.standard_normal(50_000, dtype=np.float32)]\n"
        "ups = [([rng.standard_normal(50_000, dtype=np.float32)], int(n)) for n in range(1, 40)]\n"
        "step = agg._blas_slice\n"
        "agg._blas_slice = agg._SLICE_THREADED\n"
        "sliced = agg.aggregate_masked(prev, [(a, n, None) for a, n in ups])[0]\n"
        "agg._blas_slice = step\n"
        "threads = {i['filepath']: i['num_threads'] for i in threadpool_info()\n"
        "           if i['user_api'] == 'blas'}\n"
        "assert len(threads) >= 1 and set(threads.values()) == {1}, threads\n"
        "import scipy.linalg.blas\n"
        "assert any('scipy.libs' in p for p in threads), threads  # SciPy's own OpenBLAS too\n"
        "assert agg._blas_slice > 50_000\n"
        "whole = agg.aggregate_masked(prev, [(a, n, None) for a, n in ups])[0]\n"
        "np.testing.assert_allclose(whole, sliced, rtol=0, atol=1e-6)\n"
        "print('pinned')\n")
    assert "pinned" in run_python(code).stdout
