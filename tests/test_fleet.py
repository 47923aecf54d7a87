"""``xflwb.federation.fleet``: availability windows against a brute-force reading, fit
durations, the virtual clock."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from xflwb.federation.fleet import (
    AlwaysAvailable,
    Capacities,
    VirtualClock,
    Windows,
    fit_outcomes,
)

PERIOD = 100.0


@st.composite
def windows(draw: st.DrawFn) -> tuple[int, list[tuple[int, float, float]]]:
    """A fleet of up to 4 clients with non-overlapping integer windows in [0, 100]."""
    n = draw(st.integers(1, 4))
    rows = []
    for c in range(n):
        cuts = sorted(draw(st.sets(st.integers(0, 100), max_size=6)))
        for s, e in zip(cuts[::2], cuts[1::2], strict=False):
            rows.append((c, float(s), float(e)))
    return n, rows


def brute_available(rows: list[tuple[int, float, float]], n: int, t: float,
                    period: float | None) -> np.ndarray:
    out = np.zeros(n, bool)
    for c, s, e in rows:
        tt = t % period if period else t
        if s <= tt < e:
            out[c] = True
    return out


def brute_until(rows: list[tuple[int, float, float]], n: int, t: float,
                period: float | None) -> np.ndarray:
    """Step forward in unit steps (windows have integer ends) while still available."""
    avail = brute_available(rows, n, t, period)
    out = np.full(n, t)
    for c in np.flatnonzero(avail):
        u = math.floor(t) + 1.0
        while brute_available(rows, n, u, period)[c]:
            u += 1.0
            if u > t + 3 * (period or 100):
                u = math.inf
                break
        out[c] = u
    return out


@settings(max_examples=60, deadline=None)
@given(windows(), st.floats(0, 350, allow_nan=False), st.booleans())
@example((1, [(0, 16.0, 100.0)]), 236.0, True)  # ends at the period's end, none starts at 0
# the next change 5.7e-14 s away (one float step): t + k·(nxt − t)/5 rounds onto nxt itself
@example((1, [(0, 0.0, 1.0), (0, 2.0, 50.0)]), 349.99999999999994, True)
def test_windows_agree_with_a_brute_force_reading(case: tuple[int, list[tuple[int, float,
                                                                             float]]],
                                                   t: float, periodic: bool) -> None:
    n, rows = case
    period = PERIOD if periodic else None
    w = Windows(n, [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows],
                period=period)
    assert (w.available(t) == brute_available(rows, n, t, period)).all()
    assert np.array_equal(w.until(t), brute_until(rows, n, t, period))
    nxt = w.next_change(t)
    assert nxt > t
    if math.isfinite(nxt):  # nothing changes before the next change
        for k in range(1, 5):
            u = t + k * (nxt - t) / 5
            if u >= nxt:  # rounded onto the change itself (nxt - t is a float step or two)
                continue
            assert (w.available(u) == w.available(t)).all()
    else:  # only a trace ends: after its last window nobody comes back
        assert not periodic or not rows
        assert not w.available(t + 1e6).any()


def test_bad_windows_are_refused_with_the_client_named() -> None:
    with pytest.raises(ValueError, match=r"client 1.*overlap"):
        Windows(2, [1, 1], [0, 5], [10, 20])
    with pytest.raises(ValueError, match="end after it starts"):
        Windows(1, [0], [5], [5])
    with pytest.raises(ValueError, match=">= 0"):
        Windows(1, [0], [-1], [5])
    with pytest.raises(ValueError, match=r"0\.\.1"):
        Windows(2, [2], [0], [5])
    with pytest.raises(ValueError, match="lie in"):
        Windows(1, [0], [0], [200], period=100)


def test_a_night_across_midnight_continues_and_a_whole_day_never_ends() -> None:
    w = Windows(2, [0, 0, 1], [0, 80, 0], [20, 100, 100], period=100)
    assert w.until(90)[0] == 120.0  # 90 → the period's end, then on until 20 next period
    assert w.until(90)[1] == math.inf
    assert w.next_change(90) == 100.0  # a boundary (a window starts at 0 again)
    assert w.next_change(100) == 120.0


def test_fit_durations_and_drop_outs() -> None:
    caps = Capacities(("android", "ios"), np.array([1.0, 3.0]), np.array([1e6, 1e6]),
                      np.array([2e6, 2e6]), np.array([0.1, 0.1]),
                      {"android": 0.01, "ios": 0.01}, {"android": 0.001, "ios": 0.001})
    secs = caps.fit_seconds([0, 1], [100, 100], 2, 2e6, 1e6)
    # 2 × latency + 1 s down + examples × epochs × cost × slowdown + 1 s up
    assert np.allclose(secs, [0.2 + 1 + 2 + 1, 0.2 + 1 + 6 + 1])
    assert np.allclose(caps.evaluate_seconds([1], [100], 0), [0.2 + 0.3])
    w = Windows(2, [0, 1], [0, 0], [100, 5])
    end, dropped = fit_outcomes(w, [0, 1], 0.0, secs)
    assert dropped.tolist() == [False, True] and end.tolist() == [secs[0], 5.0]
    end, dropped = fit_outcomes(AlwaysAvailable(2), [0, 1], 10.0, secs)
    assert not dropped.any() and np.allclose(end, 10 + secs)


def test_capacities_refuse_what_would_break_a_clock() -> None:
    ok = dict(platform=("android",), slowdown=np.ones(1), uplink=np.ones(1),
              downlink=np.ones(1), latency=np.zeros(1), train_cost={"android": 1.0},
              evaluate_cost={"android": 1.0})
    Capacities(**ok)  # type: ignore[arg-type]
    for name, bad in (("uplink", np.zeros(1)), ("slowdown", np.array([np.nan])),
                      ("latency", np.ones(2))):
        with pytest.raises(ValueError, match=name):
            Capacities(**{**ok, name: bad})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="ios"):
        Capacities(**{**ok, "platform": ("ios",)})  # type: ignore[arg-type]


def test_the_virtual_clock_only_goes_forwards() -> None:
    clock = VirtualClock()
    clock.advance_to(5.0)
    assert clock() == 5.0
    with pytest.raises(ValueError, match="back"):
        clock.advance_to(4.0)
