# make run   - set up .venv and run the daemon on config/rotator.toml
# make test  - set up .venv, check the test servers' binaries, run the test suite
VENV   ?= .venv
PYTHON ?= python3
CONFIG ?= config/rotator.toml
BIN     = $(VENV)/bin

.PHONY: run test lint typecheck bench install clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

install: $(BIN)/.installed

run: $(BIN)/.installed
	$(BIN)/rotator --config $(CONFIG) init
	exec $(BIN)/rotator --config $(CONFIG) run

test: $(BIN)/.installed
	scripts/ensure-test-servers
	$(BIN)/pytest

lint: $(BIN)/.installed
	$(BIN)/ruff check rotator plugins tests bench

typecheck: $(BIN)/.installed
	$(BIN)/mypy

bench: $(BIN)/.installed
	scripts/ensure-test-servers
	$(BIN)/python bench/rotations.py

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
