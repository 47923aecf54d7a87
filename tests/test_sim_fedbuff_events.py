"""FedBuff's virtual-clock host (``xflwb.simulation.fedbuff.VirtualLoop``) without Ray: the
real ``VersionDriver`` and event queue over hand-built fleets (``Capacities``, ``Windows``),
with a runner that trains nothing (each update moves its base by one). Event order by
(virtual time, dispatch order), drop-outs at the end of a client's availability (never
sent), the clock jumping to the next availability change, ``max_seconds`` counted in
simulated seconds, a trace that ends."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xflwb.federation.fedbuff import Arrival, FedBuff
from xflwb.federation.fleet import (
    AlwaysAvailable,
    Capacities,
    NoClientAvailable,
    VirtualClock,
    Windows,
)
from xflwb.federation.update import Update
from xflwb.federation.versions import Failure, Job, Returned, VersionMade
from xflwb.simulation.fedbuff import DROPOUT, AvailableClients, Done, EventQueue, VirtualLoop

MASKS = {"android": [True, True], "ios": [False, True]}
START = [np.zeros(2, np.float32), np.zeros(3, np.float32)]


def accept(platform: str, client: str, result: Any, base: list[np.ndarray]) -> Update:
    tensors, examples = result
    return Update(platform, client, [np.asarray(t, np.float32) for t in tensors],
                  MASKS[platform], int(examples))


def caps(slowdown: list[float], platforms: list[str] | None = None,
         latency: float = 0.0, uplink: float = 1e15, downlink: float = 1e15) -> Capacities:
    """1 s per example and epoch on every platform, × slowdown; bandwidth is free unless
    given (bytes/s)."""
    n = len(slowdown)
    return Capacities(tuple(platforms or ["android"] * n), np.asarray(slowdown, float),
                      np.full(n, uplink), np.full(n, downlink), np.full(n, latency),
                      {"android": 1.0, "ios": 1.0}, {"android": 0.1, "ios": 0.1})


class Runner:
    """Runs nothing: a fit returns its base moved by one (10 examples), an evaluation its
    client id. Remembers what it was asked to send."""

    def __init__(self) -> None:
        self.loop: VirtualLoop | None = None
        self.started: list[tuple[float, Job]] = []
        self.bytes = (0, 0)  # (model down, update up)
        self.errors = 0  # the first fits to fail with an error

    def sizes(self, job: Job) -> tuple[int, int]:
        return self.bytes

    def start(self, job: Job) -> Job:
        assert self.loop is not None
        self.started.append((self.loop.clock.now, job))
        return job

    def finish(self, handle: Any, job: Job) -> Done:
        assert self.loop is not None and handle is job
        if job.kind == "evaluate":
            return Done(result=job.client)
        if self.errors:
            self.errors -= 1
            return Done(failure=Failure(job.platform, job.client, "ValueError: bad", True))
        base = self.loop.core.buffer.versions[job.version]
        return Done(result=([b + 1 for b in base], 10), returned=Returned(examples=10))


class Sim:
    """A loop with its stand-ins and everything it reported."""

    def __init__(self, fleet: Capacities, availability: Any = None, examples: int = 10,
                 max_versions: int = 100, fraction_evaluate: float = 0.0,
                 **options: Any) -> None:
        self.runner = Runner()
        self.arrivals: list[Arrival] = []
        self.versions: list[VersionMade] = []
        self.evaluations: list[tuple[int, list[Any], list[Any]]] = []
        n = len(fleet)
        self.loop = VirtualLoop(
            START, FedBuff(**options), masks=MASKS, accept=accept, caps=fleet,
            availability=availability or AlwaysAvailable(n),
            train_examples=np.full(n, examples), test_examples=np.full(n, examples),
            runner=self.runner, max_versions=max_versions, on_arrival=self.arrivals.append,
            on_version=self.versions.append, fraction_evaluate=fraction_evaluate,
            on_evaluated=lambda *a: self.evaluations.append(a))
        self.runner.loop = self.loop

    def metric(self, made: VersionMade, platform: str, name: str) -> float | None:
        return {(p, k): v for p, k, v in made.metrics + made.totals}[(platform, name)]


def test_the_queue_orders_by_time_then_dispatch():
    q = EventQueue()
    for t, c in [(5.0, "a"), (1.0, "b"), (5.0, "c"), (1.0, "d")]:
        q.push(t, Job("fit", c, "android", 0))
    peeked = q.peek()
    assert peeked is not None and peeked.job.client == "b"
    order = []
    while q:
        order.append(q.pop().job.client)
    assert order == ["b", "d", "a", "c"]
    assert q.peek() is None


def test_reports_arrive_in_virtual_time_order_ties_in_dispatch_order():
    # fits of 10, 20 and 40 s: client 0 reports at 10, 20, 30, ...; client 1 at 20, 40;
    # at t=20 client 1's fit (sent at 0) goes before client 0's second (sent at 10)
    sim = Sim(caps([1.0, 2.0, 4.0]), buffer_size=1, max_versions=6)
    sim.loop.run()
    applied = [(a.seconds, a.client) for a in sim.arrivals if a.status == "applied"]
    assert applied == [(10.0, "0"), (20.0, "1"), (20.0, "0"), (30.0, "0"), (40.0, "2"),
                       (40.0, "1")]
    assert [sim.metric(v, "all", "sim_seconds") for v in sim.versions] == \
        [10.0, 20.0, 20.0, 30.0, 40.0, 40.0]
    staleness = {(a.seconds, a.client): a.staleness for a in sim.arrivals}
    assert staleness[(40.0, "2")] == 4  # sent version 0, applied after four versions
    assert all(a.fit_seconds == {"0": 10.0, "1": 20.0, "2": 40.0}[a.client]
               for a in sim.arrivals)
    # the model sent at each dispatch was the newest version then
    assert [(t, j.client, j.version) for t, j in sim.runner.started[:4]] == \
        [(0.0, "0", 0), (0.0, "1", 0), (0.0, "2", 0), (10.0, "0", 1)]


def test_a_client_leaving_mid_fit_drops_out_at_until_and_trains_nothing():
    # client 0 is available until 15 s (a trace: never again), its fit takes 20 s
    windows = Windows(2, [0, 1], [0.0, 0.0], [15.0, 1e6])
    sim = Sim(caps([2.0, 1.0], ["android", "ios"]), windows, buffer_size=1, max_versions=2)
    sim.loop.run()
    assert [j.client for _, j in sim.runner.started] == ["1", "1"]  # 0's fit: never sent
    # client 0's drop-out (at 15) falls between version 1 (t=10) and version 2 (t=20)
    second = sim.versions[1]
    assert sim.metric(second, "android", "dropouts") == 1.0
    assert sim.metric(second, "all", "dropouts") == 1.0
    assert sim.metric(second, "ios", "dropouts") == 0.0
    assert [(f.client, f.reason, f.is_error) for f in second.failures] == \
        [("0", DROPOUT, False)]
    assert sim.metric(sim.versions[0], "android", "dropouts") == 0.0
    assert not any(a.client == "0" for a in sim.arrivals)  # it never reported


def test_nobody_idle_and_nothing_running_jumps_to_the_next_availability_change():
    # the only client: [0, 5) and [100, 200); its fit takes 10 s
    windows = Windows(1, [0, 0], [0.0, 100.0], [5.0, 200.0])
    sim = Sim(caps([1.0]), windows, buffer_size=1, max_versions=1)
    sim.loop.run()
    assert [t for t, _ in sim.runner.started] == [100.0]  # the first fit dropped unsent
    assert sim.metric(sim.versions[0], "all", "sim_seconds") == 110.0
    assert sim.metric(sim.versions[0], "android", "dropouts") == 1.0


def test_resting_clients_are_woken_when_their_rest_ends():
    # both first fits fail with an error at 10 s: both rest 2 s and nobody else can work
    sim = Sim(caps([1.0, 1.0]), buffer_size=3, max_versions=1)
    sim.runner.errors = 2
    sim.loop.run()
    assert [t for t, _ in sim.runner.started] == [0.0, 0.0, 12.0, 12.0, 22.0, 22.0]
    assert sim.metric(sim.versions[0], "all", "sim_seconds") == 32.0
    assert sim.metric(sim.versions[0], "all", "failures") == 2.0
    assert sim.metric(sim.versions[0], "all", "dropouts") == 0.0


def test_daily_windows_repeat():
    # available 1 h a day from 22:00; a fit takes 10 s
    day = 86400.0
    windows = Windows(1, [0], [22 * 3600.0], [23 * 3600.0], period=day)
    sim = Sim(caps([1.0]), windows, buffer_size=1, max_versions=2)
    sim.loop.run()
    assert [sim.metric(v, "all", "sim_seconds") for v in sim.versions] == \
        [22 * 3600.0 + 10, 22 * 3600.0 + 20]


def test_max_seconds_is_simulated_and_late_fits_arrive_late():
    sim = Sim(caps([1.0]), buffer_size=1, max_seconds=35.0)
    sim.loop.run()
    assert [sim.metric(v, "all", "sim_seconds") for v in sim.versions] == [10.0, 20.0, 30.0]
    late = sim.arrivals[-1]
    assert late.status == "rejected" and "after the session's last version" in late.reason
    assert late.seconds == 40.0  # the fit sent at 30 s still ran to its end
    assert sim.loop.clock.now == 40.0


def test_max_seconds_stops_a_fleet_that_sleeps():
    # nobody available between 5 and 10,000 s: the stop rule holds at 1,000 s
    windows = Windows(1, [0, 0], [0.0, 10_000.0], [5.0, 20_000.0])
    sim = Sim(caps([1.0]), windows, buffer_size=1, max_seconds=1000.0)
    sim.loop.run()
    assert sim.versions == [] and sim.loop.clock.now == 1000.0


def test_a_trace_that_ends_is_a_clear_error():
    windows = Windows(1, [0], [0.0], [5.0])  # gone after 5 s, for ever
    sim = Sim(caps([1.0]), windows, buffer_size=1, max_versions=3)
    with pytest.raises(NoClientAvailable, match="max_seconds"):
        sim.loop.run()


def test_evaluations_take_simulated_time_and_see_the_version():
    sim = Sim(caps([1.0, 1.0]), buffer_size=2, max_versions=1, fraction_evaluate=1.0,
              evaluate_every=1)
    sim.loop.run()
    assert len(sim.evaluations) == 1
    number, results, failures = sim.evaluations[0]
    # each client evaluates the version once: client 1 (idle at 10 s) at once; client 0,
    # which had started another fit at 10 s, once that fit ends (late) at 20 s
    assert number == 1 and sorted(results) == ["0", "1"] and failures == []
    assert sim.loop.clock.now == 20.0 + 1.0  # 10 examples × 0.1 s
    assert sim.arrivals[-1].status == "rejected" and sim.arrivals[-1].seconds == 20.0


def test_latency_and_bytes_count_in_a_fit():
    # 10 s of compute, 2 × 2.5 s latency, 1,000 bytes down at 100 B/s, 500 up at 50 B/s
    sim = Sim(caps([1.0], latency=2.5, uplink=50.0, downlink=100.0), buffer_size=1,
              max_versions=1)
    sim.runner.bytes = (1000, 500)
    sim.loop.run()
    assert sim.arrivals[0].seconds == 10.0 + 2 * 2.5 + 10.0 + 10.0


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.floats(0, 90), st.floats(1, 50)),
                max_size=8),
       st.lists(st.floats(0, 400), min_size=1, max_size=12), st.booleans())
def test_the_available_clients_follow_the_windows(rows, times, daily):
    """The cached answer equals the availability's at every time the clock reaches."""
    rows = [(c, s, s + d) for c, s, d in rows]
    kept: list[tuple[int, float, float]] = []
    for c, s, e in sorted(rows):  # windows of one client must not overlap
        if not any(k[0] == c and s < k[2] and k[1] < e for k in kept):
            kept.append((c, s, e))
    windows = Windows(4, [k[0] for k in kept], [k[1] for k in kept], [k[2] for k in kept],
                      period=150.0 if daily else None)
    clock = VirtualClock()
    clients = AvailableClients(windows, ["android", "ios", "ios", "android"], clock)
    for t in sorted(times):
        clock.advance_to(t)
        expected = {str(i) for i in np.flatnonzero(windows.available(t))}
        assert set(clients.connected()) == expected


@settings(max_examples=25, deadline=None)
@given(st.lists(st.floats(0.1, 20.0), min_size=1, max_size=6), st.integers(1, 3),
       st.integers(1, 6))
def test_any_fleet_reports_in_time_order(slowdowns, buffer_size, concurrency):
    sim = Sim(caps(slowdowns), buffer_size=buffer_size, max_versions=4,
              max_concurrency=concurrency)
    sim.loop.run()
    times = [a.seconds for a in sim.arrivals]
    assert times == sorted(times)
    made = [sim.metric(v, "all", "sim_seconds") for v in sim.versions]
    assert made == sorted(made) and len(made) == 4
    # every report came exactly fit_seconds after its dispatch
    for a in sim.arrivals:
        assert math.isclose(a.fit_seconds, 10.0 * slowdowns[int(a.client)])
