"""FedBuff on the Simulation Engine (Ray), on the virtual clock: a 200-phone fleet with a
slow tail keeps making versions; a fleet whose iPhones are 3× slower shows it in their
staleness; the same seed gives the same history, arrivals and model (with compressed
links and drop_prob's drop-outs). Two runs of one configuration in all: the first is also
the one every slow-tail assertion reads."""

from __future__ import annotations

import numpy as np
import pytest

import xflwb
from tests.conftest import digits_cnn

#: wall-clock measurements: the only metrics two runs of one seed may differ in
WALL_CLOCK = {"aggregate_seconds"}


def compute_bound(android: str, ios: str) -> xflwb.DeviceProfiles:
    """Phones whose fits take their compute alone (slowdowns drawn from ``android`` /
    ``ios``; no latency, links too fast to count): what the tests measure is speed."""
    links = "const:1e12"
    return xflwb.DeviceProfiles(android_slowdown=android, ios_slowdown=ios,
                                android_latency="const:0", ios_latency="const:0",
                                android_uplink=links, ios_uplink=links,
                                android_downlink=links, ios_downlink=links)


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    return xflwb.export(digits_cnn(21), name="simbuff_cnn", data_type="digits",
                        out_dir=tmp_path_factory.mktemp("exp"),
                        optimizer=xflwb.SGD(learning_rate=0.05, momentum=0.9))


def per_example_seconds(export, data_dir) -> dict[str, float]:
    """The measured seconds of one training example per platform (TFLite, the Core ML
    executor): what the simulation multiplies a phone's slowdown by, read from (and written
    to) ``data_dir``'s cost cache as the simulation itself does."""
    from pathlib import Path

    from xflwb.simulation import SimulationConfig
    from xflwb.simulation.client import ClientSpec
    from xflwb.simulation.virtual import virtual_fleet

    cfg = SimulationConfig(android=1, ios=1)
    spec = ClientSpec(bundle=None, bundle_sha="test", android=1, ios=1, dataset="digits",
                      partition="iid", seed=0, test_fraction=0.2)
    costs = virtual_fleet(cfg, Path(export.directory), spec, str(data_dir)).costs
    return {p: float(costs[p]["train"]) for p in ("android", "ios")}


def _run(simulate, model, ray_address, profiles, **where):
    """100 Android + 100 iOS phones (``profiles``), 12 versions of 10 updates; int8 up, fp16
    down, drop_prob's drop-outs, non-IID partitions (3 to 14 examples a phone)."""
    return simulate(
        model, android=100, ios=100, rounds=12, strategy="fedbuff",
        strategy_options=xflwb.FedBuff(buffer_size=10, evaluate_every=6),
        fraction_evaluate=0.1, profiles=profiles, compression="up=int8,down=fp16",
        drop_prob=0.2, seed=3, partition="dirichlet:0.5", ray_address=ray_address,
        progress=False, timeout=1200, **where)


@pytest.fixture(scope="module")
def twice(export, tmp_path_factory, shared_ray):
    """Two runs in one data directory, ``xflwb.simulate``'s and a workbench's: the second
    reads the per-example costs the first measured (DATA_DIR/costs), as every later run of
    an export does.

    Lognormal speeds (σ = 0.8: the slowest are 10×–20× slower than the fastest), iPhones
    3× slower at the median in simulated seconds: the measured per-platform cost of an
    example is divided out (the Core ML executor's can be several times TFLite's, which
    would leave no iPhone update within the versions' staleness bound)."""
    data = tmp_path_factory.mktemp("same")
    cost = per_example_seconds(export, data)
    profiles = compute_bound(f"lognormal:{1.0 / cost['android']!r},0.8",
                             f"lognormal:{3.0 / cost['ios']!r},0.8")
    first = _run(xflwb.simulate, export, shared_ray, profiles, data_dir=data)
    with xflwb.Workbench(data_dir=data, port=0) as wb:
        second = _run(wb.simulate, "simbuff_cnn", shared_ray, profiles)
        assert list(wb.session_table.status) == ["finished", "finished"]
    return [first, second]


@pytest.fixture(scope="module")
def slow_tail(twice):
    """The first of ``twice``'s runs."""
    return twice[0]


def test_a_slow_tail_does_not_hold_versions_back(slow_tail):
    sim = slow_tail
    assert sim.status == "finished", sim.info["error"]
    h = sim.history
    sim_seconds = h.query("metric == 'sim_seconds' and platform == 'all'")
    assert list(sim_seconds["round"]) == list(range(1, 13))
    assert (np.diff(sim_seconds["value"].to_numpy()) >= 0).all()
    applied = sim.arrivals.query("status == 'applied'")
    assert len(applied) == 12 * 10
    # fits took from the fastest phones' to 10× that and more: the versions came from the
    # fast ones, the slow ones' updates arrived stale
    secs = sim.arrivals["fit_seconds"]
    assert secs.max() >= 10 * secs.min()
    assert applied["staleness"].max() >= 1
    # the fast phones trained again and again before the slow ones reported once
    per_client = applied.groupby("client").size()
    assert per_client.max() >= 3
    # every version is evaluated every 6th: accuracy is in the history
    assert {6, 12} <= set(h.query("metric == 'accuracy' and platform == 'all'")["round"])


def test_slower_iphones_are_staler(slow_tail):
    applied = slow_tail.arrivals.query("status == 'applied'")
    mean = applied.groupby("platform")["staleness"].mean()
    assert mean["ios"] > mean["android"]
    h = slow_tail.history.query("metric == 'staleness_mean'")
    per = h.groupby("platform")["value"].mean()
    assert per["ios"] > per["android"]
    # and they report less often in the same simulated time
    counts = applied.groupby("platform").size()
    assert counts["android"] > counts["ios"]


def test_the_same_seed_gives_the_same_run(twice):
    a, b = twice
    assert a.status == b.status == "finished", (a.info["error"], b.info["error"])
    ha, hb = (s.history.query("metric not in @WALL_CLOCK").sort_values(
        ["round", "platform", "metric"]).reset_index(drop=True) for s in (a, b))
    assert len(ha) > 0
    assert ha[["round", "platform", "metric"]].equals(hb[["round", "platform", "metric"]])
    np.testing.assert_array_equal(ha["value"].to_numpy(), hb["value"].to_numpy())
    cols = [c for c in a.arrivals.columns if c not in ("id", "session_id", "recorded_at")]
    assert a.arrivals[cols].equals(b.arrivals[cols])
    for x, y in zip(a.global_parameters(), b.global_parameters(), strict=True):
        np.testing.assert_array_equal(x, y)
    assert a.arrivals["staleness"].max() >= 1  # asynchronous indeed
    # drop_prob's drop-outs are failures (seeded per client and attempt: the same ones)
    assert ha.query("metric == 'failures' and platform == 'all'")["value"].sum() >= 1
    # int8 updates: about a quarter of float32's bytes, in every version
    sent = ha.query("platform == 'all'").pivot_table(index="round", columns="metric",
                                                     values="value")
    assert (sent["bytes_up"] < sent["bytes_up_float32"] / 2).all()
