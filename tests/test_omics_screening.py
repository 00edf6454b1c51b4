"""In-fold univariate screening of omic features (`OmicsConfig(select="cox")`)."""

import numpy as np
import pandas as pd
import pytest
from sksurv.compare import compare_survival
from sksurv.util import Surv

from healnet.preprocess.omics import OmicsConfig, OmicsTransform, OmicsTransformError, cox_score_statistic
from healnet.preprocess.state import Preprocessor

SCREENED = OmicsConfig(top_k=2, select="cox")


def cohort(n_patients: int = 120, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """An rnaseq-like frame whose two low-variance genes set the hazard, beside four wide noise genes,
    and the patients' outcomes (index patient_id; survival_months, event)."""
    rng = np.random.default_rng(seed)
    ids = [f"TCGA-AA-{i:04d}" for i in range(n_patients)]
    prognostic = rng.normal(size=(n_patients, 2))
    noise = rng.normal(scale=5.0, size=(n_patients, 4))
    hazard = np.exp(1.5 * prognostic[:, 0] - 1.5 * prognostic[:, 1])
    times = rng.exponential(12.0 / hazard)
    censor_at = rng.exponential(24.0, n_patients)
    frame = pd.DataFrame(
        np.hstack([prognostic, noise]),
        index=ids,
        columns=["RISK_rnaseq", "PROTECT_rnaseq"] + [f"NOISE{i}_rnaseq" for i in range(4)],
    )
    survival = pd.DataFrame(
        {"survival_months": np.minimum(times, censor_at), "event": times <= censor_at}, index=ids
    )
    return frame, survival


def test_score_statistic_is_the_log_rank_test_of_a_binary_feature():
    """Without tied times the score test of a 0/1 feature is the log-rank test: scikit-survival's chi2."""
    rng = np.random.default_rng(3)
    n = 80
    group = rng.integers(0, 2, n)
    times = rng.exponential(10.0, n) * (1.0 + 0.5 * group)  # continuous: no two times tie
    events = rng.random(n) < 0.7
    statistic = cox_score_statistic(group[:, None].astype(float), times, events)[0]
    chi2, _ = compare_survival(Surv.from_arrays(events, times), group)
    assert statistic**2 == pytest.approx(chi2, rel=1e-9)
    assert statistic < 0  # the group with the longer times has the lower hazard


def test_score_statistic_with_tied_times_matches_the_risk_sets_one_by_one():
    rng = np.random.default_rng(4)
    values = rng.normal(size=(50, 3))
    times = rng.integers(1, 8, 50).astype(float)  # many ties
    events = rng.random(50) < 0.6
    score, variance = np.zeros(3), np.zeros(3)
    for patient in np.flatnonzero(events):
        at_risk = values[times >= times[patient]]
        score += values[patient] - at_risk.mean(axis=0)
        variance += at_risk.var(axis=0)
    np.testing.assert_allclose(cox_score_statistic(values, times, events), score / np.sqrt(variance))


def test_cox_selection_keeps_the_prognostic_features_that_variance_drops():
    frame, survival = cohort()
    frames = {"rnaseq": frame}
    by_variance = OmicsTransform.fit(frames, OmicsConfig(top_k=2))
    screened = OmicsTransform.fit(frames, SCREENED, survival)
    assert set(by_variance.feature_names["rnaseq"]) <= {f"NOISE{i}_rnaseq" for i in range(4)}
    assert screened.feature_names["rnaseq"] == ["RISK_rnaseq", "PROTECT_rnaseq"]


def test_screening_reads_the_training_patients_outcomes_only():
    frame, survival = cohort()
    train = list(frame.index[:80])
    fitted = Preprocessor.fit({"rnaseq": frame}, {}, train, SCREENED, clinical=survival)
    others = survival.copy()
    held_out = ~others.index.isin(train)
    # the held-out patients' outcomes reversed: screened on them, PROTECT would rank as RISK does
    times = others.loc[held_out, "survival_months"]
    others.loc[held_out, "survival_months"] = times.max() + 1 - times
    refitted = Preprocessor.fit({"rnaseq": frame}, {}, train, SCREENED, clinical=others)
    assert refitted.omics.state_dict() == fitted.omics.state_dict()
    assert fitted.omics.feature_names["rnaseq"] == ["RISK_rnaseq", "PROTECT_rnaseq"]


def test_a_screened_transform_round_trips_through_its_state():
    frame, survival = cohort()
    fitted = OmicsTransform.fit({"rnaseq": frame}, SCREENED, survival)
    restored = OmicsTransform.from_state_dict(fitted.state_dict())
    assert restored.config == SCREENED
    np.testing.assert_array_equal(
        restored.transform({"rnaseq": frame}, list(frame.index))["rnaseq"].values,
        fitted.transform({"rnaseq": frame}, list(frame.index))["rnaseq"].values,
    )


@pytest.mark.parametrize(
    ("config", "survival", "message"),
    [
        (dict(select="cox"), True, "give top_k"),
        (dict(select="lasso", top_k=2), True, "select must be one of"),
        (dict(select="cox", top_k=2), False, "pass the training outcomes"),
    ],
)
def test_screening_errors_name_the_problem(config, survival, message):
    frame, outcomes = cohort()
    with pytest.raises(OmicsTransformError, match=message):
        OmicsTransform.fit({"rnaseq": frame}, OmicsConfig(**config), outcomes if survival else None)


def test_screening_names_training_patients_without_an_outcome():
    frame, survival = cohort()
    with pytest.raises(OmicsTransformError, match="no survival outcome.*TCGA-AA-0000"):
        OmicsTransform.fit({"rnaseq": frame}, SCREENED, survival.drop(index="TCGA-AA-0000"))
