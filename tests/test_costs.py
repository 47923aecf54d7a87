"""Measured costs and the virtual fleet (issue 24 item 1): the per-example cost of an export
on the real runtimes (TFLite interpreter, Core ML executor), cached per artifact, and the
fleet a simulation's options become."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

import xflwb
from tests.conftest import digits_cnn
from xflwb.federation.fleet import AlwaysAvailable, NoClientAvailable, Windows
from xflwb.simulation import client as sim_client
from xflwb.simulation import costs, virtual
from xflwb.simulation.config import SimulationConfig

PLATFORMS = ["android", "ios"]


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    return xflwb.export(digits_cnn(31), name="costs_cnn", data_type="digits",
                        out_dir=tmp_path_factory.mktemp("exp"),
                        optimizer=xflwb.SGD(learning_rate=0.1))


@pytest.fixture(scope="module")
def data():
    d = xflwb.load_dataset("digits")
    return d.x_train[:200], d.y_train[:200]


@pytest.fixture(scope="module")
def measured(export, data, tmp_path_factory):
    cache = tmp_path_factory.mktemp("costs")
    return cache, costs.measured_costs(export.directory, PLATFORMS, *data, cache)


def test_costs_are_measured_on_each_runtime_positive_and_finite(measured):
    cache, got = measured
    assert set(got) == set(PLATFORMS)
    for plat in PLATFORMS:
        for what in ("train", "evaluate"):
            value = got[plat][what]
            assert math.isfinite(value) and value > 0, (plat, what, value)
    entries = sorted(p.name for p in cache.iterdir())
    assert len(entries) == 2 and all(e.endswith(f"-{costs.METHOD}.json") for e in entries)


def test_the_cache_gives_the_same_numbers_twice(export, data, measured):
    cache, first = measured
    assert costs.measured_costs(export.directory, PLATFORMS, *data, cache) == first


def test_the_cache_is_what_is_read(export, data, measured, tmp_path):
    """An entry is keyed by the artifact: plant numbers, they come back unmeasured."""
    cache, _ = measured
    planted = tmp_path / "planted"
    shutil.copytree(cache, planted)
    for entry in planted.glob("*-android-*.json"):
        entry.write_text(json.dumps({"train": 123.0, "evaluate": 4.5}))
    got = costs.measured_costs(export.directory, ["android"], *data, planted)
    assert got == {"android": {"train": 123.0, "evaluate": 4.5}}
    # an unreadable entry is measured again, not trusted
    for entry in planted.glob("*-android-*.json"):
        entry.write_text("{not json")
    assert costs.measured_costs(export.directory, ["android"], *data,
                                planted)["android"]["train"] != 123.0


def test_a_changed_artifact_is_measured_anew(export, data, measured, tmp_path_factory):
    cache, _ = measured
    other = xflwb.export(digits_cnn(32), name="costs_cnn", data_type="digits",
                         out_dir=tmp_path_factory.mktemp("exp2"),
                         optimizer=xflwb.SGD(learning_rate=0.1))
    planted = tmp_path_factory.mktemp("planted2")
    for entry in cache.glob("*.json"):  # the first export's entries, with planted numbers
        (planted / entry.name).write_text(json.dumps({"train": 123.0, "evaluate": 4.5}))
    got = costs.measured_costs(other.directory, PLATFORMS, *data, planted)
    assert all(got[p]["train"] != 123.0 for p in PLATFORMS)
    assert len(list(planted.glob("*.json"))) == 4  # two artifacts × two platforms


# -- the virtual fleet ---------------------------------------------------------------------------
def _spec(export, cfg: SimulationConfig) -> sim_client.ClientSpec:
    blob, sha = sim_client.make_bundle(export.manifest, PLATFORMS)
    return sim_client.ClientSpec(bundle=blob, bundle_sha=sha, android=cfg.android,
                                 ios=cfg.ios, dataset=cfg.dataset, partition=cfg.partition,
                                 seed=cfg.seed, test_fraction=cfg.test_fraction)


def test_example_counts_are_the_clients_own_split(export):
    cfg = SimulationConfig(android=7, ios=6, partition="dirichlet:0.3", seed=4,
                           test_fraction=0.25)
    spec = _spec(export, cfg)
    parts = sim_client._partitions(cfg.dataset, cfg.partition, cfg.num_clients, cfg.seed)
    train, test = virtual.example_counts([len(p[1]) for p in parts], cfg.test_fraction)
    for pid in range(cfg.num_clients):
        x, _, xt, _ = sim_client.client_data(spec, pid)
        assert (train[pid], test[pid]) == (len(x), len(xt)), pid
    for sizes, tf in (([0, 1, 2, 3, 10, 11], 0.5), ([5, 2, 1], 0.0), ([4, 9], 0.99)):
        tr, te = virtual.example_counts(sizes, tf)
        for n, a, b in zip(sizes, tr, te, strict=True):
            from xflwb.devices.partition import _local_split

            ref_train, ref_test = _local_split(n, tf, 0, 0)
            assert (a, b) == (len(ref_train), len(ref_test)), (n, tf)


def test_without_profiles_the_fleet_is_ideal(export, measured, tmp_path):
    cache, got = measured
    data_dir = tmp_path / "data"
    shutil.copytree(cache, data_dir / "costs")  # this export's costs, already measured
    cfg = SimulationConfig(android=3, ios=2)
    fleet = virtual.virtual_fleet(cfg, export.directory, _spec(export, cfg), str(data_dir))
    assert isinstance(fleet.availability, AlwaysAvailable) and fleet.availability.n == 5
    assert fleet.costs == got
    caps = fleet.caps
    assert caps.platform == ("android",) * 3 + ("ios",) * 2
    assert (caps.slowdown == 1).all() and (caps.latency == 0).all()
    assert (caps.uplink == virtual.IDEAL_BANDWIDTH).all()
    secs = caps.fit_seconds(np.arange(5), fleet.train_examples, 1, 1e5, 1e5)
    assert np.allclose(secs, fleet.train_examples * np.array(
        [got[p]["train"] for p in caps.platform]), rtol=1e-6)


def test_a_thousand_client_fleet_from_a_profile(export, measured, tmp_path):
    cache, got = measured
    data_dir = tmp_path / "data"
    shutil.copytree(cache, data_dir / "costs")
    cfg = SimulationConfig(android=500, ios=500, partition="dirichlet:0.5", profiles={
        "availability": "diurnal", "ios_slowdown": "const:3"})
    fleet = virtual.virtual_fleet(cfg, export.directory, _spec(export, cfg), str(data_dir))
    assert isinstance(fleet.availability, Windows) and fleet.availability.n == 1000
    assert 0 < fleet.availability.available(0.0).sum() < 1000
    assert (fleet.caps.slowdown[500:] == 3).all()
    assert fleet.caps.train_cost == {p: got[p]["train"] for p in PLATFORMS}
    assert fleet.train_examples.sum() + fleet.test_examples.sum() == 1797  # all of digits
    again = virtual.virtual_fleet(cfg, export.directory, _spec(export, cfg), str(data_dir))
    assert np.array_equal(again.caps.uplink, fleet.caps.uplink)


def test_nobody_available_at_the_start_is_refused_by_the_fleet(export, measured, tmp_path):
    cache, _ = measured
    trace = tmp_path / "late.csv"
    trace.write_text("client,available_from,available_to\n0,0,10\n1,5,20\n")
    data_dir = tmp_path / "data"
    shutil.copytree(cache, data_dir / "costs")
    cfg = SimulationConfig(android=1, ios=1, profiles={"availability": str(trace)})
    trace.write_text("client,available_from,available_to\n0,100,200\n1,150,300\n")
    with pytest.raises(NoClientAvailable, match=r"the first becomes available at 100 s"):
        virtual.virtual_fleet(cfg, export.directory, _spec(export, cfg), str(data_dir))


def test_the_ideal_fleets_costs_land_in_the_data_dir(export, tmp_path):
    cfg = SimulationConfig(android=2)
    virtual.virtual_fleet(cfg, Path(export.directory), _spec(export, cfg), str(tmp_path))
    assert [p.name.split("-")[1] for p in (tmp_path / "costs").glob("*.json")] == ["android"]
