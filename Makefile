# Two commands on a fresh machine:
#   make demo   set up, then run the main job on the embedded default (no keys, no GPU, no downloads)
#   make test   set up, then run the tests
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup demo test ui lint

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# A stamp: `make setup` (and so `make demo` / `make test`) installs again only when pyproject.toml changed.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/python scripts/run_main_job.py

test: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest

ui: setup
	mkdir -p var/dagster_home var/landing var/config
	test -f var/dagster_home/dagster.yaml || cp dagster.yaml var/dagster_home/dagster.yaml
	DAGSTER_HOME=$(CURDIR)/var/dagster_home INTERP_DATA_DIR=$(CURDIR)/var $(BIN)/dg dev

lint:
	$(BIN)/ruff check .
