"""Failures surface: a session whose every client fails, or whose fleet died, fails with
their reasons; ``wait`` says what a session waits for; the CLI exits non-zero; the dashboard
and report show each device's error and the failure count.

The model/data mismatches here get past the pre-start check on purpose (it refuses them in
``spawn_devices``/``simulate``): the failure paths must hold for what no check foresees.
"""

from __future__ import annotations

import gc
import os
import re
import subprocess
import sys

import keras
import pytest

import xflwb
from tests.conftest import SERVED_TOY_MANIFEST as MANIFEST
from tests.conftest import Phone, digits_cnn
from tests.conftest import toy_canonical as _canon
from tests.conftest import toy_fit_res as _res
from tests.support import wait_until
from xflwb.devices.fleet import Fleet
from xflwb.flower_legacy import Code, FitRes, Parameters, Status
from xflwb.sessions.flower_strategy import (
    AllClientsFailed,
    ClientFailure,
    CrossPlatformStrategy,
    failure_reason,
    summarize,
)
from xflwb.sessions.handle import SessionTimeout
from xflwb.sessions.registry import Registry
from xflwb.widgets.dashboard import Dashboard, report

pytestmark = pytest.mark.timeout(600)


def _failed(platform: str, cid: str, message: str) -> tuple[Phone, FitRes]:
    return (Phone(cid, platform),
            FitRes(status=Status(Code.FIT_NOT_IMPLEMENTED, message),
                   parameters=Parameters(tensors=[], tensor_type=""), num_examples=0,
                   metrics={}))


# -- the strategy's verdict, with Flower's own failure forms ----------------------------------
def test_a_round_where_every_client_fails_with_an_error_fails_with_their_reasons():
    reports = []
    s = CrossPlatformStrategy(MANIFEST, _canon(0), min_clients=1,
                              on_fit_round=lambda r, g: reports.append(r))
    failures = [_failed("android", "a1", "ValueError: x must have shape (N, 64), got (57, 8)"),
                _failed("ios", "i1", "ValueError: x must have shape (N, 64), got (43, 8)"),
                ClientFailure("android", "a2", RuntimeError("GrpcBridgeClosed"))]
    with pytest.raises(AllClientsFailed) as err:
        s.aggregate_fit(1, [], failures)
    msg = str(err.value)
    assert msg.startswith("all 3 clients selected for round 1 failed: ")
    # the two shape errors differ only in each device's sample count: one reason, twice
    assert "ValueError: x must have shape (N, 64), got (57, 8) (×2)" in msg
    assert "RuntimeError: GrpcBridgeClosed" in msg
    # the round is recorded (failures per platform, reasons) but not counted
    (r,) = reports
    assert r.failed == msg
    assert sorted(r.failures) == sorted([
        ("android", "a1", "ValueError: x must have shape (N, 64), got (57, 8)"),
        ("ios", "i1", "ValueError: x must have shape (N, 64), got (43, 8)"),
        ("android", "a2", "RuntimeError: GrpcBridgeClosed")])
    by = {(p, m): v for p, m, v in r.metrics}
    assert by[("all", "failures")] == 3 and by[("android", "failures")] == 2
    assert by[("ios", "failures")] == 1


def test_lost_clients_or_one_good_update_keep_the_session_going():
    s = CrossPlatformStrategy(MANIFEST, _canon(0), min_clients=1)
    lost = type("GrpcBridgeClosed", (Exception,), {})
    dropped = _failed("ios", "i", "dropped out (simulated, drop_prob)")
    # every client lost its connection or dropped out: phones come back, no verdict
    params_, _ = s.aggregate_fit(1, [], [ClientFailure("android", "a", lost()), dropped,
                                         ClientFailure("ios", "t", TimeoutError())])
    assert params_ is not None
    # an error, but another client's update arrived: the round counts
    s.aggregate_fit(2, [(Phone("a", "android"), _res(_canon(1), 10))],
                    [_failed("ios", "i", "ValueError: boom")])


def test_failure_reasons_read_every_form_flower_reports():
    sim = ValueError("Message contains an Error (reason: <class 'flwr.clientapp.client_app."
                     "ClientAppException'>:<'\nException ClientAppException occurred. "
                     "Message: Model provided has model identifier 'a tf', should be "
                     "'TFL3'\n'>). It originated during client-side execution of a message.")
    assert failure_reason(ClientFailure("android", "7", sim)) == (
        "android", "7", "Model provided has model identifier 'a tf', should be 'TFL3'", True)
    assert failure_reason(_failed("ios", "3", "")) == (
        "ios", "3", "status FIT_NOT_IMPLEMENTED", True)
    assert failure_reason(KeyError("k")) == ("unknown", "?", "KeyError: 'k'", True)
    assert summarize(["a", "b", "c", "d", "d", "e"], limit=2) == "d (×2); a; and 3 more"


# -- a phone session on the real virtual-device fleet ------------------------------------------
def test_phone_session_whose_every_device_fails_fails_with_their_errors(tmp_path):
    """Issue 11's case: an MLP taking 64 features, devices holding 8×8×1 digits."""
    keras.utils.set_random_seed(0)
    mlp = keras.Sequential([keras.Input((64,)), keras.layers.Dense(10, activation="softmax")])
    res = xflwb.export(mlp, name="mlp64", data_type="digits", out_dir=tmp_path / "e")
    with xflwb.Workbench(data_dir=tmp_path / "x", port=0) as wb:
        wb.publish(res)
        # the kernel drops the export, as a backend serving another process's export would
        # see it: Fleet.start below would otherwise refuse the mismatch up front (issue 21)
        del res
        gc.collect()
        session = wb.train("mlp64", rounds=2, min_clients=2, round_timeout=120)
        # nobody connected yet: the timeout says what the session waits for
        wait_until(lambda: session.progress.get("phase") == "waiting", 180,
                   "the session to wait", describe=lambda: session.progress)
        with pytest.raises(SessionTimeout) as err:
            session.wait(timeout=0.2)
        assert isinstance(err.value, TimeoutError)  # existing `except TimeoutError` works
        msg = str(err.value)
        assert f"session {session.id} is still at round 0/2 after 0.2 s" in msg
        assert "waiting for 2 clients before round 1 (min_clients=2); 0 connected" in msg
        assert "last device errors: none reported" in msg
        # the lower-level Fleet: wb.spawn_devices would refuse this mismatch up front
        fleet = Fleet(wb.url, tmp_path / "fleet", android=1, ios=1, dataset="digits").start()
        try:
            assert session.wait(timeout=300) == "failed"
            fleet.wait(timeout=60)
            table = fleet.table
        finally:
            fleet.stop()
        error = session.error
        assert error.startswith("all 2 clients selected for round 1 failed: ValueError: x "
                                "must have shape (N, 64) (Keras layout), got ("), error
        assert error.endswith("(×2)"), error
        assert session.round == 0  # the failed round does not count
        fails = session.failures
        assert sorted(fails.platform) == ["android", "ios"] and (fails["round"] == 1).all()
        assert fails.reason.str.contains("must have shape").all()
        assert (table.status == "failed").all()
        assert table.error.str.contains("(N, 64)", regex=False).all()

        # the dashboard and the report show the reason, the count and each device's error
        dash = Dashboard(session, fleet)
        assert "failed" in dash.header.value and "2 failed fits" in dash.header.value
        assert "2 of 2 devices failed" in dash.header.value
        assert "must have shape (N, 64)" in dash.header.value
        assert "<th>error</th>" in dash.devices.value
        assert dash.devices.value.count("must have shape (N, 64)") == 2
        assert "failed fits (last 2 of 2)" in dash.failures.value
        assert dash.progress.bar_style == "danger" and dash.progress.description == "round 0/2"
        html = report(session, fleet)._repr_html_()
        assert "2 failed fits" in html and "<th>error</th>" in html
        assert html.count("must have shape (N, 64)") >= 4  # header, 2 failed fits, 2 devices


@pytest.fixture(scope="module")
def digits_export(tmp_path_factory):
    """One digits CNN export for the tests below: each publishes it into its own registry
    and damages that copy (the export itself stays intact)."""
    return xflwb.export(digits_cnn(4), name="dying", data_type="digits",
                        out_dir=tmp_path_factory.mktemp("digits"))


def test_a_fleet_whose_devices_all_die_fails_its_session(digits_export, tmp_path):
    """The iPhone refuses a damaged download; the session waits for it (and says so); once
    the Android phone dies too, nothing can join: the session fails with both reasons."""
    res = digits_export
    with xflwb.Workbench(data_dir=tmp_path / "x", port=0) as wb:
        m = wb.publish(res)
        path = os.path.join(m["directory"], res.manifest["platforms"]["ios"]["file"])
        os.chmod(path, 0o644)
        with open(path, "r+b") as f:  # damaged on disk after publishing: sha256 differs
            f.seek(40)
            f.write(b"\x00damaged\x00")
        session = wb.train("dying", rounds=2, min_clients=2, round_timeout=120)
        fleet = wb.spawn_devices(android=1, ios=1, dataset="digits")
        try:
            wait_until(lambda: session.progress.get("connected") == 1
                       and "failed" in set(fleet.table.status), 180,
                       "android to join, ios to fail",
                       describe=lambda: (session.progress, fleet.table))
            with pytest.raises(SessionTimeout) as err:
                session.wait(timeout=0.2)
            msg = str(err.value)
            assert "waiting for 2 clients before round 1 (min_clients=2); 1 connected" in msg
            assert "last device errors: CorruptModelError: downloaded" in msg
            android = fleet.ids[0]
            fleet.kill(android)
            assert session.wait(timeout=120) == "failed"
        finally:
            fleet.stop()
    error = session.error
    assert error.startswith("all 2 devices of fleet 1 died: "), error
    assert "CorruptModelError" in error and "killed by SIGKILL" in error


# -- the Simulation Engine and `xflwb simulate` -------------------------------------------------
@pytest.mark.slow
def test_simulation_whose_every_client_fails_fails_and_the_cli_exits_non_zero(
        digits_export, tmp_path, shared_ray):
    res = digits_export  # simulated on Android only: its .tflite is the copy damaged below
    data = tmp_path / "d"
    reg = Registry(data)
    path = os.path.join(reg.publish(res)["directory"],
                        res.manifest["platforms"]["android"]["file"])
    reg.close()
    os.chmod(path, 0o644)
    with open(path, "wb") as f:  # the registry's copy is damaged: every client fails to load
        f.write(b"not a tflite model")
    proc = subprocess.run(
        [sys.executable, "-m", "xflwb", "simulate", res.name, "--android", "2", "--rounds",
         "2", "--data-dir", str(data), "--no-progress", "--ray-address", shared_ray],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, (proc.stdout, proc.stderr[-3000:])
    assert "all 2 clients selected for round 1 failed: " in proc.stderr
    assert "should be 'TFL3' (×2)" in proc.stderr
    reg = Registry(data)
    try:
        (row,) = reg.list_sessions()
        assert row["status"] == "failed" and row["error"].startswith("all 2 clients")
        assert [f["round"] for f in reg.get_failures(row["id"])] == [1, 1]
    finally:
        reg.close()


def test_failed_experiment_run_exits_non_zero_with_the_reason(tmp_path):
    notebook = os.path.join(os.path.dirname(__file__), "..", "experiments",
                            "fedavg_digits.ipynb")
    proc = subprocess.run(
        [sys.executable, "-m", "xflwb", "experiment", "run", notebook, "--out",
         str(tmp_path / "run"), "-p", "engine", "cloud"],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, (proc.stdout, proc.stderr[-3000:])
    assert re.search(r"the run failed in cell \d+: ValueError: engine must be 'devices' or "
                     r"'simulation', got 'cloud' \(executed notebook in ", proc.stderr)
    assert "Traceback" not in proc.stderr
