# The two commands for a fresh machine:
#   make run    create .venv, install ganflow, run the pipeline (`dvc repro`) on the built-in digits
#   make test   create .venv, install ganflow with its dev extra, run the test suite
# For developers: make test-fast (unit and static tests: no Ray, no server, no DVC pipeline) and
# make lint (ruff and mypy, as the pre-commit hooks run them).
# Both are idempotent: the install steps rerun only when pyproject.toml changes.

PYTHON ?= python3
VENV ?= .venv
BIN := $(abspath $(VENV))/bin
# Installed first, and only when the venv has no torch yet. On this project's machines
# torch==2.13.0 is the CPU wheel on local disk; elsewhere pip picks the platform's build
# (CUDA on Linux x86_64). GPU users: put your own torch into .venv first, or override,
# e.g. make run TORCH="torch --index-url https://download.pytorch.org/whl/cu128"
TORCH ?= torch==2.13.0
RUN_STAMP := $(VENV)/.ganflow-run
DEV_STAMP := $(VENV)/.ganflow-dev
export PATH := $(BIN):$(PATH)

.PHONY: run test test-fast lint ui cluster-up cluster-down
.DEFAULT_GOAL := run

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

# pip byte-compiles what it installs one file at a time (about half of the install's 2 minutes
# here); --no-compile and one parallel compileall afterwards do the same work on every core.
# A file compileall cannot compile (a package's Python 2 test data) is compiled on import, if ever.
PIP_INSTALL := $(BIN)/pip install --no-compile
COMPILE := $(BIN)/python -m compileall -q -j 0 "$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')" >/dev/null 2>&1 || true

$(RUN_STAMP): pyproject.toml | $(VENV)/bin/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(PIP_INSTALL) $(TORCH)
	$(PIP_INSTALL) -e .
	$(COMPILE)
	touch $@

# tests/test_ui.py drives Debian's chromium through Playwright (never `playwright install`,
# which downloads a browser): install it when missing, with sudo unless root.
$(DEV_STAMP): pyproject.toml $(RUN_STAMP)
	$(PIP_INSTALL) -e '.[dev]'
	$(COMPILE)
	test -x /usr/bin/chromium || { SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		$$SUDO apt-get update && \
		$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium; }
	touch $@

run: $(RUN_STAMP)
	$(BIN)/dvc repro
	$(BIN)/ganflow outputs

# make test runs the suite in two phases. First every file but the serial ones, in
# TEST_WORKERS pytest-xdist processes (--dist loadfile: a file's tests share one worker, so a
# module-scoped cluster is built once; the longest files first, tests/conftest.py's LONGEST_FIRST).
# Then SERIAL_TESTS alone, in one process: test_cluster's
# `ray start --head` checks that it leaves Ray's machine-wide fixed ports (10001, 52365) free, so
# it cannot share the machine with another test's Ray (docs/RUNS.md). TEST_WORKERS=0 runs the
# first phase in one process. A phase that selects no test (exit 5, e.g. under a -k that matches
# one phase only) counts as passed, unless neither phase selected one.
TEST_WORKERS ?= 2
SERIAL_TESTS := tests/test_cluster.py
test: $(DEV_STAMP)
	@set +e; \
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder $(addprefix --ignore=,$(SERIAL_TESTS)) $(PYTEST_ARGS); a=$$?; \
	[ $$a -eq 0 ] || [ $$a -eq 5 ] || exit $$a; \
	$(BIN)/python -m pytest $(SERIAL_TESTS) $(PYTEST_ARGS); b=$$?; \
	[ $$b -eq 0 ] || [ $$b -eq 5 ] || exit $$b; \
	[ $$a -eq 0 ] || [ $$b -eq 0 ] || { echo "make test: no test selected" >&2; exit 5; }

test-fast: $(DEV_STAMP)
	GANFLOW_TEST_TIER=fast $(BIN)/python -m pytest -m "not slow and not ray and not server" $(PYTEST_ARGS)

LINTED := ganflow pipelines tests benchmarks docs
lint: $(DEV_STAMP)
	$(BIN)/ruff check $(LINTED)
	$(BIN)/ruff format --check $(LINTED)
	$(BIN)/mypy

ui: $(RUN_STAMP)
	$(BIN)/ganflow ui

# A Ray head and an MLflow server on this machine, both on 127.0.0.1, to try the cluster path
# (see infra/README.md): prints the params.yaml lines that send tune/train there as Ray jobs.
cluster-up: $(RUN_STAMP)
	$(BIN)/ganflow cluster up

cluster-down: $(RUN_STAMP)
	$(BIN)/ganflow cluster down
