# Two commands set everything up (see README.md):
#   make demo   create .venv, install, prepare the default corpus and train the small demo model
#   make test   create .venv if needed, install, run the test suite
#   make lint   ruff (lint + format check) and mypy (the files in pyproject.toml: lm/config, lm/training, data)
#   make test-fast  the suite without slow, distributed and SLURM tests (a few minutes)
#   make device-wheels  the wheels that the GPU acceptance needs on a lent GPU machine with no network, in .whl/
#                   (docs/gpu-device.md)
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin

.PHONY: install demo test test-fast lint device-wheels clean

$(BIN)/lm: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[dev,eval]"
	touch $(BIN)/lm

install: $(BIN)/lm

demo: install
	$(BIN)/lm train main

test: install
	$(BIN)/python -m pytest -n 2 --dist loadfile --timeout 1200 -q

test-fast: install
	$(BIN)/python -m pytest -n 2 --dist loadfile --timeout 600 -q -m "not slow and not distributed and not slurm"

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

device-wheels: install
	PYTHON=$(BIN)/python scripts/device_wheels.sh

clean:
	rm -rf runs artifacts
