"""The package type-checks: ``mypy xflwb`` (pinned in the dev extra, configured in
pyproject.toml) reports nothing.

Run here, inside ``make test``'s suite, rather than before it: mypy takes about 45 s of one
core (measured 2026-12-08), and beside the other tests it fills CPU the suite leaves idle
instead of adding its whole length to ``make test``. ``make lint`` / ``make typecheck`` still run it
on its own.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def test_mypy_finds_no_error_in_the_package():
    # --no-incremental: mypy's cache crashes on this tree (as in the Makefile)
    done = subprocess.run([sys.executable, "-m", "mypy", "xflwb", "--no-incremental"],
                          cwd=ROOT, capture_output=True, text=True, timeout=840)
    assert done.returncode == 0, done.stdout[-20000:] + done.stderr[-5000:]
    assert "Success: no issues found" in done.stdout, done.stdout
