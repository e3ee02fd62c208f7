# Two entry points for a fresh machine; each creates its own virtual environment in .venv.
#   make demo   install, then generate an image with the embedded default model
#   make test   install with the test references (diffusers, transformers), then run every test
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: demo test install install-test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch first and pinned: 2.13.0 is the CPU wheel on these machines; a looser spec pulls CUDA builds.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.installed
	$(BIN)/pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

demo: install
	$(BIN)/stablexl generate "grinning face" --seed 1 --output demo.png

# Per-clone tmp (--basetemp) so concurrent runs never clean up each other. The full-size parity modules
# run in processes of their own: each test needs up to 15 GB, and a fresh process keeps earlier tests'
# leftovers from adding to that peak on a 24 GB machine.
PYTEST := $(BIN)/python -m pytest -q --basetemp=.pytest_tmp
test: install-test
	$(PYTEST) -m "not fullsize"
	$(PYTEST) -m fullsize tests/models/test_parity_fullsize.py
	$(PYTEST) -m fullsize tests/test_pipeline_fullsize.py

bench: install-test
	$(BIN)/python benchmarks/load_sdxl_single_file.py

clean:
	rm -rf $(VENV) build src/*.egg-info
