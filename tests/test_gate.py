"""The promotion gate's rules (healnet/gate.py) and the patient bootstrap of Harrell's C they rest on
(healnet/survival_metrics.py)."""

import json
import math
import time

import numpy as np
import pandas as pd
import pytest
from sksurv.metrics import concordance_index_censored
from test_registry import small_checkpoint

from healnet.checkpoint import load_checkpoint
from healnet.fitting import CohortData
from healnet.gate import (
    DRY_RUN_RULE,
    ENOUGH_EVENTS,
    GATE_VERSION,
    MINIMUM,
    NOT_WORSE,
    PROMOTE,
    REJECT,
    VALID,
    Champion,
    GateError,
    GatePolicy,
    assess_champion,
    decide,
    incomparability,
    model_inputs,
    rule_texts,
)
from healnet.inference import Predictor
from healnet.registry import checkpoint_path, register_model
from healnet.scoring import CohortPatients, ScoredPatients
from healnet.survival_metrics import (
    DEFAULT_BOOTSTRAP,
    Bootstrap,
    harrell_c,
    harrell_c_bootstrap,
    harrell_c_interval,
    harrell_c_weighted,
)

RULES = rule_texts(GatePolicy(), DEFAULT_BOOTSTRAP.confidence)


def scored_set(n: int = 80, events: int = 40, noise: float = 0.0, seed: int = 0) -> ScoredPatients:
    """n test patients with `events` deaths and a risk that orders them by time, blurred by `noise`
    (0: Harrell's C of 1)."""
    rng = np.random.default_rng(seed)
    times = rng.permutation(np.arange(1.0, n + 1.0))
    observed = np.zeros(n, dtype=np.int64)
    observed[rng.choice(n, events, replace=False)] = 1
    risk = -times + noise * rng.normal(size=n) * n
    return ScoredPatients([f"P{i}" for i in range(n)], times, observed, risk)


def with_risk(patients: ScoredPatients, risk: np.ndarray) -> ScoredPatients:
    return ScoredPatients(patients.patient_ids, patients.times, patients.events, risk)


# ---- the bootstrap


def test_the_numpy_concordance_equals_scikit_survivals_on_random_data():
    rng = np.random.default_rng(7)
    for _ in range(40):
        n = int(rng.integers(5, 90))
        times = rng.integers(1, 25, n).astype(float)  # tied times, with deaths and censoring among them
        events = rng.random(n) < 0.6
        events[0] = True
        risk = np.round(rng.normal(size=n), 1)  # tied risks too
        expected = concordance_index_censored(events, times, risk)[0]
        assert harrell_c_weighted(times, events, risk, np.ones(n))[0] == pytest.approx(expected, abs=1e-12)
        # a resample is the same as the patients repeated by their counts
        counts = rng.multinomial(n, np.full(n, 1 / n))
        drawn = np.repeat(np.arange(n), counts)
        if events[drawn].any():
            resampled = concordance_index_censored(events[drawn], times[drawn], risk[drawn])[0]
            assert harrell_c_weighted(times, events, risk, counts)[0] == pytest.approx(resampled, abs=1e-12)


def test_the_bootstrap_is_seeded_and_reproducible():
    patients = scored_set(noise=0.3)
    first = harrell_c_interval(patients.times, patients.events, patients.risk)
    assert first == harrell_c_interval(patients.times, patients.events, patients.risk)
    assert first != harrell_c_interval(patients.times, patients.events, patients.risk, Bootstrap(seed=1))
    low, high = first
    assert low < harrell_c(patients.times, patients.events, patients.risk) < high
    counts = DEFAULT_BOOTSTRAP.counts(80)
    assert counts.shape == (1000, 80) and (counts.sum(axis=1) == 80).all()


def test_a_thousand_resamples_of_a_hundred_patients_take_well_under_a_second():
    patients = scored_set(n=100, events=50, noise=0.3)
    started = time.perf_counter()
    resampled = harrell_c_bootstrap(patients.times, patients.events, [patients.risk, -patients.risk])
    assert time.perf_counter() - started < 1.0
    assert resampled.shape == (2, 1000) and np.isfinite(resampled).all()
    np.testing.assert_allclose(resampled[0] + resampled[1], 1.0)  # reversed risks: 1 − C on every resample


@pytest.mark.parametrize(("field", "value"), [("resamples", 0), ("resamples", 1.5), ("confidence", 1.0)])
def test_invalid_bootstrap_settings_are_refused(field, value):
    with pytest.raises(ValueError, match=field):
        Bootstrap(**{field: value})


# ---- the rules


def test_a_first_model_whose_interval_clears_the_minimum_is_promoted():
    result = decide(scored_set(), None, GatePolicy(min_c_index=0.6))
    assert result.decision == PROMOTE and result.passed
    assert result.c_index == 1.0 and result.c_index_ci == (1.0, 1.0)
    assert result.rule == rule_texts(GatePolicy(min_c_index=0.6), 0.95)[MINIMUM]
    assert result.checks == {VALID: True, ENOUGH_EVENTS: True, MINIMUM: True}
    assert any("no champion yet" in reason for reason in result.reasons)


def test_an_interval_straddling_the_minimum_is_rejected():
    patients = scored_set(noise=1.0)
    policy = GatePolicy(min_c_index=0.6)
    result = decide(patients, None, policy)
    low, high = result.c_index_ci
    assert low < policy.min_c_index <= result.c_index < high  # the point estimate alone would have passed
    assert result.decision == REJECT and result.checks[MINIMUM] is False
    assert result.rule == rule_texts(policy, 0.95)[MINIMUM] and "lower bound" in result.rule
    assert f"{low:.4f} < min_c_index 0.6000" in result.reasons[-1]


def test_too_few_test_events_are_rejected_with_that_reason():
    result = decide(scored_set(events=12), None, GatePolicy(min_c_index=0.5))
    assert result.decision == REJECT and result.test_events == 12
    assert result.checks[ENOUGH_EVENTS] is False and result.checks[MINIMUM] is True
    assert result.rule == RULES[ENOUGH_EVENTS]
    assert any("12 test events < min_test_events 20: too few test events" in r for r in result.reasons)
    assert decide(scored_set(events=12), None, GatePolicy(min_test_events=12)).decision == PROMOTE


def test_a_champion_that_is_not_comparable_gets_its_reason_and_the_no_champion_rule():
    reason = "omic feature names differ (rnaseq: 3 only the candidate's)"
    champion = Champion("healnet:old", 0.9, not_comparable=reason)
    result = decide(scored_set(noise=1.0), champion, GatePolicy(min_c_index=0.6))
    assert result.decision == REJECT and result.rule == rule_texts(GatePolicy(min_c_index=0.6), 0.95)[MINIMUM]
    assert NOT_WORSE not in result.checks and result.paired_difference is None
    assert any(f"champion healnet:old is not comparable ({reason})" in r for r in result.reasons)
    record = result.to_dict()["champion"]
    assert record["comparable"] is False and record["not_comparable_reason"] == reason
    assert "not comparable" in result.to_markdown()
    assert decide(scored_set(), champion, GatePolicy(min_c_index=0.6)).decision == PROMOTE


def test_the_paired_difference_decides_against_a_comparable_champion_both_ways():
    candidate = scored_set(noise=0.3)
    rng = np.random.default_rng(3)
    close = Champion(
        "healnet:close", 0.8, risk=candidate.risk + 0.05 * len(candidate.risk) * rng.normal(size=80)
    )
    lenient, strict = GatePolicy(tolerance=0.1), GatePolicy(tolerance=0.0)
    promoted, rejected = decide(candidate, close, lenient), decide(candidate, close, strict)
    difference = promoted.paired_difference
    assert difference is not None and -0.1 <= difference.low < 0.0 < difference.high
    assert promoted.decision == PROMOTE and promoted.rule == rule_texts(lenient, 0.95)[NOT_WORSE]
    assert rejected.decision == REJECT and rejected.rule == rule_texts(strict, 0.95)[NOT_WORSE]
    assert rejected.checks == {VALID: True, ENOUGH_EVENTS: True, NOT_WORSE: False}
    assert difference.observed == pytest.approx(promoted.c_index - promoted.champion_c_index)
    # a clearly better champion: rejected whatever the candidate's own interval says
    better = Champion("healnet:better", 0.9, risk=-candidate.times)
    worse = decide(candidate, better, GatePolicy(min_c_index=0.0, tolerance=0.02))
    assert worse.decision == REJECT and worse.paired_difference.high < 0.0
    assert any("healnet:better" in reason and "< −tolerance" in reason for reason in worse.reasons)
    # with a comparable champion the minimum is not the rule: not worse than the champion is
    assert decide(candidate, close, GatePolicy(min_c_index=1.01, tolerance=0.1)).decision == PROMOTE


def test_the_same_resamples_score_the_candidate_and_the_champion():
    candidate = scored_set(noise=0.3)
    champion = Champion("healnet:same", None, risk=candidate.risk.copy())
    result = decide(candidate, champion, GatePolicy(tolerance=0.0))
    assert result.paired_difference.low == result.paired_difference.high == 0.0
    assert result.decision == PROMOTE
    assert result.c_index_ci == decide(candidate, None, GatePolicy()).c_index_ci


def test_dry_run_reports_failures_but_never_blocks():
    result = decide(scored_set(events=5, noise=2.0), None, GatePolicy(min_c_index=0.9, dry_run=True))
    assert result.decision == PROMOTE and not result.passed and result.rule == DRY_RUN_RULE
    assert result.checks[ENOUGH_EVENTS] is False and result.checks[MINIMUM] is False
    assert "dry run" in result.reasons[-1]


@pytest.mark.parametrize("dry_run", [False, True])
def test_a_candidate_whose_c_index_is_not_one_is_rejected_even_in_dry_run(dry_run):
    patients = scored_set()
    for unusable in (with_risk(patients, np.full(80, np.nan)), scored_set(events=0)):
        result = decide(unusable, None, GatePolicy(dry_run=dry_run))
        assert result.decision == REJECT and not result.passed and result.rule == RULES[VALID]
        assert result.checks == {VALID: False} and "not a number in [0, 1]" in result.reasons[0]
        assert json.dumps(result.to_dict(), allow_nan=False)  # null, not NaN, in gate.json


def test_the_gate_record_states_every_number_and_the_rule():
    candidate = scored_set(noise=0.3)
    champion = Champion("healnet:abc", 0.61, risk=candidate.risk[::-1].copy())
    record = json.loads(json.dumps(decide(candidate, champion, GatePolicy()).to_dict(), allow_nan=False))
    assert {
        "decision",
        "rule",
        "c_index",
        "c_index_ci",
        "test_events",
        "paired_difference",
        "reasons",
    } <= set(record)
    assert record["gate_version"] == GATE_VERSION == "2.0.0" and record["policy"]["min_test_events"] == 20
    assert len(record["c_index_ci"]) == 2 and record["test_events"] == 40
    assert set(record["paired_difference"]) >= {"mean", "ci"} and len(record["paired_difference"]["ci"]) == 2
    assert record["champion"]["tag"] == "healnet:abc" and record["champion"]["comparable"] is True
    assert record["bootstrap"] == {"resamples": 1000, "confidence": 0.95, "seed": 0}
    metrics = decide(candidate, champion, GatePolicy()).metrics()
    assert {"c_index_ci_low", "c_index_ci_high", "paired_difference_mean", "paired_difference_ci_low"} <= set(
        metrics
    )
    assert all(isinstance(value, float) for value in metrics.values())
    markdown = decide(candidate, champion, GatePolicy()).to_markdown()
    assert (
        f"v{GATE_VERSION}" in markdown
        and "Decided by the rule" in markdown
        and "paired difference" in markdown
    )


@pytest.mark.parametrize(
    ("field", "value"),
    [("min_c_index", -0.1), ("min_c_index", math.nan), ("tolerance", 2.0), ("min_test_events", -1)],
)
def test_invalid_policies_are_refused(field, value):
    with pytest.raises(GateError, match=field):
        GatePolicy(**{field: value})


def test_policy_is_frozen():
    with pytest.raises(AttributeError):
        GatePolicy().min_c_index = 0.1


# ---- comparability, with real checkpoints scored through the serving path


def omics_patients(n: int = 30, seed: int = 0) -> CohortPatients:
    """n patients with the six rnaseq features of `small_checkpoint`'s models."""
    rng = np.random.default_rng(seed)
    ids = [f"TCGA-BB-{i:04d}" for i in range(n)]
    frame = pd.DataFrame(rng.normal(size=(n, 6)), index=ids, columns=[f"g{j}_rnaseq" for j in range(6)])
    clinical = pd.DataFrame(
        {"survival_months": rng.uniform(1, 60, n), "event": rng.integers(0, 2, n)}, index=ids
    )
    return CohortPatients(CohortData(clinical, {"rnaseq": frame}, {}), ids)


def test_model_inputs_name_what_makes_two_models_not_comparable(tmp_path):
    small_checkpoint(tmp_path / "a", seed=0)
    small_checkpoint(tmp_path / "b", seed=1)
    inputs = model_inputs(load_checkpoint(tmp_path / "a"))
    assert inputs["modalities"] == ["omic"] and inputs["omic_features"]["rnaseq"][0] == "g0_rnaseq"
    assert (
        incomparability(inputs, model_inputs(load_checkpoint(tmp_path / "b"))) is None
    )  # other weights only
    fewer = {**inputs, "omic_features": {"rnaseq": inputs["omic_features"]["rnaseq"][:4]}}
    assert "omic feature names differ (rnaseq: 2 only the candidate's" in incomparability(inputs, fewer)
    other = {**inputs, "modalities": ["omic", "wsi"], "slide_encoder": {"name": "uni_v1"}}
    reason = incomparability(inputs, other)
    assert "model modalities differ" in reason and "patch encoder differ" in reason


def test_a_comparable_champion_is_scored_on_the_test_patients_through_the_serving_path(registry, tmp_path):
    small_checkpoint(tmp_path / "champion", seed=1)
    small_checkpoint(tmp_path / "candidate", seed=2)
    tag = register_model(tmp_path / "champion", metadata={"c_index": 0.64})
    patients = omics_patients()
    candidate_inputs = model_inputs(load_checkpoint(tmp_path / "candidate"))
    champion = assess_champion(tag, candidate_inputs, lambda: patients)
    assert champion.comparable and champion.recorded_c_index == 0.64
    expected = patients.score(Predictor.from_dir(tmp_path / "champion")).risk
    np.testing.assert_array_equal(champion.risk, expected)
    assert assess_champion(None, candidate_inputs, lambda: patients) is None


def test_a_champion_that_cannot_be_loaded_or_reads_other_inputs_is_not_comparable(registry, tmp_path):
    small_checkpoint(tmp_path / "champion", seed=1)
    small_checkpoint(tmp_path / "candidate", seed=2)
    tag = register_model(tmp_path / "champion")
    inputs = model_inputs(load_checkpoint(tmp_path / "candidate"))

    def never_loaded():
        raise AssertionError("the patients are loaded only for a comparable champion")

    other = assess_champion(tag, {**inputs, "clinical_covariates": ["age"]}, never_loaded)
    assert not other.comparable and "clinical covariates differ" in other.not_comparable
    weights = checkpoint_path(tag) / "model.pt"
    weights.write_bytes(weights.read_bytes() + b"\0")  # the store's copy no longer matches its sha256
    broken = assess_champion(tag, inputs, never_loaded)
    assert not broken.comparable and broken.not_comparable.startswith("its checkpoint cannot be loaded")
    result = decide(scored_set(), broken, GatePolicy())
    assert result.decision == PROMOTE and result.rule == RULES[MINIMUM]
