"""The survival evaluation report (docs/evaluation.md): interval coverage on cohorts with a known C, the
interpolation between bin edges, the time-dependent AUC inside the follow-up only, calibration and
D-calibration, the subgroup table, and the HTML and text reports."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
from scipy.special import expit

from healnet.calibration import calibration_groups, calibration_summary, calibration_time, d_calibration
from healnet.evaluate import survival_report
from healnet.evaluation_report import format_text, render_html
from healnet.subgroups import SUBGROUP_MIN_EVENTS, age_band, subgroup_levels, subgroup_table
from healnet.survival import SurvivalBins, step_survival
from healnet.survival_interpolation import interpolated_survival, interpolation_note, survival_at_own_time
from healnet.survival_metrics import (
    Bootstrap,
    concordance_intervals,
    harrell_c_weighted,
    time_dependent_auc,
    uno_c,
    uno_c_weights,
)

DRAWS = 200
ADMIN_CENSORING = 60.0  # months: every cohort is followed up to here, so Uno's tau is fixed


def population(rng: np.random.Generator, n: int, censored: bool):
    """Exponential survival with log-hazard eta ~ N(0, 1) (median ~14 months), a risk score eta + N(0, 1),
    and (when `censored`) uniform censoring with administrative censoring at ADMIN_CENSORING."""
    eta = rng.normal(size=n)
    death = rng.exponential(20.0 * np.exp(-eta))
    risk = eta + rng.normal(size=n)
    if not censored:
        return death, np.ones(n, dtype=int), risk
    censor = np.minimum(rng.uniform(0, 2 * ADMIN_CENSORING, size=n), ADMIN_CENSORING)
    return np.minimum(death, censor), (death <= censor).astype(int), risk


def known_c(rng: np.random.Generator, tau: float | None) -> float:
    """The population concordance P(r_i > r_j | T_i < T_j [, T_i < tau]) from two million random pairs."""
    times_i, _, risk_i = population(rng, 2_000_000, censored=False)
    times_j, _, risk_j = population(rng, 2_000_000, censored=False)
    earlier = times_i < times_j
    if tau is not None:
        earlier &= times_i < tau
    return float(np.mean(risk_i[earlier] > risk_j[earlier]))


def test_known_c_matches_its_closed_form_without_censoring():
    """Without censoring C = 2 E[1(r_i > r_j) sigmoid(eta_i − eta_j)]: the Monte Carlo target is right."""
    rng = np.random.default_rng(7)
    eta_i, eta_j = rng.normal(size=(2, 2_000_000))
    risk_i, risk_j = eta_i + rng.normal(size=2_000_000), eta_j + rng.normal(size=2_000_000)
    closed = 2 * np.mean((risk_i > risk_j) * expit(eta_i - eta_j))
    assert known_c(np.random.default_rng(8), None) == pytest.approx(closed, abs=0.003)


def test_the_harrell_interval_covers_the_known_c_at_its_level():
    rng = np.random.default_rng(11)
    truth = known_c(rng, None)
    bootstrap = Bootstrap(resamples=1000, seed=3)
    covered = 0
    for _ in range(DRAWS):
        times, events, risk = population(rng, 80, censored=False)
        low, high = bootstrap.interval(harrell_c_weighted(times, events, risk, bootstrap.counts(80)))
        covered += low <= truth <= high
    assert 0.88 <= covered / DRAWS <= 0.99, f"coverage {covered / DRAWS} of C = {truth:.3f}"


def test_the_uno_interval_covers_the_known_truncated_c_at_its_level():
    rng = np.random.default_rng(12)
    truth = known_c(rng, ADMIN_CENSORING)
    bootstrap = Bootstrap(resamples=1000, seed=4)
    covered = 0
    for _ in range(DRAWS):
        # the interval is conditional on the training censoring distribution: a large training set
        train_times, train_events, _ = population(rng, 1000, censored=True)
        times, events, risk = population(rng, 80, censored=True)
        intervals = concordance_intervals(train_times, train_events, times, events, risk, bootstrap)
        interval = intervals["uno_c_ci"]
        covered += interval.low <= truth <= interval.high
    assert 0.88 <= covered / DRAWS <= 0.99, f"coverage {covered / DRAWS} of Uno's C = {truth:.3f}"


def test_uno_c_from_weights_equals_scikit_survival_and_shares_the_resamples():
    rng = np.random.default_rng(5)
    train_times, train_events, _ = population(rng, 150, censored=True)
    times, events, risk = population(rng, 70, censored=True)
    times = np.round(times, 0)  # tied times: the tie rules must agree too
    weights = uno_c_weights(train_times, train_events, times, events)
    ours = harrell_c_weighted(times, events, risk, np.ones((1, times.size)), weights)[0]
    assert ours == pytest.approx(uno_c(train_times, train_events, times, events, risk), abs=1e-12)
    bootstrap = Bootstrap(resamples=50, seed=1)
    counts = bootstrap.counts(times.size)
    for row in counts[:5]:  # a resample is the patients repeated: scikit-survival on the repeated rows agrees
        drawn = np.repeat(np.arange(times.size), row)
        expected = uno_c(train_times, train_events, times[drawn], events[drawn], risk[drawn], tau=60.0)
        assert harrell_c_weighted(times, events, risk, row, weights)[0] == pytest.approx(expected, abs=1e-12)
    intervals = concordance_intervals(train_times, train_events, times, events, risk, bootstrap)
    assert set(intervals) == {"c_index_ci", "uno_c_ci"}
    for interval in intervals.values():
        assert interval.low <= interval.estimate <= interval.high and interval.resamples == 50


BINS = SurvivalBins(np.array([0.0, 10.0, 20.0, 30.0, np.inf]))
SURVIVAL = np.array([[0.9, 0.7, 0.4, 0.2], [0.8, 0.5, 0.3, 0.1]])


def test_interpolation_is_exact_at_the_edges_linear_between_and_held_after_the_last():
    edges = [0.0, 10.0, 20.0, 30.0]
    at_edges = interpolated_survival(SURVIVAL, BINS, edges)
    np.testing.assert_allclose(at_edges, step_survival(SURVIVAL, BINS, edges))
    np.testing.assert_allclose(at_edges[:, 1:], SURVIVAL[:, :3])
    np.testing.assert_allclose(interpolated_survival(SURVIVAL, BINS, [15.0])[:, 0], [0.8, 0.65])
    np.testing.assert_allclose(interpolated_survival(SURVIVAL, BINS, [2.5])[:, 0], [0.975, 0.95])
    np.testing.assert_allclose(interpolated_survival(SURVIVAL, BINS, [45.0, 500.0]), [[0.4, 0.4], [0.3, 0.3]])
    grid = np.linspace(0, 40, 401)
    curve = interpolated_survival(SURVIVAL, BINS, grid)
    assert (np.diff(curve, axis=1) <= 1e-12).all(), "monotone where the bin survival is"
    own = survival_at_own_time(SURVIVAL, BINS, [15.0, 25.0])
    np.testing.assert_allclose(own, [0.8, 0.4])
    note = interpolation_note(BINS)
    assert "10.0, 20.0, 30.0 months" in note and "interpolated linearly" in note


def test_td_auc_is_null_with_a_reason_beyond_the_follow_up():
    rng = np.random.default_rng(2)
    train_times, train_events, _ = population(rng, 200, censored=True)
    times, events, risk = population(rng, 80, censored=True)
    times = np.minimum(times, 48.3)  # test follow-up ends before five years
    at = np.column_stack([expit(-risk + k) for k in range(4)])  # any survival-like score per time
    values, excluded = time_dependent_auc(train_times, train_events, times, events, at, [12, 24, 36, 60])
    assert set(values) == {"12", "24", "36", "60"}
    assert values["60"] is None and excluded == {"60": "beyond the last test follow-up, 48.3 months"}
    assert all(0.0 <= values[key] <= 1.0 for key in ("12", "24", "36"))


def exponential_cohort(rng, n, scale):
    """Patients with known exponential survival; predictions S(t) = exp(−t · rate · scale) (scale 1:
    calibrated)."""
    rate = np.exp(rng.normal(size=n)) / 20.0
    death = rng.exponential(1.0 / rate)
    censor = rng.uniform(0, 80, size=n)
    times, events = np.minimum(death, censor), (death <= censor).astype(int)
    return times, events, lambda t: np.exp(-np.asarray(t) * rate * scale)


def test_d_calibration_accepts_a_calibrated_model_and_rejects_a_miscalibrated_one():
    rng = np.random.default_rng(3)
    times, events, survival = exponential_cohort(rng, 400, scale=1.0)
    calibrated = d_calibration(events.astype(bool), survival(times))
    times, events, survival = exponential_cohort(rng, 400, scale=3.0)
    miscalibrated = d_calibration(events.astype(bool), survival(times))
    assert calibrated["bins"] == 10 and calibrated["p_value"] > 0.05
    assert miscalibrated["p_value"] < 1e-6 and miscalibrated["statistic"] > calibrated["statistic"]


def test_a_censored_patient_is_spread_over_the_bins_below_its_survival():
    spread = d_calibration(np.array([False]), np.array([0.25]), bins=4)
    # counts: 1/(4 · 0.25) = 1 in [0, 0.25); 0 in the bin holding 0.25 → statistic from counts (1, 0, 0, 0)
    assert spread["statistic"] == pytest.approx(((1 - 0.25) ** 2 + 3 * 0.25**2) / 0.25)


def test_calibration_summary_and_groups_see_miscalibration():
    rng = np.random.default_rng(4)
    times, events, survival = exponential_cohort(rng, 400, scale=1.0)
    time = 20.0
    good = calibration_summary(times, events.astype(bool), survival(time), time)
    assert good["ici"] < 0.05 and good["slope"] == pytest.approx(1.0, abs=0.25)
    bad = calibration_summary(times, events.astype(bool), survival(time) ** 4, time)
    assert bad["ici"] > 3 * good["ici"]
    groups = calibration_groups(times, events, survival(time), time)
    assert [group["n"] for group in groups] == [100] * 4
    for group in groups:
        assert group["observed_low"] <= group["observed"] <= group["observed_high"]
        assert abs(group["predicted"] - group["observed"]) < 0.15
    assert calibration_time([5.0, 10.0, 30.0, 40.0], [1, 1, 1, 0], [1.0, 50.0]) == 10.0


def test_subgroups_list_every_level_and_flag_the_ones_with_few_deaths():
    rng = np.random.default_rng(6)
    n = 120
    times, events, risk = population(rng, n, censored=True)
    clinical = pd.DataFrame(
        {
            "is_female": pd.array([1] * 20 + [0] * 95 + [None] * 5, dtype="Int8"),
            "age": np.r_[np.full(60, 45.0), np.full(30, 65.0), np.full(30, 85.0)],
            "site": [f"S{i % 30}" for i in range(n)],
            "oncotree_code": ["BLCA"] * n,
        },
        index=[f"P{i}" for i in range(n)],
    )
    used = [["omic", "clinical"]] * 100 + [["clinical"]] * 20
    variables = subgroup_levels(clinical, used)
    assert list(variables) == ["sex", "age band", "subtype", "tissue-source site", "modalities received"]
    assert set(variables["tissue-source site"]) == {"other (30 levels)"}  # 4 patients each: pooled
    rows = subgroup_table(times, events, risk, variables, min_events=10, bootstrap=Bootstrap(resamples=200))
    by_level = {(row["variable"], row["level"]): row for row in rows}
    assert [row["level"] for row in rows if row["variable"] == "age band"] == ["<50", "60–69", "≥80"]
    assert by_level[("sex", "missing")]["n"] == 5 and by_level[("sex", "missing")]["flagged"]
    for row in rows:
        chosen = variables[row["variable"]].to_numpy() == row["level"]
        assert row["n"] == chosen.sum() and row["events"] == events[chosen].sum()
        assert row["flagged"] == (row["events"] < 10)
        if row["c_index"] is not None and row["low"] is not None:
            assert row["low"] <= row["c_index"] <= row["high"]
    assert SUBGROUP_MIN_EVENTS == 10
    assert [age_band(a) for a in (30, 50, 59.9, 79, 80, float("nan"))] == [
        "<50",
        "50–59",
        "50–59",
        "70–79",
        "≥80",
        "missing",
    ]


@pytest.fixture(scope="module")
def report() -> dict:
    """The survival report of per-bin predictions on a synthetic cohort whose follow-up ends at 48 months."""
    rng = np.random.default_rng(9)
    train_times, train_events, _ = population(rng, 200, censored=True)
    times, events, risk = population(rng, 90, censored=True)
    times = np.minimum(times, 48.0)
    bins = SurvivalBins.fit(train_times, train_events, 4)
    hazards = expit(np.add.outer(risk, [-2.0, -1.5, -1.0, -0.5]))
    survival = np.cumprod(1 - hazards, axis=1)
    clinical = pd.DataFrame({"is_female": pd.array([0, 1] * 45, dtype="Int8"), "age": 60.0}, index=range(90))
    variables = subgroup_levels(clinical, [["omic"]] * 90)
    result = survival_report((train_times, train_events), (times, events), survival, bins, variables)
    return {**result, "role": "test", "patients": 90, "events": int(events.sum())}


def test_the_report_has_every_key_the_model_card_reads(report):
    for key in ("c_index_ci", "uno_c_ci"):
        assert set(report[key]) == {"estimate", "low", "high", "confidence", "resamples"}
    assert set(report["td_auc"]) == {"12", "24", "36", "60"} and report["td_auc"]["60"] is None
    assert set(report["td_auc_excluded"]) == {"60"}
    curve = report["brier_curve"]
    assert len(curve["times"]) == len(curve["brier"]) == 50 and 0 < curve["integrated_brier_score"] < 0.5
    calibration = report["calibration"]
    assert {"time", "groups", "ici", "slope", "d_calibration"} <= set(calibration)
    assert set(calibration["d_calibration"]) == {"bins", "statistic", "p_value"}
    assert len(calibration["groups"]) == 4 and report["subgroup_min_events"] == SUBGROUP_MIN_EVENTS
    assert {row["variable"] for row in report["subgroups"]} == {"sex", "age band", "modalities received"}
    assert "interpolated linearly" in report["survival_interpolation"]


def test_html_and_text_show_every_section_and_mark_flagged_rows(report):
    page = render_html(report, "a <test> report", {"data_hash": "abc123"})
    assert "a &lt;test&gt; report" in page and "abc123" in page  # autoescaped
    assert "beyond the last test follow-up" in page and report["survival_interpolation"] in page
    flagged = [row for row in report["subgroups"] if row["flagged"]]
    assert len(re.findall(r'<tr class="flagged">', page)) == len(flagged)
    text = format_text(report)
    for expected in ("Harrell's C", "Uno's C", "time-dependent AUC", "beyond the last test follow-up", "ICI"):
        assert expected in text
    assert text.count("\n !") == len(flagged)
