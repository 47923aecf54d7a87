"""The root conftest's test selection and order: ``make test-fast`` keeps the quick tests
and new ones, ``make durations`` records every test, ``make test`` runs long files first."""

from __future__ import annotations

import json
from pathlib import Path

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parents[1]


def _project(pytester, durations: dict[str, float] | None) -> None:
    """A project with the real root conftest, a slow mark and two test files."""
    pytester.makeconftest((ROOT / "conftest.py").read_text())
    pytester.makeini("[pytest]\nmarkers =\n    slow: long\n    browser: b\n    fuzz: f\n")
    tests = pytester.mkdir("tests")
    (tests / "test_a.py").write_text(
        "import pytest\n"
        "def test_quick(): assert True\n"
        "def test_recorded_slow(): assert True\n"
        "def test_new(): assert True\n"
        "@pytest.mark.slow\n"
        "def test_marked(): assert True\n")
    (tests / "test_b.py").write_text("def test_long(): assert True\n")
    if durations is not None:
        (tests / "durations.json").write_text(json.dumps(durations))


def test_fast_keeps_quick_and_unrecorded_tests_and_drops_slow_ones(pytester):
    _project(pytester, {"tests/test_a.py::test_quick": 0.2,
                        "tests/test_a.py::test_recorded_slow": 30.0,
                        "tests/test_b.py::test_long": 0.5})
    result = pytester.runpytest("--fast", "-v", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=3, deselected=2)
    ran = result.stdout.str()
    assert "test_quick PASSED" in ran and "test_new PASSED" in ran
    assert "test_recorded_slow" not in ran and "test_marked" not in ran


def test_long_files_run_first_and_a_run_records_every_test(pytester, tmp_path):
    _project(pytester, {"tests/test_a.py::test_quick": 0.2,
                        "tests/test_b.py::test_long": 50.0})
    out = tmp_path / "durations.json"
    result = pytester.runpytest("-v", "-p", "no:cacheprovider", "--record-durations", str(out))
    result.assert_outcomes(passed=5)
    lines = [ln for ln in result.stdout.str().splitlines() if " PASSED" in ln]
    assert "test_b.py::test_long" in lines[0], lines  # 50 s recorded: handed out first
    recorded = json.loads(out.read_text())
    assert set(recorded) == {f"tests/test_a.py::{n}" for n in
                             ("test_quick", "test_recorded_slow", "test_new", "test_marked")
                             } | {"tests/test_b.py::test_long"}
    assert all(v >= 0 for v in recorded.values())


def test_without_a_record_every_test_runs_in_collection_order(pytester):
    _project(pytester, None)
    result = pytester.runpytest("--fast", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=4, deselected=1)  # only the slow mark is left out
