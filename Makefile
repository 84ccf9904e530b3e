# ProductLens: `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export PYTHONHASHSEED := 0
# FATAL only: no start-up noise (common/quiet_tf.py); failures still raise as Python exceptions.
export TF_CPP_MIN_LOG_LEVEL := 3
# dvc.yaml stages run `python -m components.<stage>`: that python must be the venv's.
export PATH := $(CURDIR)/$(BIN):$(PATH)
export DVC_NO_ANALYTICS := 1
# The component image, registry-qualified (a cluster pulls it from there): the default component_image of
# `make compile` (= pipelines.training_pipeline.DEFAULT_IMAGE_REPOSITORY) and the tag of `make image`.
IMAGE_REPOSITORY ?= ghcr.io/productlens/productlens-components
IMAGE_TAG ?= $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
BASE_IMAGE ?=
KFP_HOST ?=
RUN_ARGS ?=
ARGS ?=

.DEFAULT_GOAL := help

.PHONY: help
help: ## List the targets with one line each
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  %-20s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -r requirements.lock
	$(BIN)/pip install -q --disable-pip-version-check --no-deps -e .
	touch $@

.PHONY: setup
setup: $(STAMP) ## Create .venv and install the pinned stack (quick when nothing changed)

.PHONY: lint
lint: setup ## Run ruff and the import contracts (dependencies point one way: README, Layout)
	$(BIN)/ruff check common components pipelines serving recommender labelling productlens tests bench
	$(BIN)/ruff format --check common components pipelines serving recommender labelling productlens tests bench
	$(BIN)/lint-imports

.PHONY: pull
pull: setup ## Fetch dataset v1 from the DVC remote (../shared/dvc-remote)
	@test -d ../shared/dvc-remote || { echo "error: ../shared/dvc-remote not found: the DVC remote is read from shared/ beside this clone (clone the repo next to shared/, as CI does)" >&2; exit 2; }
	$(BIN)/dvc pull data.dvc

.PHONY: repro
repro: pull ## Set up, pull the data, run the whole pipeline (dvc repro), then publish the blessed candidate
	$(BIN)/dvc repro
	@$(MAKE) --no-print-directory publish

# Through make, the stages' bare `python` is the venv's whatever the calling shell's PATH (see `which-python`).
.PHONY: exp
exp: pull ## Run a DVC experiment with the venv's python: make exp ARGS='-S train.epochs=2 -n two-epochs'
	$(BIN)/dvc exp run $(ARGS)

.PHONY: which-python
which-python: ## Print the python that dvc.yaml's `python -m ...` commands run under make (the venv's)
	@python -c 'import sys; print(sys.executable)'

# Outside DVC on purpose: `dvc repro` and `dvc exp run` never change what is served.
.PHONY: publish
publish: setup ## Publish the validated candidate as models/productlens/<N+1> (nothing when N already serves it); label it stable
	$(BIN)/python -m components.publish --candidate artifacts/export/candidate --gate artifacts/gate/gate.json \
		--blessing artifacts/infra_validate/blessing.json --data-dvc data.dvc --output models \
		--models-config serving/models.config --models-config serving/k8s/models.config

# The canary rollout (components/labels.py): the candidate beside stable, then promote or roll back. SERVER is the
# gRPC address of the model server `make serve` runs, MODELS_CONFIG the file it re-reads (as for make serve); each
# step waits for the server to apply it. serving/k8s/models.config is kept in step.
.PHONY: canary promote rollback
canary promote rollback: SERVER ?= localhost:8500
canary promote rollback: MODELS_CONFIG ?= serving/models.config
canary: setup ## Publish the validated candidate as the canary beside stable (make serve running; the app: PRODUCTLENS_CANARY_SHARE)
	$(BIN)/python -m components.publish --candidate artifacts/export/candidate --gate artifacts/gate/gate.json \
		--blessing artifacts/infra_validate/blessing.json --data-dvc data.dvc --output models \
		--models-config $(MODELS_CONFIG) --models-config serving/k8s/models.config --label canary --server $(SERVER)

promote: setup ## Canary rollout: stable -> the canary's version (CHECK=reports/monitor/live.json: refuse on drift)
	$(BIN)/productlens promote --models-config $(MODELS_CONFIG) --models-config serving/k8s/models.config \
		--server $(SERVER) $(if $(CHECK),--check $(CHECK))

rollback: setup ## Canary rollout: stable back to the previous version, or the canary dropped
	$(BIN)/productlens rollback --models-config $(MODELS_CONFIG) --models-config serving/k8s/models.config \
		--server $(SERVER)

# DVC's own page loads Vega from a CDN (blank offline): this template loads the pinned copies beside the page.
PLOTS_TEMPLATE := common/report_assets/dvc_plots.html
.PHONY: plots
plots: setup ## DVC plots (learning curves, confusion matrix, ...) -> dvc_plots/index.html, offline (Vega vendored)
	$(BIN)/dvc plots show --html-template $(PLOTS_TEMPLATE) --out dvc_plots
	rm -rf dvc_plots/vendor && mkdir -p dvc_plots/vendor && cp -R common/report_assets/vega* dvc_plots/vendor/

.PHONY: test
test: pull ## Set up, pull dataset v1 and run the whole test suite
	$(BIN)/python -m pytest tests

.PHONY: clean
clean: ## Remove pipeline outputs (not the venv, not the data)
	rm -rf artifacts reports models dvclive dvc_plots

.PHONY: compile
compile: setup ## Compile the KFP pipeline to pipelines/training_pipeline.yaml (commit the result)
	$(BIN)/python -m pipelines.training_pipeline --image-repository $(IMAGE_REPOSITORY) --image-tag $(IMAGE_TAG)

.PHONY: image
image: ## Build the component image every step runs in (needs Docker): IMAGE_REPOSITORY:IMAGE_TAG
	DOCKER_BUILDKIT=1 docker build -f components/Dockerfile -t $(IMAGE_REPOSITORY):$(IMAGE_TAG) \
		$(if $(BASE_IMAGE),--build-arg BASE_IMAGE=$(BASE_IMAGE)) .

.PHONY: submit
submit: setup ## Run the compiled pipeline on Kubeflow: make submit KFP_HOST=https://... [RUN_ARGS='data_revision=v1']
	@test -n "$(KFP_HOST)" || { echo "usage: make submit KFP_HOST=https://<kfp endpoint> [RUN_ARGS='name=value ...']"; exit 2; }
	$(BIN)/python -m pipelines.submit --host $(KFP_HOST) $(RUN_ARGS)

.PHONY: retrain-check
retrain-check: pull ## Retrain with the committed params (validate..gate, no export); fail if metrics move beyond the tolerance
	# --force --no-run-cache: really rerun every step, even when the workspace or DVC's run cache has its outputs.
	$(BIN)/dvc repro --force --no-run-cache gate
	$(BIN)/python -m pipelines.retrain_check

.PHONY: kb
kb: pull ## Build the product knowledge base (dvc repro build_kb: python -m recommender.build_kb -> artifacts/kb/productlens.db)
	$(BIN)/dvc repro build_kb

# The drift check outside DVC, on any folder of prediction logs, against the baseline `make repro` built (its monitor
# stage); exits 1 with one line per drifted check. Writes reports/monitor/live.{json,md}, never DVC's outputs.
LOGS ?=
MONITOR_BASELINE := artifacts/monitor/baseline.json
.PHONY: monitor
monitor: setup ## Drift check of prediction logs vs the training data and evaluation: make monitor LOGS=<folder or prefix>
	@test -n "$(LOGS)" || { echo "usage: make monitor LOGS=<folder of prediction log files, or their filename prefix>" >&2; exit 2; }
	@test -f $(MONITOR_BASELINE) || { echo "error: no $(MONITOR_BASELINE): run make repro first (its monitor stage builds the baseline)" >&2; exit 2; }
	$(BIN)/python -m components.monitor --logs $(LOGS) --baseline $(MONITOR_BASELINE) --params params.yaml \
		--metrics reports/monitor/live.json --report reports/monitor/live.md

.PHONY: app
app: HOST ?= 127.0.0.1
app: setup ## Serve the recommender API + upload page on 127.0.0.1:8080 (HOST=0.0.0.0: every interface)
	@test -n "$$PRODUCTLENS_DB_URL" || test -f artifacts/kb/productlens.db || $(MAKE) kb
	$(BIN)/python -m recommender.app --host $(HOST) --port 8080

.PHONY: browser
browser: ## Install Debian's chromium for the upload-page browser test (only when /usr/bin/chromium is missing)
	@test -x /usr/bin/chromium || { SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium; }

.PHONY: bench-recommender
bench-recommender: setup ## Benchmark HTTP -> gRPC -> database at concurrency 1 and 8 (needs a KB; starts its own servers)
	@test -n "$$PRODUCTLENS_DB_URL" || test -f artifacts/kb/productlens.db || $(MAKE) kb
	$(BIN)/python -m bench.recommender

.PHONY: bench-kb-reads
bench-kb-reads: setup ## Benchmark the app's KB reads per answer: a ranking the cache lacks vs reading every candidate row (same run)
	@test -n "$$PRODUCTLENS_DB_URL" || test -f artifacts/kb/productlens.db || $(MAKE) kb
	$(BIN)/python -m bench.kb_reads $(if $(PRODUCTLENS_DB_URL),--db-url $(PRODUCTLENS_DB_URL))

.PHONY: bench-canary
bench-canary: setup ## Benchmark a canary publish, promote and rollback under load: failed requests (goal 0), answers per label
	@test -n "$$PRODUCTLENS_DB_URL" || test -f artifacts/kb/productlens.db || $(MAKE) kb
	$(BIN)/python -m bench.canary

.PHONY: serve
serve: HOST ?= 127.0.0.1
serve: MODELS_CONFIG ?= serving/models.config
serve: setup ## Serve models/ like TF Serving: gRPC 127.0.0.1:8500, REST :8501 + metrics (HOST=0.0.0.0: every interface; MODELS_CONFIG=another models.config)
	@ls -d models/productlens/[0-9]* >/dev/null 2>&1 || echo "No version under models/productlens yet: run 'make repro' (the server waits and loads it when it appears)."
	$(BIN)/python -m serving.server --host=$(HOST) --port=8500 --rest_api_port=8501 --model_config_file=$(MODELS_CONFIG) \
		--model_config_file_poll_wait_seconds=2 \
		--enable_batching --batching_parameters_file=serving/batching.config --monitoring_config_file=serving/monitoring.config

.PHONY: review-sheets
review-sheets: setup ## Blind review sheets of the unreviewed test images and the audit's flagged train/val images
	$(BIN)/dvc repro audit_labels
	$(BIN)/productlens review sheets --split test
	$(BIN)/productlens review sheets --issues reports/label_issues.csv
	$(BIN)/productlens review status --issues reports/label_issues.csv

.PHONY: bench-serving
bench-serving: setup ## Benchmark in-process vs our server over gRPC/REST at concurrency 1/8/32, and a version swap under load
	$(BIN)/python -m bench.serving

.PHONY: bench-prediction-logging
bench-prediction-logging: setup ## Benchmark gRPC throughput at concurrency 32 with prediction logging off and at rate 1.0, same run
	$(BIN)/python -m bench.prediction_logging

.PHONY: bench-train
bench-train: setup ## Benchmark training on dataset v1: the paper CNN vs the default model, same run (~10 min on 2 cores)
	@test -f artifacts/splits/train.csv || $(BIN)/dvc repro preprocess
	$(BIN)/python -m bench.train

.PHONY: bench-train-options
bench-train-options: setup ## What input size, alpha, flip TTA and padding buy: one linear head on frozen features, same run (~10 min)
	@test -f artifacts/splits/train.csv || $(BIN)/dvc repro preprocess
	$(BIN)/python -m bench.train_options

.PHONY: suspect-labels
suspect-labels: setup ## Label audit (cleanlab): likely label errors, outliers, near-duplicates -> reports/label_issues.csv
	$(BIN)/dvc repro audit_labels
