"""Bounded influence by default (issue 20, item 3): one phone that claims num_examples=10**15
or sends a huge update moves the model no more than one honest phone does.

In process, with real FitRes bytes (protobuf off the wire, parsed by Flower's serde, as
``GrpcClientProxy.fit`` returns them): ``CrossPlatformStrategy.aggregate_fit`` for rounds
and ``AsyncLoop._arrived`` (the FedBuff loop's per-arrival step, with its real
``VersionBuffer``) for FedBuff.
"""

from __future__ import annotations

import math
from concurrent.futures import Future
from typing import Any

import numpy as np
import pytest
from flwr.common import serde
from flwr.proto import transport_pb2 as pb
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import SERVED_TOY_MANIFEST as MANIFEST
from tests.conftest import Phone
from tests.conftest import toy_canonical as canon
from xflwb.bridge import params
from xflwb.federation.influence import PeerWindow, lower_median, weight_cap
from xflwb.server.config import SessionConfig
from xflwb.server.fedbuff import Arrival, AsyncLoop, FedBuff, _Job
from xflwb.sessions.flower_strategy import CrossPlatformStrategy
from xflwb.simulation.config import SimulationConfig

START = canon(0)


def wire_fitres(arrays: list[np.ndarray], n: int, platform: str = "android") -> Any:
    """``arrays`` (canonical) as ``platform``'s phone sends them: protobuf bytes, parsed."""
    tensors = params.encode_tensors(params.to_platform(arrays, MANIFEST, platform))
    raw = pb.ClientMessage(fit_res=pb.ClientMessage.FitRes(
        parameters=pb.Parameters(tensors=tensors, tensor_type="ND"),
        num_examples=n)).SerializeToString()
    return serde.fit_res_from_proto(pb.ClientMessage.FromString(raw).fit_res)


def step(seed: int, scale: float = 0.01) -> list[np.ndarray]:
    """A model one local training step away from START (a honest update at scale 0.01)."""
    rng = np.random.default_rng(seed)
    return [(s + scale * rng.standard_normal(s.shape)).astype(np.float32) for s in START]


def distance(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return math.sqrt(sum(float(np.sum((np.float64(x) - y) ** 2)) for x, y in zip(a, b,
                                                                                   strict=True)))


def round_model(updates: list[tuple[str, list[np.ndarray], int]], **options: Any
                ) -> tuple[list[np.ndarray], Any]:
    """The global model after one round of ``(cid, model, num_examples)`` android updates
    (a fresh strategy: no history), and the round's report."""
    reports: list = []
    s = CrossPlatformStrategy(MANIFEST, START, min_clients=1,
                              on_fit_round=lambda r, g: reports.append(r), **options)
    s.aggregate_fit(1, [(Phone(cid, "android"), wire_fitres(m, n)) for cid, m, n in updates],
                    [])
    return s.global_, reports[0]


HONEST = [(f"h{i}", step(i), 10) for i in range(1, 4)]


def effect(extra: tuple[str, list[np.ndarray], int], **options: Any) -> float:
    """How far adding ``extra`` to the honest round moves the resulting model."""
    without, _ = round_model(HONEST, **options)
    with_it, _ = round_model([*HONEST, extra], **options)
    return distance(with_it, without)


# -- the median and the cap ---------------------------------------------------------------------
def test_the_lower_median_of_one_honest_claim_and_one_lie_is_the_honest_one():
    assert lower_median([10, 10**15]) == 10 and lower_median([10**15, 10]) == 10
    assert lower_median([3, 1, 2]) == 2 and lower_median([4, 1, 3, 2]) == 2
    assert weight_cap([10, 10**15], 2.0) == 20 and weight_cap([10, 10**15], None) is None
    assert weight_cap([1, 1], 1.5) == 1 and weight_cap([], 2.0) is None
    w = PeerWindow(size=2)
    for cid, v in (("a", 1.0), ("b", 2.0), ("a", 5.0), ("c", float("inf")), ("d", 9.0)):
        w.observe(cid, v)
    assert sorted(w.values()) == [5.0, 9.0]  # b forgotten (least recent), a's newest, no inf


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 6),
       st.lists(st.tuples(st.integers(0, 9),
                          st.one_of(st.floats(-1e3, 1e3), st.sampled_from(
                              [0.0, -0.0, 1.0, math.nan, math.inf, -math.inf]))),
                max_size=60))
def test_the_windows_median_is_the_lower_median_of_its_values(size, observations):
    """The window keeps its values sorted as clients come, repeat and are forgotten: its
    median is always the lower median of exactly the values it remembers."""
    w = PeerWindow(size=size)
    for client, value in observations:
        w.observe(str(client), value)
        kept = w.values()
        assert len(kept) == len(w) <= size
        assert all(math.isfinite(v) for v in kept)
        assert w.median() == (lower_median(kept) if kept else None)


def test_the_bounds_are_on_by_default_and_off_with_none():
    cfg = SessionConfig()
    assert cfg.max_weight_ratio == 2.0 and cfg.max_norm_ratio == 10.0
    assert SessionConfig(max_weight_ratio=None, max_norm_ratio=None).max_norm_ratio is None
    for bad in ({"max_weight_ratio": 0.5}, {"max_norm_ratio": 0}, {"max_norm_ratio": "auto"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            SessionConfig(**bad)
    # secagg hides single updates and DP clips: the defaults must not refuse either
    sim = SimulationConfig(android=3, secagg={})
    assert sim.max_norm_ratio == 10.0
    s = CrossPlatformStrategy(MANIFEST, START, secure_sums=True)
    assert s.max_norm_ratio is None
    dp = CrossPlatformStrategy(MANIFEST, START, privacy={
        "noise_multiplier": 1.0, "clipping_norm": 1.0})
    assert dp.max_norm_ratio is None


# -- rounds (fedavg) ----------------------------------------------------------------------------
def test_a_claim_of_10_15_with_a_large_update_moves_the_round_less_than_one_honest_phone():
    honest = effect(("h4", step(4), 10))
    attack = effect(("bad", step(99, scale=100.0), 10**15))
    assert attack <= honest
    _, report = round_model([*HONEST, ("bad", step(99, scale=100.0), 10**15)])
    (_, cid, why), = report.rejections
    assert cid == "bad" and "max_norm_ratio 10" in why and "not clipped" in why
    # the old defaults (max_examples=10**6, no norm bound): the attacker owns the round
    old = effect(("bad", step(99, scale=100.0), 10**15), max_weight_ratio=None,
                 max_norm_ratio=None)
    assert old > 1000 * honest


def test_a_claim_of_10_15_with_an_honest_sized_update_counts_as_two_median_phones():
    _, report = round_model([*HONEST, ("bad", step(99), 10**15)])
    metrics = {(p, k): v for p, k, v in report.metrics}
    assert metrics[("android", "examples")] == 3 * 10 + 2 * 10
    assert metrics[("android", "capped")] == 1
    honest = effect(("h4", step(4), 10))
    # weight 20 of 50 against 10 of 40: at most max_weight_ratio honest phones' worth
    assert effect(("bad", step(99), 10**15)) <= 2 * 1.25 * honest


def test_two_phones_one_liar_the_liar_counts_as_twice_the_honest():
    _, report = round_model([("h1", step(1), 10), ("bad", step(2), 10**15)])
    metrics = {(p, k): v for p, k, v in report.metrics}
    assert metrics[("android", "examples")] == 10 + 20


def test_2_63_examples_of_values_near_3e38_are_refused_and_the_model_stays_finite():
    huge = [np.full(s.shape, 3e38, np.float32) for s in START]
    model, report = round_model([*HONEST, ("bad", huge, 2**63 - 1)], max_examples=None)
    assert [cid for _, cid, _ in report.rejections] == ["bad"]
    assert all(np.isfinite(a).all() for a in model)
    assert distance(model, START) < 1
    # every bound off: the float64 sums do not overflow; the model is finite (and the
    # attacker's, which is why the bounds are on by default)
    model, report = round_model([*HONEST, ("bad", huge, 2**63 - 1)], max_examples=None,
                                max_weight_ratio=None, max_norm_ratio=None)
    assert all(np.isfinite(a).all() for a in model)


def test_norms_are_judged_against_recent_rounds_and_follow_a_fleet_whose_updates_grow():
    s = CrossPlatformStrategy(MANIFEST, START, min_clients=1, max_norm_ratio=4.0)
    s.aggregate_fit(1, [(Phone(c, "android"), wire_fitres(m, n)) for c, m, n in HONEST], [])
    start2 = s.global_

    def moved(scale: float, seed: int) -> list[np.ndarray]:
        rng = np.random.default_rng(seed)
        return [(g + scale * rng.standard_normal(g.shape)).astype(np.float32)
                for g in start2]

    reports: list = []
    s.on_fit_round = lambda r, g: reports.append(r)
    # round 2: everyone's update is 10× larger: h1's is judged against round 1's three and
    # rejected; once most phones' newest norms are the new scale, the median follows ...
    s.aggregate_fit(2, [(Phone(f"h{i}", "android"), wire_fitres(moved(0.1, i), 10))
                        for i in range(1, 4)], [])
    assert [cid for _, cid, _ in reports[0].rejections] == ["h1"]
    # ... and round 3 accepts every phone at the fleet's new scale
    s.aggregate_fit(3, [(Phone(f"h{i}", "android"), wire_fitres(moved(0.1, i + 10), 10))
                        for i in range(1, 4)], [])
    assert reports[1].rejections == []


@settings(max_examples=30, deadline=None)
@given(claims=st.lists(st.integers(1, 10**6), min_size=1, max_size=7),
       lie=st.integers(1, 2**63 - 1), scale=st.floats(1e-4, 1e30),
       ratio=st.sampled_from([1.0, 2.0, 3.5]))
def test_any_claim_and_scale_the_liars_weight_share_is_bounded(claims, lie, scale, ratio):
    """H honest claims ≥ their lower median m number at least ⌈H/2⌉ (one liar among H + 1
    values can take one slot above it), each counts ≥ m, the liar ≤ r·m: its share of the
    weight is at most r / (r + ⌈H/2⌉). The liar is on iOS (its own examples metric), so
    its norm is judged against iOS peers only (none here): the weight cap alone bounds it,
    and nothing it sends gets an honest Android update rejected."""
    reports: list = []
    s = CrossPlatformStrategy(MANIFEST, START, min_clients=1, max_weight_ratio=ratio,
                              on_fit_round=lambda r, g: reports.append(r))
    results = [(Phone(f"h{i}", "android"), wire_fitres(step(i), n))
               for i, n in enumerate(claims)]
    results.append((Phone("liar", "ios"), wire_fitres(step(99, scale), lie, "ios")))
    s.aggregate_fit(1, results, [])
    assert all(np.isfinite(a).all() for a in s.global_)
    metrics = {(p, k): v for p, k, v in reports[0].metrics}
    liar = metrics.get(("ios", "examples"), 0.0)
    honest = metrics.get(("android", "examples"), 0.0)
    h = len(claims)
    assert not [r for r in reports[0].rejections if r[0] == "android"]  # none refused
    assert liar / (liar + honest) <= ratio / (ratio + math.ceil(h / 2)) + 1e-12


# -- FedBuff --------------------------------------------------------------------------------------
class Tracked(Phone):
    """A fit's client as AsyncLoop's job holds it (``_Tracked``: id, timing, bytes)."""

    seconds = 0.0
    bytes_up = bytes_down = 0


def fedbuff(buffer_size: int = 1, min_clients: int = 2, **options: Any) -> AsyncLoop:
    strategy = CrossPlatformStrategy(MANIFEST, START, min_clients=min_clients, **options)
    loop = AsyncLoop(None, strategy, FedBuff(buffer_size=buffer_size, evaluate_every=0),
                     max_versions=100, max_workers=1)
    loop.arrivals: list[Arrival] = []  # type: ignore[misc]
    loop.on_arrival = loop.arrivals.append
    return loop


def arrive(loop: AsyncLoop, cid: str, model: list[np.ndarray], n: int) -> None:
    """One phone's FitRes comes back to the loop, trained from the current version."""
    fut: Future[Any] = Future()
    fut.set_result(wire_fitres(model, n))
    loop._complete(fut, _Job("fit", Tracked(cid, "android"), "android", loop.state.version))


def test_fedbuff_a_first_attacker_in_a_k1_buffer_is_judged_against_the_next_phone():
    """K=1: the attacker arrives first. Its update is held until a second phone reports,
    then rejected; version 1 is the honest update alone."""
    loop = fedbuff()
    arrive(loop, "bad", step(99, scale=100.0), 10**15)
    assert loop.state.version == 0 and loop.arrivals == []  # held, not yet applied
    arrive(loop, "h1", step(1), 10)
    assert loop.state.version == 1
    by = {a.client: a for a in loop.arrivals}
    assert by["bad"].status == "rejected" and "max_norm_ratio" in by["bad"].reason
    assert by["h1"].status == "applied"
    for got, want in zip(loop.strategy.global_, step(1), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_fedbuff_the_10_15_claim_moves_a_version_no_more_than_one_honest_update():
    """K=3, the attacker (10**15 examples, a step of 100) arrives first in each of 5
    versions, then honest phones until the version is made: the attacker moves no version
    at all (today's defaults gave it 10**6 / (10**6 + 20) of every version)."""
    def run(attacker: bool, **options: Any) -> list[list[np.ndarray]]:
        loop = fedbuff(buffer_size=3, **options)
        models = []
        for v in range(5):
            if attacker:
                arrive(loop, "bad", [(a + 100.0).astype(np.float32)
                                     for a in loop.strategy.global_], 10**15)
            for i in range(1, 4):
                if loop.state.version > v:
                    break
                g = loop.strategy.global_
                rng = np.random.default_rng(100 * v + i)
                arrive(loop, f"h{i}", [(a + 0.01 * rng.standard_normal(a.shape)).astype(
                    np.float32) for a in g], 10)
            assert loop.state.version == v + 1
            models.append(loop.strategy.global_)
        return models

    honest = run(False)
    for h, a in zip(honest, run(True), strict=True):
        assert distance(h, a) < 1e-5  # the attacker's pull on the version: none
    one_step = distance(honest[0], START)
    old = run(True, max_weight_ratio=None, max_norm_ratio=None)
    assert distance(old[0], START) > 1000 * one_step


def test_fedbuff_weight_cap_uses_the_recent_phones_claims():
    loop = fedbuff(buffer_size=4, max_norm_ratio=None)
    for i in range(1, 4):
        arrive(loop, f"h{i}", step(i), 10)
    arrive(loop, "bad", step(99), 10**15)
    by = {a.client: a for a in loop.arrivals}
    assert by["bad"].examples == 20 and by["bad"].capped
    assert loop.state.version == 1


def test_fedbuff_with_every_bound_off_never_applies_a_non_finite_version():
    loop = fedbuff(max_examples=None, max_weight_ratio=None, max_norm_ratio=None)
    arrive(loop, "a", [np.full(s.shape, 3e38, np.float32) for s in START], 2**63 - 1)
    arrive(loop, "b", [np.full(s.shape, -3e38, np.float32) for s in START], 2**63 - 1)
    assert all(np.isfinite(a).all() for a in loop.strategy.global_)
    assert any(a.status == "rejected" for a in loop.arrivals)


def test_fedbuff_held_updates_are_recorded_when_the_session_ends_in_the_warm_up():
    loop = fedbuff(min_clients=3)
    arrive(loop, "h1", step(1), 10)
    arrive(loop, "h1", step(2), 10)  # replaces its held one (recorded as superseded)
    assert [a.reason[:13] for a in loop.arrivals] == ["superseded by"]
    loop.round_timeout = 0.0
    loop.cm = type("NoPhones", (), {"all": lambda self: {},
                                    "num_available": lambda self: 0})()
    loop._wind_down()
    assert len(loop.arrivals) == 2 and loop.arrivals[-1].status == "rejected"
    assert "warm-up" in loop.arrivals[-1].reason


def test_the_influence_benchmark_runs_and_the_attack_is_rejected_every_round():
    """``benchmarks/influence.py --smoke`` (a few seconds) completes and prints its table:
    the benchmark cannot rot, and under the defaults the attack of issue 20 is rejected in
    every round and version, while the old defaults let it through."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "influence.py"
    out = subprocess.run([sys.executable, str(script), "--smoke"], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = {tuple(line.split()[:3]): line.split() for line in out.stdout.splitlines()
            if line.split()[:1] in (["fedavg"], ["fedbuff"])}
    for strategy in ("fedavg", "fedbuff"):
        assert rows[(strategy, "item3", "default")][-1] == "3/3", out.stdout
        assert rows[(strategy, "item3", "old")][-1] == "0/3", out.stdout
        assert float(rows[(strategy, "item3", "default")][4]) <= 1.0  # ≤ one honest update
