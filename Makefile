# The two commands of the README: `make run` and `make test`. Both set up .venv themselves.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Server options, e.g. make run PORT=9000 or SERVE_ARGS="--grpc-port -1"; every default lives in
# src/bedside/settings.py (bedside settings lists them).
SERVE_ARGS ?=
SERVE_ARGS += $(if $(HOST),--host $(HOST)) $(if $(PORT),--port $(PORT))

.PHONY: run test lint bench demo proto settings clean

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
	$(VENV)/bin/bedside serve $(SERVE_ARGS)

demo: $(VENV)/.demo
	$(VENV)/bin/bedside demo

lint: $(VENV)/.dev
	$(PY) -m ruff check src tests bench
	$(PY) -m mypy

test: $(VENV)/.dev lint
	$(PY) -m pytest

bench: $(VENV)/.dev
	$(PY) bench/server_latency.py

# Regenerate the OIP v2 gRPC messages after editing oip.proto (the generated file is committed).
proto: $(VENV)/.dev
	cd src && ../$(PY) -m grpc_tools.protoc -I. --python_out=. --pyi_out=. bedside/server/grpc/oip.proto

# Every server setting, its value and where it came from (defaults, BEDSIDE_* variables).
settings: $(VENV)/.demo
	$(VENV)/bin/bedside settings

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .ruff_cache
