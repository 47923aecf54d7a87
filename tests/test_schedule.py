"""Synchronous rounds on the virtual clock (``xflwb.federation.schedule``): the production
rules' invariants over random small fleets, windows and deadlines, and the wait for enough
available clients."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xflwb.federation.fleet import AlwaysAvailable, Capacities, NoClientAvailable, Windows
from xflwb.federation.schedule import SyncScheduler, advance, plan_round

COSTS = {"android": 0.01, "ios": 0.02}


def caps_of(slowdown: list[float], platforms: list[str] | None = None,
            latency: float = 0.0) -> Capacities:
    n = len(slowdown)
    plats = tuple(platforms or ["android" if i % 2 == 0 else "ios" for i in range(n)])
    return Capacities(plats, np.asarray(slowdown, float), np.full(n, 1e6), np.full(n, 1e6),
                      np.full(n, latency), COSTS, COSTS)


@st.composite
def fleets(draw: st.DrawFn) -> tuple[Capacities, Windows | AlwaysAvailable]:
    n = draw(st.integers(1, 12))
    slow = draw(st.lists(st.floats(0.1, 50.0), min_size=n, max_size=n))
    caps = caps_of(slow)
    if draw(st.booleans()):
        return caps, AlwaysAvailable(n)
    client, start, end = [], [], []
    for c in range(n):  # at most one window per client, some open at t=0
        if draw(st.booleans()):
            s = draw(st.sampled_from([0.0, 0.0, 5.0, 20.0]))
            client.append(c)
            start.append(s)
            end.append(s + draw(st.floats(0.5, 100.0)))
    return caps, Windows(n, client, start, end)


@settings(max_examples=150, deadline=None)
@given(fleet=fleets(), n=st.integers(0, 12), over=st.sampled_from([0.0, 0.3, 1.0, 3.0]),
       deadline=st.one_of(st.none(), st.floats(0.5, 60.0)), seed=st.integers(0, 2**16),
       examples=st.integers(1, 200))
def test_plan_invariants(fleet: tuple[Capacities, Windows | AlwaysAvailable], n: int,
                         over: float, deadline: float | None, seed: int, examples: int) -> None:
    caps, avail = fleet
    now = 0.0
    plan = plan_round(caps, avail, now, n, over, deadline, np.random.default_rng(seed),
                      examples, 1, 1000.0, 1000.0)
    eligible = set(np.flatnonzero(avail.available(now)).tolist())
    want = min(n, len(eligible))
    sel = plan.selected.tolist()
    assert set(sel) <= eligible and len(set(sel)) == len(sel)
    assert len(sel) == min(len(eligible), math.ceil(want * (1 + over) - 1e-9))
    kept, strag, drop = (set(a.tolist()) for a in (plan.kept, plan.stragglers, plan.dropouts))
    assert len(plan.kept) <= want and len(kept) == len(plan.kept)
    assert not (kept & strag) and not (kept & drop) and not (strag & drop)
    assert kept | strag | drop == set(sel)
    # report order, every kept report in time and earlier than any straggler's
    assert (np.diff(plan.report) >= 0).all()
    seconds = caps.fit_seconds(plan.stragglers, np.full(len(strag), examples), 1, 1e3, 1e3)
    if deadline is not None:
        assert (plan.report <= now + deadline).all()
    if len(plan.kept) and len(strag):
        assert plan.report.max() <= (now + seconds).min()
    # the end: the n-th kept report, else the deadline, else the last event
    if want and len(plan.kept) == want:
        assert plan.end == plan.report[-1]
    elif want and deadline is not None:
        assert plan.end == now + deadline
    assert plan.end >= now
    # the counts recorded with the round
    metrics = {(p, k): v for p, k, v in plan.metrics}
    assert metrics[("all", "selected")] == len(sel)
    assert metrics[("all", "stragglers")] == len(strag)
    assert metrics[("all", "dropouts")] == len(drop)
    assert metrics[("all", "available")] == len(eligible)
    assert sum(v for (p, k), v in metrics.items() if k == "selected" and p != "all") == len(sel)
    assert metrics[("all", "sim_seconds")] == plan.end
    # same seed, same plan
    again = plan_round(caps, avail, now, n, over, deadline, np.random.default_rng(seed),
                       examples, 1, 1000.0, 1000.0)
    assert again.kept.tolist() == plan.kept.tolist() and again.end == plan.end
    assert again.metrics == plan.metrics


def test_deadline_keeps_the_fast_and_counts_the_slow_per_platform() -> None:
    # android: 1 s per fit, ios: 3 s (slowdown 3 on the same cost)
    caps = caps_of([1.0] * 4 + [3.0] * 4, ["android"] * 4 + ["ios"] * 4)
    costs = {"android": 0.01, "ios": 0.01}
    caps = Capacities(caps.platform, caps.slowdown, caps.uplink, caps.downlink, caps.latency,
                      costs, costs)
    plan = plan_round(caps, AlwaysAvailable(8), 10.0, 8, 0.0, 2.0,
                      np.random.default_rng(0), 100, 1, 0.0, 0.0)
    assert sorted(plan.kept.tolist()) == [0, 1, 2, 3]
    assert sorted(plan.stragglers.tolist()) == [4, 5, 6, 7]
    assert plan.end == 12.0  # fewer than n in time: the round ends at the deadline
    m = {(p, k): v for p, k, v in plan.metrics}
    assert m[("ios", "stragglers")] == 4 and m[("android", "stragglers")] == 0
    assert m[("all", "round_sim_seconds")] == 2.0


def test_over_selection_keeps_the_first_n_and_ends_at_the_nth() -> None:
    caps = caps_of([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], ["android"] * 6)
    plan = plan_round(caps, AlwaysAvailable(6), 0.0, 3, 1.0, None,
                      np.random.default_rng(1), 100, 1, 0.0, 0.0)
    assert plan.kept.tolist() == [0, 1, 2]  # report order: the fastest three
    assert plan.end == pytest.approx(3.0)
    assert plan.stragglers.tolist() == [3, 4, 5]


def test_dropouts_are_clients_that_became_unavailable_mid_fit() -> None:
    caps = caps_of([1.0, 1.0, 1.0], ["android"] * 3)
    # client 2 leaves at 0.5 s, before its 1 s fit ends
    avail = Windows(3, [0, 1, 2], [0.0, 0.0, 0.0], [100.0, 100.0, 0.5])
    plan = plan_round(caps, avail, 0.0, 3, 0.0, None, np.random.default_rng(0), 100, 1,
                      0.0, 0.0)
    assert plan.dropouts.tolist() == [2] and sorted(plan.kept.tolist()) == [0, 1]
    assert plan.end == pytest.approx(1.0)  # no deadline: the last event


def test_advance_waits_for_enough_clients_or_says_never() -> None:
    avail = Windows(3, [0, 1, 2], [0.0, 10.0, 30.0], [5.0, 40.0, 50.0])
    assert advance(avail, 0.0, 1) == 0.0
    assert advance(avail, 0.0, 2) == 30.0
    with pytest.raises(NoClientAvailable, match="never 3"):
        advance(avail, 0.0, 3)
    with pytest.raises(NoClientAvailable, match="only 3"):
        advance(avail, 0.0, 4)
    daily = Windows(2, [0, 1], [3600.0, 7200.0], [7300.0, 9000.0], period=86400.0)
    assert advance(daily, 10_000.0, 2) == 86400.0 + 7200.0


def test_scheduler_moves_the_clock_round_by_round_and_is_seeded() -> None:
    caps = caps_of([1.0, 2.0, 4.0, 8.0])

    def run() -> list[tuple[list[int], float, list[int]]]:
        s = SyncScheduler(caps, AlwaysAvailable(4), seed=7, examples=[10, 20, 30, 40],
                          epochs=1, bytes_down={"android": 1e3, "ios": 2e3},
                          bytes_up={"android": 1e3, "ios": 2e3}, over_select=0.5,
                          deadline=5.0, min_clients=2)
        out = []
        for r in (1, 2, 3):
            plan = s.fit(r, lambda available: 2)
            out.append((plan.kept.tolist(), s.clock.now, s.evaluate(r, lambda a: 2).tolist()))
        return out

    first = run()
    assert first == run()
    ends = [now for _, now, _ in first]
    assert ends[0] > 0 and ends[0] < ends[1] < ends[2]


# -- the options --------------------------------------------------------------------------
@pytest.mark.parametrize(("kwargs", "match"), [
    ({"over_select": -0.1}, r"over_select must be a number in \[0, 10\]"),
    ({"over_select": 11}, r"over_select must be a number in \[0, 10\]"),
    ({"deadline": 0}, "deadline must be a positive number"),
    ({"deadline": float("nan")}, "deadline must be a positive number"),
    ({"strategy": "fedbuff", "deadline": 5.0}, "rules of synchronous rounds"),
    ({"strategy": "fedbuff", "over_select": 0.3}, "rules of synchronous rounds"),
])
def test_round_rule_options_are_checked(kwargs, match):
    from xflwb._options import OptionError
    from xflwb.server.config import SessionConfig

    with pytest.raises((OptionError, ValueError), match=match):
        SessionConfig(**kwargs)


def test_round_rule_options_reach_the_core():
    from xflwb.server.config import SessionConfig

    args = SessionConfig(over_select=0.5, deadline=30).strategy_arguments()
    assert args["over_select"] == 0.5 and args["deadline"] == 30


# -- phones: over-selection keeps the first n by measured fit time ---------------------------
def test_phone_over_selection_keeps_the_fastest_n_and_counts_the_rest():
    from tests.conftest import SERVED_TOY_MANIFEST, Phone, toy_canonical, toy_fit_res
    from xflwb.bridge import params
    from xflwb.flower_legacy import SimpleClientManager
    from xflwb.sessions.flower_strategy import CrossPlatformStrategy, Tracked

    reports = []
    s = CrossPlatformStrategy(SERVED_TOY_MANIFEST, toy_canonical(0), min_clients=2,
                              fraction_fit=0.5, over_select=1.0, max_weight_ratio=None,
                              on_fit_round=lambda r, g: reports.append(r))
    manager = SimpleClientManager()
    phones = [Phone("a1", "android"), Phone("a2", "android"), Phone("i1", "ios"),
              Phone("i2", "ios")]
    for p in phones:
        manager.register(p)
    ins = s.configure_fit(1, None, manager)  # n = 2 of 4, over-selected: all 4
    assert len(ins) == 4
    seconds = {"a1": 3.0, "a2": 9.0, "i1": 1.0, "i2": 7.0}  # measured fit times
    results = []
    for proxy, _ in ins:
        assert isinstance(proxy, Tracked)
        proxy.seconds = seconds[proxy.cid]
        arrays = toy_canonical(len(results) + 1)
        if proxy.platform == "ios":
            arrays = params.to_platform(arrays, SERVED_TOY_MANIFEST, "ios")
        results.append((proxy, toy_fit_res(arrays, 10)))
    s.aggregate_fit(1, results, [])
    m = {(p, k): v for p, k, v in reports[0].metrics}
    assert m[("all", "clients")] == 2  # i1 (1 s) and a1 (3 s)
    assert m[("ios", "clients")] == 1 and m[("android", "clients")] == 1
    assert m[("android", "stragglers")] == 1 and m[("ios", "stragglers")] == 1
    assert m[("all", "selected")] == 4 and m[("all", "failures")] == 0
