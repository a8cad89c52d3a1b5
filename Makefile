# `make test` and `make demo` work on a fresh machine: they create .venv and install
# the project (torch first, from the pinned CPU build) when it is missing or stale.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: venv test test-fast demo demo-console bench lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest tests

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

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache
