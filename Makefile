# ProductLens: `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export PYTHONHASHSEED := 0
export TF_CPP_MIN_LOG_LEVEL := 2

.DEFAULT_GOAL := help

.PHONY: help
help: ## List the targets with one line each
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  %-16s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -r requirements.lock
	$(BIN)/pip install -q --disable-pip-version-check --no-deps -e .
	touch $@

.PHONY: setup
setup: $(STAMP) ## Create .venv and install the pinned stack (quick when nothing changed)

.PHONY: lint
lint: setup ## Run ruff on the code
	$(BIN)/ruff check components pipelines serving recommender tests bench
	$(BIN)/ruff format --check components pipelines serving recommender tests bench

.PHONY: pull
pull: setup ## Fetch dataset v1 from the DVC remote (../shared/dvc-remote)
	$(BIN)/dvc pull data.dvc

.PHONY: repro
repro: pull ## Set up, pull the data and run the whole pipeline (dvc repro)
	$(BIN)/dvc repro

.PHONY: test
test: pull ## Set up, pull dataset v1 and run the whole test suite
	$(BIN)/python -m pytest tests

.PHONY: clean
clean: ## Remove pipeline outputs (not the venv, not the data)
	rm -rf artifacts reports models dvclive
