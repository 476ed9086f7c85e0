# calibbench — `make run` (set up + default experiment), `make test` (set up + test suite).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# torch/torchvision pinned to the builds this machine has on disk (pip takes them from there).
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
# pytest-xdist processes for `make test` (one per core here; each test file stays in one process,
# so module fixtures and a file's order hold). TEST_WORKERS=0 runs in this process.
TEST_WORKERS ?= 2

# The offline data and weights beside the repository (../shared), unless already set.
SHARED := $(abspath ../shared)
ifneq ($(wildcard $(SHARED)/data),)
export CALIBBENCH_DATA_DIR ?= $(SHARED)/data
export CALIBBENCH_WEIGHTS_DIR ?= $(SHARED)/weights
endif

.PHONY: setup run test lint sweep bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_PINS)
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

run: $(STAMP)
	$(PY) -m calibbench $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --durations=20 $(PYTEST_ARGS)  # the 20 slowest at the end

# ruff (rules and pin in pyproject.toml): pyflakes, pycodestyle, bugbear over the code, tests, benchmarks;
# then mypy over src/calibbench ([tool.mypy] in pyproject.toml: files, per-module ignores, strictness).
lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks experiments
	$(VENV)/bin/mypy

sweep: $(STAMP)
	$(PY) -m calibbench -m sweep=compare $(ARGS)

bench: $(STAMP)
	$(PY) benchmarks/eval_overhead.py
	$(PY) benchmarks/selectq_cost.py
	$(PY) benchmarks/synthesis_cost.py

clean:
	rm -rf $(VENV) outputs/runs outputs/sweeps outputs/cache
