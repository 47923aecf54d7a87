"""``tests/_boot/sitecustomize.py``: every process a test run starts defers
``rfc3987_syntax``'s grammar build, and an IRI check that does happen answers as before."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

BOOT = Path(__file__).with_name("_boot")
SAMPLES = ["http://example.com/ä", "urn:isbn:0451450523", "not an iri ::", "//x", ""]
CHILD = f"""
import json, sys
import ray, jsonschema  # Ray imports jsonschema, which imports rfc3987_syntax
deferred = getattr(sys.modules.get("rfc3987_syntax"), "__deferred__", False)
checker = jsonschema.FormatChecker()
answers = [checker.conforms(s, "iri") for s in {SAMPLES!r}]
print(json.dumps({{"deferred": deferred, "answers": answers,
                  "loaded": "syntax_parser" in dir(sys.modules["rfc3987_syntax"])}}))
"""


def run_child(with_boot: bool) -> dict:
    env = dict(os.environ)
    parts = [p for p in env.get("PYTHONPATH", "").split(os.pathsep)
             if p and Path(p).resolve() != BOOT.resolve()]
    env["PYTHONPATH"] = os.pathsep.join(([str(BOOT)] if with_boot else []) + parts)
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_run_puts_the_boot_folder_first_on_pythonpath():
    first = os.environ["PYTHONPATH"].split(os.pathsep)[0]
    assert Path(first).resolve() == BOOT.resolve()


def test_importing_ray_defers_the_grammar_and_iri_checks_answer_as_without_it():
    deferred, plain = run_child(with_boot=True), run_child(with_boot=False)
    assert deferred["deferred"] is True and plain["deferred"] is False
    assert deferred["answers"] == plain["answers"]
    assert True in plain["answers"] and False in plain["answers"]  # the samples tell apart
    assert deferred["loaded"]  # the first check loaded the real module in its place
