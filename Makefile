PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch is pinned and installed first so pip never resolves a CUDA build from the registry.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev,ray]'
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(VENV)/bin/luvc demo

test: setup
	$(PY) -m pytest -q
