# The two commands of the README: `make run` and `make test`. Both set up .venv themselves.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: run test lint bench demo clean

$(VENV)/.demo: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[pipeline]'
	touch $@

$(VENV)/.dev: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@ $(VENV)/.demo

run: $(VENV)/.demo
	$(VENV)/bin/bedside serve --host $(HOST) --port $(PORT)

demo: $(VENV)/.demo
	$(VENV)/bin/bedside demo

lint: $(VENV)/.dev
	$(PY) -m ruff check src tests bench

test: $(VENV)/.dev lint
	$(PY) -m pytest

bench: $(VENV)/.dev
	$(PY) bench/server_latency.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .ruff_cache
