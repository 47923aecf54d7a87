"""Run order for ``make test`` and the selection of ``make test-fast``, from measured durations.

``tests/durations.json`` maps each test's node id to the seconds it took (setup + call +
teardown) in a full run; ``make durations`` measures it anew (commit the file it writes).

* ``make test`` (``pytest -n 2 --dist loadfile``): xdist hands whole files to its two
  workers in collection order, and a long file handed out last leaves the other worker idle
  at the end; so files run longest first (their recorded totals; a file not recorded yet
  goes first, as it may be long). Only files move: a file's tests, a notebook's cells, keep
  their order, so a serial ``pytest`` runs the same tests.
* ``make test-fast`` (``pytest --fast``): the inner loop, unit and property tests only:
  every test recorded at ``FAST_LIMIT`` seconds or less, and every test not recorded yet
  (the one being written), except notebooks and the ``slow``, ``browser`` and ``fuzz``
  marks; the rest is deselected. Tests after an expensive shared fixture's first user look
  cheap in the record; files whose fast part still pays such a fixture are listed in
  ``NOT_FAST``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

DURATIONS = Path(__file__).with_name("tests") / "durations.json"
#: first on every test process's ``PYTHONPATH`` (set below, at import, before xdist starts
#: its workers): its ``sitecustomize`` defers an import every Ray process pays for and none
#: uses (see the module's docstring)
BOOT = Path(__file__).with_name("tests") / "_boot"
os.environ["PYTHONPATH"] = os.pathsep.join(
    [str(BOOT), *(p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p)])
#: a test recorded slower than this (seconds) is left out of ``--fast``
FAST_LIMIT = 1.0
#: files whose cheap-looking tests share a fixture that starts a server, devices, Ray or an
#: export (its first user carried the cost in the record): none of their tests is fast
NOT_FAST = (
    "tests/test_export.py", "tests/test_export_warnings.py", "tests/test_models.py",
    "tests/test_trust.py", "tests/test_server.py", "tests/test_server_cli_magics.py",
    "tests/test_http_limits.py", "tests/test_http_hardening.py", "tests/test_security.py",
    "tests/test_honest_start.py", "tests/test_revocation.py", "tests/test_failures.py",
    "tests/test_privacy_lineage.py", "tests/test_dashboard.py", "tests/test_quiet_cli.py",
    "tests/test_validated_once.py", "tests/test_magics_cli.py", "tests/test_sim_fedbuff.py",
    "tests/test_tracking.py", "tests/test_checkpoints.py", "tests/test_fedbuff.py",
)


def pytest_addoption(parser: Any) -> None:
    group = parser.getgroup("xflwb")
    group.addoption("--fast", action="store_true",
                    help="unit and property tests only (make test-fast): tests recorded in "
                         "tests/durations.json at FAST_LIMIT s or less, or not recorded yet")
    group.addoption("--record-durations", metavar="PATH",
                    help="write each test's seconds (setup + call + teardown) to PATH "
                         "(make durations)")


def _recorded() -> dict[str, float]:
    try:
        return {str(k): float(v) for k, v in json.loads(DURATIONS.read_text()).items()}
    except (OSError, ValueError, AttributeError):  # no record yet: order as collected
        return {}


def _file_of(nodeid: str) -> str:
    return nodeid.split("::", 1)[0]


def pytest_collection_modifyitems(config: Any, items: list[Any]) -> None:
    recorded = _recorded()
    if config.getoption("fast"):
        keep, drop = [], []
        for item in items:
            path = _file_of(item.nodeid)
            slow = (path.endswith(".ipynb") or path in NOT_FAST
                    or any(item.get_closest_marker(m) for m in ("slow", "browser", "fuzz"))
                    or recorded.get(item.nodeid, 0.0) > FAST_LIMIT)
            (drop if slow else keep).append(item)
        if drop:
            config.hook.pytest_deselected(items=drop)
            items[:] = keep
    totals: dict[str, float] = {}
    for nodeid, seconds in recorded.items():
        totals[_file_of(nodeid)] = totals.get(_file_of(nodeid), 0.0) + seconds
    unknown = float("inf")  # a new file may be long: hand it out first
    items.sort(key=lambda item: -totals.get(_file_of(item.nodeid), unknown))  # stable


class _Recorder:
    """Sums each test's phases as the reports arrive (on the xdist controller too)."""

    def __init__(self, path: str) -> None:
        self.path, self.seconds = Path(path), {}  # type: Path, dict[str, float]

    def pytest_runtest_logreport(self, report: Any) -> None:
        self.seconds[report.nodeid] = self.seconds.get(report.nodeid, 0.0) + report.duration

    def pytest_sessionfinish(self, session: Any) -> None:
        if hasattr(session.config, "workerinput"):  # an xdist worker: the controller writes
            return
        rounded = {k: round(v, 2) for k, v in sorted(self.seconds.items())}
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(rounded, indent=0) + "\n")
        os.replace(tmp, self.path)


def pytest_configure(config: Any) -> None:
    path = config.getoption("record_durations")
    if path:
        config.pluginmanager.register(_Recorder(path), "xflwb-durations")
