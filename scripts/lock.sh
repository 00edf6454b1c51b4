#!/usr/bin/env bash
# Write the images' lock files: every package pinned with its sha256 hashes, for pip --require-hashes.
#   requirements/torch-cpu.lock  the CPU build of pyproject.toml's torch: components/Dockerfile, serving/Dockerfile
#   requirements/steps.lock      pyproject.toml's dependencies but torch (the CPU step image takes it from
#                                torch-cpu.lock, the GPU image from its CUDA base): components/Dockerfile*
#   requirements/service.lock    requirements/service.in with the CPU torch: bentofile.yaml (the Bento's
#                                requirements), serving/Dockerfile
# for CPython 3.11 on x86_64 Linux with glibc 2.36 (Debian bookworm, the images' base). `make lock` runs it.
#
# The CPU torch wheel (torch==<version>+cpu) comes from TORCH_WHEELS: the PyTorch wheel page (default), or
# a folder holding that wheel where the page cannot be reached. Everything else comes from PyPI.
# Environment: UV (default .venv/bin/uv), TORCH_WHEELS.
set -Eeuo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
UV=${UV:-$ROOT/.venv/bin/uv}
TORCH_WHEELS=${TORCH_WHEELS:-https://download.pytorch.org/whl/torch/}
torch_version=$(python3 -c "
import re, tomllib
dependencies = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']
print(next(m.group(1) for d in dependencies if (m := re.fullmatch(r'torch==(\S+)', d))))")

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "torch==$torch_version+cpu" >"$work/cpu-torch.txt"
compile() { # compile OUTPUT INPUT [uv args...]
    local output=$1 input=$2
    shift 2
    "$UV" pip compile --quiet --generate-hashes --no-annotate --python-version 3.11 \
        --python-platform x86_64-manylinux_2_36 --find-links "$TORCH_WHEELS" --no-emit-find-links \
        --override "$work/cpu-torch.txt" --constraint requirements/constraints.txt \
        --custom-compile-command "make lock" --output-file "$output" "$@" "$input"
    echo "$output: $(grep -c '^[A-Za-z]' "$output") packages"
}
compile requirements/steps.lock pyproject.toml --no-emit-package torch
compile requirements/service.lock requirements/service.in
# torch's entry of service.lock, hashes included (uv writes no hashes for a --no-deps compile)
{
    printf '# The CPU torch of service.lock, installed on its own from the PyTorch CPU index. Written by `make lock`.\n'
    awk '/^torch==/ { entry = 1; print; next } entry && /^ / { print; next } { entry = 0 }' requirements/service.lock
} >requirements/torch-cpu.lock
grep -q -- '--hash=sha256:' requirements/torch-cpu.lock || { echo "no hash for torch in service.lock" >&2; exit 1; }
echo "requirements/torch-cpu.lock: $(sed -n 's/^\(torch==[^ ]*\).*/\1/p' requirements/torch-cpu.lock)"
