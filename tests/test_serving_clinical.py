"""The clinical modality served: a two-member ensemble with the linear clinical path, in-process."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
import torch
from prometheus_client import REGISTRY

from healnet.checkpoint import load_checkpoint
from healnet.ensemble import HEALNetEnsemble
from healnet.inference import Case, Predictor
from serving.demo import DemoSpec, demo_cohort, demo_payload
from serving.schemas import PredictRequest, PredictResponse
from serving.service import HEALNetService

pytest_plugins = ("serving_fixtures",)
SPEC = DemoSpec(clinical=True)  # the model of the clinical_registry fixture


@pytest.fixture(scope="module")
def service(clinical_registry, poll):
    torch.set_num_threads(1)
    service = HEALNetService()
    assert poll(service.__is_ready__, 60), service.load_error
    return service


def missing(modality: str) -> float:
    return REGISTRY.get_sample_value("healnet_missing_modality_total", {"modality": modality}) or 0.0


def test_the_checkpoint_holds_both_members_and_round_trips(clinical_registry):
    checkpoint = load_checkpoint(clinical_registry.checkpoint)
    assert len(checkpoint.state_dicts) == 2 and checkpoint.model_config.linear_path == "clinical"
    assert checkpoint.metadata["recipe"] == "serving-demo" and checkpoint.metadata["members"] == 2
    assert checkpoint.preprocessor.clinical.feature_names == ["age", "is_female"]
    manifest = json.loads((clinical_registry.checkpoint / "checkpoint.json").read_text())
    assert manifest["members"] == 2
    # the served ensemble gives the survival of the training path, averaged over its members
    data = demo_cohort(SPEC)
    ensemble = HEALNetEnsemble.from_checkpoint(checkpoint)
    pid = data.clinical.index[0]
    row = data.clinical.loc[pid]
    case = Case(
        omics={name: frame.loc[pid].to_dict() for name, frame in data.omics.items()},
        wsi_features=data.wsi_bags[pid],
        clinical={"age": float(row["age"]), "is_female": int(row["is_female"])},
    )
    (served,) = Predictor(checkpoint).predict([case])
    np.testing.assert_allclose(served.survival, ensemble.survival(data, [pid])[0], atol=1e-6)
    assert served.modalities_used == ["omic", "clinical", "wsi"]


def test_clinical_covariates_change_the_risk_and_their_absence_is_counted(service, clinical_registry):
    payload = demo_payload(SPEC, ("omic", "clinical", "wsi"), patches=5, seed=2)
    before = missing("clinical")
    with_clinical = asyncio.run(service.predict(PredictRequest(**payload)))
    older = asyncio.run(
        service.predict(PredictRequest(**payload | {"clinical": {"age": 89.0, "is_female": 0}}))
    )
    without = asyncio.run(
        service.predict(PredictRequest(**{k: v for k, v in payload.items() if k != "clinical"}))
    )
    assert isinstance(with_clinical, PredictResponse) and with_clinical.model_version == clinical_registry.tag
    assert with_clinical.modalities_used == ["omic", "clinical", "wsi"]
    assert without.modalities_missing == ["clinical"] and missing("clinical") == before + 1
    assert older.risk != pytest.approx(with_clinical.risk, abs=1e-6)
    assert without.risk != pytest.approx(with_clinical.risk, abs=1e-6)
    # clinical alone is a modality too
    alone = asyncio.run(service.predict(PredictRequest(clinical={"age": 61, "is_female": 1})))
    assert alone.modalities_used == ["clinical"]
    # a covariate the model does not know is reported, not used
    extra = asyncio.run(service.predict(PredictRequest(clinical={"age": 61, "smoker": 1})))
    assert extra.unknown_features == ["smoker"] and extra.modalities_used == ["clinical"]


def test_a_wrongly_typed_covariate_is_a_4xx_naming_it(service):
    response = asyncio.run(service.predict(PredictRequest(clinical={"age": "sixty"})))
    body = json.loads(response.body)
    assert (
        response.status_code == 400
        and body["reason"] == "invalid_schema"
        and "clinical['age']" in body["error"]
    )
