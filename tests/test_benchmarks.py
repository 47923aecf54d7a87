"""Every benchmark still runs: each script in ``benchmarks/`` that does not simulate is run
with ``--smoke`` (tiny sizes, seconds of work, the same code path and tables as a full run)
and must exit 0 and print its table; the simulating ones run in
``tests/test_benchmarks_sim.py`` (a separate file, so xdist can give it another worker).

Nothing else runs the benchmarks, so without this a benchmark breaks silently when the code
it measures changes, and the figures in ``benchmarks/README.md`` describe code that no longer
runs. No timing is asserted. The scripts are found by globbing ``benchmarks/*.py``, so a new
benchmark fails here until it has a ``--smoke`` flag and an entry in ``SMOKE``
(``tests/benchmark_smokes.py``, the one table both files read).
"""

from __future__ import annotations

import pytest

from tests.benchmark_smokes import (
    BENCHMARKS,
    OTHERS,
    SCRIPTS,
    SIMULATING,
    SMOKE,
    entry_for,
    flags,
    run_smoke,
)

pytestmark = pytest.mark.slow


def test_every_benchmark_has_a_smoke_entry():
    """A new benchmark cannot be forgotten: each script needs an entry, each entry a
    script, and the two files' parametrisations together run every script once."""
    assert SCRIPTS, f"no benchmarks found in {BENCHMARKS}"
    missing = sorted(set(SCRIPTS) - set(SMOKE))
    stale = sorted(set(SMOKE) - set(SCRIPTS))
    assert not missing, (f"benchmarks without a smoke entry: {missing}; add `--smoke` to each "
                         "and an entry to SMOKE in tests/benchmark_smokes.py")
    assert not stale, f"SMOKE names scripts that no longer exist: {stale}; remove them"
    assert sorted(OTHERS + SIMULATING) == SCRIPTS and not set(OTHERS) & set(SIMULATING)


@pytest.mark.parametrize("script", SCRIPTS)
def test_benchmark_declares_its_smoke_flags(script):
    """``--smoke`` everywhere; ``--ray-address`` / ``--workdir`` where the entry passes them
    (checked from the source, without running anything)."""
    entry = entry_for(script)
    found = flags(script)
    wanted = {"--smoke", *(["--ray-address"] if entry.ray else []),
              *(["--workdir"] if entry.workdir else [])}
    assert wanted <= found, (f"benchmarks/{script} does not declare {sorted(wanted - found)} "
                             "(argparse add_argument)")


@pytest.mark.parametrize("script", OTHERS)
def test_benchmark_smoke_run_prints_its_table(script, tmp_path, request):
    """``python benchmarks/X.py --smoke`` exits 0, prints its table and leaves the recorded
    results (benchmarks/, docs/) untouched."""
    run_smoke(script, tmp_path, request)
