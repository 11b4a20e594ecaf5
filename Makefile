# The two commands of the README. Each creates the environment it needs from the lock file.
#   make run    the whole DVC pipeline on the CPU quickstart profile (real data, offline mirror)
#   make test   the test suite
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
STAMP := $(VENV)/.installed

# Offline switches (see ../shared/notes/mlops-facts.md §7).
export DVC_NO_ANALYTICS := 1
export MLFLOW_DISABLE_TELEMETRY := true
export GRADIO_ANALYTICS_ENABLED := False
export PATH := $(BIN):$(PATH)

# The team's offline mirror of the data sets, when it sits beside the checkout.
MIRROR_DEFAULT := $(abspath $(CURDIR)/../shared/datasets)
ifeq ($(origin BRAINTUMOR_MIRROR), undefined)
  ifneq ($(wildcard $(MIRROR_DEFAULT)),)
    export BRAINTUMOR_MIRROR := $(MIRROR_DEFAULT)
  endif
endif

.PHONY: install run test lint bench-preprocess chromium serve

$(STAMP): requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements.lock
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $@

install: $(STAMP)

# dvc exp run records the run as an experiment and sets profile=quickstart in params.yaml
# (as applied experiments do); `git checkout params.yaml` returns to the paper profile.
run: install
	@git rev-parse --verify -q HEAD >/dev/null || { echo "make run needs a git checkout with a commit"; exit 1; }
	dvc exp run -S profile=quickstart

# The browser test drives Debian's Chromium (never `playwright install`: no downloads here).
chromium:
	@command -v chromium >/dev/null || { apt-get update -qq && apt-get install -y -qq chromium >/dev/null; }

test: install chromium
	$(BIN)/python -m pytest -q -ra

lint: install
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

# The web app on the champion model (or MODEL=path/to/bundle); prints its local URL.
serve: install
	$(BIN)/python -m braintumor.app $(if $(MODEL),--model $(MODEL),)

bench-preprocess: install
	$(BIN)/python bench/preprocess.py
