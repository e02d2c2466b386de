# keyload: `make demo` and `make test` set everything up on a fresh machine.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
UNITS ?= 1000
WORKDIR ?=
# Extras for `make test`: pcsc (pyscard builds from source) when swig and the PC/SC headers
# are here (`make system-deps`); python-pkcs11 comes with the test extra (a wheel).
EXTRAS ?= test$(shell command -v swig >/dev/null 2>&1 && [ -e /usr/include/PCSC/winscard.h ] && echo ,pcsc)

comma := ,
SYSTEM_DEPS := softhsm2 opensc pcscd vsmartcard-vpcd swig libpcsclite-dev gcc postgresql chromium

.PHONY: venv demo test test-fast lint typecheck unit-tests bench bench-hardware bench-service conformance clean system-deps \
	venv-floors test-floors

STAMP := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[$(EXTRAS)]'
	touch $@

venv: $(STAMP)

# The declared floors: a venv of its own with every dependency at the lowest version
# pyproject.toml allows (constraints/floors.txt), for `make test-floors`.
FLOORS_VENV ?= .venv-floors
FLOORS_BIN := $(FLOORS_VENV)/bin
FLOORS_STAMP := $(FLOORS_VENV)/.installed-$(subst $(comma),-,$(EXTRAS))

$(FLOORS_STAMP): pyproject.toml constraints/floors.txt
	$(PY) -m venv $(FLOORS_VENV)
	$(FLOORS_BIN)/python -m pip install -q --upgrade pip
	$(FLOORS_BIN)/python -m pip install -q -c constraints/floors.txt -e '.[$(EXTRAS)]'
	touch $@

venv-floors: $(FLOORS_STAMP)

# Debian packages for the hardware paths (SoftHSM2 + pkcs11-tool, pcscd + vpcd, and what
# pyscard needs to build) and the browser of the dashboard's tests (chromium). Run as root. Without them those tests skip (and fail in CI).
system-deps:
	@if [ "$$(id -u)" != 0 ]; then echo "system-deps installs Debian packages: run it as root"; exit 1; fi
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(SYSTEM_DEPS)

demo: venv
	$(BIN)/keyload demo --units $(UNITS) $(if $(WORKDIR),--workdir $(WORKDIR))
	@echo
	@echo "keyload is installed in $(VENV). To have it on PATH in this shell:"
	@echo "  . $(VENV)/bin/activate      (or: export PATH=\"$(abspath $(BIN)):\$$PATH\")"

lint: venv
	$(BIN)/ruff check src tests benchmarks

typecheck: venv
	$(BIN)/mypy

unit-tests: venv
	$(BIN)/python -m pytest -q

test: lint typecheck unit-tests

# The quick loop while developing: the suite without the slow and the hardware tests.
# PYTHONDONTWRITEBYTECODE emptied: pytest then keeps its rewritten test modules between
# runs (where the environment turns bytecode off, rewriting them costs 10-15 s a run).
test-fast: venv
	PYTHONDONTWRITEBYTECODE= $(BIN)/python -m pytest -q -m "not slow and not hardware"

# `make test` again at the floors: lint, types (the floor mypy, then the newest one in
# .venv against the floor libraries) and the whole suite, which checks that the floors are
# what got installed.
test-floors: venv-floors venv
	$(FLOORS_BIN)/ruff check src tests benchmarks
	$(FLOORS_BIN)/mypy --cache-dir $(FLOORS_VENV)/mypy-cache
	$(BIN)/mypy --cache-dir $(FLOORS_VENV)/mypy-cache-newest --python-executable $(FLOORS_BIN)/python
	KEYLOAD_FLOORS=constraints/floors.txt $(FLOORS_BIN)/python -m pytest -q -p no:cacheprovider

conformance: venv
	$(BIN)/keyload conformance

bench: venv
	$(BIN)/python benchmarks/throughput.py
	$(BIN)/python benchmarks/campaign.py

bench-hardware: venv
	$(BIN)/python benchmarks/pkcs11_export.py
	$(BIN)/python benchmarks/pcsc.py

bench-service: venv
	$(BIN)/python benchmarks/service.py

clean:
	rm -rf $(VENV) $(FLOORS_VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
