# Two commands on a fresh machine:
#   make demo   set up, then run the main job on the embedded default (no keys, no GPU, no downloads)
#   make test   set up, then run the tests
# Then: make ui (the Dagster UI), make sql Q="select ..." (DuckDB views; without Q: every view and its rows).
# All three use the data folder $(INTERP_DATA_DIR) (default ./var; e.g. make ui INTERP_DATA_DIR=/data/interp).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INTERP_DATA_DIR ?= var
DATA := $(abspath $(INTERP_DATA_DIR))

.PHONY: setup demo test ui sql lint

$(BIN)/python:
	@$(PYTHON) -m venv $(VENV)
	@$(BIN)/pip install -q --upgrade pip > $(VENV)/install.log 2>&1 || (cat $(VENV)/install.log; exit 1)

# A stamp: `make setup` (and so `make demo` / `make test`) installs again only when pyproject.toml changed.
# pip's output goes to .venv/install.log (shown only when it fails).
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	@echo "Installing the package and its dependencies into $(VENV) (pip's output: $(VENV)/install.log)"
	@$(BIN)/pip install -q torch==2.13.0 >> $(VENV)/install.log 2>&1 || (cat $(VENV)/install.log; exit 1)
	@$(BIN)/pip install -q -e ".[dev]" >> $(VENV)/install.log 2>&1 || (cat $(VENV)/install.log; exit 1)
	@touch $@

setup: $(VENV)/.installed

demo: setup
	@$(BIN)/python scripts/run_main_job.py --data-dir "$(DATA)"

test: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest

# `dg dev` starts in $DAGSTER_HOME, the code location named by ./workspace.yaml: started in the repository
# root, Dagster warns that ./dagster.yaml is ignored (the instance reads $DAGSTER_HOME/dagster.yaml, a copy).
ui: setup
	mkdir -p "$(DATA)/dagster_home" "$(DATA)/landing" "$(DATA)/config"
	test -f "$(DATA)/dagster_home/dagster.yaml" || cp dagster.yaml "$(DATA)/dagster_home/dagster.yaml"
	@cmp -s dagster.yaml "$(DATA)/dagster_home/dagster.yaml" || echo "Note: $(DATA)/dagster_home/dagster.yaml differs from ./dagster.yaml (kept: it may hold your settings); diff them to pick up the repository's new instance settings."
	cd "$(DATA)/dagster_home" && DAGSTER_HOME="$(DATA)/dagster_home" INTERP_DATA_DIR="$(DATA)" \
		"$(CURDIR)/$(BIN)/dg" dev -w "$(CURDIR)/workspace.yaml"

sql: setup
	@$(BIN)/python -m interp_assets.warehouse --db "$(DATA)/warehouse.duckdb" $(if $(Q),"$(Q)")

lint:
	$(BIN)/ruff check .
