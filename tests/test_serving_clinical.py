"""The clinical modality served: a two-member ensemble with the linear clinical path, in-process."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
from prometheus_client import REGISTRY

from devtools.demo import DemoSpec, demo_cohort, demo_payload
from healnet.checkpoint import load_checkpoint
from healnet.ensemble import HEALNetEnsemble
from healnet.inference import Case, Predictor
from serving.schemas import PredictRequest, PredictResponse

pytest_plugins = ("serving_fixtures",)
SPEC = DemoSpec(clinical=True)  # the model of the clinical_registry fixture


@pytest.fixture(scope="module")
def service(clinical_registry, ready_service):
    return ready_service()


def missing(modality: str) -> float:
    return REGISTRY.get_sample_value("healnet_missing_modality_total", {"modality": modality}) or 0.0


def test_the_checkpoint_holds_both_members_and_round_trips(clinical_registry):
    checkpoint = load_checkpoint(clinical_registry.checkpoint)
    assert len(checkpoint.state_dicts) == 2 and checkpoint.model_config.linear_path == ("clinical",)
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


def counted(metric: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(metric, labels) or 0.0


def whole_profile(seed: int = 3) -> tuple[dict, list[str]]:
    """Every omic feature of a patient as a source table holds it, the model's and others, with age and
    sex; and the names the model does not use, in the order given."""
    payload = demo_payload(SPEC, ("omic", "clinical"), seed=seed)
    unused = {table: {f"EXTRA{i}_{table}": float(i) for i in range(20)} for table in payload["omics"]}
    payload["omics"] = {table: features | unused[table] for table, features in payload["omics"].items()}
    return payload, [name for features in unused.values() for name in features]


def test_a_whole_profile_is_answered_and_the_features_the_model_does_not_use_are_listed(service):
    payload, unused = whole_profile()
    answer = asyncio.run(service.predict(PredictRequest(**payload)))
    assert isinstance(answer, PredictResponse), json.loads(answer.body)
    assert answer.modalities_used == ["omic", "clinical"] and answer.imputed_features == 0
    assert answer.unknown_features == unused and answer.out_of_training_range == []
    # ignored means ignored: the answer is that of the model's features alone
    known = {
        t: {f: v for f, v in features.items() if f not in unused} for t, features in payload["omics"].items()
    }
    alone = asyncio.run(service.predict(PredictRequest(**payload | {"omics": known})))
    assert answer.risk == pytest.approx(alone.risk, abs=1e-6) and alone.unknown_features == []


@pytest.mark.parametrize(
    "covariate, value, message",
    [
        ("age", 300, "clinical['age'] is 300, outside its plausible range 0 to 120"),
        ("age", -2.5, "clinical['age'] is -2.5, outside its plausible range 0 to 120"),
        ("is_female", 2, "clinical['is_female'] is 2, outside its plausible range 0 or 1"),
    ],
)
def test_an_implausible_clinical_value_is_refused_naming_the_field_and_its_range(
    service, covariate, value, message
):
    payload, _ = whole_profile()
    payload["clinical"][covariate] = value
    before = counted("healnet_validation_errors_total", reason="out_of_range")
    response = asyncio.run(service.predict(PredictRequest(**payload)))
    body = json.loads(response.body)
    assert (response.status_code, body["reason"], body["error"]) == (422, "out_of_range", message)
    assert counted("healnet_validation_errors_total", reason="out_of_range") == before + 1


@pytest.mark.parametrize(
    "clinical, status, reason, message",
    [
        ({"age": float("nan")}, 422, "non_finite", "clinical['age'] is nan: use null for missing"),
        ({"oncotree_code": 3.0}, 400, "invalid_schema", "clinical['oncotree_code'] must be text, got 3.0"),
        ({"smoker": "yes"}, 400, "invalid_schema", "clinical['smoker'] must be a number, got 'yes'"),
    ],
)
def test_the_clinical_transforms_check_is_the_services(service, clinical, status, reason, message):
    payload, _ = whole_profile()
    response = asyncio.run(service.predict(PredictRequest(**payload | {"clinical": clinical})))
    body = json.loads(response.body)
    assert (response.status_code, body["reason"], body["error"]) == (status, reason, message)


def test_one_omic_table_alone_is_answered(service):
    payload, unused = whole_profile()
    rnaseq = {"rnaseq": payload["omics"]["rnaseq"]}
    answer = asyncio.run(service.predict(PredictRequest(omics=rnaseq)))
    assert answer.modalities_used == ["omic"] and answer.modalities_missing == ["clinical", "wsi"]
    assert answer.imputed_features == 2 * SPEC.features_per_table  # mut and cnv, not given
    assert answer.unknown_features == [name for name in unused if name.endswith("_rnaseq")]


def test_a_value_outside_the_training_range_is_answered_flagged_and_counted(service, clinical_registry):
    low, high = load_checkpoint(clinical_registry.checkpoint).preprocessor.clinical.training_ranges["age"]
    assert high + 5 <= 120  # plausible, but older than every training patient
    payload, _ = whole_profile()
    before = counted("healnet_out_of_training_range_total", field="age")
    older = asyncio.run(service.predict(PredictRequest(**payload | {"clinical": {"age": high + 5}})))
    batch = asyncio.run(
        service.predict_batch(
            [PredictRequest(clinical={"age": low - 5, "is_female": 1}), PredictRequest(clinical={"age": low})]
        )
    )
    assert older.out_of_training_range == ["age"] and older.modalities_used == ["omic", "clinical"]
    assert [answer.out_of_training_range for answer in batch] == [["age"], []]  # the bounds are inside
    assert counted("healnet_out_of_training_range_total", field="age") == before + 2
    # every covariate with a training range is exported from start-up, at 0 until one is flagged
    assert REGISTRY.get_sample_value("healnet_out_of_training_range_total", {"field": "is_female"}) == 0.0
