# Two entry points that work on a fresh machine with Python 3.11+:
#   make demo   the example shop behind tagd
#   make test   the test suite
# Both build their own virtual environment in .venv and install tagd into it
# (a regular install, so that twistd finds the plugin as a user's install would).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test install bench

# pip, not python: a venv that failed half-way (no ensurepip) has a python but no pip,
# and is made again rather than used.
$(BIN)/pip:
	$(PYTHON) -m venv --clear $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

install: $(BIN)/pip
	$(BIN)/python -m pip install --quiet ".[test]"

demo: install
	$(BIN)/python -m tagd.demo $(DEMO_ARGS)

# From the checkout, so that PYTEST_ARGS names tests by their paths from here
# (tests/test_config.py); -P keeps the checkout off sys.path, so the tests import the
# installed tagd, as twistd does, and not its source beside them.
test: install
	$(BIN)/python -P -m pytest $(PYTEST_ARGS)

bench: install
	$(BIN)/python bench/proxy_throughput.py $(BENCH_ARGS)
