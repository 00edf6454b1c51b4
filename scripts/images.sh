#!/usr/bin/env bash
# Build, and test, the project's three images without a Docker engine or a container registry: rootful
# buildah and podman (Debian packages). `make images` runs `build` where Docker is missing; `make
# images-test` (and CI, .ci/run) runs `test`. Needs root (but for `context`).
#
#   scripts/images.sh build   the CPU step image (components/Dockerfile), the GPU training image
#                             (components/Dockerfile.gpu) and the service image (serving/Dockerfile, from a Bento)
#   scripts/images.sh test    build, then run inside the images as a cluster would: the pipeline's real KFP
#                             components (kfp.local DockerRunner against podman's Docker API) as UID 10001 with
#                             a read-only root filesystem, a tmpfs /tmp and no network on a synthetic cohort;
#                             then the service from its image (read-only, non-root) with /readyz and /predict
#   scripts/images.sh context the service image's build context only (a Bento with its packed model, in
#                             build/images/bento-context): needs the venv, not an engine (make images-docker)
#
# Base images that cannot be pulled are assembled here and kept in podman's storage: the Python base
# (PYTHON_IMAGE of the Dockerfiles) from Debian bookworm's packages with mmdebstrap, and, for the GPU image, a
# CPU stand-in of the CUDA PyTorch base (that Python plus the CPU torch wheel): the GPU image built on it is
# for testing the Dockerfile and the steps, not for GPU nodes. Re-runs reuse the bases and buildah's layer
# cache (--layers). The machine's CA bundle, pip configuration and local wheel folders are mounted read-only
# into the RUN steps only; nothing of them is in the images. Nothing is pushed.
#
# Environment: HEALNET_IMAGE, HEALNET_GPU_IMAGE, HEALNET_SERVICE_IMAGE (image names; default
# registry.example.com/healnet/{healnet,healnet-gpu,healnet-service}:<version>), PYTHON_IMAGE and
# TORCH_IMAGE (base images, e.g. pinned by digest; default: the Dockerfiles' ARG defaults), IMAGES_WORK
# (work folder, default build/images), VENV (default .venv), MODEL_TAG and REGISTRY (`build` packs MODEL_TAG,
# default the champion of REGISTRY=build/registry, into the service image; none: an image without a packed
# model, which serves the champion of a mounted store), BUILD_MOUNTS (host paths mounted read-only into
# RUN steps), TEST_PATIENTS, TEST_EPOCHS, SERVICE_PORT.
set -Eeuo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
MODE=${1:-test}
case "$MODE" in build | test | context) ;; *)
    echo "usage: scripts/images.sh [build|test|context]" >&2
    exit 2
    ;;
esac

WORK=$(mkdir -p "${IMAGES_WORK:-$ROOT/build/images}" && cd "${IMAGES_WORK:-$ROOT/build/images}" && pwd)
VENV=${VENV:-$ROOT/.venv}
VERSION=$(python3 -c "import tomllib; print(tomllib.load(open('pyproject.toml', 'rb'))['project']['version'])")
GIT_SHA=$(git rev-parse HEAD 2>/dev/null || echo unknown)
HEALNET_IMAGE=${HEALNET_IMAGE:-registry.example.com/healnet/healnet:$VERSION}
HEALNET_GPU_IMAGE=${HEALNET_GPU_IMAGE:-registry.example.com/healnet/healnet-gpu:$VERSION}
HEALNET_SERVICE_IMAGE=${HEALNET_SERVICE_IMAGE:-registry.example.com/healnet/healnet-service:$VERSION}
BUILD_MOUNTS=${BUILD_MOUNTS:-/etc/ssl/certs/ca-certificates.crt /etc/pip.conf /etc/xdg/pip /root/.config/pip /opt/wheels /opt/pypi /opt/pypi-more}
TEST_PATIENTS=${TEST_PATIENTS:-120}
TEST_EPOCHS=${TEST_EPOCHS:-5}
SERVICE_PORT=${SERVICE_PORT:-39300}
SERVICE_CONTAINER=healnet-service-images-test
STEP_UID=10001     # components/Dockerfile's user
SERVICE_UID=1034   # serving/Dockerfile's user (k8s/base runs as it)

STAGE=setup
PODMAN_SERVICE_PID=
declare -A BUILD_SECONDS=()
declare -a RESULTS=()

say() { printf '\n==> %s\n' "$*"; }
fail() {
    printf '\nimages.sh %s: FAILED in stage "%s": %s\n' "$MODE" "$STAGE" "$*" >&2
    exit 1
}
on_error() { fail "command failed (exit $1) at line $2: $3"; }
trap 'on_error $? $LINENO "$BASH_COMMAND"' ERR
cleanup() {
    podman rm -f -i "$SERVICE_CONTAINER" >/dev/null 2>&1 || true
    # step containers that an interrupted pipeline run left behind (kfp.local removes them when they end)
    podman ps -q --filter "ancestor=$HEALNET_IMAGE" --filter "ancestor=$HEALNET_GPU_IMAGE" 2>/dev/null |
        xargs -r podman rm -f >/dev/null 2>&1 || true
    if [ -n "$PODMAN_SERVICE_PID" ]; then kill "$PODMAN_SERVICE_PID" 2>/dev/null || true; fi
}
trap cleanup EXIT

# A name as podman stores it: python:3.11 -> docker.io/library/python:3.11, a/b:1 -> docker.io/a/b:1.
qualified() {
    local name=$1 first=${1%%/*}
    if [[ $name == */* ]] && { [[ $first == *.* ]] || [[ $first == *:* ]] || [ "$first" = localhost ]; }; then
        echo "$name"
    elif [[ $name == */* ]]; then
        echo "docker.io/$name"
    else
        echo "docker.io/library/$name"
    fi
}
dockerfile_arg() { sed -n "s/^ARG $2=//p" "$1" | head -n 1; }
human_size() { numfmt --to=si --round=nearest --format '%.2f' --suffix=B "$1"; }
# run LOG SECONDS COMMAND...: the command's output to LOG; its last lines are shown when it fails or times out
run() {
    local log=$1 limit=$2
    shift 2
    if ! timeout "$limit" "$@" >"$log" 2>&1; then
        tail -n 40 "$log" >&2
        fail "failed or timed out (limit $limit s); full output: $log"
    fi
}
stand_in_label() { podman image inspect --format '{{index .Labels "io.healnet.stand-in"}}' "$1"; }
# pull IMAGE: true when pulled (where a registry is reachable; fails at once on these machines)
pull() { timeout 1800 podman pull --quiet "$1" >"$LOGS/pull.log" 2>&1; }

# The service image's build context: a Bento (bentofile.yaml) with the packed model version's store under
# models/ (what `bentoml containerize` adds), in $WORK/bento-context. Needs the venv, not an engine.
prepare_bento_context() {
    STAGE="Bento"
    REGISTRY=${REGISTRY:-$ROOT/build/registry}
    if [ -z "${MODEL_TAG:-}" ] && [ -f "$REGISTRY/champion.json" ]; then
        MODEL_TAG=$(python3 -c "import json, sys; print(json.load(open(sys.argv[1]))['tag'])" "$REGISTRY/champion.json")
    fi
    [ -x "$VENV/bin/bentoml" ] || make -s venv
    model_args=()
    if [ -n "${MODEL_TAG:-}" ]; then
        model_args=(--arg "model_tag=$MODEL_TAG")
        say "bentoml build, packing $MODEL_TAG from $REGISTRY"
    else
        say "bentoml build without a packed model (no MODEL_TAG and no champion in $REGISTRY): the image serves the champion of a mounted store"
    fi
    # A BentoML store of its own with the packed model version, so that nothing is written to the registry
    BENTO_HOME="$WORK/bentoml"
    rm -rf "$BENTO_HOME"
    mkdir -p "$BENTO_HOME/models/healnet"
    if [ -n "${MODEL_TAG:-}" ]; then
        model_version=${MODEL_TAG#*:}
        [ -d "$REGISTRY/models/healnet/$model_version" ] || fail "model $MODEL_TAG is not in $REGISTRY"
        cp -a "$REGISTRY/models/healnet/$model_version" "$BENTO_HOME/models/healnet/"
        printf '%s' "$model_version" >"$BENTO_HOME/models/healnet/latest"
    fi
    run "$LOGS/bentoml-build.log" 600 env BENTOML_HOME="$BENTO_HOME" HEALNET_REGISTRY_DIR="$BENTO_HOME" \
        BENTOML_DO_NOT_TRACK=true PYTHONPATH="$ROOT" nice -n 10 "$VENV/bin/bentoml" build "${model_args[@]}"
    bento_dir="$BENTO_HOME/bentos/healnet/$(cat "$BENTO_HOME/bentos/healnet/latest")"
    # The build context: the Bento and the packed model version's store (what `bentoml containerize` adds)
    context="$WORK/bento-context"
    rm -rf "$context"
    cp -a "$bento_dir" "$context"
    cp -a "$BENTO_HOME/models" "$context/models"
    echo "Bento $(basename "$bento_dir") in $context; $(grep -c '^[A-Za-z]' "$context/env/python/requirements.txt") locked packages in env/python/requirements.txt"
}

# ---------------------------------------------------------------------------------------------------------
LOGS="$WORK/logs"
mkdir -p "$LOGS"
if [ "$MODE" = context ]; then
    prepare_bento_context
    echo "build it with: docker build -f serving/Dockerfile --build-arg GIT_SHA=$GIT_SHA -t $HEALNET_SERVICE_IMAGE $WORK/bento-context"
    exit 0
fi

STAGE=tools
[ "$(id -u)" = 0 ] || fail "needs root (rootful buildah and podman)"
say "scripts/images.sh $MODE: buildah/podman, no Docker engine, no registry; work folder $WORK"
missing=()
for tool in buildah podman runc mmdebstrap; do command -v "$tool" >/dev/null || missing+=("$tool"); done
if [ ${#missing[@]} -gt 0 ]; then
    say "installing ${missing[*]} (apt)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq buildah podman runc mmdebstrap >/dev/null
fi
# podman's default ulimits are above what root may set on these machines (no CAP_SYS_RESOURCE), and crun
# refuses their hybrid cgroup layout: the work folder's containers.conf, not /etc.
nofile=$(ulimit -Hn)
nproc=$(ulimit -Hu)   # at most 32768: buildah's chroot isolation starts its RUN steps with that
if [ "$nproc" = unlimited ] || [ "$nproc" -gt 32768 ]; then nproc=32768; fi
cat >"$WORK/containers.conf" <<CONF
[containers]
default_ulimits = ["nofile=$nofile:$nofile", "nproc=$nproc:$nproc"]
[engine]
runtime = "runc"
CONF
export CONTAINERS_CONF="$WORK/containers.conf"
echo "$(buildah --version), $(podman --version), $(runc --version | head -n 1)"
MOUNTS=()
for path in $BUILD_MOUNTS; do
    if [ -e "$path" ]; then MOUNTS+=(--volume "$path:$path:ro"); fi
done

build() { # build NAME DOCKERFILE CONTEXT [buildah args...]: timed, layer-cached, offline bases
    local name=$1 file=$2 context=$3 started=$SECONDS log
    shift 3
    log="$LOGS/build-$(tr -c 'a-zA-Z0-9.\n-' _ <<<"${name##*/}").log"
    say "building $name ($file; log: $log)"
    run "$log" 2400 nice -n 10 buildah bud --layers --pull=never --isolation chroot --network host "${MOUNTS[@]}" \
        --build-arg GIT_SHA="$GIT_SHA" -f "$file" -t "$name" "$@" "$context"
    BUILD_SECONDS[$name]=$((SECONDS - started))
    echo "built $name in ${BUILD_SECONDS[$name]} s ($(grep -c -- '--> Using cache' "$log" || true) steps from the layer cache)"
}

# ---------------------------------------------------------------------------------------------------------
STAGE="python base"
PYTHON_BASE=$(qualified "${PYTHON_IMAGE:-$(dockerfile_arg components/Dockerfile PYTHON_IMAGE)}")
[ "$(dockerfile_arg serving/Dockerfile PYTHON_IMAGE)" = "$(dockerfile_arg components/Dockerfile PYTHON_IMAGE)" ] ||
    fail "serving/Dockerfile and components/Dockerfile must default to the same PYTHON_IMAGE"
if podman image exists "$PYTHON_BASE"; then
    say "python base: $PYTHON_BASE ($(stand_in_label "$PYTHON_BASE" | sed 's/^$/as pulled/;s/^debian$/the Debian stand-in/'), cached)"
elif pull "$PYTHON_BASE"; then
    say "python base: $PYTHON_BASE (pulled)"
elif [[ $PYTHON_BASE == *@* ]]; then
    fail "cannot pull $PYTHON_BASE, and a stand-in cannot carry its digest (pull it into podman's storage first)"
else
    say "python base: assembling a stand-in for $PYTHON_BASE from Debian bookworm packages (mmdebstrap)"
    started=$SECONDS
    # The machine's own apt sources when it has them (mirror and proxy settings); Debian's python is 3.11.2
    # in /usr/bin; EXTERNALLY-MANAGED is removed so that pip behaves as in the official image.
    mirror=/etc/apt/sources.list.d/debian.sources
    [ -f "$mirror" ] || mirror=http://deb.debian.org/debian
    rm -f "$WORK/python-rootfs.tar"
    # shellcheck disable=SC2016 # "$1" is for mmdebstrap's hooks
    run "$LOGS/python-base.log" 1200 nice -n 10 mmdebstrap --mode=root --variant=minbase \
        --include=ca-certificates,python3,python3-venv,python3-pip,python-is-python3 \
        --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/doc/*' \
        --dpkgopt='path-include=/usr/share/doc/*/copyright' --dpkgopt='path-exclude=/usr/share/locale/*' \
        --customize-hook='rm -f "$1"/usr/lib/python3*/EXTERNALLY-MANAGED' \
        --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*' \
        bookworm "$WORK/python-rootfs.tar" "$mirror"
    podman import --quiet --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' --change 'LABEL io.healnet.stand-in=debian' \
        "$WORK/python-rootfs.tar" "$PYTHON_BASE" >/dev/null
    rm -f "$WORK/python-rootfs.tar"
    BUILD_SECONDS[python base]=$((SECONDS - started))
    echo "python base stand-in $PYTHON_BASE in ${BUILD_SECONDS[python base]} s"
fi

# ---------------------------------------------------------------------------------------------------------
STAGE="CPU step image"
build "$HEALNET_IMAGE" components/Dockerfile . --ignorefile components/Dockerfile.dockerignore \
    --build-arg PYTHON_IMAGE="$PYTHON_BASE"

# ---------------------------------------------------------------------------------------------------------
STAGE="GPU base"
TORCH_BASE=$(qualified "${TORCH_IMAGE:-$(dockerfile_arg components/Dockerfile.gpu TORCH_IMAGE)}")
torch_tag=${TORCH_BASE##*:}
TORCH_VERSION=${torch_tag%%-*}
STAND_IN_NOTE="CPU STAND-IN: $TORCH_BASE here is Debian python + CPU torch $TORCH_VERSION, not the CUDA image; the GPU image built on it (REQUIRE_CUDA=0) tests the Dockerfile and the steps and is not for GPU nodes"
REQUIRE_CUDA=1
if podman image exists "$TORCH_BASE" && [ -n "$(stand_in_label "$TORCH_BASE")" ]; then
    say "GPU base: $STAND_IN_NOTE (cached)"
    REQUIRE_CUDA=0
elif podman image exists "$TORCH_BASE"; then
    say "GPU base: $TORCH_BASE (as pulled, cached)"
elif pull "$TORCH_BASE"; then
    say "GPU base: $TORCH_BASE (pulled)"
elif [[ $TORCH_BASE == *@* ]]; then
    fail "cannot pull $TORCH_BASE, and a stand-in cannot carry its digest (pull it into podman's storage first)"
else
    say "GPU base: $STAND_IN_NOTE"
    REQUIRE_CUDA=0
    mkdir -p "$WORK/torch-base"
    # torch: a local CPU wheel in the mounted folders when there is one, else the PyTorch CPU index. The
    # build fails on a CUDA torch (the 5 GB wheel from PyPI).
    # shellcheck disable=SC2086 # BUILD_MOUNTS is a list of paths
    wheel=$(find $BUILD_MOUNTS -maxdepth 1 -name "torch-$TORCH_VERSION+cpu-*.whl" 2>/dev/null | head -n 1 || true)
    torch_source=${wheel:-"--index-url https://download.pytorch.org/whl/cpu --extra-index-url https://pypi.org/simple torch==$TORCH_VERSION"}
    cat >"$WORK/torch-base/Containerfile" <<EOF
FROM $PYTHON_BASE
LABEL io.healnet.stand-in=cpu org.opencontainers.image.description="CPU stand-in for $TORCH_BASE (not CUDA)"
RUN pip install --no-cache-dir $torch_source \\
    && python -c "import torch; assert torch.version.cuda is None, torch.__version__; print('torch', torch.__version__)"
EOF
    build "$TORCH_BASE" "$WORK/torch-base/Containerfile" "$WORK/torch-base"
fi

STAGE="GPU training image"
build "$HEALNET_GPU_IMAGE" components/Dockerfile.gpu . --ignorefile components/Dockerfile.gpu.dockerignore \
    --build-arg TORCH_IMAGE="$TORCH_BASE" --build-arg REQUIRE_CUDA="$REQUIRE_CUDA"
[ "$REQUIRE_CUDA" = 1 ] || echo "$STAND_IN_NOTE"

# ---------------------------------------------------------------------------------------------------------
# The pipeline in the images: its promoted model is what the service image packs in `test` mode.
if [ "$MODE" = test ]; then
    STAGE="pipeline in the images"
    [ -x "$VENV/bin/python" ] || make -s venv
    "$VENV/bin/python" -c "import docker" 2>/dev/null ||
        fail "the docker package is missing from $VENV (a dev dependency: make venv)"
    started=$SECONDS
    cohort="$WORK/cohort-$TEST_PATIENTS"
    if [ ! -f "$cohort/cohort.json" ]; then
        say "writing a $TEST_PATIENTS-patient synthetic cohort to $cohort (healnet synth)"
        rm -rf "$cohort"
        PYTHONPATH="$ROOT" nice -n 10 "$VENV/bin/healnet" synth --out "$cohort" --patients "$TEST_PATIENTS" --no-progress
    fi
    # fresh registry and pipeline root, owned by the steps' user (kfp.local mounts the root at its host path)
    rm -rf "$WORK/registry" "$WORK/kfp"
    mkdir -p "$WORK/registry" "$WORK/kfp"
    chown "$STEP_UID:$STEP_UID" "$WORK/registry" "$WORK/kfp"
    socket="$WORK/podman.sock"
    rm -f "$socket"
    podman system service --time=0 "unix://$socket" >"$WORK/podman-service.log" 2>&1 &
    PODMAN_SERVICE_PID=$!
    for _ in $(seq 60); do [ -S "$socket" ] && break; sleep 0.5; done
    [ -S "$socket" ] || fail "podman's Docker API did not start (see $WORK/podman-service.log)"
    say "running the pipeline's KFP components in $HEALNET_IMAGE and $HEALNET_GPU_IMAGE (kfp.local DockerRunner on podman's Docker API; log: $LOGS/pipeline.log)"
    run "$LOGS/pipeline.log" 1800 env DOCKER_HOST="unix://$socket" HEALNET_IMAGE="$HEALNET_IMAGE" \
        HEALNET_GPU_IMAGE="$HEALNET_GPU_IMAGE" PYTHONPATH="$ROOT" nice -n 10 "$VENV/bin/python" \
        scripts/pipeline_in_images.py --cohort "$cohort" --registry "$WORK/registry" --pipeline-root "$WORK/kfp" \
        --param epochs="$TEST_EPOCHS" --param slide_shards=2 --param min_test_events=1 --param min_c_index=0 \
        --summary "$WORK/pipeline.json"
    # kfp.local's lines per finished task, without its colours (its log may miss a parallel iteration's line)
    steps=$(sed 's/\x1b\[[0-9;]*m//g' "$LOGS/pipeline.log" |
        sed -n "s/.*Task '\(.*\)' finished with status SUCCESS.*/\1/p" | awk '!seen[$0]++' | paste -sd, -)
    echo "steps that succeeded: $steps"
    kill "$PODMAN_SERVICE_PID" 2>/dev/null || true
    wait "$PODMAN_SERVICE_PID" 2>/dev/null || true
    PODMAN_SERVICE_PID=
    MODEL_TAG=$("$VENV/bin/python" -c "import json, sys; print(json.load(open(sys.argv[1]))['model_tag'])" "$WORK/pipeline.json")
    REGISTRY="$WORK/registry"
    metrics=$("$VENV/bin/python" -c "import json, sys; m = json.load(open(sys.argv[1]))['metrics']; print(', '.join(f'{k} {v:.3f}' if isinstance(v, float) else f'{k} {v}' for k, v in m.items()))" "$WORK/pipeline.json")
    RESULTS+=("pipeline in the images ($((SECONDS - started)) s, cohort of $TEST_PATIENTS synthetic patients, $TEST_EPOCHS epochs): the compiled KFP components ($steps), train in the GPU image, the others in the CPU image, each as UID $STEP_UID with a read-only root, tmpfs /tmp and no network; test $metrics; promoted $MODEL_TAG")
fi

prepare_bento_context

STAGE="service image"
build "$HEALNET_SERVICE_IMAGE" serving/Dockerfile "$context" --build-arg PYTHON_IMAGE="$PYTHON_BASE"
# Of pyproject.toml's dependencies, the service image may hold only the service's packages and what they
# depend on: those pinned in requirements/service.lock (service.in locked), which bentofile.yaml installs.
# Jinja2, for one, is a project dependency (the evaluation report) that BentoML brings in too.
installed=$(podman run --rm --network none --entrypoint pip "$HEALNET_SERVICE_IMAGE" list --format freeze \
    --disable-pip-version-check)
training_only=$("$VENV/bin/python" - "$installed" <<'PY'
import re
import sys
import tomllib


def name(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ @]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


project = {name(r) for r in tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]}
service = {name(line) for line in open("requirements/service.lock") if re.match(r"[A-Za-z0-9]", line)}
installed = {name(line) for line in sys.argv[1].splitlines() if line.strip()}
print(" ".join(sorted((project - service) & installed)))
PY
)
[ -z "$training_only" ] || fail "the service image holds project packages that requirements/service.lock does not pin: $training_only"
echo "service image: $(wc -l <<<"$installed") Python distributions, none of pyproject.toml's dependencies beyond requirements/service.in's"

# ---------------------------------------------------------------------------------------------------------
if [ "$MODE" = test ]; then
    STAGE="service in its image"
    say "starting $HEALNET_SERVICE_IMAGE: non-root, read-only root, tmpfs /tmp, on 127.0.0.1:$SERVICE_PORT"
    podman rm -f -i "$SERVICE_CONTAINER" >/dev/null
    podman run -d --name "$SERVICE_CONTAINER" --read-only --tmpfs /tmp:rw,size=512m,mode=1777 \
        --cap-drop ALL --security-opt no-new-privileges --publish "127.0.0.1:$SERVICE_PORT:3000" \
        "$HEALNET_SERVICE_IMAGE" >/dev/null
    url="http://127.0.0.1:$SERVICE_PORT"
    started=$SECONDS
    status=000
    while [ $((SECONDS - started)) -lt 180 ]; do
        [ "$(podman inspect --format '{{.State.Running}}' "$SERVICE_CONTAINER")" = true ] ||
            fail "the service container exited: $(podman logs --tail 30 "$SERVICE_CONTAINER" 2>&1)"
        status=$(curl -s -o /dev/null -w '%{http_code}' --max-time 3 "$url/readyz" || true)
        [ "$status" = 200 ] && break
        sleep 2
    done
    [ "$status" = 200 ] || fail "/readyz answered $status after 180 s: $(podman logs --tail 30 "$SERVICE_CONTAINER" 2>&1)"
    ready_s=$((SECONDS - started))
    user=$(podman exec "$SERVICE_CONTAINER" id -u)
    [ "$user" = "$SERVICE_UID" ] || fail "the service runs as UID $user, not $SERVICE_UID"
    # a valid case: one patient's omics from the synthetic cohort the model was trained on
    "$VENV/bin/python" - "$cohort" >"$WORK/predict.json" <<'PY'
import json
import sys
from pathlib import Path

import pandas as pd

tables = {path.stem: pd.read_parquet(path).set_index("patient_id") for path in sorted(Path(sys.argv[1], "omics").glob("*.parquet"))}
patient = sorted(set.intersection(*(set(frame.index) for frame in tables.values())))[0]
omics = {name: {k: float(v) for k, v in frame.loc[patient].items() if pd.notna(v)} for name, frame in tables.items()}
print(json.dumps({"omics": omics}))
PY
    post() { curl -s -o "$WORK/answer.json" -w '%{http_code}' --max-time 30 -H 'content-type: application/json' --data-binary "@$1" "$url/predict"; }
    status=$(post "$WORK/predict.json")
    [ "$status" = 200 ] || fail "POST /predict (valid case) answered $status: $(head -c 500 "$WORK/answer.json")"
    "$VENV/bin/python" -c "import json, sys; a = json.load(open(sys.argv[1])); assert 'risk' in a and a.get('model_version') == sys.argv[2], a; print('risk', a['risk'], 'from', a['model_version'])" "$WORK/answer.json" "$MODEL_TAG" ||
        fail "the answer to the valid case is not a risk from $MODEL_TAG: $(head -c 500 "$WORK/answer.json")"
    echo '{}' >"$WORK/bad.json"
    status=$(post "$WORK/bad.json")
    [[ $status == 4?? ]] || fail "POST /predict with no modality answered $status, not a 4xx: $(head -c 500 "$WORK/answer.json")"
    echo "bad request: $status $(head -c 200 "$WORK/answer.json")"
    RESULTS+=("service: ready in ${ready_s} s as UID $user, read-only root + tmpfs /tmp, 127.0.0.1:$SERVICE_PORT; /predict valid case 200, no-modality case $status")
    podman rm -f "$SERVICE_CONTAINER" >/dev/null
fi

# ---------------------------------------------------------------------------------------------------------
STAGE=summary
say "images ($MODE)"
printf '%-58s %9s %7s %8s\n' IMAGE SIZE USER BUILD_S
for name in "$HEALNET_IMAGE" "$HEALNET_GPU_IMAGE" "$HEALNET_SERVICE_IMAGE"; do
    printf '%-58s %9s %7s %8s\n' "$name" "$(human_size "$(podman image inspect --format '{{.Size}}' "$name")")" \
        "$(podman image inspect --format '{{.Config.User}}' "$name")" "${BUILD_SECONDS[$name]}"
done
for name in "python base" "$TORCH_BASE"; do
    [ -z "${BUILD_SECONDS[$name]:-}" ] || echo "base $name built in ${BUILD_SECONDS[$name]} s"
done
cpu=$(podman image inspect --format '{{.Size}}' "$HEALNET_IMAGE")
service=$(podman image inspect --format '{{.Size}}' "$HEALNET_SERVICE_IMAGE")
echo "service image: $((100 - 100 * service / cpu)) % smaller than the CPU step image"
[ "$REQUIRE_CUDA" = 1 ] || echo "$STAND_IN_NOTE"
for line in "${RESULTS[@]}"; do echo "$line"; done
echo "nothing pushed (no registry here); images are in podman's storage (podman images)"
