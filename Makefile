# The two commands for a fresh machine:
#   make run    create .venv, install ganflow, run the pipeline (`dvc repro`) on the built-in digits
#   make test   create .venv, install ganflow with its dev extra, run the test suite
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

.PHONY: run test ui
.DEFAULT_GOAL := run

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

$(RUN_STAMP): pyproject.toml | $(VENV)/bin/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install $(TORCH)
	$(BIN)/pip install -e .
	touch $@

$(DEV_STAMP): pyproject.toml $(RUN_STAMP)
	$(BIN)/pip install -e '.[dev]'
	touch $@

run: $(RUN_STAMP)
	$(BIN)/dvc repro
	$(BIN)/ganflow outputs

test: $(DEV_STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

ui: $(RUN_STAMP)
	$(BIN)/ganflow ui
