# saex: `make run` sets up and runs the smoke matrix on the embedded model; `make test` runs the tests.
# Both are idempotent: the venv, the embedded model and corpus, and cached artifacts are reused.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: setup run test test-fast lint format bench clean-results

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)
	$(BIN)/saex setup

run: setup
	$(BIN)/saex run smoke

test: setup
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not integration"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: setup
	$(BIN)/python -m pytest -q benchmarks --benchmark-only

clean-results:
	@echo "results are never deleted by make; remove results/saex.sqlite yourself if you mean it"
