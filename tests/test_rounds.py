"""The synchronous ``Round`` driven by a fake client source: no processes, sockets or sleeps.

The fake clients read the model they are sent (their platform's layout and encoding, as a
phone would), train by a rule of the test, and answer in their own layout and encoding, so
each test exercises the gate both ways, the bounds, the policy and the report."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

from tests.conftest import SERVED_TOY_MANIFEST as MANIFEST
from tests.conftest import toy_canonical
from xflwb.bridge import params
from xflwb.errors import SessionFailure
from xflwb.federation.dp import PrivacyBudgetSpent
from xflwb.federation.policies import POLICIES
from xflwb.federation.report import AllClientsFailed
from xflwb.federation.rounds import (
    Evaluation,
    Failure,
    FitJob,
    FitResult,
    ManifestFault,
    Round,
    Target,
)
from xflwb.flower_legacy import (
    Code,
    FedAdam,
    FitRes,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)

IOS = params.trained_mask(MANIFEST, "ios")  # dense/bias (index 3) is frozen on iOS
Train = Callable[[list[np.ndarray]], list[np.ndarray] | None]  # None: the fit fails


@dataclass
class FakeClient:
    platform: str
    train: Train
    examples: Any = 10
    codec: str = "raw"
    payload: Callable[[list[bytes]], list[bytes]] | None = None  # tampers with the bytes
    metrics: dict[str, Any] = field(default_factory=dict)


class FakeSource:
    """A ``ClientSource`` over in-memory clients; records what each was sent."""

    def __init__(self, clients: dict[str, FakeClient]) -> None:
        self.clients = clients
        self.sent: dict[str, list[np.ndarray]] = {}
        self.configs: list[dict[str, Any]] = []

    def available(self) -> int:
        return len(self.clients)

    def sample(self, n: int) -> list[Target]:
        return [Target(cid, c.platform, c.codec) for cid, c in list(self.clients.items())[:n]]

    def _received(self, job: FitJob) -> list[np.ndarray]:
        arrays, codec = params.decode_tensors(job.tensors)
        assert codec == job.target.codec  # the model came back in the client's encoding
        return params.from_platform(arrays, MANIFEST, job.target.platform,
                                    base=toy_canonical(0))

    def fit(self, round: int, jobs: list[FitJob]) -> tuple[list[FitResult], list[Failure]]:
        results, failures = [], []
        for job in jobs:
            cid, client = job.target.client, self.clients[job.target.client]
            model = self._received(job)
            self.sent[cid] = model
            self.configs.append(job.config)
            trained = client.train(model)
            if trained is None:
                failures.append(Failure(client.platform, cid, "ValueError: boom", True))
                continue
            wire = params.encode_tensors(params.to_platform(trained, MANIFEST, client.platform),
                                         client.codec)
            if client.payload is not None:
                wire = client.payload(wire)
            results.append(FitResult(client.platform, cid, wire, client.examples,
                                     dict(client.metrics), fit_seconds=1.0,
                                     bytes_up=sum(len(t) for t in wire)))
        return results, failures

    def evaluate(self, round: int, jobs: list[FitJob]
                 ) -> tuple[list[Evaluation], list[Failure]]:
        return [Evaluation(j.target.platform, j.target.client, 0.5, 10) for j in jobs], []


class Clock:
    """A fake monotonic clock: each reading is one second later."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


def to(value: list[np.ndarray]) -> Train:
    return lambda model: [np.array(a, np.float32) for a in value]


def metrics(report: Any) -> dict[tuple[str, str], Any]:
    return {(p, k): v for p, k, v in report.metrics}


def make(strategy: str = "fedavg", **kw: Any) -> tuple[Round, list[Any]]:
    reports: list[Any] = []
    kw.setdefault("max_weight_ratio", None)
    rnd = Round.build(MANIFEST, toy_canonical(0), strategy=strategy, min_clients=1,
                      on_fit_round=lambda r, g: reports.append(r), clock=Clock(), **kw)
    return rnd, reports


def test_a_tensor_one_platform_does_not_train_never_dilutes_the_one_that_did():
    a, i = toy_canonical(1), toy_canonical(2)
    rnd, reports = make()
    source = FakeSource({"a": FakeClient("android", to(a), 10),
                         "i": FakeClient("ios", to(i), 30, codec="npy")})
    report = rnd.run(1, source)
    got = rnd.global_
    np.testing.assert_allclose(got[3], a[3], atol=1e-6)  # Android's alone: iOS froze it
    for k in (0, 1, 2, 4):
        np.testing.assert_allclose(got[k], (10 * a[k] + 30 * i[k]) / 40, atol=1e-5)
    m = metrics(report)
    assert m[("all", "clients")] == 2 and m[("ios", "examples")] == 30
    assert m[("all", "aggregate_seconds")] == 1.0  # the injected clock, not the wall's
    assert rnd.codec_of == {"a": "raw", "i": "npy"} and reports == [report]
    assert source.configs == [{"local_epochs": 1}] * 2
    # round 2 sends each client the new model, in its layout and encoding
    rnd.run(2, source)
    for cid in ("a", "i"):
        for x, y in zip(source.sent[cid], got, strict=True):
            np.testing.assert_allclose(x, y, atol=1e-6)


def test_a_rejection_costs_only_that_client():
    a, b = toy_canonical(1), toy_canonical(2)
    rnd, _ = make()
    source = FakeSource({
        "a": FakeClient("android", to(a)),
        "b": FakeClient("android", to(b)),
        "cut": FakeClient("android", to(b), payload=lambda w: w[:-1]),
        "nan": FakeClient("ios", to([np.full_like(x, np.nan) for x in b]), codec="npy"),
        "liar": FakeClient("android", to(b), examples=-5),
    })
    report = rnd.run(1, source)
    why = {cid: reason for _, cid, reason in report.rejections}
    assert set(why) == {"cut", "nan", "liar"}
    assert "expected 5 android tensors, got 4" in why["cut"]
    assert "NaN or inf" in why["nan"] and "num_examples must be positive" in why["liar"]
    for g, x, y in zip(rnd.global_, a, b, strict=True):
        np.testing.assert_allclose(g, (x + y) / 2, atol=1e-5)
    m = metrics(report)
    assert m[("android", "rejected")] == 2 and m[("ios", "rejected")] == 1
    assert m[("all", "clients")] == 2


def test_a_manifest_fault_fails_the_round_instead_of_rejecting_the_client():
    import copy

    rnd, _ = make()
    broken = copy.deepcopy(MANIFEST)
    del broken["platforms"]["ios"]["coreml_layers"][0]["layout"]
    rnd.gate.manifest = broken
    wire = params.encode_tensors(params.to_platform(toy_canonical(1), MANIFEST, "ios"))
    with pytest.raises(ManifestFault, match=r"ios client i's update \(KeyError: 'layout'\)"):
        rnd.aggregate_fit(1, [FitResult("ios", "i", wire, 10)], [])
    assert issubclass(ManifestFault, SessionFailure)


def test_every_client_failing_with_an_error_fails_the_session_after_the_record():
    rnd, reports = make()
    source = FakeSource({"a": FakeClient("android", lambda m: None),
                         "b": FakeClient("ios", lambda m: None)})
    with pytest.raises(AllClientsFailed, match="all 2 clients selected for round 1 failed: "
                                               r"ValueError: boom \(×2\)"):
        rnd.run(1, source)
    assert reports[0].failed and reports[0].failures == [("android", "a", "ValueError: boom"),
                                                         ("ios", "b", "ValueError: boom")]
    for g, s in zip(rnd.global_, toy_canonical(0), strict=True):
        np.testing.assert_array_equal(g, s)


def test_too_few_clients_wait_without_sampling():
    states: list[dict] = []
    rnd = Round.build(MANIFEST, toy_canonical(0), min_clients=3, on_progress=states.append)
    source = FakeSource({"a": FakeClient("android", to(toy_canonical(1)))})
    assert rnd.run(1, source) is None and source.sent == {}
    assert states == [{"phase": "waiting", "round": 1, "connected": 1, "needed": 3}]


def test_central_dp_clips_each_delta_weighs_it_once_and_the_ledger_advances():
    base = toy_canonical(0)
    far = [a + 10.0 for a in base]  # a delta far beyond the clipping norm
    near = [a + 1e-4 for a in base]  # within it
    privacy = {"noise_multiplier": 0.0, "clipping_norm": 0.5}
    rnd, reports = make(privacy=privacy)
    source = FakeSource({"far": FakeClient("android", to(far), examples=1000),
                         "near": FakeClient("android", to(near), examples=1)})
    rnd.run(1, source)
    assert source.configs[0] == {"local_epochs": 1, "clipping_norm": 0.5}
    clipped, norm = params.clip_update(far, base, [True] * 5, 0.5)
    assert norm > 0.5
    want = [(c + n) / 2 for c, n in zip(clipped, near, strict=True)]  # weight 1 each
    for g, w in zip(rnd.global_, want, strict=True):
        np.testing.assert_allclose(g, w, atol=1e-5)
    m = metrics(reports[0])
    assert m[("all", "clipping_norm")] == 0.5 and m[("all", "epsilon")] is None  # no noise
    # with noise the ledger composes each released round: ε grows, never resets
    noisy, noisy_reports = make(privacy={"noise_multiplier": 1.0, "clipping_norm": 0.5})
    noisy.dp.rng = np.random.default_rng(0)
    before = [a.copy() for a in noisy.global_]
    for r in (1, 2):
        noisy.run(r, FakeSource({"near": FakeClient("android", to(near)),
                                 "n2": FakeClient("ios", to(near), codec="npy")}))
    eps = [metrics(r)[("all", "epsilon")] for r in noisy_reports]
    assert 0 < eps[0] < eps[1] and len(noisy.dp.ledger.events) == 2
    assert noisy_reports[1].privacy_event.sample_size == 2
    # the noise moved the model far more than the 1e-4 updates did
    assert max(float(np.abs(g - b).max()) for g, b in zip(noisy.global_, before,
                                                            strict=True)) > 1e-2


def test_dp_refuses_a_round_past_max_epsilon_before_anyone_trains():
    rnd, _ = make(privacy={"noise_multiplier": 0.5, "clipping_norm": 0.5, "max_epsilon": 1e-3})
    source = FakeSource({"a": FakeClient("android", to(toy_canonical(1)))})
    with pytest.raises(PrivacyBudgetSpent, match="privacy budget spent"):
        rnd.run(1, source)
    assert source.sent == {}


def test_dp_around_a_robust_rule_is_refused():
    with pytest.raises(ValueError, match="cannot be combined with strategy 'fedmedian'"):
        make("fedmedian", privacy={"noise_multiplier": 1.0, "clipping_norm": 0.5})


def test_the_median_ignores_one_huge_update_and_the_frozen_ios_copy():
    h1, h2, h3 = toy_canonical(1), toy_canonical(2), toy_canonical(3)
    huge = [np.full_like(a, 1e6) for a in h1]
    rnd, reports = make("fedmedian")
    rnd.run(1, FakeSource({"h1": FakeClient("android", to(h1)),
                           "h2": FakeClient("android", to(h2)),
                           "bad": FakeClient("android", to(huge)),
                           "i": FakeClient("ios", to(h3), codec="npy")}))
    assert reports[0].rejections == []
    for k, g in enumerate(rnd.global_):
        values = [h1[k], h2[k], huge[k]] + ([h3[k]] if IOS[k] else [])
        want = np.median(np.stack(values), axis=0)
        np.testing.assert_allclose(g, want, rtol=1e-6)
    assert max(float(np.abs(g).max()) for g in rnd.global_) < 10


def test_a_server_optimiser_is_flowers_rule_on_the_masked_mean():
    start, a = toy_canonical(0), toy_canonical(1)
    rnd, _ = make("fedadam", strategy_options={"eta": 0.05})
    rnd.run(1, FakeSource({"a": FakeClient("android", to(a))}))
    ref = FedAdam(initial_parameters=ndarrays_to_parameters(start), eta=0.05)
    want, _ = ref.aggregate_fit(1, [(None, FitRes(Status(Code.OK, ""),
                                                  ndarrays_to_parameters(a), 10, {}))], [])
    for x, y in zip(rnd.global_, parameters_to_ndarrays(want), strict=True):
        np.testing.assert_allclose(x, y, atol=1e-6)


def test_the_peers_norm_bound_rejects_a_step_far_beyond_the_rounds():
    base = toy_canonical(0)
    steps = {f"h{i}": [a + 0.01 * (i + 1) for a in base] for i in range(3)}
    rnd, reports = make(max_norm_ratio=10.0)
    clients = {cid: FakeClient("android", to(s)) for cid, s in steps.items()}
    clients["bad"] = FakeClient("android", to([a + 100.0 for a in base]))
    rnd.run(1, FakeSource(clients))
    (_, cid, why), = reports[0].rejections
    assert cid == "bad" and why.startswith("UpdateTooLarge:") and "max_norm_ratio 10" in why


def test_the_weight_cap_counts_a_liar_as_two_median_phones():
    a, b = toy_canonical(1), toy_canonical(2)
    rnd, reports = make(max_weight_ratio=2.0)
    rnd.run(1, FakeSource({"a": FakeClient("android", to(a), 10),
                           "b": FakeClient("android", to(a), 10),
                           "liar": FakeClient("android", to(b), 10**15)}))
    m = metrics(reports[0])
    assert m[("android", "capped")] == 1 and m[("android", "examples")] == 40
    for g, x, y in zip(rnd.global_, a, b, strict=True):
        np.testing.assert_allclose(g, (20 * x + 20 * y) / 40, atol=1e-5)


def test_a_refused_client_costs_only_its_update():
    rnd, reports = make()
    rnd.refuse = lambda cid: "device token 3 was revoked" if cid == "r" else None
    rnd.run(1, FakeSource({"a": FakeClient("android", to(toy_canonical(1))),
                           "r": FakeClient("android", to(toy_canonical(2)))}))
    assert reports[0].rejections == [("android", "r",
                                      "ClientRefused: device token 3 was revoked")]


def test_secure_sums_enter_the_mean_as_one_contribution():
    from xflwb.simulation.secagg import canonical_payload

    a, i = toy_canonical(1), toy_canonical(2)
    # what SecAgg+ unmasks: Σ w·m·x / W, Σ w·m / W, Σ w / W, over weights 10 and 30
    pa, pi = canonical_payload(a, [True] * 5), canonical_payload(i, IOS)
    total = [(10 * x.astype(np.float64) + 30 * y) / 40 for x, y in zip(pa, pi, strict=True)]
    wire = params.encode_tensors([np.asarray(t, np.float32) for t in total], "npy")
    rnd, reports = make(secure_sums=True)
    rnd.aggregate_fit(1, [FitResult("android", "a", wire, 10), FitResult("ios", "i", wire, 30)],
                      [])
    np.testing.assert_allclose(rnd.global_[3], a[3], atol=1e-5)
    for k in (0, 1, 2, 4):
        np.testing.assert_allclose(rnd.global_[k], (10 * a[k] + 30 * i[k]) / 40, atol=1e-5)
    m = metrics(reports[0])
    assert m[("all", "secure_aggregates")] == 1 and m[("all", "examples")] == 40


def test_evaluation_is_weighted_by_examples_and_a_bad_one_costs_its_report():
    rnd, _ = make()
    loss, report = rnd.aggregate_evaluate(1, [Evaluation("android", "a", 1.0, 10),
                                              Evaluation("ios", "i", 0.0, 30),
                                              Evaluation("ios", "x", "nan?", 5)])
    assert loss == pytest.approx(0.25)
    assert [cid for _, cid, _ in report.rejections] == ["x"]


def test_every_registered_policy_runs_a_round():
    """The registry is the list of strategies: each one builds and aggregates."""
    for name in POLICIES:
        rnd, reports = make(name)
        rnd.run(1, FakeSource({f"c{k}": FakeClient("android", to(toy_canonical(k)))
                               for k in range(1, 5)}))
        assert reports[0].rejections == [], name
        assert any(not np.array_equal(g, s) for g, s in zip(rnd.global_, toy_canonical(0),
                                                             strict=True)), name


def test_strategy_choices_derive_from_the_registry():
    from xflwb.sessions.options import ASYNC_STRATEGIES, STRATEGIES

    assert (*POLICIES, *ASYNC_STRATEGIES) == STRATEGIES
