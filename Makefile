# Two commands on a fresh machine: `make run` (the main job on the demo cohort) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
REGISTRY ?= build/registry
PYTEST_ARGS ?=

IMAGE_REGISTRY ?= registry.example.com/healnet
# the image tag is the package version, defined once in pyproject.toml
IMAGE_TAG ?= $(shell python3 -c "import tomllib; print(tomllib.load(open('pyproject.toml', 'rb'))['project']['version'])")
HEALNET_IMAGE ?= $(IMAGE_REGISTRY)/healnet:$(IMAGE_TAG)
HEALNET_GPU_IMAGE ?= $(IMAGE_REGISTRY)/healnet-gpu:$(IMAGE_TAG)
GIT_SHA := $(shell git rev-parse HEAD 2>/dev/null || echo unknown)

.PHONY: venv run serve compile test test-fast lint format bench images clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

# The training pipeline through kfp.local on the synthetic demo cohort (generated into build/demo when missing).
run: venv
	$(PY) -m pipelines run-local --param registry_dir=$(REGISTRY)

serve: venv
	BENTOML_HOME=$(REGISTRY) HEALNET_REGISTRY_DIR=$(REGISTRY) $(VENV)/bin/bentoml serve

compile: venv
	HEALNET_IMAGE=$(HEALNET_IMAGE) HEALNET_GPU_IMAGE=$(HEALNET_GPU_IMAGE) $(PY) -m pipelines compile --output build/healnet_pipeline.yaml

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

format: venv
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

test: lint
	$(VENV)/bin/pytest -q $(PYTEST_ARGS)

test-fast: venv
	$(VENV)/bin/pytest -q -m "not slow" $(PYTEST_ARGS)

bench: venv
	$(PY) benchmarks/train_throughput.py
	$(PY) benchmarks/tiling.py
	$(PY) benchmarks/serve_load.py

images:
	@command -v docker >/dev/null && docker info >/dev/null 2>&1 || { echo "make images: no Docker engine on this machine; run it where Docker is available (see docs/pipeline.md)"; exit 1; }
	DOCKER_BUILDKIT=1 docker build -f components/Dockerfile --build-arg GIT_SHA=$(GIT_SHA) -t $(HEALNET_IMAGE) .
	DOCKER_BUILDKIT=1 docker build -f components/Dockerfile.gpu --build-arg GIT_SHA=$(GIT_SHA) -t $(HEALNET_GPU_IMAGE) .
	docker push $(HEALNET_IMAGE)
	docker push $(HEALNET_GPU_IMAGE)

clean:
	rm -rf build
