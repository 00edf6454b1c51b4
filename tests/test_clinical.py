"""The clinical modality: its transform, per-sample missingness in the model, and the linear path."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

from healnet.model import HEALNet, HEALNetConfig, ModalitySpec, ModelInputError
from healnet.preprocess.clinical import (
    ClinicalConfig,
    ClinicalProblem,
    ClinicalTransform,
    ClinicalTransformError,
    ClinicalValueError,
)


def clinical_table(n: int = 60, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "age": rng.normal(60, 10, n),
            "is_female": pd.array(rng.integers(0, 2, n), dtype="Int8"),
            "oncotree_code": rng.choice(
                ["IDC", "IDC", "IDC", "ILC", "RARE"], n, p=[0.3, 0.3, 0.2, 0.17, 0.03]
            ),
            "site": rng.choice(["A2", "B6"], n),  # a batch marker: never a covariate
        },
        index=pd.Index([f"TCGA-AA-{i:04d}" for i in range(n)], name="patient_id"),
    )


def test_transform_fits_on_training_rows_and_drops_rare_levels_and_the_site():
    table = clinical_table()
    table.loc[table.index[0], "oncotree_code"] = "RARE"
    transform = ClinicalTransform.fit(table, ClinicalConfig(min_level_count=5))
    # the most frequent level (IDC) is the reference; RARE is seen in fewer than 5 patients
    assert transform.feature_names == ["age", "is_female", "oncotree_code=ILC"]
    tokens = transform.transform(table, table.index)
    assert tokens.values.shape == (60, 3, 1)
    values = tokens.values[:, :, 0]
    np.testing.assert_allclose(values.mean(axis=0), 0.0, atol=1e-6)  # z-scored with training statistics
    np.testing.assert_allclose(values.std(axis=0), 1.0, atol=1e-5)
    assert tokens.present.all() and not tokens.imputed.any()


@pytest.mark.parametrize("men", [4, 5])
def test_a_binary_covariate_with_a_rare_value_is_left_out_when_rare_levels_pool(men):
    table = clinical_table()
    table["is_female"] = pd.array([0] * men + [1] * (len(table) - men), dtype="Int8")
    table.loc[table.index[-1], "is_female"] = pd.NA  # a missing value counts for neither level
    kept = ClinicalTransform.fit(table, ClinicalConfig(min_level_count=5))
    pooled = ClinicalTransform.fit(table, ClinicalConfig(min_level_count=5, pool_rare_binary=True))
    assert "is_female" in kept.feature_names
    assert ("is_female" in pooled.feature_names) == (men >= 5)
    assert pooled.feature_names[0] == "age" and "oncotree_code=ILC" in pooled.feature_names
    # a saved transform keeps the choice, and a case's sex is then named as a value the model does not use
    loaded = ClinicalTransform.from_state_dict(json.loads(json.dumps(pooled.state_dict())))
    assert loaded.feature_names == pooled.feature_names
    _, unknown = loaded.transform_records([{"age": 60.0, "is_female": 0}])
    assert unknown == [[] if men >= 5 else ["is_female"]]


def test_missing_covariates_are_imputed_and_a_patient_without_any_is_missing():
    table = clinical_table()
    transform = ClinicalTransform.fit(table)
    test = table.iloc[:3].copy()
    test.loc[test.index[0], "age"] = np.nan
    test.loc[test.index[1], ["age", "is_female", "oncotree_code"]] = np.nan
    tokens = transform.transform(test, [*test.index, "TCGA-ZZ-9999"])
    assert tokens.present.tolist() == [True, False, True, False]
    assert tokens.imputed.tolist() == [1, 0, 0, 0]
    median_age = np.median(table["age"])
    age = transform.features[0]
    assert tokens.values[0, 0, 0] == pytest.approx((median_age - age.mean) / age.std, rel=1e-5)
    assert not tokens.values[[1, 3]].any()  # a missing modality is zero-filled


def test_records_match_the_table_path_and_report_unknown_names():
    table = clinical_table()
    transform = ClinicalTransform.fit(table)
    row = table.iloc[4]
    record = {
        "age": float(row["age"]),
        "is_female": int(row["is_female"]),
        "oncotree_code": row["oncotree_code"],
    }
    tokens, unknown = transform.transform_records([{**record, "smoker": 1}, {}])
    np.testing.assert_allclose(tokens.values[0], transform.transform(table, [table.index[4]]).values[0])
    assert unknown == [["smoker"], []]
    assert tokens.present.tolist() == [True, False]
    with pytest.raises(ClinicalTransformError, match=r"clinical\['age'\] must be a number"):
        transform.transform_records([{"age": "sixty"}])
    with pytest.raises(ClinicalTransformError, match="is inf: use null for missing"):
        transform.transform_records([{"age": float("inf")}])


@pytest.mark.parametrize(
    "covariate, value, problem, message",
    [
        ("age", "sixty", ClinicalProblem.WRONG_TYPE, "clinical['age'] must be a number, got 'sixty'"),
        ("age", True, ClinicalProblem.WRONG_TYPE, "clinical['age'] must be a number, got True"),
        ("oncotree_code", 3, ClinicalProblem.WRONG_TYPE, "clinical['oncotree_code'] must be text, got 3"),
        ("age", float("nan"), ClinicalProblem.NOT_FINITE, "clinical['age'] is nan: use null for missing"),
        ("smoker", "yes", ClinicalProblem.WRONG_TYPE, "clinical['smoker'] must be a number, got 'yes'"),
        (
            "age",
            121,
            ClinicalProblem.IMPLAUSIBLE,
            "clinical['age'] is 121, outside its plausible range 0 to 120",
        ),
    ],
)
def test_check_value_says_what_is_wrong_naming_the_request_field(covariate, value, problem, message):
    transform = ClinicalTransform.fit(clinical_table())
    with pytest.raises(ClinicalValueError) as refused:
        transform.check_value(covariate, value)
    assert (refused.value.problem, str(refused.value)) == (problem, message)
    assert transform.check_value("age", 61) == 61.0 and isinstance(transform.check_value("age", 61), float)
    assert (
        transform.check_value("oncotree_code", "IDC") == "IDC" and transform.check_value("age", None) is None
    )


def test_state_round_trips_through_json():
    transform = ClinicalTransform.fit(clinical_table())
    restored = ClinicalTransform.from_state_dict(json.loads(json.dumps(transform.state_dict())))
    table = clinical_table(seed=1)
    np.testing.assert_array_equal(
        restored.transform(table, table.index).values, transform.transform(table, table.index).values
    )
    with pytest.raises(ClinicalTransformError, match="format"):
        ClinicalTransform.from_state_dict({**transform.state_dict(), "format_version": 99})


@pytest.mark.parametrize(
    "record, message",
    [
        ({"age": 300}, r"clinical\['age'\] is 300, outside its plausible range 0 to 120"),
        ({"age": -1.0}, r"clinical\['age'\] is -1, outside its plausible range 0 to 120"),
        ({"is_female": 2}, r"clinical\['is_female'\] is 2, outside its plausible range 0 or 1"),
        ({"is_female": 0.5}, r"clinical\['is_female'\] is 0.5, outside its plausible range 0 or 1"),
    ],
)
def test_an_implausible_record_value_is_refused_naming_the_covariate_and_its_range(record, message):
    transform = ClinicalTransform.fit(clinical_table())
    with pytest.raises(ClinicalTransformError, match=message):
        transform.transform_records([record])
    tokens, _ = transform.transform_records([{"age": 0, "is_female": 1.0}, {"age": 120}])  # bounds included
    assert tokens.present.all()


def test_the_training_range_travels_in_the_state_and_flags_values_outside_it():
    table = clinical_table()
    transform = ClinicalTransform.fit(table.iloc[:40])
    low, high = table["age"].iloc[:40].min(), table["age"].iloc[:40].max()
    assert transform.training_ranges == {"age": (low, high), "is_female": (0.0, 1.0)}
    state = json.loads(json.dumps(transform.state_dict()))
    restored = ClinicalTransform.from_state_dict(state)
    records = [{"age": high + 1, "is_female": 1}, {"age": low - 1}, {"age": low, "oncotree_code": "IDC"}, {}]
    assert restored.outside_training_range(records) == [["age"], ["age"], [], []]
    # a state written before version 2 has no training range: it loads and flags nothing
    version_1 = {
        **state,
        "format_version": 1,
        "features": [
            {k: v for k, v in f.items() if k not in ("training_min", "training_max")}
            for f in state["features"]
        ],
    }
    old = ClinicalTransform.from_state_dict(version_1)
    assert old.training_ranges == {} and old.outside_training_range(records) == [[], [], [], []]
    np.testing.assert_array_equal(
        old.transform_records(records)[0].values, restored.transform_records(records)[0].values
    )


def test_a_cohort_without_varying_covariates_is_refused():
    table = clinical_table()[["age"]].assign(age=50.0)
    with pytest.raises(ClinicalTransformError, match="no clinical feature varies"):
        ClinicalTransform.fit(table)


CLINICAL = ModalitySpec("clinical", 1, num_freq_bands=6, max_freq=3.0)
OMIC = ModalitySpec("omic", 5)


def linear_model() -> HEALNet:
    torch.manual_seed(0)
    config = HEALNetConfig(
        modalities=[OMIC, CLINICAL],
        n_bins=4,
        depth=1,
        n_latents=4,
        latent_dim=16,
        linear_path="clinical",
        linear_path_inputs=3,
    )
    model = HEALNet(config).eval()
    with torch.no_grad():
        model.linear_path.weight.copy_(torch.tensor([[0.5, -0.2, 1.0]]))
    return model


def test_a_missing_clinical_modality_changes_nothing_in_that_sample_and_its_linear_term_is_zero():
    model = linear_model()
    inputs = {"omic": torch.randn(3, 1, 5), "clinical": torch.randn(3, 3, 1)}
    present = {"clinical": torch.tensor([False, True, False])}
    logits = model(inputs, present)
    for garbage in (torch.full((3, 3, 1), 1e30), torch.full((3, 3, 1), float("nan"))):
        changed = model({**inputs, "clinical": garbage}, present)
        assert torch.equal(changed[0], logits[0]) and torch.equal(changed[2], logits[2])
        assert not torch.allclose(changed[1], logits[1])
    # a sample without the clinical modality matches a run that never saw it
    torch.testing.assert_close(model({"omic": inputs["omic"]})[0], logits[0])


def test_the_linear_term_is_the_weights_times_the_covariates():
    model = linear_model()
    inputs = {"omic": torch.randn(1, 1, 5), "clinical": torch.zeros(1, 3, 1)}
    shifted = {"omic": inputs["omic"], "clinical": torch.tensor([[[1.0], [0.0], [0.0]]])}
    # the latent path sees the covariates too, so compare the linear term alone
    offset = model._linear_offset({"clinical": shifted["clinical"]}, {"clinical": torch.tensor([True])})
    assert offset.item() == pytest.approx(0.5)
    with pytest.raises(ModelInputError, match="expects 3 values"):
        model({"omic": inputs["omic"], "clinical": torch.zeros(1, 2, 1)})


def test_linear_path_must_name_a_modality():
    with pytest.raises(ModelInputError, match="linear_path"):
        HEALNetConfig(modalities=[OMIC], n_bins=4, linear_path="clinical", linear_path_inputs=3)
