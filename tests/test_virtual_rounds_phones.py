"""Phone sessions under the production round rules: a fit not back by the ``deadline``
counts as a straggler of its platform (not a failure), and the round goes on without it."""

from __future__ import annotations

import keras
import pytest

import xflwb


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    keras.utils.set_random_seed(4)
    model = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(),
                              keras.layers.Dense(10, activation="softmax")])
    return xflwb.export(model, name="deadline_dense", data_type="digits",
                        out_dir=tmp_path_factory.mktemp("exp"),
                        optimizer=xflwb.SGD(learning_rate=0.05))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_phone_past_the_deadline_is_a_straggler_of_its_platform(export, tmp_path):
    with xflwb.Workbench(data_dir=tmp_path / "xfl", port=0) as wb:
        wb.publish(export)
        # the iOS phone sleeps 99,999× its measured fit (milliseconds): minutes, far past
        # a 15 s deadline the others meet in a fraction of it
        session = wb.train("deadline_dense", rounds=1, min_clients=3, deadline=15.0,
                           fraction_evaluate=0.0, round_timeout=300)
        wb.spawn_devices(android=2, ios=1, dataset="digits", partition="iid", seed=1,
                         slowdown=[1.0, 1.0, 100_000.0])
        assert session.wait(timeout=400) == "finished", session.info["error"]
        h = session.history.query("round == 1").set_index(["platform", "metric"])["value"]
    assert h[("ios", "stragglers")] == 1 and h[("android", "stragglers")] == 0
    assert h[("all", "selected")] == 3
    assert h[("android", "clients")] == 2  # the two in time were aggregated
    assert ("ios", "clients") not in h.index or h[("ios", "clients")] == 0
    assert h[("all", "failures")] == 0  # a straggler is no failure
