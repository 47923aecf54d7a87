"""Synchronous rounds on the Simulation Engine with the virtual clock: deterministic for a
seed, and the clock's round rules — a deadline drops the slow tail and counts it per
platform, ``sim_seconds`` advances round by round. (Without the virtual clock: determinism
and the absence of clock metrics are checked on ``test_simulation.py``'s attached runs.)"""

from __future__ import annotations

from pathlib import Path

import keras
import pytest

import xflwb
from tests.support import assert_same_run
from xflwb.simulation import SimulationConfig

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

SEED = 11
DEADLINE = 200.0


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    keras.utils.set_random_seed(5)
    model = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(),
                              keras.layers.Dense(10, activation="softmax")])
    return xflwb.export(model, name="vclock_dense", data_type="digits",
                        out_dir=tmp_path_factory.mktemp("exp"),
                        optimizer=xflwb.SGD(learning_rate=0.05))


def ios_three_times_slower(export, data_dir: Path, android: int, ios: int) -> dict:
    """A profile where a training example takes an Android client 1 simulated second and
    an iOS client 3 (the measured per-platform costs, the ones the simulation reads from
    the same cache, divided out), with transfers and latency negligible."""
    from xflwb.simulation.client import ClientSpec
    from xflwb.simulation.virtual import virtual_fleet

    cfg = SimulationConfig(android=android, ios=ios, seed=SEED)
    spec = ClientSpec(bundle=None, bundle_sha="test", android=android, ios=ios,
                      dataset="digits", partition="iid", seed=SEED, test_fraction=0.2)
    costs = virtual_fleet(cfg, Path(export.directory), spec, str(data_dir)).costs
    fast = {"uplink": "const:1e12", "downlink": "const:1e12", "latency": "const:0"}
    profile = {f"{p}_{k}": v for p in ("android", "ios") for k, v in fast.items()}
    profile["android_slowdown"] = f"const:{1.0 / costs['android']['train']!r}"
    profile["ios_slowdown"] = f"const:{3.0 / costs['ios']['train']!r}"
    return profile


@pytest.fixture(scope="module")
def runs(export, tmp_path_factory, shared_ray):
    """Two seeded runs with an iOS-3×-slower profile and a deadline, in one data directory
    (the cost cache is shared, as in real use)."""
    virt_dir = tmp_path_factory.mktemp("virtual")
    common = {"dataset": "digits", "partition": "iid", "seed": SEED, "progress": False,
              "ray_address": shared_ray, "timeout": 900}
    profile = ios_three_times_slower(export, virt_dir, 4, 4)
    virtual = [xflwb.simulate(export, data_dir=virt_dir, android=4, ios=4, rounds=2,
                              profiles=profile, deadline=DEADLINE, **common)
               for _ in range(2)]
    return {"virtual": virtual}


def test_the_same_seed_gives_the_same_history_and_model(runs):
    a, b = runs["virtual"]
    assert_same_run(a, b)


def test_the_deadline_drops_the_slow_ios_tail_and_counts_it(runs):
    h = runs["virtual"][0].history
    per = h.set_index(["round", "platform", "metric"])["value"]
    for rnd in (1, 2):
        # every client available and selected; iOS (3× slower: ~540 s a fit) misses the
        # 200 s deadline, Android (~180 s: 180 examples) makes it
        assert per[(rnd, "all", "available")] == per[(rnd, "all", "selected")] == 8
        assert per[(rnd, "ios", "stragglers")] == 4 and per[(rnd, "android", "stragglers")] == 0
        assert per[(rnd, "android", "clients")] == 4
        assert (rnd, "ios", "clients") not in per.index or per[(rnd, "ios", "clients")] == 0
        assert per[(rnd, "all", "dropouts")] == 0 and per[(rnd, "all", "failures")] == 0
        # fewer than n kept: the round lasts until the deadline
        assert per[(rnd, "all", "round_sim_seconds")] == DEADLINE
    sim = h.query("metric == 'sim_seconds'").sort_values("round")["value"].tolist()
    assert sim == [DEADLINE, 2 * DEADLINE]
    # evaluation samples the clients available at the round's end: all of them
    assert per[(2, "all", "eval_examples")] > 0


def test_a_deadline_no_client_can_meet_is_refused_before_training(export, tmp_path,
                                                                   shared_ray):
    from xflwb.errors import XflwbError

    with pytest.raises(XflwbError, match=r"no client can report in time.*fastest"):
        xflwb.simulate(export, data_dir=tmp_path / "d", android=2, ios=2, rounds=1,
                       deadline=1e-6, progress=False, ray_address=shared_ray, timeout=600)


def test_dropouts_are_counted_and_a_fleet_left_empty_ends_the_run(export, tmp_path,
                                                                  shared_ray):
    """iOS clients 2 and 3 are available for the first second only: they drop out of round
    1's fits (at least 2 s: a 1 s latency each way); round 2 needs 3 clients, which never
    come again."""
    trace = tmp_path / "trace.csv"
    trace.write_text("client,available_from,available_to\n0,0,1000000\n1,0,1000000\n"
                     "2,0,1\n3,0,1\n")
    profile = {"availability": str(trace), "android_latency": "const:1",
               "ios_latency": "const:1"}
    sim = xflwb.simulate(export, data_dir=tmp_path / "d", android=2, ios=2, rounds=2,
                         min_clients=3, profiles=profile, seed=SEED, wait=False,
                         progress=False, ray_address=shared_ray)
    assert sim.wait(timeout=600) == "failed"
    assert "never 3 client(s)" in sim.info["error"]
    per = sim.history.query("round == 1").set_index(["platform", "metric"])["value"]
    assert per[("ios", "dropouts")] == 2 and per[("android", "dropouts")] == 0
    assert per[("all", "selected")] == 4 and per[("all", "clients")] == 2
    assert per[("all", "failures")] == 0  # a drop-out is counted as one, not as a failure
