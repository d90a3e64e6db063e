# pdl1exp — `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
# One variable for the torch build: GPU users override it, e.g.
#   make run TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126"
TORCH ?= torch==2.13.0
# Extras: `cpu` takes xgboost-cpu; GPU users may use EXTRAS=dev,gpu.
EXTRAS ?= dev,cpu
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help setup run test test-full lint bench ui clean

help: ## List the targets
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-10s\033[0m %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install $(TORCH)
	$(BIN)/python -m pip install -e '.[$(EXTRAS)]'
	@touch $(STAMP)

setup: $(STAMP) ## Create .venv and install the project (torch from $$TORCH first)

run: $(STAMP) ## Run the main experiment (fusion) on the embedded synthetic cohort
	$(BIN)/python -m pdl1exp +experiment=fusion $(ARGS)

test: $(STAMP) ## Run the fast test suite (what CI runs)
	$(BIN)/python -m pytest -m "not slow" $(ARGS)

test-full: $(STAMP) ## Run every test, slow and reference ones included
	$(BIN)/python -m pytest $(ARGS)

lint: $(STAMP) ## ruff check
	$(BIN)/ruff check src tests

# BENCH_QUICK=1: the subset without the paper section and the 1000/3000-patient scaling runs
# (about 10 min on 2 cores; the full bench 29 min, 16 of them scaling: experiments/BENCHMARKS.md).
bench: $(STAMP) ## Benchmarks: writes experiments/BENCHMARKS.md and BENCHMARKS.json
	$(BIN)/python -m pdl1exp.bench $(if $(BENCH_QUICK),--quick) $(ARGS)

# One uvicorn worker and no huey job runner (MLflow's GenAI jobs): a local viewer on a laptop.
ui: $(STAMP) ## MLflow UI on 127.0.0.1:5000 over the local sqlite store (one worker)
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(BIN)/mlflow ui --workers 1 \
		--backend-store-uri sqlite:///mlruns/mlflow.db --default-artifact-root ./mlruns \
		--host 127.0.0.1 --port 5000

clean: ## Remove run outputs and caches (keeps .venv)
	rm -rf experiments/runs experiments/cache mlruns/* .pytest_cache .ruff_cache
	touch mlruns/.gitkeep
