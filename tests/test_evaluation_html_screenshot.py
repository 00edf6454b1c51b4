"""The evaluation report of a real trained model: `healnet evaluate` prints every section and writes
evaluation.json with every key, and a headless Chromium draws each plot of evaluation.html."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_evaluate_serving import evaluated  # noqa: F401  (the fixture: a small model trained and evaluated)

from healnet.cli import main as healnet_main

pytestmark = pytest.mark.slow
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
REQUIRES_CHROMIUM = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium not found: install the Debian/Ubuntu package `chromium`"
)
REPORT_KEYS = {
    "c_index_ci",
    "uno_c_ci",
    "td_auc",
    "td_auc_excluded",
    "brier_curve",
    "calibration",
    "subgroups",
    "subgroup_min_events",
    "survival_interpolation",
}
# each plot's own line colour (matplotlib's tab: palette) and the <img> that draws it
PLOT_COLOURS = {
    "kaplan-meier": (31, 119, 180),  # tab:blue, the low-risk curve (tab:red the high-risk one)
    "calibration": (148, 103, 189),  # tab:purple
    "brier-curve": (44, 160, 44),  # tab:green
    "td-auc": (255, 127, 14),  # tab:orange
}
MIN_PIXELS = 300  # of a plot's colour in the screenshot: a drawn line or band, not an icon
BROKEN_PNG = "data:image/png;base64,iVBORw0KGgo="  # a PNG signature and nothing more


def screenshot(page: Path, out: Path) -> np.ndarray:
    """The page as headless Chromium draws it, tall enough for the whole report, as RGB pixels."""
    subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--disable-gpu",
            "--no-sandbox",
            "--hide-scrollbars",
            f"--screenshot={out}",
            "--window-size=1100,6000",
            page.resolve().as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    return np.asarray(Image.open(out).convert("RGB")).astype(np.int64)


def colour_pixels(pixels: np.ndarray, colour: tuple[int, int, int], tolerance: int = 40) -> int:
    return int((np.abs(pixels - np.array(colour)).max(axis=2) <= tolerance).sum())


def test_cli_prints_every_section_and_writes_every_key(evaluated, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "evaluation"
    argv = ["evaluate", "--run", str(evaluated["checkpoint"]), "--cohort", str(evaluated["cohort"])]
    assert healnet_main([*argv, "--features", str(evaluated["features"]), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for section in ("Harrell's C", "Uno's C", "time-dependent AUC", "calibration at", "subgroups (!"):
        assert section in printed
    assert f"evaluation.json: {out / 'evaluation.json'}" in printed
    assert f"evaluation.html: {out / 'evaluation.html'}" in printed
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert set(evaluation) >= REPORT_KEYS
    assert evaluation["c_index_ci"]["estimate"] == pytest.approx(evaluation["c_index"])
    assert (evaluation["c_index_ci"]["low"], evaluation["c_index_ci"]["high"]) == (
        evaluation["c_index_ci_low"],
        evaluation["c_index_ci_high"],
    )
    for time, value in evaluation["td_auc"].items():
        assert (value is None) == (time in evaluation["td_auc_excluded"])
        assert time in printed
    flagged = sum(row["flagged"] for row in evaluation["subgroups"])
    assert printed.count("\n !") == flagged


def test_a_missing_cohort_is_one_line_without_traceback(evaluated, tmp_path, capsys):  # noqa: F811
    argv = ["evaluate", "--run", str(evaluated["checkpoint"]), "--cohort", str(tmp_path / "absent")]
    assert healnet_main(argv) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "not a cohort folder" in error


@REQUIRES_CHROMIUM
def test_chromium_draws_every_plot_of_the_report(evaluated, tmp_path):  # noqa: F811
    page = Path(evaluated["evaluation"]["evaluation_html"])
    html = page.read_text()
    assert set(re.findall(r'<img id="([\w-]+)"', html)) == set(PLOT_COLOURS)
    drawn = screenshot(page, tmp_path / "report.png")
    for plot, colour in PLOT_COLOURS.items():
        assert colour_pixels(drawn, colour) >= MIN_PIXELS, f"the {plot} plot is not drawn"
    # the same page with undecodable images: the check above must fail for it
    broken = tmp_path / "broken.html"
    broken.write_text(re.sub(r"data:image/png;base64,[^\"]+", BROKEN_PNG, html))
    not_drawn = screenshot(broken, tmp_path / "broken.png")
    for plot, colour in PLOT_COLOURS.items():
        assert colour_pixels(not_drawn, colour) < MIN_PIXELS, f"{plot}: the check cannot tell a broken image"
