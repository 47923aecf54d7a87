# Two commands do everything on a fresh machine with Python 3.11: `make demo`, `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test test-fast durations lint ruff typecheck bytecode bench bench-smoke clean

$(STAMP): pyproject.toml scripts/install-browser.sh
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "make: installing xflwb and its dependencies into $(VENV) (a few minutes the first time)"
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install --progress-bar on -e ".[dev]"
	bash scripts/install-browser.sh $(BIN)/pip  # Debian chromium for the browser test
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m xflwb demo --out demo-output

# ruff, then mypy over the whole package (pinned in the dev extra; configured in
# pyproject.toml). --no-incremental: mypy's cache crashes on this tree
lint: ruff typecheck

ruff: $(STAMP)
	$(BIN)/ruff check xflwb tests benchmarks scripts conftest.py

typecheck: $(STAMP)
	$(BIN)/mypy xflwb --no-incremental

# Compiled once here: a test run starts hundreds of Python processes (sessions, devices, Ray
# workers, kernels), and where PYTHONDONTWRITEBYTECODE is set (it is on the machines we
# build on) each would otherwise compile every module of ours it imports again (pip
# compiled the rest)
bytecode: $(STAMP)
	$(BIN)/python -m compileall -q xflwb tests benchmarks conftest.py

# ruff, then the suite on two workers, whole files each (module fixtures such as one export
# per model and one Ray head per worker are shared; a notebook's cells stay in order),
# handed out in conftest.py's order, longest recorded file first (xdist would otherwise
# reorder files by test count). mypy runs inside the suite (tests/test_typecheck.py), beside
# the other tests, where it fills CPU they leave idle
test: $(STAMP) ruff bytecode
	$(BIN)/python -m pytest -n 2 --dist loadfile --no-loadscope-reorder

# the inner loop (under 3 minutes): unit and property tests, those tests/durations.json
# records at 1 s or less (and new ones); no lint, no notebooks, no processes (conftest.py)
test-fast: $(STAMP) bytecode
	$(BIN)/python -m pytest -n 2 --fast -q

# measure every test again (a full run) into tests/durations.json, which orders make test
# (longest files first) and selects make test-fast; commit the file it writes
durations: $(STAMP) bytecode
	$(BIN)/python -m pytest -n 2 --dist loadfile --no-loadscope-reorder --record-durations tests/durations.json

bench: $(STAMP)  # about 35 minutes in all on 2 cores
	$(BIN)/python benchmarks/export_and_runtimes.py
	$(BIN)/python benchmarks/tflite_step.py
	$(BIN)/python benchmarks/aggregate.py
	$(BIN)/python benchmarks/fleet_scale.py
	$(BIN)/python benchmarks/simulation_scale.py

# every benchmark with --smoke: completes and prints its table (make test runs it too)
bench-smoke: $(STAMP) bytecode
	$(BIN)/python -m pytest -n 2 --dist loadfile tests/test_benchmarks.py tests/test_benchmarks_sim.py

clean:
	rm -rf $(VENV) demo-output .pytest_cache
