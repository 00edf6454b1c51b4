"""bentofile.yaml: its packages (requirements/service.in, locked in service.lock) are every package the served
code imports, and `bentoml build` packs code, model and the locked requirements."""

from __future__ import annotations

import ast
import importlib.metadata
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytest_plugins = ("serving_fixtures",)
REPO_ROOT = Path(__file__).resolve().parents[1]
BENTOFILE = yaml.safe_load((REPO_ROOT / "bentofile.yaml").read_text())
SERVICE_PACKAGES = [
    requirement
    for line in (REPO_ROOT / "requirements" / "service.in").read_text().splitlines()
    if (requirement := line.partition("#")[0].strip())
]


def distribution_name(requirement: str) -> str:
    return re.split(r"[<>=!~\[ ;]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def served_modules() -> list[Path]:
    """Files of the healnet and serving modules loaded by importing the service, in a fresh interpreter."""
    code = (
        "import json, sys, serving.service; "
        "print(json.dumps([m.__file__ for n, m in sys.modules.items() "
        "if n.split('.')[0] in ('healnet', 'serving') and getattr(m, '__file__', None)]))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return [Path(path) for path in json.loads(result.stdout.splitlines()[-1])]


def imported_top_level_names(path: Path) -> set[str]:
    """Top-level packages a module imports anywhere in its code (lazy imports in functions too), except
    under `if TYPE_CHECKING:`, which never runs."""
    tree = ast.parse(path.read_text())
    type_checking_only = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"
        for statement in node.body
        for inner in ast.walk(statement)
    }
    names = set()
    for node in ast.walk(tree):
        if id(node) in type_checking_only:
            continue
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_the_bentofile_lists_every_package_the_service_imports():
    listed = {distribution_name(requirement) for requirement in SERVICE_PACKAGES}
    # BentoML adds itself to every Bento, and with it its own dependencies (starlette, ...).
    with_bentoml = {"bentoml"} | {
        distribution_name(requirement)
        for requirement in importlib.metadata.requires("bentoml")
        if "extra ==" not in requirement
    }
    provided_by = importlib.metadata.packages_distributions()
    modules = served_modules()
    assert any(path.name == "inference.py" for path in modules)
    missing = {}
    for path in modules:
        for name in (
            imported_top_level_names(path)
            - set(sys.stdlib_module_names)
            - {"healnet", "serving", "__future__"}
        ):
            distributions = {d.lower().replace("_", "-") for d in provided_by.get(name, [name])}
            if not distributions & (listed | with_bentoml):
                missing[name] = f"{sorted(distributions)} (imported by {path.relative_to(REPO_ROOT)})"
    assert not missing, f"add to requirements/service.in (then make lock): {missing}"


# Training, slide-reading and pipeline packages: the service must run without them in its image
# (pandas imports pyarrow when present). Slide tiles are encoded by healnet.preprocess.encoders.
NOT_SERVED = ("sksurv", "sklearn", "scipy", "openslide", "pandas", "pyarrow", "great_expectations", "kfp")


def test_importing_the_service_leaves_out_training_and_slide_reading_packages():
    code = (
        "import json, sys, serving.service; "
        f"print(json.dumps(sorted(name for name in {NOT_SERVED!r} if name in sys.modules)))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[-1]) == []


def test_the_bentofile_leaves_out_what_the_service_does_not_import():
    listed = {distribution_name(requirement) for requirement in SERVICE_PACKAGES}
    training_only = {"scikit-survival", "scikit-learn", "openslide-python", "pandas", "pyarrow", "kfp"}
    assert not listed & training_only


@pytest.mark.slow
def test_bentoml_build_packs_the_code_and_the_model(demo_registry):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "bentoml",
            "build",
            "--arg",
            f"model_tag={demo_registry.tag}",
            "--output",
            "tag",
        ],
        cwd=REPO_ROOT,
        env=demo_registry.server_env(),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    bento_tag = re.search(r"__tag__:(\S+)", result.stdout).group(1)
    name, version = bento_tag.split(":")
    bento = demo_registry.home / "bentos" / name / version
    info = yaml.safe_load((bento / "bento.yaml").read_text())
    assert info["service"] == BENTOFILE["service"]
    assert info["args"] == {"model_tag": demo_registry.tag}
    assert [model["tag"] for model in info["services"][0]["models"]] == [demo_registry.tag]
    for path in ("src/serving/service.py", "src/healnet/inference.py", "src/healnet/preprocess/wsi.py"):
        assert (bento / path).is_file(), path
    assert not (bento / "src" / "tests").exists()
    requirements = (bento / "env" / "python" / "requirements.txt").read_text()
    # the lock, hashes and all: serving/Dockerfile installs it with pip --require-hashes
    assert "torch==2.13.0+cpu" in requirements.split() and "--hash=sha256:" in requirements
    assert (bento / "src" / "requirements" / "torch-cpu.lock").is_file()
    assert {env["name"]: env["value"] for env in info["envs"]}["BENTOML_DO_NOT_TRACK"] == "True"
