"""The one table of benchmark smoke runs, and the code that runs one, for the two test files
that run them: ``tests/test_benchmarks.py`` (benchmarks that do not simulate, and any script
without an entry) and ``tests/test_benchmarks_sim.py`` (those that run simulations on the
suite's shared Ray head). Split in two so xdist's ``--dist loadfile`` can hand them to
different workers; both glob ``benchmarks/*.py``, so a new benchmark fails until it has a
``--smoke`` flag and an entry in ``SMOKE`` here.

Each script runs as ``python benchmarks/X.py --smoke`` (tiny sizes, seconds of work, the same
code path and tables as a full run) and must exit 0 and print its table. No timing is
asserted: a smoke run's numbers mean nothing.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
#: a smoke run that takes longer than this is stuck: the simulating ones take minutes on a
#: loaded 2-core machine (load average 15–20: systems.py's 8 simulations took over 600 s).
#: Below pytest's own per-test timeout (900 s), so a failure quotes the script's output.
TIMEOUT = 840
#: characters of stdout / stderr a failure quotes
TAIL = 3000


@dataclass(frozen=True)
class Smoke:
    """How one benchmark's smoke run is called and what proves its table was printed."""

    #: lines (or parts of lines) only the benchmark's table code prints
    expect: tuple[str, ...]
    #: takes ``--ray-address`` (it runs simulations: the shared head saves a Ray start)
    ray: bool = False
    #: takes ``--workdir`` (its exports, registries and logs go to tmp_path)
    workdir: bool = False


SMOKE: dict[str, Smoke] = {
    "aggregate.py": Smoke(("| approach | ms | vs Flower |", "| ≥ 3× faster than Flower |")),
    "async.py": Smoke(("sync FedAvg: 2 rounds", "FedBuff staleness of applied updates",
                       "Server memory of FedBuff's VersionBuffer"), workdir=True),
    "compression.py": Smoke(("Part A: codec speed and size", "goal int8 encode + decode",
                             "1 Android + 1 iOS virtual phones",
                             "4-client simulation, 100% of the clients per round",
                             "goal int8 aggregation ≤ 1.3× float32"),
                            ray=True, workdir=True),
    "depthwise_floor.py": Smoke(("| variant | ms/call | ratio to tf |",
                                 "| Core ML executor depthwise kernel |", "numpy throughput")),
    "export_and_runtimes.py": Smoke(("## Export, MNIST-sized CNN",
                                     "| ratio export / bare convert |",
                                     "## Train step, batch 32, mnist CNN",
                                     "| TFLite interpreter |",
                                     "## Forward, batch 32, transfer model")),
    "fleet_scale.py": Smoke(("| devices |",)),
    "http_latency.py": Smoke(('"median_run"', '"p99_ms"')),
    "influence.py": Smoke(("ratio med", "fedbuff  adaptive  default")),
    "privacy.py": Smoke(("DP at 4 clients", "wall per round", "aggregation",
                         "final accuracy", "SecAgg+ vs plain", "4 clients   wall per round",
                         "bytes per client"), ray=True, workdir=True),
    "robustness_fuzz.py": Smoke(("in process: 60 malformed updates sent",
                                 "live: 3 malformed updates"), workdir=True),
    "simulation_scale.py": Smoke(("| arm | clients | wall s |", "| xflwb | 4 |",
                                  "| flower | 4 |", "xflwb / Flower at 4 clients"),
                                 ray=True, workdir=True),
    "tflite_step.py": Smoke(("## Train step, batch 32, MNIST-sized CNN",
                             "| runtime | wall ms | wall ratio vs Keras |", "| xflwb |")),
    "systems.py": Smoke(("tta: 20 clients", "s to target", "clock: 20 clients", "pair 1:",
                         "memory: 20 clients", "20 / 20 clients", "determinism: 20 clients",
                         "history identical: True; global model identical: True"),
                        ray=True, workdir=True),
}

#: every script in benchmarks/: the parametrisation of both test files
SCRIPTS = sorted(p.name for p in BENCHMARKS.glob("*.py"))
#: scripts ``tests/test_benchmarks_sim.py`` runs (they simulate); the others, and any script
#: without an entry, are ``tests/test_benchmarks.py``'s
SIMULATING = sorted(s for s in SCRIPTS if s in SMOKE and SMOKE[s].ray)
OTHERS = sorted(s for s in SCRIPTS if s not in SIMULATING)

COMMON = "add_common_arguments"  # privacy.py's --ray-address and --workdir


def flags(script: str) -> set[str]:
    """The option strings the script's argparse declares (read from its source), with those
    of ``privacy.add_common_arguments`` when it calls that."""
    tree = ast.parse((BENCHMARKS / script).read_text(), script)
    found = _declared(tree)
    if any(isinstance(node, ast.Call) and getattr(node.func, "id", None) == COMMON
           for node in ast.walk(tree)):
        helpers = ast.parse((BENCHMARKS / "privacy.py").read_text(), "privacy.py")
        found |= _declared(next(node for node in ast.walk(helpers)
                                if isinstance(node, ast.FunctionDef) and node.name == COMMON))
    return found


def _declared(tree: ast.AST) -> set[str]:
    """String arguments of every ``….add_argument(…)`` call in ``tree``."""
    return {arg.value for node in ast.walk(tree)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and node.func.attr == "add_argument"
            for arg in node.args if isinstance(arg, ast.Constant) and isinstance(arg.value, str)}


def entry_for(script: str) -> Smoke:
    """The script's entry, or a failure saying where to add it."""
    entry = SMOKE.get(script)
    if entry is None:
        pytest.fail(f"benchmarks/{script} has no entry in SMOKE (tests/benchmark_smokes.py); "
                    "add `--smoke` to the script and an entry there")
    return entry


def _tail(text: str) -> str:
    return text if len(text) <= TAIL else "…" + text[-TAIL:]


def run_smoke(script: str, tmp_path: Path, request: Any) -> None:
    """``python benchmarks/X.py --smoke`` exits 0, prints its table and leaves the recorded
    results (benchmarks/, docs/) untouched. Benchmarks that simulate attach to the suite's
    shared Ray head (``--ray-address``); scratch files go to ``--workdir`` in tmp_path."""
    entry = entry_for(script)
    cmd = [sys.executable, str(BENCHMARKS / script), "--smoke"]
    if entry.ray:  # only these start the shared head (tens of seconds)
        cmd += ["--ray-address", request.getfixturevalue("shared_ray")]
    if entry.workdir:
        cmd += ["--workdir", str(tmp_path / "work")]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1",
           "TF_CPP_MIN_LOG_LEVEL": "2", "MPLBACKEND": "Agg"}
    before = _recorded()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=TIMEOUT, stdin=subprocess.DEVNULL)
    said = (f"\n--- stdout (tail) ---\n{_tail(proc.stdout)}"
            f"\n--- stderr (tail) ---\n{_tail(proc.stderr)}")
    assert proc.returncode == 0, f"{' '.join(cmd[1:])} exited {proc.returncode}{said}"
    absent = [line for line in entry.expect if line not in proc.stdout]
    assert not absent, f"{script} --smoke did not print {absent}{said}"
    changed = sorted(path for path, stamp in _recorded().items() if before.get(path) != stamp)
    assert not changed, f"{script} --smoke wrote into the repository: {changed}{said}"


def _recorded() -> dict[str, tuple[int, int]]:
    """(size, mtime) of every file under benchmarks/ and docs/: where results are recorded."""
    out = {}
    for top in ("benchmarks", "docs"):
        for path in (ROOT / top).rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts:
                st = path.stat()
                out[str(path.relative_to(ROOT))] = (st.st_size, st.st_mtime_ns)
    return out
