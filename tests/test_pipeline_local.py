"""End-to-end runs of the pipeline with kfp.local on a small synthetic cohort, one per gate branch,
and a run whose validation fails."""

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from test_components import synth_validated_cohort

from pipelines.__main__ import main as pipelines_main
from pipelines.local import run_local

pytestmark = pytest.mark.slow

QUICK = {"epochs": 2, "patience": 2, "slide_shards": 2}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    return synth_validated_cohort(
        tmp_path_factory.mktemp("local") / "cohort", patients=48, seed=3, missing_slides=0.8
    )


@pytest.fixture(scope="module")
def registry(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("registry")


def registry_list(registry: Path) -> str:
    env = {**os.environ, "BENTOML_HOME": str(registry), "HEALNET_REGISTRY_DIR": str(registry)}
    done = subprocess.run(
        [sys.executable, "-m", "healnet", "registry", "list"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout


@pytest.fixture(scope="module")
def pipeline_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("kfp-root")


@pytest.fixture(scope="module")
def promoted(cohort, registry, pipeline_root):
    arguments = {"cohort_dir": str(cohort), "registry_dir": str(registry), "min_c_index": 0.0, **QUICK}
    return run_local(arguments, pipeline_root, cache=True)


def test_low_threshold_promotes_and_the_model_is_listed(promoted, registry):
    assert promoted.succeeded, promoted.error
    assert promoted.decision == "promote"
    assert promoted.model_tag and promoted.model_tag.startswith("healnet:")
    assert set(promoted.metrics) >= {"c_index", "c_index_ipcw", "integrated_brier_score"}
    assert {"validation.md", "evaluation.html", "gate.md", "promotion.md"} <= set(promoted.reports)
    listed = registry_list(registry)
    assert f"* {promoted.model_tag}" in listed


def test_unreachable_threshold_rejects_and_keeps_the_champion(
    promoted, cohort, registry, pipeline_root, capsys
):
    """Same data and settings as the promoted run, so --cache reuses its preprocessing, training and
    evaluation; validation, the gate and the rejection branch run again."""
    before = registry_list(registry)
    argv = ["run-local", "--cohort", str(cohort), "--pipeline-root", str(pipeline_root), "--cache"]
    for key, value in {"registry_dir": registry, "min_c_index": 1.01, **QUICK}.items():
        argv += ["--param", f"{key}={value}"]
    assert pipelines_main(argv) == 0
    printed = capsys.readouterr().out
    assert "gate decision: reject" in printed and "no model promoted: the champion is unchanged" in printed
    assert f"c_index {promoted.metrics['c_index']:.4f}" in printed
    run_dir = Path(printed.split("pipeline run folder: ")[1].split(" (")[0])
    assert (
        run_dir != promoted.run_dir and (run_dir / "validate").is_dir() and not (run_dir / "train").exists()
    )
    assert (run_dir / "rejection.md").is_file() and not (run_dir / "promote").exists()
    # The steps' own output goes to steps.log, not the terminal; kfp.local's per-task lines stay.
    assert "KFP Executor" not in printed and "KFP Executor" in (run_dir / "steps.log").read_text()
    assert f"steps.log: {run_dir / 'steps.log'}" in printed
    assert f"the champion stays {promoted.model_tag}" in (run_dir / "rejection.md").read_text()
    assert registry_list(registry) == before


def test_failed_validation_stops_before_training(cohort, registry, tmp_path):
    broken = tmp_path / "cohort"
    broken.mkdir()
    for item in cohort.iterdir():
        if item.name != "clinical.parquet":
            (broken / item.name).symlink_to(item)
    clinical = pd.read_parquet(cohort / "clinical.parquet")
    clinical.loc[clinical.index[:2], "age"] = 150.0
    clinical.to_parquet(broken / "clinical.parquet")
    before = registry_list(registry)
    result = run_local({"cohort_dir": str(broken), "registry_dir": str(registry), **QUICK}, tmp_path / "root")
    assert not result.succeeded and "validate" in result.error
    assert result.decision is None and result.model_tag is None
    assert not (result.run_dir / "train").exists() and not (result.run_dir / "preprocess-omics").exists()
    assert "FAILED" in result.reports["validation.md"].read_text()
    assert "age" in result.reports["steps.log"].read_text()  # the failing step's own output
    assert (result.run_dir / "notify").is_dir(), "the exit handler runs after a failure"
    assert registry_list(registry) == before
