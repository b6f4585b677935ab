# Two commands matter: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# Settings for the demo; `make demo DEMO_ARGS="--workers 1"` passes more options.
DEMO_DIR ?= runs/demo
DEMO_ARGS ?=

.PHONY: demo test install install-dev lint bench clean-runs

# The venv sees system site-packages so that a torch already installed there is kept.
$(VENV)/bin/python:
	$(PYTHON) -m venv --system-site-packages $(VENV)

# The onnx extra is part of the base install: `make demo` ends by exporting to ONNX.
$(VENV)/.installed: pyproject.toml scripts/ensure_torch.sh | $(VENV)/bin/python
	bash scripts/ensure_torch.sh $(PY)
	$(PIP) install -q -e '.[onnx]'
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PIP) install -q -e '.[dev,onnx]'
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

demo: $(VENV)/.installed
	$(VENV)/bin/motian demo --out $(DEMO_DIR) $(DEMO_ARGS)

test: $(VENV)/.installed-dev
	$(PY) -m pytest -q tests

lint: $(VENV)/.installed-dev
	$(PY) -m ruff check motian tests benchmarks

bench: $(VENV)/.installed-dev
	$(PY) benchmarks/data_pipeline.py

clean-runs:
	rm -rf runs
