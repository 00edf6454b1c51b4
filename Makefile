# Two commands on a fresh machine: `make run` (the main job on the demo cohort) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
REGISTRY ?= build/registry
PYTEST_ARGS ?=
# pytest-xdist workers; each test file runs whole in one worker (--dist loadfile), so its module fixtures
# (a served model, a pipeline run) are built once. The suite's servers and pipeline steps are largely
# subprocess start-up and waiting, which leaves a core idle in a serial run.
TEST_WORKERS ?= 2

IMAGE_REGISTRY ?= registry.example.com/healnet
# the image tag is the package version, defined once in pyproject.toml
IMAGE_TAG ?= $(shell python3 -c "import tomllib; print(tomllib.load(open('pyproject.toml', 'rb'))['project']['version'])")
HEALNET_IMAGE ?= $(IMAGE_REGISTRY)/healnet:$(IMAGE_TAG)
HEALNET_GPU_IMAGE ?= $(IMAGE_REGISTRY)/healnet-gpu:$(IMAGE_TAG)
GIT_SHA := $(shell git rev-parse HEAD 2>/dev/null || echo unknown)

.PHONY: venv run serve compile test test-fast lint format bench images images-docker images-buildah images-test pin-image lock clean

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
	$(VENV)/bin/pytest -q -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

test-fast: venv
	$(VENV)/bin/pytest -q -n $(TEST_WORKERS) --dist loadfile -m "not slow" $(PYTEST_ARGS)

bench: venv
	$(PY) benchmarks/train_throughput.py
	$(PY) benchmarks/tiling.py
	$(PY) benchmarks/serve_load.py

HEALNET_SERVICE_IMAGE ?= $(IMAGE_REGISTRY)/healnet-service:$(IMAGE_TAG)
IMAGE_NAMES = HEALNET_IMAGE=$(HEALNET_IMAGE) HEALNET_GPU_IMAGE=$(HEALNET_GPU_IMAGE) HEALNET_SERVICE_IMAGE=$(HEALNET_SERVICE_IMAGE) REGISTRY=$(REGISTRY)
# Base images other than the Dockerfiles' defaults, e.g. pinned by digest (README, Images):
#   make images PYTHON_IMAGE=python:3.11.17-slim-bookworm@sha256:... TORCH_IMAGE=pytorch/pytorch:...@sha256:...
PYTHON_BASE_ARG = $(if $(PYTHON_IMAGE),--build-arg PYTHON_IMAGE=$(PYTHON_IMAGE))
TORCH_BASE_ARG = $(if $(TORCH_IMAGE),--build-arg TORCH_IMAGE=$(TORCH_IMAGE))

# The three images: CPU steps, GPU training and the service (a Bento packing the champion of $(REGISTRY)).
# With a Docker engine they are built and pushed. Without one, rootful buildah/podman build them (scripts/images.sh
# build: bases that cannot be pulled are stood in for, the CUDA base by a CPU one) and nothing is pushed.
DOCKER_ENGINE = $(shell command -v docker >/dev/null && docker info >/dev/null 2>&1 && echo yes)
.SECONDEXPANSION:
images: $$(if $$(DOCKER_ENGINE),images-docker,images-buildah)

images-buildah: venv
	@echo "make images: no Docker engine here: building with buildah/podman; nothing is pushed, there is no registry"
	$(IMAGE_NAMES) scripts/images.sh build

# Build the images with buildah/podman, then run the pipeline's steps and the service inside them (CI).
images-test: venv
	$(IMAGE_NAMES) scripts/images.sh test

images-docker: venv
	DOCKER_BUILDKIT=1 docker build -f components/Dockerfile $(PYTHON_BASE_ARG) --build-arg GIT_SHA=$(GIT_SHA) -t $(HEALNET_IMAGE) .
	DOCKER_BUILDKIT=1 docker build -f components/Dockerfile.gpu $(TORCH_BASE_ARG) --build-arg GIT_SHA=$(GIT_SHA) -t $(HEALNET_GPU_IMAGE) .
	$(IMAGE_NAMES) scripts/images.sh context
	DOCKER_BUILDKIT=1 docker build -f serving/Dockerfile $(PYTHON_BASE_ARG) --build-arg GIT_SHA=$(GIT_SHA) -t $(HEALNET_SERVICE_IMAGE) build/images/bento-context
	docker push $(HEALNET_IMAGE)
	docker push $(HEALNET_GPU_IMAGE)
	docker push $(HEALNET_SERVICE_IMAGE)

# The images' lock files (requirements/*.lock: every package pinned, with sha256 hashes; pip --require-hashes
# installs them) from pyproject.toml and requirements/service.in. Where the PyTorch wheel page cannot be
# reached: make lock TORCH_WHEELS=<folder holding the CPU torch wheel>.
lock: venv
	test -x $(VENV)/bin/uv || $(PY) -m pip install -q uv
	UV=$(VENV)/bin/uv $(if $(TORCH_WHEELS),TORCH_WHEELS=$(TORCH_WHEELS)) scripts/lock.sh

# Pin the prod overlay's service image to the digest of the pushed image (docs/deploy.md, "Pinning the image"):
#   make pin-image DIGEST=sha256:...   the digest `docker push` printed, or `skopeo inspect` / `crane digest` of it
PROD_KUSTOMIZATION ?= k8s/overlays/prod/kustomization.yaml
pin-image:
	@echo '$(DIGEST)' | grep -Eqx 'sha256:[0-9a-f]{64}' || \
		{ echo "make pin-image: needs DIGEST=sha256:<64 hex digits>, got '$(DIGEST)' (docs/deploy.md)" >&2; exit 1; }
	sed -i -E -e 's/^(    newTag: ).*$$/\1$(IMAGE_TAG)/' -e 's/^(    digest: ).*$$/\1$(DIGEST)/' $(PROD_KUSTOMIZATION)
	@echo "pinned $(HEALNET_SERVICE_IMAGE)@$(DIGEST) in $(PROD_KUSTOMIZATION)"

clean:
	rm -rf build
