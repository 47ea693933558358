# Two entry points, each sets itself up first: `make quickstart` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup quickstart test test-fast test-tuning test-gpu clean

setup: $(VENV)/.installed

# torch==2.13.0 first: on CPU-only machines a local CPU wheel satisfies the pin; elsewhere PyPI's.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $@

quickstart: setup
	$(BIN)/mixloop run jobs/quickstart.yaml

test: setup
	$(BIN)/python -m pytest

test-fast: setup
	$(BIN)/python -m pytest tests/unit -q

# Whole searches alone (interrupted and resumed, --apply round trip); make test runs them too.
test-tuning: setup
	$(BIN)/python -m pytest -m tuning tests/ray/test_tune_runs.py

# On a machine with a CUDA device: the GPU path (bf16, fused AdamW, pinned memory, NCCL).
test-gpu: setup
	$(BIN)/python -m pytest -m gpu tests/gpu

clean:
	rm -rf runs .pytest_cache
