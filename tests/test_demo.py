"""`make demo`'s job, end to end on offline data (slow: real exports and three trainings)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from xflwb import demo


@pytest.fixture(scope="module")
def local_demo(tmp_path_factory):
    """``demo.run`` (2 epochs), then ``xflwb demo --local-only`` into the same directory:
    (its result, the bytes of each file it wrote, the CLI's finished process). One
    directory for both, so the second export (the CLI's) shows that a re-run never
    overwrites the first."""
    out_dir = tmp_path_factory.mktemp("demo")
    out = demo.run(out=out_dir, epochs=2, quiet=True)
    written = {name: (out_dir / name).stat().st_size if (out_dir / name).exists() else 0
               for name in ("runtimes.csv", "parity.csv", "training_loss.png")}
    proc = subprocess.run([sys.executable, "-m", "xflwb", "demo", "--local-only", "--out",
                           str(out_dir), "--epochs", "1"], capture_output=True, text=True,
                          timeout=600)
    return out, written, proc


@pytest.mark.slow
def test_demo_trains_every_runtime_alike(local_demo):
    out, written, proc = local_demo
    table = out["table"].set_index("runtime")
    assert list(table.index) == ["keras", "android", "ios"]
    assert out["export"].parity["ok"].all()
    assert (table["test_accuracy"] > 0.85).all(), table
    assert (table["test_accuracy_before"] < 0.3).all(), table
    assert float(table["train_loss_last"].max() - table["train_loss_last"].min()) < 1e-4
    assert all(size > 0 for size in written.values()), written
    # the CLI's run into the same directory: a second run never overwrites the first export
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert out["export"].version == 1
    assert f"exported {out['export'].name} v2 " in proc.stdout, proc.stdout[:2000]
    assert out["export"].paths["manifest"].exists()  # the first export is still there


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_federated_demo_reaches_90_percent_with_both_platforms(tmp_path):
    out = demo.run_federated(out=tmp_path, rounds=10, quiet=True)
    assert out["status"] == "finished"
    assert out["both_every_round"]
    assert min(out["accuracy"].values()) >= 0.90, out["accuracy"]
    assert abs(out["accuracy"]["android"] - out["accuracy"]["ios"]) < 0.01
    assert list(out["devices"].status) == ["finished"] * 4
    for name in ("history.csv", "devices.csv", "federated.png"):
        assert (tmp_path / name).stat().st_size > 0


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_activity_demo_trains_conv1d_on_sensor_windows_on_both_platforms(tmp_path):
    """The demo's workflow with a Conv1D activity model on the generated sensor dataset."""
    out = demo.run_federated(out=tmp_path, rounds=6, quiet=True, model="activity")
    assert out["status"] == "finished" and out["both_every_round"]
    assert out["export"].manifest["input"]["shape"] == [32, 3]
    assert out["export"].parity["ok"].all()
    # 6 classes: chance is 1/6; both platforms' artifacts agree on the global model
    assert min(out["accuracy"].values()) >= 0.75, out["accuracy"]
    assert abs(out["accuracy"]["android"] - out["accuracy"]["ios"]) < 0.01


@pytest.mark.slow
def test_cli_demo_prints_parity_table(local_demo):
    _, _, proc = local_demo
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "parity (Keras vs TFLite vs Core ML executor)" in proc.stdout
    assert "train_3_steps" in proc.stdout and "False" not in proc.stdout
