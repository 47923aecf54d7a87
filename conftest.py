"""Run order for ``make test`` (``pytest -n 2 --dist loadfile``): the longest files first.

xdist hands whole files to its two workers in collection order; a long file handed out
last leaves the other worker idle at the end. Sorting only moves files (a file's tests,
a notebook's cells, keep their order), so a serial ``pytest`` runs the same tests.
"""

from __future__ import annotations

from typing import Any

#: files that take a minute or more on 2 cores (Ray, notebooks, processes), longest first
LONG_FIRST = (
    "tests/test_benchmarks.py",  # every benchmark's smoke run: several minutes
    "tests/test_simulation.py", "tests/test_experiment.py", "tests/test_secagg.py",
    "notebooks/03-non-iid-and-stragglers.ipynb", "notebooks/04-simulation-engine.ipynb",
    "tests/test_demo.py", "tests/test_devices.py", "tests/test_lifeline.py",
    "tests/test_browser.py", "tests/test_transfer_fleet.py", "tests/test_failures.py",
    "tests/test_models.py", "notebooks/05-transfer-learning.ipynb", "tests/test_privacy.py",
    # issue 20/21 files with real processes (sessions, Ray, devices, an HTTP server)
    "tests/test_checkpoints.py", "tests/test_interrupt.py", "tests/test_privacy_lineage.py",
    "tests/test_tracking.py", "tests/test_http_limits.py", "tests/test_revocation.py",
    "tests/test_export_warnings.py", "tests/test_dashboard.py",
    # issue 23/24 files that start simulations or phone sessions
    "tests/test_virtual_rounds.py", "tests/test_sim_fedbuff.py", "tests/test_compression_sim.py",
    "tests/test_fedbuff.py", "tests/test_fairness_sessions.py",
    "tests/test_virtual_rounds_phones.py", "tests/test_server.py",
    "tests/test_http_hardening.py",
)


def pytest_collection_modifyitems(config: Any, items: list[Any]) -> None:
    root = str(config.rootpath)

    def rank(item: Any) -> int:
        path = str(item.path).removeprefix(root).lstrip("/")
        return LONG_FIRST.index(path) if path in LONG_FIRST else len(LONG_FIRST)

    items.sort(key=rank)  # stable: the order inside each file is kept
