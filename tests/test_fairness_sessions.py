"""``session.client_metrics`` after real sessions with virtual devices (issue 24): one row per
client evaluation, the accuracy each phone posted as telemetry, and per round the history's
accuracy spread equal to a numpy reference over these rows — for synchronous rounds and
FedBuff versions; read again by a fresh Workbench (it lives in the registry)."""

from __future__ import annotations

import numpy as np
import pytest

import xflwb
from tests.conftest import digits_cnn
from tests.support import wait_until
from xflwb.sessions.handle import CLIENT_METRIC_COLUMNS

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def _with_accuracy(frame):
    """``[frame]`` once it has rows and each has an accuracy (a frame has no truth value)."""
    return [frame] if len(frame) and frame.accuracy.notna().all() else None


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One Workbench, two short sessions on 2 Android + 2 iOS virtual devices: 2 synchronous
    rounds, then FedBuff (4 versions, every second one evaluated); then a new Workbench on
    the same data directory reads them back."""
    tmp = tmp_path_factory.mktemp("fair")
    res = xflwb.export(digits_cnn(7), name="fair_cnn", data_type="digits", out_dir=tmp / "e",
                       optimizer=xflwb.SGD(0.05, momentum=0.9))
    data_dir = tmp / "xfl"
    out = {}
    with xflwb.Workbench(data_dir=data_dir, port=0) as wb:
        wb.publish(res)
        for kind, options in (
                ("sync", {"rounds": 2}),
                ("fedbuff", {"rounds": 4, "strategy": "fedbuff",
                             "strategy_options": {"buffer_size": 2, "evaluate_every": 2}})):
            s = wb.train("fair_cnn", min_clients=4, round_timeout=120, **options)
            fleet = wb.spawn_devices(android=2, ios=2, dataset="digits",
                                     partition="dirichlet:0.5", seed=3)
            assert s.wait(timeout=300) == "finished", s.error
            fleet.wait(timeout=120)
            # the last evaluation's accuracy comes as telemetry, right after its EvaluateRes
            cm = wait_until(lambda s=s: _with_accuracy(s.client_metrics), 60,
                            "every evaluation's telemetry accuracy",
                            describe=lambda s=s: s.client_metrics)[0]
            out[kind] = (s.id, cm, s.history)
    later = xflwb.Workbench(data_dir=data_dir)
    try:
        out["reread"] = {k: later.session(sid).client_metrics for k, (sid, _, _) in
                         out.items()}
    finally:
        later.stop()
    return out


def _spread_matches(cm, hist):
    """Per round and platform: eval_clients, p10/p50/p90 (numpy's percentile) and the worst
    decile equal the reference over the rows; the example-weighted loss is the history's."""
    by = hist.set_index(["round", "platform", "metric"])["value"]
    for rnd, rows in cm.groupby("round"):
        for platform, group in [*rows.groupby("platform"), ("all", rows)]:
            acc = np.sort(group.accuracy.to_numpy())
            assert by[(rnd, platform, "eval_clients")] == len(acc)
            for q in (10, 50, 90):
                assert by[(rnd, platform, f"accuracy_p{q}")] == pytest.approx(
                    np.percentile(acc, q)), (rnd, platform, q)
            assert by[(rnd, platform, "accuracy_worst10")] == pytest.approx(
                acc[:int(np.ceil(len(acc) / 10))].mean())
            assert by[(rnd, platform, "eval_loss")] == pytest.approx(
                np.average(group.loss, weights=group.examples))
            assert by[(rnd, platform, "accuracy")] == pytest.approx(
                np.average(group.accuracy, weights=group.examples))


def test_a_synchronous_session_keeps_one_row_per_client_evaluation(runs):
    _, cm, hist = runs["sync"]
    assert tuple(cm.columns) == CLIENT_METRIC_COLUMNS
    assert cm["round"].tolist() == [1] * 4 + [2] * 4  # 4 devices evaluated, each round
    for _, rows in cm.groupby("round"):
        assert sorted(rows.platform) == ["android"] * 2 + ["ios"] * 2
        assert rows.client.nunique() == 4
    assert (cm.examples > 0).all() and cm.accuracy.between(0, 1).all()
    assert cm.accuracy.nunique() > 1  # non-IID devices: a spread, not one value
    _spread_matches(cm, hist)


def test_fedbuff_rows_are_numbered_by_the_version_evaluated(runs):
    _, cm, hist = runs["fedbuff"]
    evaluated = sorted(hist[(hist.metric == "eval_loss") & (hist.platform == "all")]["round"])
    assert sorted(cm["round"].unique()) == evaluated and len(evaluated) >= 2
    assert set(cm["round"]) <= set(hist.version)
    _spread_matches(cm, hist)


def test_a_new_workbench_reads_the_same_rows(runs):
    for kind in ("sync", "fedbuff"):
        reread = runs["reread"][kind]
        assert reread.equals(runs[kind][1]), kind
