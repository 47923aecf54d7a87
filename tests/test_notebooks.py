"""The tutorial notebooks that train (03, 04, 05) run top to bottom, headless, at test sizes.

Each notebook's ``parameters`` cell takes papermill's overrides: fewer rounds and phones
than a reader's run, and the Simulation Engine notebook attaches to the run's shared Ray
head instead of starting its own. Every cell must run without an error (the notebooks'
own asserts included), which is what ``--nbval-lax`` checked when these ran at full size;
``notebooks/conftest.py`` keeps nbval from running them a second time. The quickstart
(01) and parity (02) notebooks have nothing to shrink and still run under nbval.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

#: notebook → the overrides of its parameters cell (the defaults are a reader's run)
SIZES = {
    # both skews of the sweep, then the straggler session: 2 rounds each instead of 3
    "03-non-iid-and-stragglers.ipynb": {"rounds": 2},
    # 2 + 2 simulated phones for 2 rounds instead of 10 + 10 for 3 (half train each round)
    "04-simulation-engine.ipynb": {"n_android": 2, "n_ios": 2, "rounds": 2},
    # one phone per platform for one round instead of two for two
    "05-transfer-learning.ipynb": {"n_android": 1, "n_ios": 1, "rounds": 1},
}


def test_notebooks_under_test_are_the_ones_nbval_skips():
    """Every notebook runs somewhere: those here are exactly the ones nbval is told to skip,
    and each has the parameters cell the overrides go to."""
    import runpy

    skipped = runpy.run_path(str(ROOT / "notebooks" / "conftest.py"))["collect_ignore"]
    assert sorted(skipped) == sorted(SIZES)
    for name, overrides in SIZES.items():
        nb = nbformat.read(ROOT / "notebooks" / name, as_version=4)
        cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
        assert len(cells) == 1, name
        for key in overrides:
            assert f"\n{key} = " in f"\n{cells[0].source}", (name, key)


@pytest.mark.parametrize("name", sorted(SIZES))
def test_notebook_runs_end_to_end(name, tmp_path, request):
    import papermill as pm

    params = dict(SIZES[name])
    if name.startswith("04-"):
        params["ray_address"] = request.getfixturevalue("shared_ray")
    out = tmp_path / name
    pm.execute_notebook(str(ROOT / "notebooks" / name), str(out), parameters=params,
                        cwd=str(tmp_path), progress_bar=False, log_output=False)
    executed = nbformat.read(out, as_version=4)
    injected = [c for c in executed.cells
                if "injected-parameters" in c.metadata.get("tags", [])]
    assert injected and all(f"{k} = " in injected[0].source for k in params), injected
    errors = [o for c in executed.cells if c.cell_type == "code"
              for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, errors
