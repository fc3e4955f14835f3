# mlipops: two commands set everything up on a fresh machine: `make repro` and `make test`.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# stage commands (`mlipops ...`) and dvc come from the project's venv
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: install repro test test-all bench ui clean

install: $(STAMP)

# torch first, pinned to the locally served CPU wheel; otherwise pip resolves a multi-GB CUDA build
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev,qc]'
	touch $(STAMP)

repro: $(STAMP)
	dvc repro
	@cat reports/promote/decision.md

test: $(STAMP)
	$(BIN)/python -m pytest

test-all: $(STAMP)
	$(BIN)/python -m pytest -m ''

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_pipeline.py
	$(BIN)/python benchmarks/bench_index.py

ui: $(STAMP)
	$(BIN)/mlipops ui

clean:
	rm -rf data/raw data/ingested data/curated data/models data/index.duckdb registry/*/ registry/index.json \
	       reports/*/ mlflow.db mlartifacts .pytest_cache
