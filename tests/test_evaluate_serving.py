"""Evaluation scores through the serving path: the risks `healnet evaluate` records for the test patients
are the answers of a real `bentoml serve` of the registered model to the same cases."""

from __future__ import annotations

import base64
import json
from dataclasses import replace
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from test_components import synth_validated_cohort

from devtools.live_server import champion_registry
from healnet.cli import main as healnet_main
from healnet.data.cohort import Cohort
from healnet.evaluate import evaluate_checkpoint
from healnet.experiment import run_training
from healnet.inference import Case, Predictor
from healnet.preprocess.clinical import ClinicalConfig
from healnet.recipes import get_recipe
from healnet.scoring import CohortPatients, ScoredPatients
from healnet.survival_metrics import harrell_c

pytest_plugins = ("serving_fixtures",)
pytestmark = pytest.mark.slow
MODALITIES = ["omic", "clinical", "wsi"]


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory) -> dict:
    """A small synthetic cohort with slide features, a two-member ensemble of every modality trained on it
    for two epochs, and its evaluation on the test patients."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("evaluate-serving")
    cohort_dir = synth_validated_cohort(root / "cohort", patients=60, seed=4)
    features = cohort_dir / "features"
    assert (
        healnet_main(["preprocess-slides", str(cohort_dir / "slides.parquet"), "--out", str(features)]) == 0
    )
    recipe = get_recipe("demo")
    recipe = replace(
        recipe, clinical=ClinicalConfig(), members=2, train=replace(recipe.train, epochs=2, patience=2)
    )
    run_training(cohort_dir, root / "run", recipe, features, MODALITIES, progress=False)
    checkpoint = root / "run" / "checkpoint"
    evaluation = evaluate_checkpoint(checkpoint, cohort_dir, root / "evaluation", features)
    torch.set_num_threads(threads)
    return {"cohort": cohort_dir, "features": features, "checkpoint": checkpoint, "evaluation": evaluation}


def request_body(case: Case) -> dict:
    """The JSON a client sends for a case: omics by table, covariates, patch features as float32 base64."""
    body: dict = {"omics": dict(case.omics), "clinical": dict(case.clinical)}
    if case.wsi_features is not None:
        body["wsi_features_base64"] = base64.b64encode(case.wsi_features.astype("<f4").tobytes()).decode()
    return body


def test_evaluation_records_the_interval_the_events_and_each_patients_risk(evaluated):
    evaluation = evaluated["evaluation"]
    scored = ScoredPatients.read_parquet(Path(evaluation["predictions_parquet"]))
    cohort = Cohort.load(evaluated["cohort"])
    assert scored.patient_ids == cohort.patients("holdout", 0, 0, "test")
    assert (
        evaluation["events"]
        == scored.event_count
        == int(cohort.clinical.loc[scored.patient_ids, "event"].sum())
    )
    assert evaluation["c_index"] == pytest.approx(
        harrell_c(scored.times, scored.events, scored.risk), abs=1e-12
    )
    assert evaluation["c_index_ci_low"] <= evaluation["c_index"] <= evaluation["c_index_ci_high"]
    assert evaluation["bootstrap_resamples"] == 1000 and evaluation["modalities"] == MODALITIES
    assert (
        json.loads((Path(evaluation["kaplan_meier_png"]).parent / "evaluation.json").read_text())
        == evaluation
    )


def test_evaluate_risks_equal_the_live_services_answers(evaluated, serve, tmp_path):
    evaluation = evaluated["evaluation"]
    scored = ScoredPatients.read_parquet(Path(evaluation["predictions_parquet"]))
    predictor = Predictor.from_dir(evaluated["checkpoint"])
    cohort = Cohort.load(evaluated["cohort"])
    patients = CohortPatients.load(cohort, scored.patient_ids, evaluated["features"])
    cases = patients.cases(predictor)
    assert any(case.wsi_features is not None for case in cases) and any(
        case.wsi_features is None for case in cases
    )
    assert all(case.clinical for case in cases)
    with (
        champion_registry(evaluated["checkpoint"], tmp_path / "registry", "tests") as registry,
        serve(registry, tmp_path / "serve.log") as url,
    ):
        response = httpx.post(f"{url}/predict_batch", json=[request_body(case) for case in cases], timeout=60)
    assert response.status_code == 200, response.text
    answers = response.json()
    assert all(answer["unknown_features"] == [] for answer in answers)  # exactly the model's features
    served = np.array([answer["risk"] for answer in answers])
    np.testing.assert_allclose(scored.risk, served, rtol=0, atol=1e-5)
    from_survival = -np.array([answer["survival"] for answer in answers]).sum(axis=1)
    np.testing.assert_allclose(scored.risk, from_survival, rtol=0, atol=1e-6)
