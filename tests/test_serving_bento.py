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


def imported_names(path: Path) -> set[str]:
    """Modules a module imports anywhere in its code (lazy imports in functions too), except under
    `if TYPE_CHECKING:`, which never runs; `from package import name` gives `package.name` too, which may
    be a module."""
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
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def imported_top_level_names(path: Path) -> set[str]:
    return {name.split(".")[0] for name in imported_names(path)}


def module_file(name: str) -> Path | None:
    """The repository file of module `name`, or None when it is not one of ours (or not a module)."""
    path = REPO_ROOT.joinpath(*name.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def code_the_service_can_import() -> set[str]:
    """Repository files that serving/service.py reaches through its imports, lazy ones included, with the
    packages that hold them: what the Bento must ship."""
    reached: set[Path] = set()
    waiting = [REPO_ROOT / "serving" / "service.py"]
    while waiting:
        path = waiting.pop()
        if path in reached:
            continue
        reached.add(path)
        for name in imported_names(path):
            parts = name.split(".")
            if parts[0] not in ("healnet", "serving"):
                continue
            # a module imports its packages first
            found = (module_file(".".join(parts[:end])) for end in range(1, len(parts) + 1))
            waiting.extend(file for file in found if file is not None)
    return {str(path.relative_to(REPO_ROOT)) for path in reached}


def test_the_bento_ships_only_the_code_the_service_can_import():
    served = code_the_service_can_import()
    shipped_serving = {str(path.relative_to(REPO_ROOT)) for path in (REPO_ROOT / "serving").rglob("*.py")}
    assert shipped_serving <= served, (
        f"not imported by the service, yet packed by serving/**: move to devtools/ "
        f"{sorted(shipped_serving - served)}"
    )
    included = set(BENTOFILE["include"]) - {"serving/**/*.py", "requirements/torch-cpu.lock"}
    served_healnet = {path for path in served if path.startswith("healnet/")}
    assert included == served_healnet, (
        f"bentofile.yaml's include: add {sorted(served_healnet - included)}, "
        f"remove {sorted(included - served_healnet)}"
    )


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
    for path in (
        "src/serving/service.py",
        "src/healnet/inference.py",
        "src/healnet/preprocess/feature_files.py",
    ):
        assert (bento / path).is_file(), path
    for left_out in ("tests", "devtools", "healnet/train.py", "healnet/cli", "healnet/preprocess/wsi.py"):
        assert not (bento / "src" / left_out).exists(), left_out
    requirements = (bento / "env" / "python" / "requirements.txt").read_text()
    # the lock, hashes and all: serving/Dockerfile installs it with pip --require-hashes
    assert "torch==2.13.0+cpu" in requirements.split() and "--hash=sha256:" in requirements
    assert (bento / "src" / "requirements" / "torch-cpu.lock").is_file()
    assert {env["name"]: env["value"] for env in info["envs"]}["BENTOML_DO_NOT_TRACK"] == "True"
