# Two commands on a fresh machine: `make run` (the main job on the demo cohort) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO ?= build/demo
RUN_DIR ?= build/runs/demo
PYTEST_ARGS ?=

.PHONY: venv run demo test test-fast lint format bench images clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

$(DEMO)/cohort.json: | $(STAMP)
	$(VENV)/bin/healnet synth --out $(DEMO) --patients 160 --seed 0

$(DEMO)/features/report.json: $(DEMO)/cohort.json
	$(VENV)/bin/healnet preprocess-slides $(DEMO)/slides.parquet --out $(DEMO)/features

demo: $(DEMO)/features/report.json

run: demo
	$(VENV)/bin/healnet train --cohort $(DEMO) --out $(RUN_DIR)
	$(VENV)/bin/healnet evaluate --run $(RUN_DIR) --cohort $(DEMO)

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: venv
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

test: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest -q $(PYTEST_ARGS)

test-fast: venv
	$(VENV)/bin/pytest -q -m "not slow" $(PYTEST_ARGS)

bench: venv demo
	$(PY) benchmarks/train_throughput.py
	$(PY) benchmarks/tiling.py

clean:
	rm -rf build
