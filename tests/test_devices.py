"""Virtual devices end to end: real artifacts, real protocol, device processes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import keras
import numpy as np
import pytest

import xflwb
import xflwb.devices.fleet
from tests.support import wait_until
from xflwb.bridge import runtime
from xflwb.devices import datasets
from xflwb.devices.partition import device_data

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def _unseen_cnn():
    """A model no other test uses: valid conv, average pooling, tanh hidden layer."""
    keras.utils.set_random_seed(11)
    return keras.Sequential([
        keras.Input((8, 8, 1)),
        keras.layers.Conv2D(6, 3, activation="relu"),
        keras.layers.AveragePooling2D(2),
        keras.layers.Flatten(),
        keras.layers.Dense(24, activation="tanh"),
        keras.layers.Dense(10, activation="softmax"),
    ])


def _all_digits():
    d = datasets.load("digits")
    return np.concatenate([d.x_train, d.x_test]), np.concatenate([d.y_train, d.y_test])


def _no_process(pids):
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


@pytest.fixture(scope="module")
def unseen(tmp_path_factory):
    return xflwb.export(_unseen_cnn(), name="unseen_cnn", data_type="digits",
                        out_dir=tmp_path_factory.mktemp("exp"),
                        optimizer=xflwb.SGD(learning_rate=0.05, momentum=0.9))


def test_unseen_model_trains_on_mixed_fleet_and_matches_keras_fedavg(unseen, tmp_path):
    """10 rounds, 2 Android + 2 iOS devices, Dirichlet(0.5): ≥ 90 %, and the same run as an
    all-Keras FedAvg loop (same partitions, seeds, batches) lands within 2 points."""
    rounds, local_epochs, seed = 10, 2, 0
    with xflwb.Workbench(data_dir=tmp_path / "xfl", port=0) as wb:
        wb.publish(unseen)
        session = wb.train("unseen_cnn", rounds=rounds, min_clients=4,
                           local_epochs=local_epochs, round_timeout=120)
        fleet = wb.spawn_devices(android=2, ios=2, dataset="digits",
                                 partition="dirichlet:0.5", seed=seed)
        assert session.wait(timeout=400) == "finished"
        table = fleet.wait(timeout=60)
        pids = [p.pid for p in fleet.procs.values()]
        final = session.global_parameters()
        hist = session.history
    _no_process(pids)
    assert list(table.status) == ["finished"] * 4, table
    assert list(table.rounds_done) == [rounds] * 4
    wide = hist.pivot_table(index=["round", "platform"], columns="metric", values="value")
    assert (wide.xs("android", level="platform")["clients"] == 2).all()
    assert (wide.xs("ios", level="platform")["clients"] == 2).all()
    x, y = _all_digits()
    rt = runtime.load(unseen, "ios")
    rt.set_canonical_parameters(final)
    fleet_acc = rt.evaluate(x, y)[1]
    assert fleet_acc >= 0.90, fleet_acc

    # the same federation as a plain Keras FedAvg loop
    parts = [device_data("digits", "dirichlet:0.5", 4, k, seed=seed) for k in range(4)]
    keras_rt = runtime.load(unseen, "keras")
    glob = xflwb.bridge.manifest.initial_parameters(unseen.manifest)
    for rnd in range(rounds):
        updates = []
        for p in parts:
            keras_rt.set_canonical_parameters(glob)
            keras_rt.fit(p.x_train, p.y_train, epochs=local_epochs, seed=seed + rnd)
            updates.append((keras_rt.canonical_parameters(), len(p.x_train)))
        total = sum(n for _, n in updates)
        glob = [sum(u[k] * n for u, n in updates) / total for k in range(len(glob))]
    keras_rt.set_canonical_parameters(glob)
    keras_acc = keras_rt.evaluate(x, y)[1]
    assert abs(fleet_acc - keras_acc) <= 0.02, (fleet_acc, keras_acc)


def test_killed_device_does_not_stall_and_dropped_device_rejoins(unseen, tmp_path):
    with xflwb.Workbench(data_dir=tmp_path / "xfl", port=0) as wb:
        wb.publish(unseen)
        # min_clients=3: after the kill every round needs the dropper, so it must rejoin
        session = wb.train("unseen_cnn", rounds=6, min_clients=3, round_timeout=60)
        fleet = wb.spawn_devices(android=2, ios=2, dataset="digits", partition="iid", seed=1,
                                 slowdown=[3.0, 1.0, 1.0, 1.0],
                                 drop_prob=[0.0, 0.0, 0.0, 0.5])
        victim = fleet.ids[0]
        wait_until(lambda: fleet.table.set_index("id").loc[victim].status == "training", 120,
                   "the slow Android phone in mid-fit", max_pause=0.05,
                   describe=lambda: fleet.table)
        fleet.kill(victim)
        assert session.wait(timeout=240) == "finished"
        assert session.round == 6  # no stall: every round ran (counted, not timed)
        table = fleet.wait(timeout=60).set_index("id")
        failures = session.history.query("metric == 'failures' and platform == 'all'")
    assert table.loc[victim, "status"] == "failed"
    assert table.loc[victim, "error"] == "killed by SIGKILL"
    assert failures["value"].sum() >= 1  # the killed (and dropped) fits were failures
    dropper = table.loc[fleet.ids[3]]
    assert dropper.drops >= 1 and dropper.rounds_done >= 1, dropper  # came back and trained
    assert dropper.status == "finished"


def test_device_refuses_a_corrupt_model(unseen, tmp_path):
    with xflwb.Workbench(data_dir=tmp_path / "xfl", port=0) as wb:
        m = wb.publish(unseen)
        path = m["directory"] + "/" + unseen.manifest["platforms"]["android"]["file"]
        os.chmod(path, 0o644)
        with open(path, "r+b") as f:
            f.seek(100)
            f.write(b"\x00corrupted\x00")
        status_file = tmp_path / "status.json"
        proc = subprocess.run(
            [sys.executable, "-m", "xflwb", "device", "--backend", wb.url, "--platform",
             "android", "--data-type", "digits", "--dataset", "digits", "--num-partitions",
             "2", "--partition-id", "1", "--cache-dir", str(tmp_path / "cache"),
             "--status-file", str(status_file), "--max-wait", "5"],
            capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    status = json.loads(status_file.read_text())
    assert status["status"] == "failed"
    assert "CorruptModelError" in status["error"] and "sha256" in status["error"]
    # the device's log keeps the traceback (log.exception), so a failure can be traced
    assert re.search(r"device \d+ failed: .*\nTraceback \(most recent call last\):\n(.|\n)*"
                     r"CorruptModelError", proc.stderr), proc.stderr[-3000:]
    assert not (tmp_path / "cache" / "unseen_cnn" / "unseen_cnn-v1.tflite").exists()


#: the devices' own entry point (what a fleet launches) and the command line's spelling
ENTRY_POINTS = {"python -m xflwb.devices": ["-m", "xflwb.devices"],
                "xflwb device": ["-m", "xflwb", "device"]}


@pytest.mark.parametrize("prog", list(ENTRY_POINTS))
def test_device_entry_points_reject_bad_arguments(prog, tmp_path):
    proc = subprocess.run(
        [sys.executable, *ENTRY_POINTS[prog], "--backend", "http://127.0.0.1:9",
         "--platform", "ios", "--partition", "dirichlet:-1"],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "dirichlet" in proc.stderr
    assert f"{prog}: error: bad partition spec 'dirichlet:-1'" in proc.stderr, proc.stderr
    with pytest.raises(ValueError, match="at least one device"):
        xflwb.devices.fleet.Fleet("http://x", tmp_path)


def test_fleet_partitions_once_and_hands_each_device_its_rows(tmp_path):
    """The fleet computes every device's rows once (``--partition-file``, this run's own
    file), so no device imports the partitioners; what a device reads is what it would
    have computed (``tests/test_light_imports.py``)."""
    import numpy as np

    fleet = xflwb.devices.fleet.Fleet("http://127.0.0.1:9", tmp_path / "f", android=1, ios=2,
                                      partition="dirichlet:0.5", seed=4)
    try:
        fleet.start()
        argv = [fleet.procs[i].args for i in fleet.ids]
    finally:
        fleet.stop()
    files = {a[a.index("--partition-file") + 1] for a in argv}
    assert len(files) == 1 and fleet.run_id in next(iter(files)), files
    with np.load(next(iter(files))) as f:
        rows = [f[f"arr_{k}"] for k in range(3)]
    expected = xflwb.devices.partition.dataset_indices("digits", "dirichlet:0.5", 3, 4)
    assert all(np.array_equal(a, b) for a, b in zip(rows, expected, strict=True))


def test_fleet_launches_the_devices_own_entry_point(tmp_path):
    """Each device process runs ``python -m xflwb.devices``, not the command line: a device
    that dies at start-up (a dataset typo) says so in the entry point's own words."""
    fleet = xflwb.devices.fleet.Fleet("http://127.0.0.1:9", tmp_path / "f", android=1,
                                      dataset="digit").start()
    try:
        row = fleet.wait(timeout=120).iloc[0]
        args = fleet.procs[fleet.ids[0]].args
    finally:
        fleet.stop()
    assert args[1:3] == ["-m", "xflwb.devices"] and "xflwb.cli" not in " ".join(args), args
    assert row.status == "failed", row
    assert row.error.startswith("exited with code 2: python -m xflwb.devices: error: "), row.error
    assert "'digit'" in row.error, row.error
