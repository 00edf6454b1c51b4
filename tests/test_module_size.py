"""No module of `healnet/` or `serving/` is over `MAX_LINES` lines, unless its docstring says why it must
stay whole: a docstring line starting with `KEPT_WHOLE` and followed by the reason."""

import ast
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("healnet", "serving")
MAX_LINES = 600
KEPT_WHOLE = "Kept whole:"


def kept_whole_reason(source: str) -> str:
    """The reason after `KEPT_WHOLE` on a line of the module docstring, or "" when there is none."""
    docstring = ast.get_docstring(ast.parse(source)) or ""
    for line in docstring.splitlines():
        if line.strip().startswith(KEPT_WHOLE):
            return line.strip().removeprefix(KEPT_WHOLE).strip()
    return ""


def oversized_without_reason(root: Path) -> list[str]:
    """The modules under `root`'s packages over MAX_LINES lines whose docstring gives no reason to stay
    whole, with their length."""
    found = []
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            source = path.read_text()
            length = len(source.splitlines())
            if length > MAX_LINES and not kept_whole_reason(source):
                found.append(f"{path.relative_to(root)} ({length} lines)")
    return found


def test_no_module_is_over_the_limit_without_a_reason():
    assert not oversized_without_reason(REPO_ROOT), (
        f"split these modules, or say in their docstring why each must stay whole "
        f'("{KEPT_WHOLE} <reason>" on a line of its own)'
    )


def module(body_lines: int, docstring: str) -> str:
    return f'"""{docstring}"""\n' + "x = 1\n" * body_lines


@pytest.mark.parametrize(
    ("source", "oversized"),
    [
        (module(MAX_LINES - 1, "Short."), False),
        (module(MAX_LINES, "One line over."), True),
        (
            module(MAX_LINES, f"Long.\n\n{KEPT_WHOLE} one state machine; halves would share every name.\n"),
            False,
        ),
        (module(MAX_LINES, f"Long.\n\n{KEPT_WHOLE}   \n"), True),  # a marker without a reason
        (module(MAX_LINES, "Long, though kept whole: no marker at a line start.\n"), True),
        ("x = 1\n" * (MAX_LINES + 1) + f'"""{KEPT_WHOLE} not the module docstring."""\n', True),
    ],
    ids=[
        "at the limit",
        "over",
        "over with a reason",
        "empty reason",
        "marker mid-line",
        "not the docstring",
    ],
)
def test_the_rule_itself(tmp_path, source, oversized):
    (tmp_path / "healnet").mkdir()
    (tmp_path / "serving").mkdir()
    (tmp_path / "serving" / "big.py").write_text(source)
    assert bool(oversized_without_reason(tmp_path)) == oversized
