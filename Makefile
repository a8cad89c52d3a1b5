# `make test` and `make demo` work on a fresh machine: they create .venv and install
# the project when it is missing or stale: torch first (pinned), then the exact versions of
# requirements-dev.lock, then the project itself (editable; its dependencies are all met by
# the lock, and one added without re-locking still installs: tests/infra flags that lock).
#
# Which torch: `pip install torch==2.13.0` from pip's configured index. On the project's
# machines that finds the CPU wheel (torch 2.13.0+cpu: 192 MB wheel, 754 MB installed); from
# plain PyPI on Linux it is the CUDA build (torch plus nvidia-* wheels: several GB). For the
# CPU build elsewhere: make TORCH_INDEX=https://download.pytorch.org/whl/cpu
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_INDEX ?=
# checkov pins old packaging/networkx releases: it gets its own venv (tests/infra uses it).
TOOLS := .venv-tools
CHECKOV := checkov>=3.2,<4

export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: venv test test-fast demo demo-console bench lint lock clean gpu-check

$(STAMP): pyproject.toml requirements-dev.lock
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install --quiet -r requirements-dev.lock
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	$(BIN)/python -c 'import torch; print("make: torch", torch.__version__, "CUDA" if torch.version.cuda else "CPU")'
	test -x $(TOOLS)/bin/checkov || ($(PY) -m venv $(TOOLS) && $(TOOLS)/bin/python -m pip install --quiet '$(CHECKOV)')
	touch $(STAMP)

venv: $(STAMP)

# --durations: the CI log names the slowest tests (the suite must stay well inside CI's limit).
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest tests --durations=25

test-fast: $(STAMP)
	$(BIN)/python -m pytest tests -m "not slow"

# The whole flow over HTTP on the embedded default (SQLite, local Ray, API on loopback).
demo: $(STAMP)
	$(BIN)/moe-unlearn world build
	$(BIN)/python -m api.demo

# The demo, then the API and dispatcher stay up for the web console (Ctrl-C stops them).
demo-console: $(STAMP)
	$(BIN)/moe-unlearn world build
	$(BIN)/python -m api.demo --keep

bench: $(STAMP)
	$(BIN)/python -m bench.train_step
	$(BIN)/python -m bench.attribution
	$(BIN)/python -m bench.job_stages
	$(BIN)/python -m bench.checkpoint_cost
	$(BIN)/python -m bench.api_load
	$(BIN)/python -m bench.quality

# Tests marked gpu + a real-shape bfloat16 job on one GPU against the CPU run
# (bench/results/gpu_check.json); without CUDA: says so, checks its plumbing, exits 0.
gpu-check: $(STAMP)
	$(BIN)/python -m bench.gpu_check

lint: $(STAMP)
	$(BIN)/ruff check .

# Re-resolve the lock files from pyproject.toml's ranges (see infra/lock.sh).
lock: $(STAMP)
	UV=$(BIN)/uv infra/lock.sh

clean:
	rm -rf $(VENV) $(TOOLS) .pytest_cache
