# The two commands of the README. Each creates the environment it needs from the lock file.
#   make run    the whole DVC pipeline on the CPU quickstart profile (real data, offline mirror)
#   make test   the test suite
# For development: `make lint` (ruff, ruff format, mypy; CI runs it before the tests) and
# `make test-fast` (the unit tier, about a minute).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev

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

.PHONY: install install-dev run test test-fast lint bench-preprocess chromium serve plots-template

# Two locks, each the full closure of its packages, installed with --no-deps (no resolver
# run, nothing unlisted pulled in): requirements.lock is what `make run` needs;
# requirements-dev.lock adds the test, lint and team-service tools and the JAX and PyTorch
# backends (~1.4 GB that a pipeline run does not unpack). tests/repo/test_locks.py checks both.
# --no-compile: no bytecode for every installed module up front (about a minute here);
# Python writes it on first import, for the modules a run actually imports.
PIP := $(BIN)/pip install --quiet --disable-pip-version-check --no-deps --no-compile
# uv (pinned in requirements.lock, installed first by pip) unpacks the same pinned wheels
# in parallel: the runtime lock in ~13 s instead of ~56 s here, a quarter of `make run`'s
# set-up. It reads no pip config, so pip's find-links (PIP_FIND_LINKS: the machine's local
# torch +cpu wheel) is passed on. If uv cannot install a lock, pip installs it as before.
UV := $(BIN)/uv pip install --quiet --no-deps --python $(BIN)/python \
	$(foreach link,$(PIP_FIND_LINKS),--find-links $(link))
LOCKED_UV = $$(grep -E '^uv==' requirements.lock)
$(STAMP): requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) $(LOCKED_UV)
	$(UV) -r requirements.lock || $(PIP) -r requirements.lock
	$(UV) -e . || $(PIP) -e .
	touch $@

$(DEV_STAMP): $(STAMP) requirements-dev.lock
	$(UV) -r requirements-dev.lock || $(PIP) -r requirements-dev.lock
	touch $@

install-dev: install $(DEV_STAMP)

# The serving install (issue 22): requirements-serving.lock alone (no TensorFlow, Keras, JAX
# or torch) and the package, in .venv-serving; the app, `predict` and the pyfunc run there
# on a bundle's exported model. tests/repo/test_serving_lock.py builds one the same way.
SERVING_VENV := .venv-serving
SERVING_STAMP := $(SERVING_VENV)/.installed
$(SERVING_STAMP): requirements-serving.lock pyproject.toml
	$(PYTHON) -m venv $(SERVING_VENV)
	$(SERVING_VENV)/bin/pip install --quiet --disable-pip-version-check --no-deps --no-compile \
		-r requirements-serving.lock
	$(SERVING_VENV)/bin/pip install --quiet --disable-pip-version-check --no-deps --no-compile -e .
	touch $@

.PHONY: install-serving
install-serving: $(SERVING_STAMP)

# GPU runners (CUDA 12 driver): `make install GPU=1` adds requirements-gpu.lock, JAX with
# its CUDA plugin and the NVIDIA libraries as wheels (no system CUDA toolkit needed). Run
# with KERAS_BACKEND=jax (params: train.backend: jax); README "GPU runners" says why.
# tests/repo/test_gpu_runner.py resolves this lock against the index so that it cannot rot.
GPU ?= 0
GPU_STAMP := $(VENV)/.installed-gpu
$(GPU_STAMP): $(STAMP) requirements-gpu.lock
	$(PIP) -r requirements-gpu.lock
	touch $@

ifeq ($(GPU),1)
install: $(GPU_STAMP)
endif
install: $(STAMP)
	@$(MAKE) --no-print-directory $(PLOTS_TEMPLATE) || echo "warning: no $(PLOTS_TEMPLATE): \
	dvc plots show fails until \`make plots-template\` succeeds (it needs npm and its registry)"

# `dvc plots show` offline. DVC's own page loads vega, vega-lite and vega-embed from a CDN
# and is blank offline; .dvc/config points `plots.html_template` at this page instead, with
# the three libraries inlined (pinned versions, checked against these sha512 sums).
PLOTS_TEMPLATE := .dvc/offline-plots.html
PLOTS_JS := vega@5.33.1 vega-lite@5.23.0 vega-embed@6.29.0
define PLOTS_JS_SHA512
d5f02b7d50d4a956dbe73f27fbf9d541bf95341cf1f2cbd8e82aecc932b85239b8cab77d2356aea0ac4100f5cb09abd8d4b72b6c752c9106c650ff205cecf243  vega-5.33.1.tgz
97827af80584dc3223be8bc4a079762ddb425247e6e33b3c5f1c7b20dc19100bfe5d56fa911eaf20dd60b77b7680dda0b3fcb80d84ecfd13e84de600b8483a98  vega-lite-5.23.0.tgz
3e696c8532ed2c52e05ad17f6f6dd3d4ec17e7702e809f51677a8f136734d551406e0b77fc648d23f7adcc0fc6cddae471e5c599af850c7357529a4ab8cd14e9  vega-embed-6.29.0.tgz
endef
export PLOTS_JS_SHA512
PLOTS_NPM := .dvc/tmp/plots-npm

plots-template: $(PLOTS_TEMPLATE)

# A library holding "</script" would end the inline script early: refused, not inlined.
$(PLOTS_TEMPLATE): Makefile
	rm -rf $(PLOTS_NPM) && mkdir -p $(PLOTS_NPM)
	cd $(PLOTS_NPM) && npm pack --silent $(PLOTS_JS) >/dev/null
	cd $(PLOTS_NPM) && echo "$$PLOTS_JS_SHA512" | sha512sum --check --quiet
	{ printf '%s\n' '<!DOCTYPE html>' '<html>' '<head>' '<meta charset="utf-8">' \
	    '{refresh_tag}' '<title>DVC plots</title>' \
	    '<style>body { font-family: sans-serif; } table { border-spacing: 15px; }</style>'; \
	  for package in $(PLOTS_JS); do \
	    js=$$(tar -xzOf $(PLOTS_NPM)/$${package/@/-}.tgz package/build/$${package%@*}.min.js); \
	    if grep -qi '</script' <<<"$$js"; then echo "$$package holds </script" >&2; exit 1; fi; \
	    printf '<script>/* %s, inlined by make plots-template */\n%s\n</script>\n' "$$package" "$$js"; \
	  done; \
	  printf '%s\n' '</head>' '<body>' '{plot_divs}' '</body>' '</html>'; } > $(PLOTS_NPM)/page.html
	mv $(PLOTS_NPM)/page.html $@ && rm -rf $(PLOTS_NPM)

# dvc exp run records the run as an experiment and sets profile=quickstart in params.yaml
# (as applied experiments do); `git checkout params.yaml` returns to the paper profile.
run: install
	@git rev-parse --verify -q HEAD >/dev/null || { echo "make run needs a git checkout with a commit"; exit 1; }
	dvc exp run -S profile=quickstart

# Experiments side by side in 120 columns (README "Comparing runs"): each experiment's test
# and leakage-free accuracy and its lowest class recall on the test set, sorted by
# leakage-free accuracy, and the parameters that differ from the baseline. --drop hides
# every column that is not a parameter (the other metrics, data counts, dependency digests,
# the creation time) by naming the parameters' sections (tests/integration/test_dvc_views.py
# checks that it names each section of params.yaml); --keep brings the three metrics back.
# (leakage_free.min_recall, the gate's, would take 8 more columns than the 120.)
COMPARE_KEEP := (test|leakage_free)\.accuracy$$|test\.min_recall$$
COMPARE_DROP := (?!Experiment$$|profile$$|params\.yaml:|profiles/|(common|acquire|clean|preprocess|augment|model|train|evaluate|registry|serving|localise|audit|tracking)\.)
.PHONY: compare
compare:
	dvc exp show --no-pager --only-changed --sort-by leakage_free.accuracy --sort-order desc \
	  --keep '$(COMPARE_KEEP)' --drop '$(COMPARE_DROP)'

# The browser test drives Debian's Chromium (never `playwright install`: no downloads here).
chromium:
	@command -v chromium >/dev/null || { apt-get update -qq && apt-get install -y -qq chromium >/dev/null; }

test: install-dev chromium
	$(BIN)/python -m pytest -q -ra

# The unit tier: pure functions on tiny generated inputs; no slow, integration or browser test
# and none that reads the data mirror (markers in pyproject.toml; `data` is set by conftest).
FAST_TESTS := not slow and not data
test-fast: install-dev
	$(BIN)/python -m pytest -q -ra -m "$(FAST_TESTS)" tests/unit tests/repo

# The same checks as .pre-commit-config.yaml; mypy's scope and strictness are in pyproject.toml.
lint: install-dev
	$(BIN)/ruff check src tests bench services
	$(BIN)/ruff format --check src tests bench services
	$(BIN)/mypy

# The web app on the champion model (or MODEL=path/to/bundle); prints its local URL.
serve: install
	$(BIN)/python -m braintumor.serving.app $(if $(MODEL),--model $(MODEL),)

# A PNG of the real app answering a real slice (class, confidences, map) in headless
# Chromium: bench/screenshot.py, on models/bundle (or MODEL=...), into
# figures/app_screenshot.png (or OUT=...; figures/ is not committed).
.PHONY: screenshot
screenshot: install-dev
	nice -n 10 $(BIN)/python bench/screenshot.py --model $(or $(MODEL),models/bundle) \
		$(if $(OUT),--out $(OUT),)

bench-preprocess: install
	$(BIN)/python bench/preprocess.py

# Team services on loopback (docs/team.md): PostgreSQL + SeaweedFS (S3) + MLflow with basic
# auth, all data under .services/. Optional: `make run` and `make test` never need them.
.PHONY: services-up services-down services-status
services-up: install-dev
	$(BIN)/python services/team_services.py up

services-down: install-dev
	$(BIN)/python services/team_services.py down

services-status: install-dev
	$(BIN)/python services/team_services.py status
