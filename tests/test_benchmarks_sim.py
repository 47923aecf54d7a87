"""Every benchmark that simulates still runs: ``python benchmarks/X.py --smoke --ray-address
…`` on the suite's shared Ray head exits 0 and prints its table (the others, the entry
checks and the table of smoke runs: ``tests/test_benchmarks.py``,
``tests/benchmark_smokes.py``). A file of its own so xdist's ``--dist loadfile`` can run it
beside the non-simulating smokes. No timing is asserted.
"""

from __future__ import annotations

import pytest

from tests.benchmark_smokes import SIMULATING, run_smoke

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("script", SIMULATING)
def test_simulating_benchmark_smoke_run_prints_its_table(script, tmp_path, request):
    """``python benchmarks/X.py --smoke --ray-address … --workdir …`` exits 0, prints its
    table and leaves the recorded results (benchmarks/, docs/) untouched."""
    run_smoke(script, tmp_path, request)
