# keyload: `make demo` and `make test` set everything up on a fresh machine.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
UNITS ?= 1000
WORKDIR ?=

.PHONY: venv demo test lint typecheck unit-tests bench conformance clean

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(BIN)/keyload demo --units $(UNITS) $(if $(WORKDIR),--workdir $(WORKDIR))

lint: venv
	$(BIN)/ruff check src tests benchmarks

typecheck: venv
	$(BIN)/mypy

unit-tests: venv
	$(BIN)/python -m pytest -q

test: lint typecheck unit-tests

conformance: venv
	$(BIN)/keyload conformance tests/vectors/klp1/*.json

bench: venv
	$(BIN)/python benchmarks/throughput.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
