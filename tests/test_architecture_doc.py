"""docs/architecture.md lists every healnet module with the healnet modules it imports, and the import
directions between the top-level packages hold."""

import ast
import re
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
ARCHITECTURE = REPO_ROOT / "docs" / "architecture.md"
ROW = re.compile(r"^\| `(healnet/[\w/]+\.py)` \| [^|]+ \| ([^|]+) \|$", re.MULTILINE)
# package -> top-level packages it may import
ALLOWED = {
    "healnet": {"healnet"},
    "components": {"healnet", "components"},
    "pipelines": {"healnet", "components", "pipelines"},
    "serving": {"healnet", "serving"},
    "devtools": {"healnet", "serving", "devtools"},
}
OURS = {*ALLOWED, "tests"}


def imported_modules(path: Path) -> set[str]:
    """Every absolute module imported anywhere in the file (lazy imports inside functions included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
    return names


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def documented() -> dict[str, set[str]]:
    rows = ROW.findall(ARCHITECTURE.read_text())
    return {path: set(re.findall(r"`(healnet[\w.]*)`", imports)) for path, imports in rows}


def test_every_healnet_module_is_documented_with_its_imports():
    table = documented()
    modules = sorted(str(p.relative_to(REPO_ROOT)) for p in (REPO_ROOT / "healnet").rglob("*.py"))
    assert sorted(table) == modules, "docs/architecture.md's package table is out of date"
    for path in modules:
        actual = {m for m in imported_modules(REPO_ROOT / path) if m.split(".")[0] == "healnet"}
        actual.discard(module_name(REPO_ROOT / path))
        assert table[path] == actual, f"{path}: the documented imports differ from the code's"


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_point_one_way(package):
    for path in sorted((REPO_ROOT / package).rglob("*.py")):
        ours = {m.split(".")[0] for m in imported_modules(path)} & OURS
        assert ours <= ALLOWED[package], (
            f"{path.relative_to(REPO_ROOT)} imports {sorted(ours - ALLOWED[package])}"
        )


def test_nothing_outside_tests_imports_from_tests():
    for folder in ("healnet", "components", "pipelines", "serving", "devtools", "benchmarks", "scripts"):
        for path in sorted((REPO_ROOT / folder).rglob("*.py")):
            assert "tests" not in {m.split(".")[0] for m in imported_modules(path)}, path
            assert (
                "tests" not in path.read_text().split("sys.path", 1)[-1][:200]
                or "sys.path" not in path.read_text()
            ), path
