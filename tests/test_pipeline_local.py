"""End-to-end runs of the pipeline with kfp.local on a small synthetic cohort, one per gate branch,
and a run whose validation fails."""

import json
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

# a 48-patient cohort has about 8 test patients: the gate's minimum of test events is lowered to fit
QUICK = {"epochs": 2, "patience": 2, "slide_shards": 2, "min_test_events": 1}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    return synth_validated_cohort(
        tmp_path_factory.mktemp("local") / "cohort", patients=48, seed=3, missing_slides=0.8
    )


EVALUATION_KEYS = {"c_index_ci", "uno_c_ci", "td_auc", "brier_curve", "calibration", "subgroups"}


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
    card = json.loads(promoted.reports["model_card.json"].read_text())
    assert card["model"]["version"] == promoted.model_tag and card["gate"]["rule"] == promoted.rule
    # the report's numbers, in the run folder and kept with the registered version beside its card
    version = promoted.model_tag.split(":", 1)[1]
    for evaluation in (
        promoted.reports["evaluation.json"],
        registry / "models" / "healnet" / version / "evaluation.json",
    ):
        assert set(json.loads(evaluation.read_text())) >= EVALUATION_KEYS
    listed = registry_list(registry)
    assert f"* {promoted.model_tag}" in listed


def test_unreachable_threshold_rejects_and_keeps_the_champion(
    promoted, cohort, registry, pipeline_root, capsys
):
    """Same data and settings as the promoted run, so --cache reuses its preprocessing, training and
    evaluation; validation, the gate and the rejection branch run again. The gate asks for more test
    events than the cohort has."""
    before = registry_list(registry)
    argv = ["run-local", "--cohort", str(cohort), "--pipeline-root", str(pipeline_root), "--cache"]
    for key, value in {"registry_dir": registry, **QUICK, "min_test_events": 1000}.items():
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
    assert (run_dir / "model_card.md").read_text().startswith("# Model card: rejected candidate")
    assert registry_list(registry) == before


def test_failed_validation_stops_before_training(cohort, registry, tmp_path, monkeypatch, capsys):
    # kfp.local has no Secrets: the exit handler takes the webhook from the environment the run has
    monkeypatch.setenv("HEALNET_NOTIFY_WEBHOOK", "http://hooks.example.com/T0KEN")
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
    assert not (result.run_dir / "train").exists() and not (result.run_dir / "merge-features").exists()
    assert "FAILED" in result.reports["validation.md"].read_text()
    assert "age" in result.reports["steps.log"].read_text()  # the failing step's own output
    assert (result.run_dir / "notify").is_dir(), "the exit handler runs after a failure"
    steps_log = result.reports["steps.log"].read_text()
    assert "notification refused: HEALNET_NOTIFY_WEBHOOK is not an https:// URL" in steps_log
    assert "T0KEN" not in steps_log + capsys.readouterr().out
    assert registry_list(registry) == before


def test_an_unreadable_slide_is_a_missing_modality_for_its_patient(tmp_path, capsys):
    """One truncated slide file: tiling quarantines it, the run goes on to a gate decision, the patient is
    scored without slides, and the shard report, the model and the run summary name the slide."""
    from healnet.data.cohort import Cohort
    from healnet.explain import patient_case
    from healnet.inference import Predictor
    from healnet.scoring import ScoredPatients

    root = synth_validated_cohort(tmp_path / "cohort", patients=48, seed=3, missing_slides=0.5)
    cohort = Cohort.load(root)
    test_ids = set(cohort.patients("holdout", 0, 0, "test"))
    located = cohort.slides[cohort.slides["path"].notna()]
    lone = located.groupby("patient_id").filter(lambda rows: len(rows) == 1)
    slide, patient = next(
        (row.slide_id, row.patient_id) for row in lone.itertuples() if row.patient_id in test_ids
    )
    path = cohort.slide_path(slide)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    argv = ["run-local", "--cohort", str(root), "--pipeline-root", str(tmp_path / "root")]
    for key, value in {"registry_dir": tmp_path / "registry", "min_c_index": 0.0, **QUICK}.items():
        argv += ["--param", f"{key}={value}"]
    assert pipelines_main(argv) == 0
    printed = capsys.readouterr().out
    assert "gate decision: " in printed
    assert f"slides quarantined, their patients predicted without them: 1 ({slide})" in printed
    assert "slides_quarantined 1" in printed
    run_dir = Path(printed.split("pipeline run folder: ")[1].split(" (")[0])
    assert (
        f"1 slide(s) will be quarantined when tiled and their patients trained without them: {slide}"
        in (run_dir / "validation.md").read_text()
    )
    shard_reports = [
        json.loads(report.read_text())
        for report in run_dir.glob("for-loop-*/preprocess-slides/features/**/report*.json")
    ]
    quarantined = [entry["slide"] for report in shard_reports for entry in report["quarantined"]]
    assert quarantined == [slide]
    scored = ScoredPatients.read_parquet(run_dir / "evaluate" / "predictions")
    assert patient in scored.patient_ids, "the patient is scored, not dropped"
    predictor = Predictor.from_dir(run_dir / "train" / "model" / "checkpoint")
    [alone] = predictor.predict([patient_case(cohort, patient, predictor)])
    assert "wsi" in alone.modalities_missing
    risk = dict(zip(scored.patient_ids, scored.risk, strict=True))[patient]
    assert risk == pytest.approx(alone.risk, abs=1e-5)
