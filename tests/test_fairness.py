"""Fairness across clients (issue 24): the spread of the clients' accuracies per platform
(p10 / p50 / p90, the worst decile's mean) against a numpy reference, its place in a round's
evaluation report, and every client's evaluation kept in the registry — accuracy from the
client's metrics or from its matched telemetry, NaN in rows of an older registry."""

from __future__ import annotations

import json
import math
import sqlite3

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from tests.conftest import SERVED_TOY_MANIFEST as MANIFEST
from tests.conftest import toy_canonical
from tests.test_registry_migrations import _old_database
from xflwb.federation.fairness import (
    FAIRNESS_METRICS,
    fairness_by_round,
    fairness_metrics,
    worst_count,
)
from xflwb.federation.rounds import Evaluation, Round
from xflwb.sessions.handle import CLIENT_METRIC_COLUMNS, client_metrics_frame, history_frame
from xflwb.sessions.registry import Registry

NAN = float("nan")


def reference(platforms: list[str], accuracy: list[float]) -> dict[tuple[str, str], float]:
    """The spread as the issue states it, written with plain numpy per group: percentiles by
    ``np.percentile``'s default, the worst decile as the ``ceil(m/10)`` lowest."""
    groups: dict[str, list[float]] = {}
    for p, a in zip(platforms, accuracy, strict=True):
        if not math.isnan(a):
            groups.setdefault(p, []).append(a)
            groups.setdefault("all", []).append(a)
    out = {}
    for p, values in groups.items():
        v = np.array(values)
        for q in (10, 50, 90):
            out[(p, f"accuracy_p{q}")] = float(np.percentile(v, q))
        out[(p, "accuracy_worst10")] = float(np.mean(np.sort(v)[:math.ceil(len(v) / 10)]))
        out[(p, "eval_clients")] = float(len(v))
    return out


def as_dict(rows: list[tuple[str, str, float]]) -> dict[tuple[str, str], float]:
    d = {(p, m): v for p, m, v in rows}
    assert len(d) == len(rows), "a (platform, metric) pair twice"
    return d


# ties (a handful of values), any accuracy, and clients that reported none
accuracies = st.one_of(st.sampled_from([0.0, 0.25, 0.5, 1.0]),
                       st.floats(0.0, 1.0, allow_nan=False), st.just(NAN))
clients = st.lists(st.tuples(st.sampled_from(["android", "ios"]), accuracies),
                   min_size=1, max_size=80)


@settings(max_examples=150, deadline=None)
@given(clients)
@example([("ios", 0.3)])  # one client: itself everywhere
@example([("android", 0.5)] * 11)  # all tied; 11 clients → worst 2
@example([("android", NAN), ("ios", 0.2), ("ios", 0.9)])  # a platform with none
@example([("android", NAN)])  # nobody reported one
def test_the_spread_equals_a_numpy_reference(rows):
    platforms = [p for p, _ in rows]
    acc = [a for _, a in rows]
    got = as_dict(fairness_metrics(platforms, acc))
    want = reference(platforms, acc)
    assert set(got) == set(want)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-12, abs=1e-12), key
    # None (a client that reported none) is NaN
    none = [None if math.isnan(a) else a for a in acc]
    assert as_dict(fairness_metrics(platforms, none)) == got
    # one platform only: "all" is that platform
    for p in {p for p, a in rows if not math.isnan(a)}:
        if len({q for q, a in rows if not math.isnan(a)}) == 1:
            assert {m: v for (q, m), v in got.items() if q == p} == \
                   {m: v for (q, m), v in got.items() if q == "all"}


def test_the_worst_decile_is_the_ceiling_of_a_tenth_counted_exactly():
    assert [worst_count(m) for m in (0, 1, 9, 10, 11, 20, 30, 31, 1000)] == \
           [0, 1, 1, 1, 2, 2, 3, 4, 100]
    # 30 clients: the worst 3, not 4
    acc = np.arange(30) / 29
    worst = as_dict(fairness_metrics(["android"] * 30, acc))[("android", "accuracy_worst10")]
    assert worst == pytest.approx(np.mean(acc[:3]))
    one = as_dict(fairness_metrics(["ios"], [0.625]))
    assert {m: one[("ios", m)] for m in FAIRNESS_METRICS} == {
        "accuracy_p10": 0.625, "accuracy_p50": 0.625, "accuracy_p90": 0.625,
        "accuracy_worst10": 0.625, "eval_clients": 1.0}


def test_rows_come_platforms_sorted_then_all_and_mismatched_lengths_are_refused():
    rows = fairness_metrics(["ios", "android", "ios"], [0.5, 0.75, 1.0])
    assert [p for p, _, _ in rows] == ["android"] * 5 + ["ios"] * 5 + ["all"] * 5
    assert fairness_metrics([], []) == []
    with pytest.raises(ValueError, match="one platform per accuracy"):
        fairness_metrics(["ios"], [0.5, 0.6])


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 5), st.sampled_from(["android", "ios"]), accuracies),
                max_size=60), st.randoms(use_true_random=False))
def test_many_rounds_at_once_equal_each_round_alone_in_any_order(rows, rnd):
    shuffled = list(rows)
    rnd.shuffle(shuffled)
    got = fairness_by_round(*zip(*shuffled, strict=True)) if shuffled else \
        fairness_by_round([], [], [])
    want = []
    for r in sorted({r for r, _, _ in rows}):
        mine = [(p, a) for q, p, a in rows if q == r]
        want += [{"round": r, "platform": p, "metric": m, "value": v}
                 for p, m, v in fairness_metrics([p for p, _ in mine], [a for _, a in mine])]
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g == {**w, "value": pytest.approx(w["value"], rel=1e-12, abs=1e-12)}


# -- in a round's evaluation report ------------------------------------------------------------
def test_the_evaluation_report_carries_each_accuracy_and_the_spread_of_the_valid_ones():
    rnd = Round.build(MANIFEST, toy_canonical(0), min_clients=1, max_weight_ratio=None)
    evaluations = [
        Evaluation("android", "a1", 0.5, 10, {"accuracy": 0.9}),
        Evaluation("android", "a2", 0.7, 30, {"accuracy": 0.6}),
        Evaluation("android", "a3", 0.6, 20, {}),  # reported none (a FedKit phone)
        Evaluation("ios", "i1", 0.4, 10, {"accuracy": 1}),  # an int is a number
        Evaluation("ios", "i2", 0.4, 10, {"accuracy": 1.5}),  # not an accuracy
        Evaluation("ios", "i3", 0.4, 10, {"accuracy": True}),  # a bool is not one either
        Evaluation("ios", "i4", 0.4, 10, {"accuracy": "0.5"}),
        Evaluation("ios", "i5", 0.4, 0, {"accuracy": 0.1}),  # no examples: nothing measured
        Evaluation("ios", "i6", 0.4, 10, None),
        Evaluation("ios", "i7", 0.4, 10, {"accuracy": NAN}),
    ]
    loss, report = rnd.aggregate_evaluate(3, evaluations)
    assert [e[4] for e in report.evaluations] == [0.9, 0.6, None, 1.0] + [None] * 6
    assert [e[:4] for e in report.evaluations][:2] == [("android", "a1", 0.5, 10),
                                                       ("android", "a2", 0.7, 30)]
    got = {(p, m): v for p, m, v in report.metrics}
    spread = as_dict(fairness_metrics(["android", "android", "ios"], [0.9, 0.6, 1.0]))
    assert {k: v for k, v in got.items() if k[1] in FAIRNESS_METRICS} == spread
    assert got[("android", "eval_clients")] == 2 and got[("all", "eval_clients")] == 3
    assert got[("android", "accuracy_p50")] == pytest.approx(0.75)  # unweighted
    assert got[("android", "accuracy")] == pytest.approx((0.9 * 10 + 0.6 * 30) / 40)
    assert loss == pytest.approx(sum(e[2] * e[3] for e in report.evaluations)
                                 / sum(e[3] for e in report.evaluations))


def test_a_round_whose_clients_report_no_accuracy_has_no_spread():
    rnd = Round.build(MANIFEST, toy_canonical(0), min_clients=1, max_weight_ratio=None)
    _, report = rnd.aggregate_evaluate(1, [Evaluation("android", "a", 0.5, 10),
                                           Evaluation("ios", "i", 0.5, 10)])
    assert not {m for _, m, _ in report.metrics} & set(FAIRNESS_METRICS)
    assert [e[4] for e in report.evaluations] == [None, None]


# -- in the registry -------------------------------------------------------------------------
def _phone_session(reg: Registry) -> int:
    """A running phone session of a model row (no export needed to record evaluations)."""
    with sqlite3.connect(reg.data_dir / "xflwb.db") as db:
        db.execute("INSERT INTO models VALUES (1, 'm', 1, 'digits', ?, '/nowhere', 1.0)",
                   (json.dumps({"name": "m", "version": 1, "parameters": []}),))
    sid = reg.create_session({"id": 1, "name": "m"}, {"rounds": 2})
    reg.update_session(sid, status="running")
    return sid


def _telemetry(reg: Registry, sid: int, device: int, loss: float, acc: float,
               size: int) -> None:
    reg.add_telemetry("evaluate", {"session_id": sid, "device_id": device, "start": 0,
                                   "end": 1, "loss": loss, "accuracy": acc,
                                   "test_size": size})


def test_every_client_evaluation_is_kept_with_its_accuracy_from_metrics_or_telemetry(
        tmp_path):
    reg = Registry(tmp_path)
    try:
        sid = _phone_session(reg)
        _telemetry(reg, sid, 7, 0.25, 0.5, 12)  # arrives before its EvaluateRes
        reg.add_evaluations(sid, 1, [("android", "p1", 0.25, 12),  # matched: 0.5
                                     ("ios", "p2", 0.75, 8, None),
                                     ("ios", "p3", 0.5, 8, 0.875)])  # its own accuracy
        _telemetry(reg, sid, 8, 0.75, 0.625, 8)  # arrives after: fills p2
        _telemetry(reg, sid, 9, 0.5, 0.125, 8)  # matches p3, which keeps its own
        reg.add_evaluations(sid, 2, [("android", "p1", 0.3, 12, float("nan"))])
        cm = client_metrics_frame(reg, sid)
        assert tuple(cm.columns) == CLIENT_METRIC_COLUMNS
        assert cm[["round", "platform", "client", "examples"]].values.tolist() == [
            [1, "android", "p1", 12], [1, "ios", "p2", 8], [1, "ios", "p3", 8],
            [2, "android", "p1", 12]]
        np.testing.assert_array_equal(cm.accuracy, [0.5, 0.625, 0.875, NAN])
        np.testing.assert_array_equal(cm.loss, [0.25, 0.75, 0.5, 0.3])
        assert str(cm.accuracy.dtype) == "float64" and str(cm.examples.dtype) == "int64"
        # a phone session's history summarises the telemetry's accuracies per round
        h = history_frame(reg, sid).set_index(["round", "platform", "metric"])["value"]
        want = as_dict(fairness_metrics(["android", "ios", "ios"], [0.5, 0.625, 0.875]))
        for (p, m), v in want.items():
            assert h[(1, p, m)] == pytest.approx(v)
        assert not any(m in FAIRNESS_METRICS for r, _, m in h.index if r == 2)
        # a round whose spread was recorded with it (a simulation's) keeps the recorded one
        reg.add_metrics(sid, 1, [("all", "eval_clients", 5.0)])
        h2 = history_frame(reg, sid)
        assert h2[h2.metric == "eval_clients"].value.tolist() == [5.0]
        # an empty session: the columns, typed
        empty = client_metrics_frame(reg, sid + 1)
        assert empty.empty and tuple(empty.columns) == CLIENT_METRIC_COLUMNS
    finally:
        reg.close()


def test_an_older_registry_opens_and_its_evaluations_say_what_they_knew(tmp_path):
    """A database of the previous schema: matched evaluations get their telemetry's accuracy
    (when it is one), the others NaN; its history still reads."""
    old = tmp_path / "old" / "xflwb.db"
    old.parent.mkdir()
    _old_database(old)
    with sqlite3.connect(old) as db:  # telemetry 1 (accuracy 0.75) matched the first
        db.execute("INSERT INTO telemetry (kind, device_id, session_id, round, platform, "
                   "start, \"end\", loss, accuracy, test_size, received) VALUES "
                   "('evaluate', 7, 1, 1, 'android', 0, 1, 0.9, 7.5, 10, 1.3)")
        db.executemany("INSERT INTO evaluations (session_id, round, platform, client, loss, "
                       "num_examples, telemetry_id) VALUES (1, 1, ?, ?, ?, 10, ?)",
                       [("android", "a", 0.5, 1), ("ios", "b", 0.4, None),
                        ("android", "c", 0.9, 2)])  # telemetry 2: accuracy out of range
    reg = Registry(old.parent)
    try:
        cm = client_metrics_frame(reg, 1)
        assert cm.client.tolist() == ["a", "b", "c"]
        np.testing.assert_array_equal(cm.accuracy, [0.75, NAN, NAN])
        h = history_frame(reg, 1)
        assert h[h.metric == "accuracy_p50"][["platform", "value"]].values.tolist() == [
            ["all", 0.75], ["android", 0.75]]
        assert h[(h.metric == "loss")].value.tolist() == [0.5]  # its old metric row
    finally:
        reg.close()
