# scratchlm: `make run` builds the model on the embedded defaults, `make test` runs the tests.
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

.PHONY: run test install deploy clean help

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

deploy: install  ## create the work pool and deployments on the Prefect server at PREFECT_API_URL
	cd infra && ../$(VENV)/bin/prefect work-pool create scratchlm-process --type process --overwrite
	cd infra && ../$(VENV)/bin/prefect --no-prompt deploy --all

clean:  ## remove pipeline outputs (not the DVC cache)
	rm -rf data metrics reports mlruns.db mlartifacts
