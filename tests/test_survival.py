"""Survival maths against hand-computed examples."""

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from healnet.survival import SurvivalBins, SurvivalDataError, nll_loss, step_survival, survival_from_logits
from healnet.survival_metrics import harrell_c, harrell_c_or_nan, integrated_brier, survival_metrics, uno_c

LOG2 = math.log(2.0)

# Three patients, 4 bins. Logit 0 -> hazard 1/2; logit log(3) -> hazard 3/4.
#   A: death in bin 1, hazards all 1/2:  S_padded = [1, 1/2, 1/4, 1/8, 1/16]
#      uncensored = -(log S_padded[1] + log h[1]) = -(log 1/2 + log 1/2) = 2 log 2
#   B: censored in bin 2, hazards all 1/2: censored = -log S_padded[3] = -log 1/8 = 3 log 2
#   C: death in bin 0, h[0] = 3/4: uncensored = -(log 1 + log 3/4) = -log 0.75
LOGITS = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [math.log(3.0), 0.0, 0.0, 0.0]])
LABELS = torch.tensor([1, 2, 0])
EVENTS = torch.tensor([1, 0, 1])
UNCENSORED_A = 2 * LOG2
CENSORED_B = 3 * LOG2
UNCENSORED_C = -math.log(0.75)


def test_nll_loss_hand_example_with_default_alpha():
    # Deaths: (1-a)(0 + u) + a u = u. Censored: (1-a) c.
    expected = (UNCENSORED_A + 0.6 * CENSORED_B + UNCENSORED_C) / 3
    assert nll_loss(LOGITS, LABELS, EVENTS).item() == pytest.approx(expected, rel=1e-6)


def test_nll_loss_alpha_zero_is_plain_nll_and_alpha_one_ignores_censored():
    plain = (UNCENSORED_A + CENSORED_B + UNCENSORED_C) / 3
    assert nll_loss(LOGITS, LABELS, EVENTS, alpha=0.0).item() == pytest.approx(plain, rel=1e-6)
    uncensored_only = (UNCENSORED_A + 0.0 + UNCENSORED_C) / 3
    assert nll_loss(LOGITS, LABELS, EVENTS, alpha=1.0).item() == pytest.approx(uncensored_only, rel=1e-6)


def test_nll_loss_bin_weights_give_a_weighted_mean():
    # Weights per bin [w0, w1, w2, w3] = [1, 3, 0, 1]: A (bin 1) weighs 3, B (bin 2) 0, C (bin 0) 1.
    weights = torch.tensor([1.0, 3.0, 0.0, 1.0])
    expected = (3 * UNCENSORED_A + 0 * 0.6 * CENSORED_B + 1 * UNCENSORED_C) / 4
    assert nll_loss(LOGITS, LABELS, EVENTS, bin_weights=weights).item() == pytest.approx(expected, rel=1e-6)
    uniform = nll_loss(LOGITS, LABELS, EVENTS, bin_weights=torch.ones(4))
    assert uniform.item() == pytest.approx(nll_loss(LOGITS, LABELS, EVENTS).item(), rel=1e-6)


def test_nll_loss_is_finite_and_differentiable_at_extreme_logits():
    # Hazard ~0 in the death bin and survival ~0 past it: the eps clamps keep log() finite.
    logits = torch.tensor(
        [[-200.0, -200.0, -200.0, -200.0], [200.0, 200.0, 200.0, 200.0]], requires_grad=True
    )
    loss = nll_loss(logits, torch.tensor([2, 3]), torch.tensor([1, 0]))
    assert torch.isfinite(loss)
    # -log(1e-7) bounds each term: death in bin 2 with h ~ 0 costs about 16.1.
    assert loss.item() == pytest.approx((-math.log(1e-7) + 0.6 * -math.log(1e-7)) / 2, rel=1e-3)
    loss.backward()
    assert torch.isfinite(logits.grad).all()


def test_nll_loss_gradient_lowers_the_loss():
    logits = torch.zeros(3, 4, requires_grad=True)
    before = nll_loss(logits, LABELS, EVENTS)
    before.backward()
    after = nll_loss((logits - 0.5 * logits.grad).detach(), LABELS, EVENTS)
    assert after.item() < before.item()


@pytest.mark.parametrize(
    ("logits", "labels", "events", "message"),
    [
        (torch.zeros(4), torch.tensor([0]), torch.tensor([1]), "logits must have shape"),
        (torch.zeros(2, 4), torch.tensor([0]), torch.tensor([1, 1]), "labels and events must have shape"),
        (torch.zeros(2, 4), torch.tensor([0, 4]), torch.tensor([1, 1]), "labels must be bin indices"),
        (torch.zeros(2, 4), torch.tensor([0, 1]), torch.tensor([1, 2]), "events must be 0"),
        (torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), torch.zeros(0), "batch is empty"),
    ],
)
def test_nll_loss_rejects_bad_input(logits, labels, events, message):
    with pytest.raises(SurvivalDataError, match=message):
        nll_loss(logits, labels, events)


def test_nll_loss_rejects_bad_alpha_and_weights():
    with pytest.raises(SurvivalDataError, match="alpha"):
        nll_loss(LOGITS, LABELS, EVENTS, alpha=1.5)
    with pytest.raises(SurvivalDataError, match="bin_weights must have shape"):
        nll_loss(LOGITS, LABELS, EVENTS, bin_weights=torch.ones(3))
    with pytest.raises(SurvivalDataError, match="zero weight"):
        nll_loss(LOGITS, LABELS, EVENTS, bin_weights=torch.zeros(4))


def test_survival_from_logits_hand_example():
    # Row 0: hazards [1/2, 1/2, 1/2, 1/2] -> S = [1/2, 1/4, 1/8, 1/16], risk = -15/16.
    # Row 1: hazards [3/4, 1/4, 1/2, 1/2] -> S = [1/4, 3/16, 3/32, 3/64], risk = -(16+12+6+3)/64 = -37/64.
    logits = torch.tensor(
        [[0.0, 0.0, 0.0, 0.0], [math.log(3.0), -math.log(3.0), 0.0, 0.0]], dtype=torch.float64
    )
    hazards, survival, risk = survival_from_logits(logits)
    expected_hazards = [[0.5, 0.5, 0.5, 0.5], [0.75, 0.25, 0.5, 0.5]]
    expected_survival = [[1 / 2, 1 / 4, 1 / 8, 1 / 16], [1 / 4, 3 / 16, 3 / 32, 3 / 64]]
    np.testing.assert_allclose(hazards.numpy(), expected_hazards, rtol=1e-12)
    np.testing.assert_allclose(survival.numpy(), expected_survival, rtol=1e-12)
    np.testing.assert_allclose(risk.numpy(), [-15 / 16, -37 / 64], rtol=1e-12)


def test_higher_hazard_gives_higher_risk():
    logits = torch.tensor(
        [[-2.0] * 4, [0.0] * 4, [2.0] * 4, [-2.0, -2.0, -2.0, 3.0], [3.0, -2.0, -2.0, -2.0]]
    )
    _, survival, risk = survival_from_logits(logits)
    assert risk[0] < risk[1] < risk[2]
    # The same extra hazard raises risk more when it comes early.
    assert risk[0] < risk[3] < risk[4]
    assert (survival[:, 1:] <= survival[:, :-1]).all()


def test_bins_from_quartiles_of_uncensored_times_only():
    # Uncensored 1..5: linear quartiles 2, 3, 4. Censored times (0.5, 2.2, 100) must not move them.
    times = [1.0, 2.0, 3.0, 4.0, 5.0, 0.5, 2.2, 100.0]
    events = [1, 1, 1, 1, 1, 0, 0, 0]
    bins = SurvivalBins.fit(times, events, 4)
    np.testing.assert_array_equal(bins.edges, [0.0, 2.0, 3.0, 4.0, np.inf])
    assert bins.n_bins == 4
    assert SurvivalBins.fit(times[:5], events[:5], 4) == bins
    assert SurvivalBins.fit(times[:5], events[:5], n_bins=2).edges.tolist() == [0.0, 3.0, np.inf]


def test_bins_assign_at_edges_and_beyond_the_fitted_range():
    bins = SurvivalBins.fit([1.0, 2.0, 3.0, 4.0, 5.0], [1, 1, 1, 1, 1], 4)  # edges 0, 2, 3, 4, inf
    # A time equal to an inner edge starts the upper bin; times past the fitted data go to the last bin.
    times = np.array([0.0, 0.1, 1.999, 2.0, 2.5, 3.0, 4.0, 5.0, 1000.0])
    np.testing.assert_array_equal(bins.assign(times), [0, 0, 0, 1, 1, 2, 3, 3, 3])
    assert bins.assign(torch.tensor([2.0, 3.5])).tolist() == [1, 2]
    assert bins.assign([2.0]).dtype == np.int64


def test_bins_fitted_on_train_do_not_change_with_the_test_set():
    rng = np.random.default_rng(0)
    train_times, train_events = rng.exponential(20.0, 40), rng.integers(0, 2, 40)
    bins = SurvivalBins.fit(train_times, train_events, 4)
    for scale in (1.0, 50.0):
        test_times = rng.exponential(scale, 10)
        assert SurvivalBins.fit(train_times, train_events, 4) == bins
        assert set(bins.assign(test_times)) <= {0, 1, 2, 3}
    both = SurvivalBins.fit(np.r_[train_times, [500.0] * 10], np.r_[train_events, [1] * 10], 4)
    assert both != bins


def test_bins_to_dict_round_trips_through_json_exactly():
    bins = SurvivalBins.fit([1 / 3, 2 / 7, 3.14159, 10.5, 7.77, 100.0], [1, 1, 1, 1, 1, 0], 4)
    text = json.dumps(bins.to_dict())
    assert "Infinity" not in text
    restored = SurvivalBins.from_dict(json.loads(text))
    assert restored == bins
    assert restored.edges.tobytes() == bins.edges.tobytes()
    assert hash(restored) == hash(bins)


def test_bins_are_immutable():
    bins = SurvivalBins.fit([1.0, 2.0, 3.0, 4.0], [1, 1, 1, 1], 4)
    with pytest.raises(ValueError):
        bins.edges[1] = 0.5
    with pytest.raises(AttributeError):
        bins.edges = np.array([0.0, np.inf])


@pytest.mark.parametrize(
    ("times", "events", "message"),
    [
        ([1.0, 2.0, 3.0, 4.0, 5.0], [1, 1, 1, 0, 0], "from 3 uncensored time"),
        ([1.0, np.nan, 3.0, 4.0], [1, 1, 1, 1], "non-finite"),
        ([1.0, -2.0, 3.0, 4.0], [1, 1, 1, 1], "negative"),
        ([1.0, 2.0, 3.0, 4.0], [1, 1, 1], "must have shape"),
        ([1.0, 2.0, 3.0, 4.0], [1, 1, 2, 1], "must be 0 .censored. or 1"),
        ([5.0, 5.0, 5.0, 5.0, 6.0], [1, 1, 1, 1, 1], "too few distinct"),
    ],
)
def test_bins_fit_rejects_bad_input(times, events, message):
    with pytest.raises(SurvivalDataError, match=message):
        SurvivalBins.fit(times, events, 4)


def test_bins_reject_bad_edges_and_dicts():
    with pytest.raises(SurvivalDataError, match="start at 0.0 and end at inf"):
        SurvivalBins(np.array([0.0, 1.0, 2.0]))
    with pytest.raises(SurvivalDataError, match="strictly increasing"):
        SurvivalBins(np.array([0.0, 2.0, 1.0, np.inf]))
    with pytest.raises(SurvivalDataError, match="'edges'"):
        SurvivalBins.from_dict({"bins": [0.0, "inf"]})
    bins = SurvivalBins.fit([1.0, 2.0, 3.0, 4.0], [1, 1, 1, 1], 4)
    with pytest.raises(SurvivalDataError, match="negative"):
        bins.assign([-1.0])


def test_inverse_frequency_weights_hand_example():
    # Counts per bin [3, 1, 2, 0] -> 1/count = [1/3, 1, 1/2] over present bins, mean 11/18.
    bins = SurvivalBins(np.array([0.0, 1.0, 2.0, 3.0, np.inf]))
    weights = bins.inverse_frequency_weights([0, 0, 0, 1, 2, 2])
    np.testing.assert_allclose(weights, [6 / 11, 18 / 11, 9 / 11, 0.0])
    np.testing.assert_allclose(bins.inverse_frequency_weights(torch.tensor([0, 1, 2, 3])), [1.0] * 4)
    with pytest.raises(SurvivalDataError, match="bin indices"):
        bins.inverse_frequency_weights([0, 4])


def test_harrell_c_hand_example():
    # Times 1, 2, 3, 4; patient 3 censored. Comparable pairs (earlier one died): (1,2) (1,3) (1,4) (2,3) (2,4).
    # Risk [.9, .5, .7, .1]: discordant only (2,3) -> 4/5.
    assert harrell_c([1, 2, 3, 4], [1, 1, 0, 1], [0.9, 0.5, 0.7, 0.1]) == pytest.approx(4 / 5)
    # Risk [.9, .7, .7, .1]: (2,3) tied risk counts 1/2 -> 4.5/5.
    assert harrell_c(
        np.array([1, 2, 3, 4]), torch.tensor([1, 1, 0, 1]), [0.9, 0.7, 0.7, 0.1]
    ) == pytest.approx(0.9)


def test_harrell_c_or_nan_where_no_pair_is_comparable():
    # The one death is the last time: no pair is comparable, so C is undefined.
    with pytest.raises(SurvivalDataError, match="comparable"):
        harrell_c([1, 2, 3], [0, 0, 1], [0.1, 0.2, 0.3])
    assert math.isnan(harrell_c_or_nan([1, 2, 3], [0, 0, 1], [0.1, 0.2, 0.3]))
    assert math.isnan(harrell_c_or_nan([1, 2, 3], [0, 0, 0], [0.1, 0.2, 0.3]))
    assert harrell_c_or_nan([1, 2, 3], [1, 0, 1], [0.3, 0.2, 0.1]) == 1.0
    with pytest.raises(SurvivalDataError, match="shape"):  # other errors still raise
        harrell_c_or_nan([1, 2, 3], [1, 0, 1], [0.3, 0.2])


def test_uno_c_hand_example_with_censoring():
    # Training censoring KM: censorings at 2 (4 at risk) and 5 (last) -> G(t) = 3/4 on [2, 5).
    # Test times 1.5, 2.5, 3.5 (censored), 4.5; tau = min(5, 4.5) = 4.5.
    # Patient 1 (G = 1, weight 1): concordant with 2, 3, 4 -> 3 of 3.
    # Patient 2 (G = 3/4, weight 16/9): discordant with 3 (.5 < .7), concordant with 4 -> w of 2w.
    expected = (3 + 16 / 9) / (3 + 2 * 16 / 9)  # = 43/59
    uno = uno_c([1, 2, 3, 4, 5], [1, 0, 1, 1, 0], [1.5, 2.5, 3.5, 4.5], [1, 1, 0, 1], [0.9, 0.5, 0.7, 0.1])
    assert uno == pytest.approx(expected)
    assert harrell_c([1.5, 2.5, 3.5, 4.5], [1, 1, 0, 1], [0.9, 0.5, 0.7, 0.1]) == pytest.approx(4 / 5)


def test_uno_c_equals_harrell_c_without_censoring():
    # With no censoring in training every IPCW weight is 1; training follow-up beyond the test keeps every pair.
    rng = np.random.default_rng(1)
    test_times = rng.exponential(10.0, 30)
    risk = rng.normal(size=30) - 0.1 * test_times
    train_times = np.r_[rng.exponential(10.0, 40), test_times.max() + 1.0]
    events = np.ones(30)
    uno = uno_c(train_times, np.ones(41), test_times, events, risk)
    assert uno == pytest.approx(harrell_c(test_times, events, risk))


def test_step_survival_hand_example():
    # S = [.8, .6, .3, .1] -> S_padded = [1, .8, .6, .3, .1]; S(t) = S_padded[number of bin ends <= t].
    bins = SurvivalBins(np.array([0.0, 10.0, 20.0, 30.0, np.inf]))
    curve = step_survival(np.array([[0.8, 0.6, 0.3, 0.1]]), bins, [0.0, 5.0, 10.0, 19.9, 25.0, 30.0, 100.0])
    np.testing.assert_allclose(curve, [[1.0, 1.0, 0.8, 0.8, 0.6, 0.3, 0.3]])


def _cohort(rng: np.random.Generator, n: int, censor_rate: float) -> tuple[np.ndarray, np.ndarray]:
    return rng.exponential(20.0, n) + 0.5, (rng.random(n) > censor_rate).astype(int)


def _perfect_survival(bins: SurvivalBins, times: np.ndarray) -> np.ndarray:
    # Hazard 1 in each patient's own bin: S_k = 1 before it and 0 from it on.
    return (np.arange(bins.n_bins)[None, :] < bins.assign(times)[:, None]).astype(float)


def test_integrated_brier_perfect_predictor_beats_uninformative():
    rng = np.random.default_rng(2)
    train_times, train_events = _cohort(rng, 80, 0.3)
    test_times, test_events = _cohort(rng, 40, 0.3)
    bins = SurvivalBins.fit(train_times, train_events, 4)
    uninformative = np.tile([0.75, 0.5, 0.25, 0.0], (40, 1))
    perfect = integrated_brier(
        train_times, train_events, test_times, test_events, _perfect_survival(bins, test_times), bins
    )
    flat = integrated_brier(train_times, train_events, test_times, test_events, uninformative, bins)
    assert 0.0 <= perfect < flat <= 1.0


def test_integrated_brier_accepts_test_follow_up_beyond_training():
    # The last training time is a death, so sksurv refuses test times past it unless they are capped.
    train_times, train_events = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0]), np.array([1, 0, 1, 1, 0, 1])
    test_times, test_events = np.array([1.5, 2.5, 3.5, 9.0, 12.0]), np.array([1, 1, 0, 1, 0])
    bins = SurvivalBins.fit(train_times, train_events, n_bins=2)
    ibs = integrated_brier(train_times, train_events, test_times, test_events, np.full((5, 2), 0.5), bins)
    assert 0.0 < ibs < 1.0


def test_survival_metrics_on_an_informative_model():
    rng = np.random.default_rng(3)
    train_times, train_events = _cohort(rng, 80, 0.3)
    test_times, test_events = _cohort(rng, 40, 0.3)
    bins = SurvivalBins.fit(train_times, train_events, 4)
    survival = torch.as_tensor(_perfect_survival(bins, test_times) * 0.9 + 0.05)
    metrics = survival_metrics(train_times, train_events, test_times, test_events, survival, bins)
    assert set(metrics) == {"c_index", "c_index_ipcw", "integrated_brier_score"}
    assert metrics["c_index"] > 0.75
    assert metrics["c_index_ipcw"] > 0.75
    assert 0.0 <= metrics["integrated_brier_score"] < 0.25


def test_metrics_reject_sets_without_events_or_distinct_times():
    with pytest.raises(SurvivalDataError, match="no events: all 3 samples are censored"):
        harrell_c([1.0, 2.0, 3.0], [0, 0, 0], [0.1, 0.2, 0.3])
    with pytest.raises(SurvivalDataError, match="all 3 times equal 2.0"):
        harrell_c([2.0, 2.0, 2.0], [1, 0, 1], [0.1, 0.2, 0.3])
    with pytest.raises(SurvivalDataError, match="risk must have shape"):
        harrell_c([1.0, 2.0, 3.0], [1, 0, 1], [0.1, 0.2])
    with pytest.raises(SurvivalDataError, match="training set has no events"):
        uno_c([1.0, 2.0], [0, 0], [1.0, 2.0], [1, 1], [0.2, 0.1])
    with pytest.raises(SurvivalDataError, match="Uno's C with tau=50"):
        uno_c([1.0, 2.0, 3.0], [1, 1, 1], [1.0, 2.0, 40.0], [1, 1, 1], [0.3, 0.2, 0.1], tau=50.0)
    bins = SurvivalBins(np.array([0.0, 2.0, np.inf]))
    with pytest.raises(SurvivalDataError, match="test set has no events"):
        integrated_brier([1.0, 2.0, 3.0], [1, 1, 1], [1.0, 2.0], [0, 0], np.full((2, 2), 0.5), bins)
    with pytest.raises(SurvivalDataError, match="survival must have shape"):
        integrated_brier([1.0, 2.0, 3.0], [1, 1, 1], [1.0, 2.0], [1, 1], np.full((2, 3), 0.5), bins)


def test_metrics_on_real_blca_times(blca_table):
    table = pd.read_csv(blca_table, usecols=["case_id", "survival_months", "censorship"])
    patients = table.drop_duplicates("case_id")
    times = patients["survival_months"].to_numpy()
    events = 1 - patients["censorship"].to_numpy()
    train = np.random.default_rng(4).random(len(times)) < 0.7
    bins = SurvivalBins.fit(times[train], events[train], 4)
    # Quartiles of the uncensored training times: each bin holds about a quarter of those deaths.
    counts = np.bincount(bins.assign(times[train & (events == 1)]), minlength=4)
    assert counts.min() >= counts.sum() // 4 - 1
    test = ~train
    oracle = survival_metrics(
        times[train], events[train], times[test], events[test], _perfect_survival(bins, times[test]), bins
    )
    flat = survival_metrics(
        times[train],
        events[train],
        times[test],
        events[test],
        np.tile([0.8, 0.6, 0.4, 0.2], (test.sum(), 1)),
        bins,
    )
    assert flat["c_index"] == flat["c_index_ipcw"] == 0.5
    assert oracle["c_index"] > 0.85
    assert oracle["c_index_ipcw"] > 0.75
    assert oracle["integrated_brier_score"] < flat["integrated_brier_score"] < 0.25
