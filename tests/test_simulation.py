"""Flower Simulation Engine (Ray): the same runtimes and strategy as the phone path."""

from __future__ import annotations

import json
import re

import keras
import numpy as np
import pytest

import xflwb
from tests.conftest import digits_cnn
from tests.support import assert_same_run, wait_until
from xflwb.bridge import params, runtime
from xflwb.devices import datasets
from xflwb.sessions.registry import Registry
from xflwb.simulation import SimulationConfig


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    return xflwb.export(digits_cnn(21), name="sim_cnn", data_type="digits",
                        out_dir=tmp_path_factory.mktemp("exp"),
                        optimizer=xflwb.SGD(learning_rate=0.05, momentum=0.9))


# -- configuration: bad input fails at the call, with the fix ---------------------------------
@pytest.mark.parametrize(("kwargs", "match"), [
    ({}, "needs clients"),
    ({"android": -1, "ios": 2}, "android must be a non-negative integer"),
    ({"android": 2, "fraction_fit": 1.5}, r"fraction_fit must be a number in \(0, 1\]"),
    ({"android": 2, "fraction_fit": 0.0}, r"fraction_fit must be a number in \(0, 1\]"),
    ({"android": 2, "min_clients": 3}, "min_clients must be in 1..2"),
    ({"android": 2, "partition": "zipf:2"}, "zipf"),
    ({"android": 2, "dataset": "imagenet"}, "unknown dataset"),
    ({"android": 2, "strategy": "fedprox9"}, "strategy must be one of"),
    ({"android": 2, "rounds": 0}, "rounds must be a positive integer"),
    ({"android": 2, "backend_config": "ray"}, "backend_config must be a dict"),
    ({"android": 2, "rounds": True}, "rounds must be a positive integer.*got True"),
    ({"android": 2, "round_timeout": float("nan")}, "round_timeout must be a positive number"),
    ({"android": 2, "drop_prob": 1.0}, r"drop_prob must be a number in \[0, 1\)"),
])
def test_config_rejects_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SimulationConfig(**kwargs)


def test_config_defaults_and_platform_order():
    cfg = SimulationConfig(android=3, ios=2, fraction_fit=0.4)
    assert cfg.fraction_evaluate == 0.4 and cfg.min_clients == 2 and cfg.num_clients == 5
    assert [cfg.platform_of(i) for i in range(5)] == ["android"] * 3 + ["ios"] * 2
    assert SimulationConfig(ios=1).min_clients == 1


def test_missing_platform_artifact_is_named(tmp_path):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax")])
    res = xflwb.export(model, name="android_only", data_type="t", out_dir=tmp_path / "a",
                       platforms=("android",))
    with pytest.raises(ValueError, match=r"no ios artifact.*ios=0"):
        xflwb.simulate(res, android=1, ios=1, data_dir=tmp_path / "d")
    with pytest.raises(ValueError, match=r"no published model named .never_published."):
        xflwb.simulate("never_published", android=1, data_dir=tmp_path / "d")


# -- no hidden state: nobody keeps a simulation's database open once it is done -----------
def open_db_files(data_dir) -> list[str]:
    """The registry database files (SQLite: the db, its -wal and -shm) this process holds
    open: what a registry or session manager nobody closed leaves behind."""
    import psutil

    db = str((data_dir / "xflwb.db").resolve())
    return sorted(f.path for f in psutil.Process().open_files() if f.path.startswith(db))


def test_a_refused_simulation_leaves_no_database_open(tmp_path):
    with pytest.raises(ValueError, match="no published model named"):
        xflwb.simulate("never_published", android=1, data_dir=tmp_path / "d")
    assert (tmp_path / "d" / "xflwb.db").exists()  # the registry was opened to look
    assert open_db_files(tmp_path / "d") == []


#: the seeded run ``attached`` starts twice and ``test_compression_sim``'s end-to-end check
#: once more, compressed: 3 of 4 clients a round (fraction_fit 0.75), so the seeded draw of
#: who trains is part of what two runs must agree on
ATTACHED_RUN = {"android": 2, "ios": 2, "rounds": 2, "fraction_fit": 0.75, "seed": 1,
                "progress": False}


@pytest.fixture(scope="module")
def attached(export, tmp_path_factory, shared_ray_head):
    """One seeded configuration run twice on the run's shared Ray head, in one data
    directory: first through its GCS address, ``xflwb.simulate(export)`` waiting; then
    through Ray Client (``ray://``), by the published name, ``wait=False`` then ``wait()``.
    Several tests read these two runs (databases held open, attaching, determinism, no
    virtual clock, the float32 reference of compression); what the process held open at
    each step is recorded as it happens."""
    data = tmp_path_factory.mktemp("attached") / "d"
    seen: dict = {}
    first = xflwb.simulate(export, data_dir=data, timeout=600,
                           ray_address=shared_ray_head["gcs"], **ATTACHED_RUN)
    seen["after wait=True"] = open_db_files(data)
    seen["first status"], seen["first history rows"] = first.status, len(first.history)
    seen["after reads"] = open_db_files(data)
    running = xflwb.simulate("sim_cnn", data_dir=data, wait=False,
                             ray_address=shared_ray_head["client"], **ATTACHED_RUN)
    seen["while running"] = open_db_files(data)
    seen["second wait"] = running.wait(timeout=600)
    seen["after wait()"] = open_db_files(data)
    return {"data": data, "runs": [first, running], "seen": seen}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_simulations_hold_no_database_open_once_done(attached):
    """``xflwb.simulate`` keeps no manager per data directory: its handle owns one, closed
    once the simulation ended (``wait=True``, or ``wait()``); handles stay readable after.
    (A Workbench's simulations run on its own manager, closed by ``wb.stop()``: checked in
    ``test_fidelity_simulation_matches_process_fleet``.)"""
    seen = attached["seen"]
    assert seen["after wait=True"] == []
    assert seen["first status"] == "finished" and seen["first history rows"] > 0  # readable …
    assert seen["after reads"] == []  # … holding nothing open between reads
    assert seen["while running"], "a running simulation's handle reads through its registry"
    first, running = attached["runs"]
    assert seen["second wait"] == "finished", running.info["error"]
    assert seen["after wait()"] == []
    assert first.id != running.id and len(running.global_parameters()) == 4
    assert open_db_files(attached["data"]) == []


# -- the client a Ray worker runs, without Ray ------------------------------------------------
def _spec(export, android=1, ios=1, partition="iid"):
    from xflwb.simulation import client

    blob, sha = client.make_bundle(export.manifest, ["android", "ios"])
    return client.ClientSpec(bundle=blob, bundle_sha=sha, android=android, ios=ios,
                             dataset="digits", partition=partition, seed=3,
                             test_fraction=0.2)


def test_sim_client_trains_the_real_artifacts_in_platform_layout(export):
    from flwr.app import RecordDict

    from xflwb.flower_legacy import EvaluateIns, FitIns, Parameters
    from xflwb.simulation import client

    spec = _spec(export)
    canonical = [np.asarray(a) for a in xflwb.bridge.manifest.initial_parameters(
        export.manifest)]
    for pid, platform in ((0, "android"), (1, "ios")):
        state = RecordDict()
        c = client.SimClient(spec, pid, state)
        props = c.get_properties(None).properties
        assert props == {"platform": platform, "partition_id": pid}
        arrays = params.to_platform(canonical, export.manifest, platform)
        ins = FitIns(Parameters(tensors=params.encode_tensors(arrays, "raw"), tensor_type="ND"),
                     {"local_epochs": 1})
        res = c.fit(ins)
        back, codec = params.decode_tensors(res.parameters.tensors)
        assert codec == "raw" and res.parameters.tensor_type == "ND"
        updated = params.from_platform(back, export.manifest, platform)
        assert any(not np.allclose(u, a) for u, a in zip(updated, canonical, strict=True))
        # the same update a virtual phone computes: same data, same seed (seed + rounds done)
        x, y, xt, _ = client.client_data(spec, pid)
        rt = runtime.load(export, platform)
        rt.set_parameters(arrays)
        rt.fit(x, y, epochs=1, seed=spec.seed)
        for got, want in zip(back, rt.get_parameters(), strict=True):
            np.testing.assert_allclose(np.asarray(got).ravel(), np.asarray(want).ravel(),
                                       atol=1e-5)
        assert res.num_examples == len(x)
        c.fit(ins)
        assert int(state.config_records["xflwb"]["rounds_done"]) == 2
        npy = FitIns(Parameters(tensors=params.encode_tensors(arrays, "npy"),
                                tensor_type="ndarray"), {"local_epochs": 1})
        assert params.decode_tensors(c.fit(npy).parameters.tensors)[1] == "npy"
        ev = c.evaluate(EvaluateIns(ins.parameters, {}))
        assert ev.num_examples == len(xt) and 0 <= ev.metrics["accuracy"] <= 1
    # a dropout is a failed fit (non-OK status), counted as an attempt but not as a round
    from dataclasses import replace

    state = RecordDict()
    dropper = client.SimClient(replace(spec, drop_prob=0.999), 0, state)
    res = dropper.fit(ins)
    assert res.status.code != client.Code.OK and res.num_examples == 0
    assert dict(state.config_records["xflwb"]) == {"rounds_done": 0, "attempts": 1}
    # one runtime per worker and platform, reused by every client and round
    assert client.runtime_for(spec, "ios") is client.runtime_for(spec, "ios")


def test_client_data_matches_virtual_device_data():
    from xflwb.devices.partition import device_data
    from xflwb.simulation import client

    spec = client.ClientSpec(bundle={}, bundle_sha="x", android=3, ios=2, dataset="digits",
                             partition="dirichlet:0.5", seed=4, test_fraction=0.2)
    for pid in range(5):
        want = device_data("digits", "dirichlet:0.5", 5, pid, seed=4)
        got = client.client_data(spec, pid)
        for a, b in zip(got, (want.x_train, want.y_train, want.x_test, want.y_test),
                        strict=True):
            np.testing.assert_array_equal(a, b)


# -- registry: a simulation never takes phones nor seeds a phone session's resume -------------
def test_simulations_are_invisible_to_phone_sessions(export, tmp_path):
    reg = Registry(tmp_path / "d")
    model = reg.publish(export)
    sim = reg.create_session(model, {"engine": "simulation", "rounds": 1})
    reg.update_session(sim, status="running")
    reg.add_checkpoint(sim, model, 1, tmp_path / "sim.npz")
    assert reg.active_session_for("sim_cnn") is None
    assert reg.latest_checkpoint("sim_cnn", model["version"]) is None
    assert reg.latest_checkpoint("sim_cnn", session_id=sim)["round"] == 1
    phone = reg.create_session(model, json.loads(json.dumps({"rounds": 1})))
    reg.update_session(phone, status="running")
    assert reg.active_session_for("sim_cnn")["id"] == phone
    reg.close()


# -- end to end on Ray ------------------------------------------------------------------------
def _accuracy(export, parameters):
    d = datasets.load("digits")
    x, y = np.concatenate([d.x_train, d.x_test]), np.concatenate([d.y_train, d.y_test])
    rt = runtime.load(export, "ios")
    rt.set_canonical_parameters(parameters)
    return rt.evaluate(x, y)[1]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_fidelity_simulation_matches_process_fleet(export, tmp_path, shared_ray):
    """Same export, partitions and seeds: the Simulation Engine run and the fleet of device
    processes speaking the phone protocol end within 1 accuracy point (issue 6). The
    Workbench's registry is open while it runs and closed by its stop, the simulation's
    handle readable after, holding nothing open."""
    rounds, seed, partition = 4, 0, "dirichlet:0.5"
    with xflwb.Workbench(data_dir=tmp_path / "xfl", port=0) as wb:
        wb.publish(export)
        session = wb.train("sim_cnn", rounds=rounds, min_clients=4, round_timeout=120)
        fleet = wb.spawn_devices(android=2, ios=2, dataset="digits", partition=partition,
                                 seed=seed)
        assert session.wait(timeout=400) == "finished"
        fleet.wait(timeout=60)
        fleet_params = session.global_parameters()
        fleet_hist = session.history
        # the export itself (published above: publishing it again is a no-op)
        sim = wb.simulate(export, android=2, ios=2, dataset="digits", partition=partition,
                          rounds=rounds, seed=seed, ray_address=shared_ray)
        assert sim.wait(timeout=600) == "finished", sim.info["error"]
        sim_params = sim.global_parameters()
        sim_hist = sim.history
        assert list(wb.session_table.status) == ["finished", "finished"]
        # a Workbench's simulations run on its own manager: its registry serves while it
        # runs, and wb.stop() (leaving the block) closes it
        assert open_db_files(wb.data_dir), "the workbench's registry serves while it runs"
    assert open_db_files(wb.data_dir) == []
    assert sim.status == "finished" and open_db_files(wb.data_dir) == []
    wide = sim_hist.pivot_table(index=["round", "platform"], columns="metric", values="value")
    assert (wide.xs("android", level="platform")["clients"] == 2).all()
    assert (wide.xs("ios", level="platform")["clients"] == 2).all()
    assert sorted(sim_hist["round"].unique()) == list(range(1, rounds + 1))
    # per-platform accuracy straight from the simulated clients' EvaluateRes
    acc = sim_hist.query("metric == 'accuracy'").set_index(["round", "platform"])["value"]
    assert {"android", "ios", "all"} <= set(acc.index.get_level_values("platform"))
    fleet_acc = fleet_hist.query("metric == 'accuracy' and platform == 'all'")
    assert abs(acc.loc[(rounds, "all")] - fleet_acc["value"].iloc[-1]) <= 0.01
    a_fleet, a_sim = _accuracy(export, fleet_params), _accuracy(export, sim_params)
    assert a_sim > 0.5 and abs(a_sim - a_fleet) <= 0.01, (a_sim, a_fleet)
    # 4 clients × 4 rounds of fit + evaluate on the Ray workers (one per CPU of the Ray
    # it started: at most 2 here): each worker loaded each platform's runtime at most once
    log = (tmp_path / "xfl" / "logs" / f"session-{sim.id}.log").read_text()
    for platform in ("android", "ios"):
        loads = re.findall(rf"xflwb worker (\d+): loaded {platform} runtime", log)
        assert 1 <= len(loads) <= 2 and len(set(loads)) == len(loads), (platform, loads)


@pytest.fixture(scope="module")
def via_magic(ip, export, shared_ray, tmp_path_factory):
    """``ATTACHED_RUN`` once more, started by ``%xfl_simulate`` with int8 up and fp16 down:
    the magic's run (partial participation: 3 of 4 clients a round) is the compressed run
    compared with ``attached``'s float32 one. Returns (the session, what the magic printed)."""
    import contextlib
    import io

    ip.user_ns["sim_export"] = export
    line = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in ATTACHED_RUN.items()
                    if k != "progress")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        session = ip.run_line_magic(
            "xfl_simulate", f"sim_export {line} --compression up=int8,down=fp16 "
            f"--data-dir {tmp_path_factory.mktemp('magic') / 'd'} --ray-address {shared_ray}")
    return session, out.getvalue()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_xfl_simulate_magic_partial_participation(ip, via_magic, tmp_path, capsys):
    session, out = via_magic
    assert "2 Android + 2 iOS" in out and ip.user_ns["sim_cnn_simulation"] is session
    assert session.wait(timeout=600) == "finished", session.info["error"]
    hist = session.history
    clients = hist.query("metric == 'clients' and platform == 'all'")["value"]
    assert list(clients) == [3.0, 3.0]  # three of the four each round
    assert len(session.global_parameters()) == 4
    from xflwb.widgets.dashboard import snapshot_html

    assert "simulated 2 Android + 2 iOS clients" in snapshot_html(session)
    ip.run_line_magic("xfl_simulate", "--help")
    assert "Simulation Engine" in capsys.readouterr().out
    from xflwb.magics import XflMagicError

    with pytest.raises(XflMagicError, match="needs clients"):
        ip.run_line_magic("xfl_simulate", f"sim_export --rounds 1 --data-dir {tmp_path / 'e'}")
    assert not (tmp_path / "e").exists()  # bad options publish nothing


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_cli_simulate_writes_history_and_never_overwrites(export, tmp_path, shared_ray,
                                                        capsys):
    import subprocess
    import sys

    import pandas as pd

    out = tmp_path / "history.csv"
    cmd = [sys.executable, "-m", "xflwb", "simulate", str(export.directory), "--android", "2",
           "--ios", "2", "--rounds", "2", "--drop-prob", "0.5", "--data-dir",
           str(tmp_path / "d"), "--out", str(out), "--ray-address", shared_ray]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "finished, round 2 (finished all 2 rounds)" in proc.stdout and "android" in proc.stdout
    assert re.search(r"round: 100%.*2/2", proc.stderr), proc.stderr[-2000:]  # tqdm bar
    assert not re.search(r"^\s*(all|android|ios)\s.*\d\.0\b", proc.stdout, re.MULTILINE), \
        proc.stdout  # counts print as integers, not 2.0
    hist = pd.read_csv(out)
    assert {"android", "ios", "all"} <= set(hist.platform) and hist["round"].max() == 2
    # dropouts: seeded per client and attempt, failures for Flower, the rest aggregated
    fails = hist.query("metric == 'failures' and platform == 'all'")["value"].tolist()
    clients = hist.query("metric == 'clients' and platform == 'all'")["value"].tolist()
    want = [sum(np.random.default_rng([0, pid, r]).random() < 0.5 for pid in range(4))
            for r in range(2)]
    assert fails == want and [c + f for c, f in zip(clients, fails, strict=True)] == [4, 4]
    # the refusals, in this process (the command's entry point ran above): the same
    # arguments again, then no clients
    from xflwb import cli

    capsys.readouterr()
    assert cli.main(cmd[3:]) == 2 and "never overwritten" in capsys.readouterr().err
    assert cli.main(["simulate", "sim_cnn", "--data-dir", str(tmp_path / "d")]) == 2
    assert "needs clients" in capsys.readouterr().err


def test_ray_client_server_failure_is_asked_again(monkeypatch):
    """A Ray Client cluster whose per-client server fails to start (transient) is asked
    again; any other connection error, or a failure that persists, is raised as is."""
    from xflwb.simulation import server

    monkeypatch.setattr(server.time, "sleep", lambda _s: None)

    class Cluster:  # stands in for the ``ray`` module at connect time only
        def __init__(self, failures: list[Exception]) -> None:
            self.failures, self.inits, self.shutdowns = failures, 0, 0

        def init(self, **_kwargs) -> None:
            self.inits += 1
            if self.failures:
                raise self.failures.pop(0)

        def shutdown(self) -> None:
            self.shutdowns += 1

    transient = ConnectionAbortedError("Initialization failure from server:\nRuntimeError: "
                                       "Starting Ray client server failed. See ...")
    flaky = Cluster([transient, transient])
    server._connect(flaky, {"address": "ray://127.0.0.1:10001"})
    assert (flaky.inits, flaky.shutdowns) == (3, 2)
    broken = Cluster([transient] * server._CLIENT_SERVER_RETRIES)
    with pytest.raises(ConnectionAbortedError, match="Starting Ray client server failed"):
        server._connect(broken, {"address": "ray://127.0.0.1:10001"})
    assert broken.inits == server._CLIENT_SERVER_RETRIES
    other = Cluster([ConnectionAbortedError("version mismatch")])
    with pytest.raises(ConnectionAbortedError, match="version mismatch"):
        server._connect(other, {"address": "ray://127.0.0.1:10001"})
    assert other.inits == 1


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_stop_ends_the_simulation_and_its_ray_processes(export, tmp_path):
    """On its own Ray (not ``shared_ray``): stopping must end the Ray the simulation started."""
    import os

    # one client a platform: the smallest fleet whose first round shows the run is under way
    sim = xflwb.simulate(export, android=1, ios=1, rounds=500, data_dir=tmp_path / "d",
                         wait=False)
    def first_round() -> bool:
        if sim.round >= 1:
            return True
        if sim.status != "running":  # ended: no round will come
            pytest.fail(f"the simulation is {sim.status}: {sim.info['error']}")
        return False

    wait_until(first_round, 300, "the simulation's first round",
               describe=lambda: sim.info["error"])
    pid = sim.info["pid"]
    sim.stop()
    assert sim.status == "stopped"
    def group_gone() -> bool:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return True
        return False

    # nothing left of its process group (Ray) once reaped
    wait_until(group_gone, 20, f"the stopped simulation's process group {pid} to end")
    # what it learnt so far is kept
    assert len(sim.global_parameters()) == 4 and sim.round >= 1
    assert "simulated android=1 ios=1" in repr(sim)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_attaches_to_an_existing_ray_cluster(attached, shared_ray_head):
    """``ray_address`` joins a running cluster (GCS address, then Ray Client ``ray://``):
    artifacts travel through the object store, the cluster outlives the simulation, and
    both ways give the same model (same partitions, seeds and batches). The cluster is the
    run's shared head (its start-up is another test's subject)."""
    import subprocess
    import sys
    from pathlib import Path

    ray = str(Path(sys.executable).with_name("ray"))
    runs = attached["runs"]
    for sim, address in zip(runs, (shared_ray_head["gcs"], shared_ray_head["client"]),
                            strict=True):
        assert sim.status == "finished", sim.info["error"]
        assert sim.info["config"]["ray_address"] == address
    status = subprocess.run([ray, "status", "--address", shared_ray_head["gcs"]],
                            capture_output=True, text=True, timeout=120)
    assert status.returncode == 0 and "Active" in status.stdout  # still up
    a, b = (sim.global_parameters() for sim in runs)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_allclose(x, y, atol=1e-6)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_same_seed_gives_the_same_history_and_model(attached):
    """Synchronous rounds without the virtual clock are deterministic for a seed: who
    trains, every metric and the model (with the virtual clock:
    ``test_virtual_rounds.py``)."""
    a, b = attached["runs"]
    assert_same_run(a, b)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_without_profiles_there_is_no_virtual_clock(attached):
    h = attached["runs"][0].history
    assert not h.metric.isin(["sim_seconds", "stragglers", "selected"]).any()
    # fraction_fit 0.75 of 4: three clients trained each round
    clients = h.query("metric == 'clients' and platform == 'all'")["value"].tolist()
    assert clients == [3.0, 3.0]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_simulation_with_int8_up_and_fp16_down_sends_fewer_bytes(attached, via_magic):
    """The same seeded run as ``attached``'s float32 one, with int8 up and fp16 down (the
    magic's run): the same clients train, each sends and receives fewer bytes (the
    clients' codecs: ``test_compression_sim.py``)."""
    platforms = ["android", "ios"]
    plain, small = attached["runs"][0], via_magic[0]
    assert small.wait(timeout=600) == "finished", small.info["error"]
    assert plain.status == small.status == "finished"
    assert small.info["config"]["compression"] == {"up": "int8", "down": "fp16"}

    def per(history, metric):
        rows = history[(history.metric == metric) & history.platform.isin(platforms)]
        return rows.groupby("platform")["value"].sum()

    for platform in platforms:
        f32_up, f32_down = per(plain.history, "bytes_up")[platform], per(
            plain.history, "bytes_down")[platform]
        up, down = per(small.history, "bytes_up")[platform], per(
            small.history, "bytes_down")[platform]
        assert f32_up / up >= 3.5, (platform, f32_up, up)  # int8: ~3.9× at block 256
        assert 1.9 <= f32_down / down <= 2.0, (platform, f32_down, down)  # fp16: 2× less
        # what float32 would have cost is recorded next to what was sent
        assert per(small.history, "bytes_up_float32")[platform] == f32_up
        assert per(small.history, "bytes_down_float32")[platform] == f32_down
    # every client asked trained in every round (none refused its compressed update): the
    # float32 run's clients, platform by platform
    def clients(history):
        return history.query("metric == 'clients'").set_index(["round", "platform"])[
            "value"].sort_index()

    assert clients(small.history).equals(clients(plain.history))
    assert clients(small.history).xs("all", level="platform").tolist() == [3.0, 3.0]
    assert len(clients(small.history)) == 2 * (len(platforms) + 1)
    acc = small.history.query("metric == 'accuracy' and platform == 'all'")["value"]
    assert np.isfinite(acc).all() and len(acc) == 2
