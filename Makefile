# mlipops: two commands set everything up on a fresh machine: `make repro` and `make test`.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# stage commands (`mlipops ...`) and dvc come from the project's venv
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: install repro repro-strict active lint test test-all bench ui clean browser

install: $(STAMP)

# torch first, pinned to the locally served CPU wheel; otherwise pip resolves a multi-GB CUDA build
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev,qc]'
	touch $(STAMP)

# every stage but `active` (active learning runs oracle calls and retrains: on demand, `make active`).
# A rejected model is a result: promote writes all its outputs, decision.md says why, and this exits 0.
# `make repro EXAMPLE=mlearn-mo`: the shipped example on real DFT data (examples/<name>/, a DVC sub-project)
repro: $(STAMP)
ifdef EXAMPLE
	@test -f examples/$(EXAMPLE)/example.yaml || { echo "no example examples/$(EXAMPLE)/ (see examples/)" >&2; exit 2; }
	cd examples/$(EXAMPLE) && dvc repro promote
	@cat examples/$(EXAMPLE)/reports/promote/decision.md
else
	dvc repro promote bo_scan
	@cat reports/promote/decision.md
endif

# for CI: `make repro`, then fail (the check exits 3, make itself non-zero) when the model was rejected,
# read from reports/promote/metrics.json (promoted: 0/1); like `mlipops promote --strict`, without rerunning it
repro-strict: repro
	@$(BIN)/python -c 'import json, sys; sys.exit(0 if json.load(open("reports/promote/metrics.json"))["promoted"] else 3)' \
	  || { echo "promotion rejected: see reports/promote/decision.md" >&2; exit 3; }

active: $(STAMP)
	dvc repro active
	@cat reports/active/summary.md

# the browser test (tests/test_ui_browser.py) drives Debian's headless chromium + chromedriver: `make browser`
# installs them when missing (as root, or through sudo; .ci/run calls it); without them that one test is skipped
# with the reason. `make test` itself never installs system packages.
browser:
	@if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; elif command -v sudo >/dev/null 2>&1; then SUDO="sudo -n"; else SUDO=none; fi; \
	  if [ "$$SUDO" != none ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing chromium + chromium-driver (apt-get) for the browser test"; \
	    $$SUDO apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q chromium chromium-driver >/dev/null \
	      || echo "warning: could not install chromium; tests/test_ui_browser.py will be skipped"; \
	  else echo "warning: chromium missing and no root/apt-get; tests/test_ui_browser.py will be skipped"; fi; \
	fi

# the suite on TEST_WORKERS processes (pytest-xdist), whole files per process so that a module's fixture (a tiny
# pipeline run) is built once: 12 min on 2 cores against 19 min in one process. TEST_WORKERS=0: one process
TEST_WORKERS ?= 2
PYTEST := $(BIN)/python -m pytest $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)

# pyflakes + pycodestyle through ruff (settings in pyproject.toml); .ci/run calls it before the tests
lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

test: $(STAMP)
	$(PYTEST)

test-all: $(STAMP)
	$(PYTEST) -m ''

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_pipeline.py
	$(BIN)/python benchmarks/bench_index.py

ui: $(STAMP)
	$(BIN)/mlipops ui

clean:
	rm -rf data/raw data/ingested data/curated data/models data/index.duckdb data/active registry/*/ registry/index.json \
	       reports/*/ mlflow.db mlartifacts .pytest_cache
