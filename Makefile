# scratchlm: `make run` builds the model on the embedded defaults, `make test` runs the tests, `make lint` ruff.
# Both create .venv and install the pinned working set first (nothing to install by hand).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
PLOTS_TEMPLATE := $(VENV)/share/scratchlm/dvc_plots.html
export PATH := $(abspath $(VENV))/bin:$(PATH)
# The torch build: CUDA where an NVIDIA driver answers (`nvidia-smi`), CPU otherwise; `make install TORCH_VARIANT=cpu`
# (or cu126, cu128, ...) overrides. One lock per build: requirements.lock is the CPU one; a CUDA build installs from
# requirements-<variant>.lock. requirements-cu130.lock is committed: PyPI's own Linux torch wheel is the CUDA 13.0
# build (NVIDIA driver >= 580), so it installs from PyPI alone; another variant's lock comes from PyTorch's index,
# written once with `make lock TORCH_VARIANT=<variant>` (docs/SCALE.md, "GPU installs").
# The accelerator is chosen per run, not here (train.device / SCRATCHLM_DEVICE; tasks/common/distributed.py).
PYPI_TORCH_VARIANT := cu130
TORCH_VARIANT ?= $(shell nvidia-smi >/dev/null 2>&1 && echo $(PYPI_TORCH_VARIANT) || echo cpu)
TORCH_VERSION := $(shell sed -n 's/^torch==\([^+]*\).*/\1/p' requirements.lock)
LOCK := $(if $(filter cpu,$(TORCH_VARIANT)),requirements.lock,requirements-$(TORCH_VARIANT).lock)
# where pip finds the variant's torch wheel: the configured index for cpu and for PyPI's own CUDA build, PyTorch's
# index for other CUDA builds (set TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu where the configured index
# has no +cpu wheel)
TORCH_INDEX_URL ?= $(if $(filter cpu $(PYPI_TORCH_VARIANT),$(TORCH_VARIANT)),,https://download.pytorch.org/whl/$(TORCH_VARIANT))
# the torch pin of a variant: PyPI's CUDA wheel carries no local version label (+cu130), PyTorch's index's do
TORCH_PIN := torch==$(TORCH_VERSION)$(if $(filter $(PYPI_TORCH_VARIANT),$(TORCH_VARIANT)),,+$(TORCH_VARIANT))
TORCH_INDEX := $(if $(TORCH_INDEX_URL),--extra-index-url $(TORCH_INDEX_URL))
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
# Prefect's local state (ephemeral server database) stays inside the project unless PREFECT_HOME/PREFECT_API_URL say otherwise
export PREFECT_HOME ?= $(CURDIR)/.prefect
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
# the ephemeral server's 20 s default start-up budget is too short on a busy 2-core machine
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 120

.PHONY: run test lint format install lock deploy clean help plots-template

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*##/\t/'

install: $(VENV)/.installed $(PLOTS_TEMPLATE)  ## create .venv with the pinned dependencies (TORCH_VARIANT's torch)
	@have=$$(cat $(VENV)/.variant 2>/dev/null); [ -z "$$have" ] || [ "$$have" = "$(TORCH_VARIANT)" ] || \
		echo "note: .venv holds the $$have torch build, not $(TORCH_VARIANT); rm -rf .venv && make install to switch" >&2

$(VENV)/.installed: pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip wheel setuptools
	# torch first, the variant's build pinned by its lock (the CPU wheel installs in seconds; CUDA ones are GBs)
	$(PIP) install -q $(TORCH_INDEX) -c $(LOCK) torch
	# deepspeed is an sdist whose setup.py imports torch: build it against the torch above
	$(PIP) install -q --no-build-isolation -c $(LOCK) deepspeed
	$(PIP) install -q $(TORCH_INDEX) -c $(LOCK) -e '.[dev]'
	echo $(TORCH_VARIANT) > $(VENV)/.variant
	touch $@

requirements-%.lock:
	@echo "install: no $@ for TORCH_VARIANT=$*; write it once where the network reaches PyPI and PyTorch's" \
		"index: make lock TORCH_VARIANT=$* (and commit it), or install the CPU build: make install TORCH_VARIANT=cpu" >&2
	@exit 2

lock:  ## write TORCH_VARIANT's lock (downloads that torch): the CPU lock's pins + that torch build and its wheels
	rm -rf .venv-lock && $(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install -q --upgrade pip wheel setuptools
	# every package but torch and its CUDA runtime wheels stays at the CPU lock's version
	grep -v -E '^(torch|triton|nvidia-)' requirements.lock > .venv-lock/shared.txt
	.venv-lock/bin/python -m pip install -q $(TORCH_INDEX) "$(TORCH_PIN)"
	.venv-lock/bin/python -m pip install -q --no-build-isolation -c .venv-lock/shared.txt deepspeed
	.venv-lock/bin/python -m pip install -q $(TORCH_INDEX) -c .venv-lock/shared.txt -e '.[dev]'
	.venv-lock/bin/python -m pip freeze --exclude-editable | LC_ALL=C sort > $(LOCK).new
	mv $(LOCK).new $(LOCK) && rm -rf .venv-lock
	@echo "wrote $(LOCK) ($$(wc -l < $(LOCK)) pins); make install TORCH_VARIANT=$(TORCH_VARIANT) installs from it"

# `dvc plots show` offline: DVC's page template with vega, vega-lite and vega-embed inlined, from the npm registry
# at install time (.dvc/config: plots.html_template); without npm, DVC's own online page and a warning
$(PLOTS_TEMPLATE): infra/dvc_plots/build_template.py | $(VENV)/.installed
	$(PY) infra/dvc_plots/build_template.py $@

plots-template: $(VENV)/.installed  ## (re)build the offline page template of `dvc plots show`
	$(PY) infra/dvc_plots/build_template.py $(PLOTS_TEMPLATE)

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

clean:  ## remove what the pipeline writes: outputs, metrics, MLflow store, checkpoints, Prefect state (not the DVC cache)
	rm -rf data metrics reports mlruns.db mlartifacts mlruns checkpoints .prefect dvc_plots
