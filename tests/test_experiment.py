"""Headless experiments through papermill: parameters injected, results CSV per platform."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nbformat
import pandas as pd
import pytest
from papermill.exceptions import PapermillExecutionError

from xflwb import experiment

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "experiments" / "fedavg_digits.ipynb"

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def test_cli_grid_over_both_engines_writes_notebooks_and_platform_csv(tmp_path, shared_ray):
    """``xflwb experiment run --grid``: one grid over the process fleet and Flower's
    Simulation Engine (on the run's shared Ray head): parameters injected, the same results
    format with both platforms from both engines, a comparison plot, nothing overwritten."""
    proc = subprocess.run(
        [sys.executable, "-m", "xflwb", "experiment", "run", str(NOTEBOOK), "--out",
         str(tmp_path), "-p", "rounds", "1", "-p", "n_android", "1", "-p", "n_ios", "1",
         "-p", "ray_address", repr(shared_ray), "--grid", "engine=devices,simulation"],
        capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    executed = nbformat.read(tmp_path / "fedavg_digits-engine=simulation.ipynb", as_version=4)
    injected = [c for c in executed.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert injected and "rounds = 1" in injected[0].source and "n_ios = 1" in injected[0].source
    df = pd.read_csv(tmp_path / "results.csv")
    assert {"round", "platform", "metric", "value", "rounds", "n_android",
            "engine"} <= set(df.columns)
    assert sorted(df["engine"].unique()) == ["devices", "simulation"]
    assert df["run"].nunique() == 2 and df["round"].max() == 1
    for _, runs in df.groupby("engine"):
        assert {"android", "ios"} <= set(runs.platform)
        assert runs.query("metric == 'clients' and platform == 'all'")["value"].tolist() == [2]
    assert (tmp_path / "comparison.png").stat().st_size > 0
    # results are never overwritten
    again = subprocess.run(
        [sys.executable, "-m", "xflwb", "experiment", "run", str(NOTEBOOK), "--out",
         str(tmp_path), "-p", "rounds", "1", "--grid", "engine=devices,simulation"],
        capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "never overwritten" in again.stderr


def test_a_failing_notebook_cell_fails_the_run_with_its_exception(tmp_path):
    # the notebook's own check fails the run; papermill reports the cell's exception
    with pytest.raises(PapermillExecutionError) as failed:
        experiment.run(NOTEBOOK, tmp_path / "bad", {"rounds": 1, "engine": "cloud"})
    assert failed.value.ename == "ValueError"
    assert "engine must be 'devices' or 'simulation', got 'cloud'" in failed.value.evalue


def test_the_experiment_runs_fedbuff_on_devices(tmp_path):
    """``-p strategy fedbuff``: asynchronous versions on the process fleet (the results
    carry the version column)."""
    df = experiment.run(NOTEBOOK, tmp_path, {"rounds": 3, "n_android": 1, "n_ios": 1,
                                             "strategy": "fedbuff",
                                             "strategy_options": {"buffer_size": 1}})
    assert {"android", "ios"} <= set(df.platform)
    assert (df["version"] == df["round"]).all() and df["version"].max() == 3
    assert df.query("metric == 'staleness_max'")["value"].notna().any()


def test_privacy_utility_experiment_writes_the_accuracy_epsilon_curve(tmp_path, shared_ray):
    """experiments/privacy_utility.ipynb under a grid: one DP-free baseline and one private
    run per clipping norm; the curve has ε = ∞ for the baseline and a finite ε from the
    ledger for the private run, per platform."""
    nb = ROOT / "experiments" / "privacy_utility.ipynb"
    df = experiment.run(nb, tmp_path, {"rounds": 1, "n_android": 2, "n_ios": 2,
                                       "noise_multipliers": [0.0, 1.0], "fraction_fit": 1.0,
                                       "ray_address": shared_ray},
                        grid={"clipping_norm": [1.0]})
    assert set(df["noise_multiplier"]) == {0.0, 1.0}
    eps = df.query("metric == 'epsilon'")
    assert set(eps["noise_multiplier"]) == {1.0} and (eps["value"] > 0).all()
    curve = pd.read_csv(tmp_path / "privacy_utility-clipping_norm=1.0-results-privacy_utility.csv")
    assert {"android", "ios", "all"} <= set(curve.platform)
    assert (curve.query("noise_multiplier == 0")["epsilon"] == float("inf")).all()
    private = curve.query("noise_multiplier == 1.0")["epsilon"]
    assert private.between(0, 1e6).all()
    # the ledger's last ε is the curve's
    assert private.iloc[0] == pytest.approx(eps[eps["round"] == eps["round"].max()]["value"]
                                            .iloc[0])
    assert (tmp_path / "privacy_utility-clipping_norm=1.0-results-privacy_utility.png"
            ).stat().st_size > 0


def test_time_to_accuracy_experiment_compares_a_deadline_with_fedbuff(tmp_path, shared_ray):
    """experiments/time_to_accuracy.ipynb, tiny: both arms on a profiled fleet, simulated
    time in the results, the participation counts of the deadline arm, the plot."""
    nb = ROOT / "experiments" / "time_to_accuracy.ipynb"
    df = experiment.run(nb, tmp_path, {
        "n_android": 4, "n_ios": 4, "rounds": 2, "versions": 2, "fraction_fit": 0.5,
        "buffer_size": 2, "max_concurrency": 4, "deadline": 3600.0,
        "ios_slowdowns": ["lognormal:7.5,0.4"], "availability": "always",
        "ray_address": shared_ray})
    assert {"sync + deadline", "fedbuff"} <= set(df["arm"])
    sim = df.query("metric == 'sim_seconds' and platform == 'all'")
    assert set(sim["arm"]) == {"sync + deadline", "fedbuff"} and (sim["value"] > 0).all()
    sync = df.query("arm == 'sync + deadline' and platform != 'all'")
    assert {"selected", "stragglers", "dropouts"} <= set(sync["metric"])
    assert list(tmp_path.glob("*.png"))
