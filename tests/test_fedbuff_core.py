"""FedBuff's decisions (``xflwb.federation.versions``) driven by a fake clock and fake clients:
no processes, no sockets, no sleeps. Who trains (idle longest first, ``max_concurrency``
counted), what becomes of each update (staleness weight, ``max_staleness``, the warm-up, the
platform masks), when training stops and what arrives too late, the evaluation schedule,
the all-fail rule; and a hypothesis test over random interleavings."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xflwb.errors import SessionFailure, UpdateRejected
from xflwb.federation.fedbuff import Arrival, FedBuff, StaleUpdate
from xflwb.federation.influence import weight_cap
from xflwb.federation.update import Update
from xflwb.federation.versions import (
    AllFitsFailed,
    Failure,
    Job,
    Returned,
    VersionDriver,
    VersionMade,
)

#: two canonical tensors: Android trains both, iOS only the second (the head)
MASKS = {"android": [True, True], "ios": [False, True]}
START = [np.zeros(2, np.float32), np.zeros(3, np.float32)]


class Clock:
    """Time moves only when a test says so."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Clients:
    """The connected clients: id → platform."""

    def __init__(self, **platforms: str) -> None:
        self.platforms = dict(platforms)

    def connected(self) -> dict[str, str | None]:
        return dict(self.platforms)


def accept(platform: str, client: str, result: Any, base: list[np.ndarray]) -> Update:
    """The gate's stand-in: ``result`` is ``(canonical tensors, examples)`` or an exception
    to raise (a malformed update). Untrained tensors are passed through as they came: the
    masks, not the gate, must keep them out of the average."""
    if isinstance(result, Exception):
        raise result
    tensors, examples = result
    return Update(platform, client, [np.asarray(t, np.float32) for t in tensors],
                  MASKS[platform], int(examples))


class Cap:
    """Bounded influence's stand-in: the weight cap only (no norm rule)."""

    max_weight_ratio = 2.0
    judges_norms = False

    def observe_norm(self, platform: str, client: str, norm: float) -> None:
        raise AssertionError("no norm rule here")

    def bound(self, platform: str, client: str, tensors: list[np.ndarray], examples: int,
              base: list[np.ndarray], cap: int | None, scale: float) -> tuple[int, bool]:
        return (cap, True) if cap is not None and examples > cap else (examples, False)


class Run:
    """A driver with its fakes and everything it reported."""

    def __init__(self, clients: Clients | None = None, **options: Any) -> None:
        kw = {k: options.pop(k) for k in ("bounds", "min_clients", "fraction_evaluate",
                                          "max_versions") if k in options}
        self.clock = Clock()
        self.clients = clients or Clients(a="android", b="android", c="ios")
        self.arrivals: list[Arrival] = []
        self.versions: list[VersionMade] = []
        self.evaluations: list[tuple[int, list[Any], list[Any]]] = []
        self.driver = VersionDriver(
            START, FedBuff(**options), masks=MASKS, accept=accept, clients=self.clients,
            clock=self.clock, max_versions=kw.pop("max_versions", 100),
            on_arrival=self.arrivals.append, on_version=self.versions.append,
            on_evaluated=lambda *a: self.evaluations.append(a), **kw)
        self.driver.begin()

    def fit(self, client: str) -> Job:
        """``client``'s fit as the driver would start it now."""
        d = self.driver
        return Job("fit", client, self.clients.platforms[client], d.version)

    def back(self, job: Job, step: float = 1.0, examples: int = 10, **kw: Any) -> None:
        """``job``'s client returns its base version moved by ``step`` everywhere."""
        base = self.driver.buffer.versions.get(job.version, START)
        self.driver.fit_returned(job, ([b + step for b in base], examples),
                                 Returned(examples=examples), **kw)


def by_client(arrivals: list[Arrival]) -> dict[str, Arrival]:
    return {a.client: a for a in arrivals}


# -- who trains ---------------------------------------------------------------------------------
def test_idle_longest_first_takes_turns_under_max_concurrency():
    run = Run(Clients(a="android", b="android", c="ios"), max_concurrency=1, buffer_size=100)
    order = []
    for t in range(1, 7):
        (job,) = run.driver.next_jobs()
        order.append(job.client)
        run.clock.now = float(t)
        run.back(job)
    assert order == ["a", "b", "c", "a", "b", "c"]


def test_a_client_never_idle_before_is_first_and_a_new_client_gets_work_at_once():
    run = Run(Clients(a="android", b="android"), max_concurrency=1, buffer_size=100)
    (job,) = run.driver.next_jobs()
    run.clock.now = 5.0
    run.back(job)
    run.clients.platforms["z"] = "ios"  # joins later; never idle: idle the longest
    assert run.driver.next_jobs()[0].client == "b"
    run.clock.now = 6.0
    run.back(Job("fit", "b", "android", 0))
    assert run.driver.next_jobs()[0].client == "z"


def test_max_concurrency_counted_over_a_session():
    """Five clients, at most two fitting at once: counted at every step, never timed."""
    clients = Clients(**{f"p{i}": "android" for i in range(5)})
    run = Run(clients, max_concurrency=2, buffer_size=3, max_versions=4)
    most, started = 0, 0
    rng = np.random.default_rng(0)
    while not run.driver.done():
        started += len(run.driver.next_jobs())
        most = max(most, run.driver.fits_running)
        assert run.driver.fits_running <= 2
        job = list(run.driver.running.values())[int(rng.integers(len(run.driver.running)))]
        run.clock.now += 1.0
        run.back(job)
    assert most == 2 and started >= 12 and run.driver.versions_made == 4
    unbounded = Run(clients, buffer_size=3)
    assert len(unbounded.driver.next_jobs()) == 5 and unbounded.driver.fits_running == 5


def test_clients_of_a_platform_not_served_or_busy_get_no_work():
    run = Run(Clients(a="android", w="windows", n=None))  # type: ignore[arg-type]
    assert [j.client for j in run.driver.next_jobs()] == ["a"]
    assert run.driver.next_jobs() == []  # "a" is busy


def test_a_job_the_host_could_not_start_is_as_if_never_given():
    run = Run(Clients(a="android", b="android"), buffer_size=1, fraction_evaluate=1.0)
    a, b = run.driver.next_jobs()
    run.driver.not_started(b)  # "b" left before its fit started
    assert run.driver.fits_running == 1 and [c for c, _ in run.driver.idle()] == ["b"]
    run.back(a)  # version 1: evaluated on both
    (ev,) = run.driver.next_jobs()[:1]
    run.driver.not_started(ev)
    assert run.driver.evaluations[0].dispatched == 1  # "b" still has it
    again = run.driver.next_jobs()
    assert [j.kind for j in again] == ["evaluate"] and again[0].client == "a"


# -- what becomes of an update --------------------------------------------------------------------
def test_staleness_weights_the_delta_against_the_version_the_client_started_from():
    run = Run(staleness="polynomial:1", buffer_size=1)
    a, b = run.fit("a"), run.fit("b")  # both on version 0
    run.back(a, step=2.0)
    assert run.driver.version == 1
    run.back(b, step=2.0)  # trained on version 0: staleness 1, weight 1/2
    assert run.driver.version == 2
    got = by_client(run.arrivals)
    assert (got["b"].staleness, got["b"].weight, got["b"].status) == (1, 0.5, "applied")
    for t in run.driver.buffer.current:  # 2 + 0.5 · 2
        np.testing.assert_allclose(t, 3.0)


def test_a_version_reports_the_wire_bytes_and_what_float32_would_have_cost():
    run = Run(buffer_size=2)
    a, c = run.fit("a"), run.fit("c")
    run.driver.fit_returned(a, ([b + 1 for b in START], 10), Returned(
        examples=10, bytes_up=30, bytes_down=60, bytes_up_float32=100, bytes_down_float32=100))
    run.driver.fit_returned(c, (START, 10), Returned(
        examples=10, bytes_up=80, bytes_down=80, bytes_up_float32=80, bytes_down_float32=80))
    (made,) = run.versions
    m = {(p, k): v for p, k, v in made.metrics}
    assert (m[("android", "bytes_up")], m[("android", "bytes_up_float32")]) == (30, 100)
    assert (m[("android", "bytes_down")], m[("android", "bytes_down_float32")]) == (60, 100)
    assert (m[("all", "bytes_up")], m[("all", "bytes_up_float32")]) == (110, 180)
    assert "bytes_up_float32" not in run.arrivals[0].row()  # the registry's row is unchanged


def test_beyond_max_staleness_is_rejected_with_the_reason_and_the_model_stays():
    run = Run(max_staleness=1, buffer_size=1)
    c = run.fit("c")
    run.back(run.fit("a"))
    run.back(run.fit("b"))
    before = [t.copy() for t in run.driver.buffer.current]
    run.back(c)
    late = by_client(run.arrivals)["c"]
    assert late.status == "rejected" and late.weight == 0.0 and late.staleness == 2
    assert "stale update" in late.reason and "max_staleness 1" in late.reason
    assert run.driver.version == 2
    for got, want in zip(run.driver.buffer.current, before, strict=True):
        np.testing.assert_array_equal(got, want)
    assert issubclass(StaleUpdate, UpdateRejected) and issubclass(StaleUpdate, ValueError)


def test_a_malformed_update_costs_only_itself():
    run = Run(buffer_size=2)
    run.driver.fit_returned(run.fit("a"), ValueError("parameter 0 has shape (9,)"))
    run.back(run.fit("b"))
    assert run.driver.version == 0 and len(run.arrivals) == 2
    bad = by_client(run.arrivals)["a"]
    assert bad.status == "rejected" and bad.reason == "ValueError: parameter 0 has shape (9,)"
    run.back(run.fit("a"))
    assert run.driver.version == 1 and [a.status for a in run.versions[0].applied] == [
        "applied", "applied"]
    assert [a.client for a in run.versions[0].rejected] == ["a"]


def test_screened_client_is_refused_before_its_update_is_read():
    def screen(client: str) -> None:
        if client == "a":
            raise PermissionError("device token revoked")

    run = Run(buffer_size=1)
    run.driver.screen = screen
    run.driver.fit_returned(run.fit("a"), RuntimeError("never read"))
    assert by_client(run.arrivals)["a"].reason == "PermissionError: device token revoked"


def test_a_manifest_lookup_failure_stops_instead_of_blaming_the_client():
    run = Run()
    with pytest.raises(RuntimeError, match="a lookup failed while mapping android client a"):
        run.driver.fit_returned(run.fit("a"), KeyError("dense/kernel"))


def test_a_tensor_ios_does_not_train_never_dilutes_androids():
    """One Android update (+1 everywhere) and one iOS update whose untrained first tensor
    says -50: the first tensor moves by Android's +1 alone, the second by both (+1, +3)."""
    run = Run(buffer_size=2)
    run.driver.fit_returned(run.fit("a"), ([START[0] + 1, START[1] + 1], 10))
    run.driver.fit_returned(run.fit("c"), ([START[0] - 50, START[1] + 3], 10))
    assert run.driver.version == 1
    first, second = run.driver.buffer.current
    np.testing.assert_allclose(first, 1.0)
    np.testing.assert_allclose(second, 2.0)


def test_warm_up_holds_updates_until_enough_clients_reported_then_caps_the_liar():
    """min_clients=3 with a weight cap: nothing is applied until three distinct clients
    reported (a client's second update replaces its first, recorded as superseded); then
    the liar's 10**6 examples count as 2 × the median claim."""
    run = Run(Clients(a="android", b="android", c="ios"), buffer_size=3, bounds=Cap(),
              min_clients=3)
    run.back(run.fit("a"), examples=10)
    assert run.arrivals == [] and run.driver.version == 0  # held
    run.back(run.fit("a"), examples=10)
    assert [a.reason[:13] for a in run.arrivals] == ["superseded by"]
    run.back(run.fit("b"), examples=10)
    assert len(run.arrivals) == 1 and run.driver.version == 0
    run.back(run.fit("c"), examples=10**6)
    assert run.driver.version == 1
    applied = [a for a in run.arrivals if a.status == "applied"]
    assert sorted(a.client for a in applied) == ["a", "b", "c"]
    liar = by_client(applied)["c"]
    assert liar.capped and liar.examples == weight_cap([10, 10, 10**6], 2.0) == 20


def test_updates_held_when_the_session_ends_are_recorded_rejected():
    run = Run(buffer_size=1, bounds=Cap(), min_clients=3)
    run.back(run.fit("a"))
    run.driver.begin_wind_down()
    (held,) = run.arrivals
    assert held.status == "rejected" and "warm-up" in held.reason


def test_without_bounds_or_with_one_client_nothing_is_held():
    assert not Run(bounds=None, min_clients=3).driver.holding
    assert not Run(bounds=Cap(), min_clients=1).driver.holding


# -- when it stops ------------------------------------------------------------------------------
def test_max_versions_stops_and_later_updates_are_recorded_as_late():
    run = Run(buffer_size=1, max_versions=2)
    jobs = run.driver.next_jobs()
    assert len(jobs) == 3
    run.back(jobs[0])
    assert not run.driver.done()
    run.back(jobs[1])
    assert run.driver.versions_made == 2 and run.driver.done()
    assert run.driver.next_jobs() == []  # no fit starts after the stop rule
    run.back(jobs[2])
    late = run.arrivals[-1]
    assert late.status == "rejected" and "after the session's last version 2" in late.reason
    assert late.examples == 10 and run.driver.version == 2 and len(run.versions) == 2


def test_updates_landing_together_never_make_more_than_max_versions():
    """K=1, max_versions=1 and three updates back before the host looks at the rule: one
    version; the other two are late, never applied."""
    run = Run(buffer_size=1, max_versions=1)
    for job in run.driver.next_jobs():
        run.back(job)
    assert run.driver.versions_made == 1
    assert [a.status for a in run.arrivals] == ["applied", "rejected", "rejected"]


def test_updates_the_warm_up_releases_never_make_more_than_max_versions():
    """K=1, max_versions=1, two held updates released together: the first makes the last
    version, the second is late (found by the interleavings test below)."""
    run = Run(Clients(a="android", b="android"), buffer_size=1, max_versions=1,
              bounds=Cap(), min_clients=2)
    run.back(run.fit("a"))
    run.back(run.fit("b"))
    assert run.driver.versions_made == 1 and len(run.versions) == 1
    got = by_client(run.arrivals)
    assert got["a"].status == "applied" and got["b"].status == "rejected"
    assert "after the session's last version 1" in got["b"].reason


def test_max_seconds_on_the_injected_clock():
    run = Run(buffer_size=1, max_seconds=10.0)
    run.clock.now = 9.99
    assert not run.driver.done()
    run.back(run.fit("a"))
    run.clock.now = 10.0
    assert run.driver.done() and run.driver.done()  # stays stopped
    run.back(run.fit("b"))
    assert run.arrivals[-1].status == "rejected" and run.driver.version == 1


def test_failures_after_the_stop_rule_are_not_counted():
    """After the last version a failing fit neither rests its client nor counts towards
    the all-fail rule (two errors in a row would end this session before it)."""
    run = Run(Clients(a="android", b="android"), buffer_size=1, max_versions=1)
    a, b = run.driver.next_jobs()
    run.back(a)
    for _ in range(5):
        run.driver.fit_failed(b, Failure("android", "b", "boom"))
    run.driver.begin_wind_down()
    assert [c for c, _ in run.driver.idle()] == ["a", "b"] and run.driver.running == {}


# -- evaluation ---------------------------------------------------------------------------------
def test_evaluation_every_n_versions_on_a_fraction_of_idle_clients():
    clients = Clients(a="android", b="android", c="ios", d="ios")
    run = Run(clients, buffer_size=1, evaluate_every=2, fraction_evaluate=0.5,
              max_versions=10)
    run.back(run.fit("a"))
    assert run.driver.evaluations == []  # version 1: not evaluated
    run.back(run.fit("a"))
    (ev,) = run.driver.evaluations
    assert (ev.version, ev.target) == (2, 2)
    jobs = run.driver.next_jobs()
    assert [j.kind for j in jobs] == ["evaluate", "evaluate", "fit", "fit"]
    assert all(j.version == 2 for j in jobs if j.kind == "evaluate")
    first, second = (j for j in jobs if j.kind == "evaluate")
    run.driver.evaluated(first, result=("x", 0.5))
    assert run.evaluations == []  # one still out
    run.driver.evaluated(second, failure=TimeoutError())
    assert len(run.evaluations) == 1
    number, results, failures = run.evaluations[0]
    assert number == 2 and results == [("x", 0.5)] and len(failures) == 1


def test_no_evaluation_when_evaluate_every_or_fraction_is_zero():
    for kw in ({"evaluate_every": 0, "fraction_evaluate": 1.0},
               {"evaluate_every": 1, "fraction_evaluate": 0.0}):
        run = Run(buffer_size=1, **kw)
        run.back(run.fit("a"))
        run.driver.begin_wind_down()
        assert run.driver.evaluations == [] and not run.driver.evaluates


def test_the_final_model_is_evaluated_then_clients_are_told_goodbye():
    run = Run(Clients(a="android", b="android"), buffer_size=1, evaluate_every=5,
              fraction_evaluate=1.0, max_seconds=10.0)
    run.back(run.fit("a"))
    assert run.driver.evaluations == []  # version 1 of 5
    run.clock.now = 10.0
    assert run.driver.done()
    run.driver.begin_wind_down()
    (ev,) = run.driver.evaluations
    assert (ev.version, ev.target) == (1, 2)
    step = run.driver.wind_down_step()
    assert [(j.kind, j.client) for j in step.start] == [("evaluate", "a"), ("evaluate", "b")]
    assert step.goodbye == [] and not step.over
    for job in step.start:
        run.driver.evaluated(job, result=job.client)
    assert run.evaluations == [(1, ["a", "b"], [])]
    step = run.driver.wind_down_step()
    assert step.start == [] and step.goodbye == ["a", "b"] and step.over
    assert run.driver.wind_down_step().goodbye == []  # told once


def test_wind_down_waits_for_running_fits_and_closes_a_starved_evaluation():
    run = Run(Clients(a="android", b="android"), buffer_size=1, max_versions=1,
              fraction_evaluate=1.0)
    a, b = run.driver.next_jobs()
    run.back(a)  # version 1, evaluation scheduled on 2 clients
    assert run.driver.done()
    run.driver.begin_wind_down()
    step = run.driver.wind_down_step()
    assert [j.kind for j in step.start] == ["evaluate"] and not step.over  # "a" only
    run.clock.now = 1.0
    run.back(b)  # late
    run.clock.now = 2.0
    run.driver.evaluated(step.start[0], result="a")
    assert run.arrivals[-1].status == "rejected"
    step = run.driver.wind_down_step()
    assert [j.client for j in step.start] == ["b"]
    run.driver.evaluated(step.start[0], result="b")
    assert run.evaluations == [(1, ["a", "b"], [])]
    assert run.driver.wind_down_step().over


# -- errors ---------------------------------------------------------------------------------------
def test_all_fail_rule_counts_errors_only_and_an_accepted_update_resets_it():
    run = Run(Clients(a="android", b="android"), buffer_size=2)
    run.driver.fit_failed(run.fit("a"), Failure("android", "a", "disconnected", False))
    run.driver.fit_failed(run.fit("a"), Failure("android", "a", "KeyError: x"))
    run.back(run.fit("b"))  # accepted: the errors in a row start again
    run.driver.fit_failed(run.fit("b"), Failure("android", "b", "ValueError: y"))
    with pytest.raises(AllFitsFailed, match=r"the last 2 fits all failed .* version 0: "
                                            r"ValueError: y; KeyError: z") as err:
        run.driver.fit_failed(run.fit("a"), Failure("android", "a", "KeyError: z"))
    assert isinstance(err.value, SessionFailure) and isinstance(err.value, RuntimeError)


def test_all_fail_rule_waits_for_every_connected_client_and_min_clients():
    run = Run(Clients(a="android", b="android", c="ios"), buffer_size=1, min_clients=4)
    for i in range(3):
        run.driver.fit_failed(run.fit("a"), Failure("android", "a", f"boom {i}"))
    with pytest.raises(AllFitsFailed):
        run.driver.fit_failed(run.fit("a"), Failure("android", "a", "boom 3"))


def test_a_failing_client_rests_2_4_30_seconds_on_the_clock():
    run = Run(Clients(a="android"), buffer_size=100)
    rests = []
    for _ in range(6):
        (job,) = run.driver.next_jobs()
        start = run.clock.now
        run.driver.fit_failed(job, Failure("android", "a", "boom", False))  # no rest
        assert run.driver.next_jobs()  # given work again at once
        run.driver.fit_failed(run.driver.running["a"], Failure("android", "a", "boom"))
        while not run.driver.next_jobs():
            run.clock.now += 1.0
        rests.append(run.clock.now - start)
        run.back(run.driver.running["a"])  # accepted: the count starts again
    assert rests == [2.0] * 6
    (job,) = run.driver.next_jobs()
    for n in range(1, 7):  # errors in a row: 2, 4, 8, 16, 30, 30 s
        failed_at = run.clock.now
        run.driver.fit_failed(job, Failure("android", "a", "boom"))
        run.clock.now = failed_at + min(30.0, 2.0 ** n) - 0.5
        assert run.driver.next_jobs() == []
        run.clock.now += 0.5
        (job,) = run.driver.next_jobs()


def test_failures_since_the_last_version_are_reported_with_it():
    run = Run(buffer_size=1)
    run.driver.fit_failed(run.fit("c"), Failure("ios", "c", "disconnected", False))
    run.back(run.fit("a"))
    (made,) = run.versions
    assert [f.client for f in made.failures] == ["c"]
    metrics = {(p, k): v for p, k, v in made.metrics + made.totals}
    assert metrics[("ios", "failures")] == 1.0 and metrics[("all", "failures")] == 1.0
    assert metrics[("android", "clients")] == 1.0 and metrics[("all", "buffer_size")] == 1.0


def test_a_non_finite_step_keeps_the_model_and_says_so():
    run = Run(buffer_size=1, staleness="constant")
    a, b = run.fit("a"), run.fit("b")  # both on version 0
    big = ([np.full(2, 3e38), np.full(3, 3e38)], 1)
    run.driver.fit_returned(a, big)
    assert run.driver.version == 1
    run.driver.fit_returned(b, big)  # 3e38 + 3e38 overflows float32
    made = run.versions[-1]
    assert made.model is None and made.number == 2 and run.driver.version == 1
    assert "NaN or inf" in (made.error or "") and "stays at version 1" in (made.error or "")
    assert all(np.isfinite(t).all() for t in run.driver.buffer.current)


# -- random interleavings -----------------------------------------------------------------------
@settings(max_examples=150, deadline=None)
@given(data=st.data(), n=st.integers(1, 5), buffer_size=st.integers(1, 3),
       max_staleness=st.integers(0, 3), max_versions=st.integers(1, 4),
       max_concurrency=st.none() | st.integers(1, 3), min_clients=st.integers(1, 4),
       fraction_evaluate=st.sampled_from([0.0, 0.5, 1.0]), bounded=st.booleans())
def test_random_interleavings_keep_the_rules(data, n, buffer_size, max_staleness,
                                             max_versions, max_concurrency, min_clients,
                                             fraction_evaluate, bounded):
    """Whatever order fits start, return, fail or break in: never more than max_versions
    versions, never a stale update applied, at most max_concurrency fits at once, and every
    update that reached the server recorded exactly once (after the wind-down)."""
    clients = Clients(**{f"p{i}": ("android", "ios")[i % 2] for i in range(n)})
    run = Run(clients, buffer_size=buffer_size, max_staleness=max_staleness,
              max_versions=max_versions, max_concurrency=max_concurrency,
              min_clients=min_clients, fraction_evaluate=fraction_evaluate,
              bounds=Cap() if bounded else None)
    d = run.driver
    returned: list[tuple[str, int]] = []

    def finish(job: Job, outcome: str) -> None:
        if job.kind == "evaluate":
            d.evaluated(job, result=job.client)
        elif outcome == "fail":
            d.fit_failed(job, Failure(job.platform, job.client, "lost", False))
        else:
            returned.append((job.client, job.version))
            if outcome == "bad":
                d.fit_returned(job, ValueError("bad"))
            else:
                run.back(job, examples=data.draw(st.integers(1, 10**6)))

    for _ in range(data.draw(st.integers(0, 40))):
        if d.done():
            break
        action = data.draw(st.sampled_from(["start", "return", "return", "tick"]))
        if action == "start":
            d.next_jobs()
        elif action == "tick":
            run.clock.now += data.draw(st.floats(0, 40))
        elif d.running:
            job = data.draw(st.sampled_from(sorted(d.running.values(),
                                                   key=lambda j: j.client)))
            finish(job, data.draw(st.sampled_from(["ok", "ok", "bad", "fail"])))
        assert d.fits_running <= (max_concurrency or n)
    d.begin_wind_down()
    for _ in range(50):
        step = d.wind_down_step()
        if step.over or not d.running:
            break
        job = data.draw(st.sampled_from(sorted(d.running.values(), key=lambda j: j.client)))
        finish(job, data.draw(st.sampled_from(["ok", "bad", "fail"])))
    assert d.wind_down_step().over
    assert d.versions_made <= max_versions and len(run.versions) <= max_versions
    recorded = sorted((a.client, a.base_version) for a in run.arrivals)
    assert recorded == sorted(returned)  # exactly once each
    for a in run.arrivals:
        if a.status == "applied":
            assert a.version - 1 - a.base_version <= max_staleness
            assert a.weight > 0 and a.version <= max_versions
        else:
            assert a.reason and a.weight == 0.0
    applied = {id(a) for a in run.arrivals if a.status == "applied"}
    assert applied == ({id(a) for v in run.versions for a in v.applied}
                       | {id(a) for a in d.buffer.pending})
