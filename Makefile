# `make demo` and `make test` create .venv when it is missing and install what they need.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint bench bench-peers clean chromium

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed-base: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@ $(VENV)/.installed-base

demo: $(VENV)/.installed-base
	$(BIN)/retrybus demo

# the suite in two processes (pytest-xdist), each test file in one of them: most
# tests wait on servers and subprocesses, so two halve the time on two cores
TEST_WORKERS ?= 2

test: $(VENV)/.installed-dev chromium
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile

# The dashboard's browser tests drive Debian's chromium through Playwright (no
# browser download: `playwright install` is never run). Installed when missing.
chromium:
	@if [ ! -x /usr/bin/chromium ]; then \
		if [ "$$(id -u)" = 0 ]; then \
			echo "installing Debian's chromium for the dashboard's browser tests"; \
			(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
				|| echo "could not install chromium: the browser tests will say so"; \
		else \
			echo "the dashboard's browser tests need /usr/bin/chromium: sudo apt-get install -y chromium"; \
		fi; \
	fi

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy

bench: $(VENV)/.installed-dev
	$(BIN)/python bench/run.py

# retrybus beside Dramatiq, Celery and FastStream on the local Redis, RabbitMQ and
# NATS (bench/peers/README.md): a venv of its own, never in pyproject.toml or CI.
PEERS_VENV := bench/peers/.venv

$(PEERS_VENV)/.installed: bench/peers/requirements.txt pyproject.toml
	$(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(PEERS_VENV)/bin/python -m pip install --quiet -r bench/peers/requirements.txt -e ".[redis,rabbitmq,nats]"
	touch $@

bench-peers: $(PEERS_VENV)/.installed
	$(PEERS_VENV)/bin/python bench/peers/run.py $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
