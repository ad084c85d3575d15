# scratchlm: `make run` builds the model on the embedded defaults, `make test` runs the tests, `make lint` ruff.
# Both create .venv and install the pinned working set first (nothing to install by hand).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
export PATH := $(abspath $(VENV))/bin:$(PATH)
export DS_ACCELERATOR ?= cpu
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
# Prefect's local state (ephemeral server database) stays inside the project unless PREFECT_HOME/PREFECT_API_URL say otherwise
export PREFECT_HOME ?= $(CURDIR)/.prefect
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
# the ephemeral server's 20 s default start-up budget is too short on a busy 2-core machine
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 120

.PHONY: run test lint format install deploy clean help

help:  ## list the targets
	@grep -E '^[a-z]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*##/\t/'

install: $(VENV)/.installed  ## create .venv with the pinned dependencies

$(VENV)/.installed: pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip wheel setuptools
	# torch first and pinned: the CPU wheel installs in seconds, an unpinned one pulls CUDA builds
	$(PIP) install -q torch==2.13.0
	# deepspeed is an sdist whose setup.py imports torch: build it against the torch above
	$(PIP) install -q --no-build-isolation -c requirements.lock deepspeed
	$(PIP) install -q -c requirements.lock -e '.[dev]'
	touch $@

run: install  ## run the whole pipeline (Prefect flow -> dvc repro per stage -> MLflow)
	$(VENV)/bin/scratchlm run

test: install  ## run the test suite
	$(PY) -m pytest -q tests

lint: install  ## ruff: lint and check formatting (configured in pyproject.toml); CI runs it before the tests
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install  ## ruff: apply the formatter and the safe lint fixes
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# work pools `make deploy` creates (scratchlm-<type>); the deployments of infra/prefect.yaml name them
PREFECT_POOLS ?= process docker kubernetes

deploy: install  ## create the work pools and deployments (infra/prefect.yaml) on the Prefect server at PREFECT_API_URL
	@test -n "$$PREFECT_API_URL" || { echo "deploy: set PREFECT_API_URL to the Prefect server to deploy to," \
		"e.g. PREFECT_API_URL=http://127.0.0.1:4200/api make deploy (docs/SCALE.md)" >&2; exit 2; }
	for type in $(PREFECT_POOLS); do \
		$(VENV)/bin/prefect work-pool create scratchlm-$$type --type $$type --overwrite >/dev/null || exit 1; \
		echo "work pool scratchlm-$$type ($$type) ready"; done
	# from the repository root: entrypoints are relative to it, and process runs start in this checkout
	$(VENV)/bin/prefect --no-prompt deploy --prefect-file infra/prefect.yaml --all
	@echo "deployed to $$PREFECT_API_URL; start a worker: $(VENV)/bin/prefect worker start --pool scratchlm-process"

clean:  ## remove pipeline outputs (not the DVC cache)
	rm -rf data metrics reports mlruns.db mlartifacts
