"""The tcga recipe trained on the real BLCA table and served in-process: a patient's omics sent as the
table holds them (every column, most of which the model does not use) are answered."""

from __future__ import annotations

import asyncio
import json
import math
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
import torch

from devtools.live_server import champion_registry
from healnet.checkpoint import load_checkpoint
from healnet.data.cohort import ingest
from healnet.experiment import run_training
from healnet.recipes import TCGA
from serving.schemas import PredictRequest, PredictResponse
from serving.service import HEALNetService

pytest_plugins = ("serving_fixtures",)
OMIC_TABLES = ("mut", "cnv", "rnaseq")
# One member and one epoch: what is checked is the served model's contract, not its accuracy.
RECIPE = replace(TCGA, members=1, train=replace(TCGA.train, epochs=1))


@pytest.fixture(scope="module")
def checkpoint(blca_table: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    cohort_dir = tmp_path_factory.mktemp("blca") / "cohort"
    ingest(blca_table, cohort_dir)
    out = tmp_path_factory.mktemp("blca_run")
    return Path(
        run_training(cohort_dir, out, RECIPE, modalities=["omic", "clinical"], progress=False)["checkpoint"]
    )


@pytest.fixture(scope="module")
def service(checkpoint, tmp_path_factory, poll):
    with champion_registry(checkpoint, tmp_path_factory.mktemp("bentoml_home"), "tests"):
        service = HEALNetService()
        assert poll(service.__is_ready__, 60), service.load_error
        yield service


@pytest.fixture(scope="module")
def patient(blca_table: Path) -> dict:
    """The first patient of the table without a missing omic value, as a request: every omic column by
    table under its name in the table, and the clinical covariates."""
    table = pd.read_csv(blca_table)
    columns = {t: [c for c in table.columns if c.endswith(f"_{t}")] for t in OMIC_TABLES}
    row = table.loc[table[[c for names in columns.values() for c in names]].notna().all(axis=1).idxmax()]
    return {
        "omics": {t: {c: float(row[c]) for c in names} for t, names in columns.items()},
        "clinical": {
            "age": float(row["age"]),
            "is_female": float(row["is_female"]),
            "oncotree_code": row["oncotree_code"],
        },
    }


def answer(service: HEALNetService, payload: dict):
    return asyncio.run(service.predict(PredictRequest(**payload)))


def test_a_whole_profile_is_answered_listing_the_features_the_model_does_not_use(
    service, checkpoint, patient
):
    response = answer(service, patient)
    assert isinstance(response, PredictResponse), json.loads(response.body)
    assert response.modalities_used == ["mut", "cnv", "rnaseq", "clinical"] and response.imputed_features == 0
    preprocessor = load_checkpoint(checkpoint).preprocessor
    given = {name for features in patient["omics"].values() for name in features}
    used = {name for names in preprocessor.omics.input_feature_names.values() for name in names}
    assert len(used) == 3 * RECIPE.omics.top_k and used < given
    # BLCA has one subtype, so the model has no oncotree_code indicator: that covariate is listed too
    unused_covariates = set(patient["clinical"]) - set(preprocessor.clinical.covariates)
    assert sorted(response.unknown_features) == sorted((given - used) | unused_covariates)
    assert math.isfinite(response.risk) and response.out_of_training_range == []


def test_an_implausible_age_is_refused_and_one_beyond_the_training_patients_is_flagged(
    service, checkpoint, patient
):
    refused = answer(service, patient | {"clinical": patient["clinical"] | {"age": 300.0}})
    body = json.loads(refused.body)
    assert (refused.status_code, body["reason"]) == (422, "out_of_range") and "0 to 120" in body["error"]
    _, oldest = load_checkpoint(checkpoint).preprocessor.clinical.training_ranges["age"]
    flagged = answer(service, patient | {"clinical": patient["clinical"] | {"age": oldest + 1}})
    assert flagged.out_of_training_range == ["age"]


@pytest.mark.parametrize("table", OMIC_TABLES)
def test_one_table_of_the_profile_alone_is_answered(service, patient, table):
    response = answer(service, {"omics": {table: patient["omics"][table]}})
    assert isinstance(response, PredictResponse), json.loads(response.body)
    assert response.modalities_used == [table]
    assert response.modalities_missing == [t for t in (*OMIC_TABLES, "clinical") if t != table]
