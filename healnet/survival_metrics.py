"""Evaluation metrics of survival predictions via scikit-survival: Harrell's C, Uno's C, the time-dependent
AUC, the Brier score over time and its integral, and patient-bootstrap intervals of Harrell's and Uno's C.
Training and evaluation import it; serving does not (scikit-survival stays out of its image).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from sksurv.exceptions import NoComparablePairException
from sksurv.metrics import concordance_index_censored, concordance_index_ipcw, integrated_brier_score
from sksurv.util import Surv

from healnet.survival import SurvivalBins, SurvivalDataError, as_numpy, check_survival_set, step_survival

# scikit-survival's concordance_index_censored counts two risks this close as tied (its tied_tol default)
TIED_RISK_TOLERANCE = 1e-8


def harrell_c(times: Any, events: Any, risk: Any) -> float:
    """Harrell's concordance index; higher risk should mean earlier death. Tied risks count 1/2."""
    times, events = check_survival_set(times, events, "evaluation")
    risk = as_numpy(risk, "risk").astype(np.float64)
    if risk.shape != times.shape:
        raise SurvivalDataError(f"risk must have shape {times.shape}, got {risk.shape}")
    try:
        return float(concordance_index_censored(events, times, risk)[0])
    except ValueError as error:
        raise SurvivalDataError(
            f"Harrell's C on {len(times)} samples ({int(events.sum())} events): {error}"
        ) from error


def harrell_c_or_nan(times: Any, events: Any, risk: Any) -> float:
    """Harrell's C, or NaN where it is undefined: no event, or no event earlier than another time (a small
    early-stopping part can hold one event and no comparable pair)."""
    try:
        return harrell_c(times, events, risk)
    except SurvivalDataError as error:
        if isinstance(error.__cause__, NoComparablePairException) or not np.any(events):
            return float("nan")
        raise


@dataclass(frozen=True)
class Bootstrap:
    """How uncertain a C on a few test patients is: `resamples` draws of the patients with replacement from a
    generator seeded with `seed`, and the percentile interval at `confidence`. Evaluation and the promotion
    gate both take these defaults from here."""

    resamples: int = 1000
    confidence: float = 0.95
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.resamples, bool) or not isinstance(self.resamples, int) or self.resamples < 1:
            raise SurvivalDataError(f"bootstrap resamples must be a positive integer, got {self.resamples!r}")
        if not 0.0 < self.confidence < 1.0:
            raise SurvivalDataError(f"bootstrap confidence must be in (0, 1), got {self.confidence!r}")

    def counts(self, n_patients: int) -> np.ndarray:
        """(resamples, n_patients): how often each patient is drawn in each resample (n_patients draws each)."""
        rng = np.random.default_rng(self.seed)
        return rng.multinomial(n_patients, np.full(n_patients, 1.0 / n_patients), size=self.resamples)

    def interval(self, resampled: np.ndarray) -> tuple[float, float]:
        """The percentile interval of a statistic over the resamples where it is defined (NaN: none is)."""
        defined = np.asarray(resampled, dtype=np.float64)
        defined = defined[np.isfinite(defined)]
        if defined.size == 0:
            return float("nan"), float("nan")
        tail = (1.0 - self.confidence) / 2.0
        low, high = np.quantile(defined, [tail, 1.0 - tail])
        return float(low), float(high)


DEFAULT_BOOTSTRAP = Bootstrap()


def comparable_pairs(times: np.ndarray, events: np.ndarray) -> np.ndarray:
    """(n, n) bool: the pairs Harrell's C counts, as scikit-survival does. Patient i's death is observed before
    j's time, or at j's time when j is censored then (two deaths at one time are not ordered)."""
    observed = np.asarray(events, dtype=bool)
    earlier = times[:, None] < times[None, :]
    tied_with_censored = (times[:, None] == times[None, :]) & ~observed[None, :]
    return observed[:, None] & (earlier | tied_with_censored)


def concordance_scores(risk: np.ndarray) -> np.ndarray:
    """(n, n): 1 where patient i's risk is above j's, 1/2 where the two tie, 0 where it is below."""
    difference = risk[:, None] - risk[None, :]
    return np.where(np.abs(difference) <= TIED_RISK_TOLERANCE, 0.5, (difference > 0).astype(np.float64))


def harrell_c_weighted(
    times: Any, events: Any, risk: Any, counts: np.ndarray, row_weights: np.ndarray | None = None
) -> np.ndarray:
    """Harrell's C of the patients repeated `counts` times, for each row of counts (resamples, n) at once:
    a pair of drawn patients counts counts[i] * counts[j] times. NaN for a row without a comparable pair.
    `row_weights` (n,) weighs each pair by its earlier patient's weight: Uno's IPCW weights make it Uno's C
    (`uno_c_weights`), with the same pairs and ties as scikit-survival's.

    The numerator and denominator are quadratic forms of the counts with the pair matrices, so a thousand
    resamples are two matrix products rather than a thousand calls of scikit-survival."""
    times, events = np.asarray(times, dtype=np.float64), np.asarray(events, dtype=bool)
    risk = as_numpy(risk, "risk").astype(np.float64)
    if risk.shape != times.shape:
        raise SurvivalDataError(f"risk must have shape {times.shape}, got {risk.shape}")
    weights = np.atleast_2d(np.asarray(counts, dtype=np.float64))
    pairs = comparable_pairs(times, events).astype(np.float64)
    if row_weights is not None:
        pairs = pairs * np.asarray(row_weights, dtype=np.float64)[:, None]
    compared = np.einsum("bi,ij,bj->b", weights, pairs, weights, optimize=True)
    concordant = np.einsum("bi,ij,bj->b", weights, pairs * concordance_scores(risk), weights, optimize=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(compared > 0, concordant / compared, np.nan)


def harrell_c_bootstrap(
    times: Any, events: Any, risks: Sequence[Any], bootstrap: Bootstrap = DEFAULT_BOOTSTRAP
) -> np.ndarray:
    """Harrell's C of each risk vector on every bootstrap resample of the patients: (len(risks), resamples).
    Every vector is scored on the same resamples, so that differences between models are paired."""
    times = as_numpy(times, "times").astype(np.float64)
    counts = bootstrap.counts(len(times))
    return np.stack([harrell_c_weighted(times, events, risk, counts) for risk in risks])


def harrell_c_interval(
    times: Any, events: Any, risk: Any, bootstrap: Bootstrap = DEFAULT_BOOTSTRAP
) -> tuple[float, float]:
    """The patient-bootstrap percentile interval of Harrell's C."""
    return bootstrap.interval(harrell_c_bootstrap(times, events, [risk], bootstrap)[0])


def _ipcw_horizon(train_times: np.ndarray, test_times: np.ndarray) -> float:
    """Largest time up to which both sets have follow-up; the censoring KM of the training set is
    positive strictly below its last time, so IPCW weights are defined for any test time below it."""
    return float(min(train_times.max(), test_times.max()))


def uno_c(
    train_times: Any,
    train_events: Any,
    test_times: Any,
    test_events: Any,
    risk: Any,
    tau: float | None = None,
) -> float:
    """Uno's IPCW concordance index, truncated at `tau` (test pairs whose earlier time is >= tau are ignored).

    The censoring distribution comes from the training set. tau defaults to min(max train time, max
    test time), which keeps every weighted test time below the training follow-up.
    """
    train_times, train_events = check_survival_set(train_times, train_events, "training")
    test_times, test_events = check_survival_set(test_times, test_events, "test")
    risk = as_numpy(risk, "risk").astype(np.float64)
    if risk.shape != test_times.shape:
        raise SurvivalDataError(f"risk must have shape {test_times.shape}, got {risk.shape}")
    if tau is None:
        tau = _ipcw_horizon(train_times, test_times)
    if tau <= 0:
        raise SurvivalDataError(f"tau must be positive, got {tau}")
    try:
        return float(
            concordance_index_ipcw(
                Surv.from_arrays(train_events, train_times),
                Surv.from_arrays(test_events, test_times),
                risk,
                tau=tau,
            )[0]
        )
    except ValueError as error:
        raise SurvivalDataError(
            f"Uno's C with tau={tau} on {len(test_times)} test samples ({int(test_events.sum())} events) "
            f"and {len(train_times)} training samples: {error}"
        ) from error


def uno_c_weights(
    train_times: Any, train_events: Any, test_times: Any, test_events: Any, tau: float | None = None
) -> np.ndarray:
    """Each test patient's weight in Uno's C: 1 / G(t)^2 for a death before `tau` (G: the training set's
    censoring Kaplan-Meier, as scikit-survival's `concordance_index_ipcw` fits it), 0 otherwise. With
    `harrell_c_weighted` they give Uno's C of any resample of the test patients."""
    from sksurv.nonparametric import CensoringDistributionEstimator

    train_times, train_events = check_survival_set(train_times, train_events, "training")
    test_times, test_events = check_survival_set(test_times, test_events, "test")
    tau = _ipcw_horizon(train_times, test_times) if tau is None else tau
    weighted = test_events & (test_times < tau)
    censoring = CensoringDistributionEstimator().fit(Surv.from_arrays(train_events, train_times))
    weights = np.zeros(test_times.size)
    if weighted.any():
        kept = censoring.predict_proba(test_times[weighted])
        if (kept <= 0).any():
            raise SurvivalDataError("the training censoring survival is zero at a test death before tau")
        weights[weighted] = 1.0 / np.square(kept)
    return weights


@dataclass(frozen=True)
class Interval:
    """A point estimate with its patient-bootstrap percentile interval."""

    estimate: float
    low: float
    high: float
    confidence: float
    resamples: int

    def to_dict(self) -> dict[str, float | int]:
        return {
            "estimate": self.estimate,
            "low": self.low,
            "high": self.high,
            "confidence": self.confidence,
            "resamples": self.resamples,
        }


def concordance_intervals(
    train_times: Any,
    train_events: Any,
    test_times: Any,
    test_events: Any,
    risk: Any,
    bootstrap: Bootstrap = DEFAULT_BOOTSTRAP,
) -> dict[str, Interval]:
    """Harrell's C ("c_index_ci") and Uno's C ("uno_c_ci") with their percentile intervals over the same
    patient resamples (`Bootstrap.counts`); Uno's tau and censoring weights stay those of all test patients."""
    test_times, test_events = check_survival_set(test_times, test_events, "test")
    counts = bootstrap.counts(len(test_times))
    uno_weights = uno_c_weights(train_times, train_events, test_times, test_events)
    estimates = {
        "c_index_ci": (harrell_c(test_times, test_events, risk), None),
        "uno_c_ci": (uno_c(train_times, train_events, test_times, test_events, risk), uno_weights),
    }
    intervals = {}
    for name, (estimate, weights) in estimates.items():
        resampled = harrell_c_weighted(test_times, test_events, risk, counts, weights)
        low, high = bootstrap.interval(resampled)
        intervals[name] = Interval(estimate, low, high, bootstrap.confidence, bootstrap.resamples)
    return intervals


def time_dependent_auc(
    train_times: Any,
    train_events: Any,
    test_times: Any,
    test_events: Any,
    survival_at: np.ndarray,
    times: Sequence[float],
) -> tuple[dict[str, float | None], dict[str, str]]:
    """Cumulative/dynamic AUC (scikit-survival's `cumulative_dynamic_auc`) at each of `times`, from the
    survival (n_test, len(times)) at those times: 1 − S(t) ranks the patients. A time outside the follow-up
    (before the first test time, at or after the last test or training time, or with no test death by then)
    gets None and a reason. Keys are the times in months as text."""
    from sksurv.metrics import cumulative_dynamic_auc

    train_times, train_events = check_survival_set(train_times, train_events, "training")
    test_times, test_events = check_survival_set(test_times, test_events, "test")
    horizon = _ipcw_horizon(train_times, test_times)
    values: dict[str, float | None] = {}
    excluded: dict[str, str] = {}
    for column, time in enumerate(times):
        key = f"{time:g}"
        reason = _outside_follow_up(time, train_times, test_times, test_events, horizon)
        if reason:
            values[key], excluded[key] = None, reason
            continue
        try:
            auc, _ = cumulative_dynamic_auc(
                Surv.from_arrays(train_events, train_times),
                Surv.from_arrays(test_events, np.minimum(test_times, train_times.max())),
                1.0 - survival_at[:, column],
                [time],
            )
        except ValueError as error:  # e.g. a censoring survival of zero at a test death before the time
            values[key], excluded[key] = None, f"not estimable: {error}"
            continue
        values[key] = float(auc[0]) if np.isfinite(auc[0]) else None
        if values[key] is None:
            excluded[key] = f"not estimable at {time:g} months (no case or no control)"
    return values, excluded


def _outside_follow_up(
    time: float, train_times: np.ndarray, test_times: np.ndarray, test_events: np.ndarray, horizon: float
) -> str:
    """Why the AUC at `time` cannot be estimated, or "" when it can."""
    if time >= test_times.max():
        return f"beyond the last test follow-up, {test_times.max():.1f} months"
    if time >= train_times.max():
        return f"beyond the last training follow-up (censoring weights), {train_times.max():.1f} months"
    if time >= horizon or time < test_times.min():
        return f"outside the test follow-up [{test_times.min():.1f}, {horizon:.1f}) months"
    if not (test_events & (test_times <= time)).any():
        return f"no test death by {time:g} months"
    return ""


def brier_curve(
    train_times: Any,
    train_events: Any,
    test_times: Any,
    test_events: Any,
    survival_at: Callable[[np.ndarray], np.ndarray],
    n_times: int = 50,
) -> dict[str, Any]:
    """The IPCW Brier score over time and its integral (scikit-survival's `brier_score` and
    `integrated_brier_score`) on the `_brier_time_grid`; `survival_at(grid)` gives the survival
    (n_test, len(grid)). Test times beyond the training follow-up are capped as in `integrated_brier`."""
    from sksurv.metrics import brier_score

    train_times, train_events = check_survival_set(train_times, train_events, "training")
    test_times, test_events = check_survival_set(test_times, test_events, "test")
    grid = _brier_time_grid(train_times, test_times, n_times)
    estimate = survival_at(grid)
    train = Surv.from_arrays(train_events, train_times)
    test = Surv.from_arrays(test_events, np.minimum(test_times, train_times.max()))
    try:
        _, scores = brier_score(train, test, estimate, grid)
        integrated = integrated_brier_score(train, test, estimate, grid)
    except ValueError as error:
        raise SurvivalDataError(f"Brier score on {len(test_times)} test samples: {error}") from error
    return {
        "times": [float(time) for time in grid],
        "brier": [float(score) for score in scores],
        "integrated_brier_score": float(integrated),
    }


def _brier_time_grid(train_times: np.ndarray, test_times: np.ndarray, n_times: int) -> np.ndarray:
    """Evaluation times: n_times evenly spaced from the first test time up to, not including, the horizon."""
    horizon = _ipcw_horizon(train_times, test_times)
    start = test_times.min()
    if start >= horizon:
        raise SurvivalDataError(
            f"no time range for the integrated Brier score: the first test time {start} is not below "
            f"the common follow-up horizon {horizon}"
        )
    return np.linspace(start, horizon, n_times + 1)[:-1]


def integrated_brier(
    train_times: Any,
    train_events: Any,
    test_times: Any,
    test_events: Any,
    survival: np.ndarray,
    bins: SurvivalBins,
    n_times: int = 50,
) -> float:
    """Integrated Brier score of the per-bin survival (n_test, n_bins), read as `step_survival`.

    Times come from `_brier_time_grid`; the censoring distribution from the training set.
    Test times beyond the training follow-up are capped at it for the IPCW: below the grid's end
    this changes no case/control status, and sksurv would otherwise refuse them.
    """
    train_times, train_events = check_survival_set(train_times, train_events, "training")
    test_times, test_events = check_survival_set(test_times, test_events, "test")
    if n_times < 2:
        raise SurvivalDataError(f"n_times must be at least 2, got {n_times}")
    grid = _brier_time_grid(train_times, test_times, n_times)
    estimate = step_survival(survival, bins, grid)
    if estimate.shape[0] != test_times.size:
        raise SurvivalDataError(f"survival has {estimate.shape[0]} rows for {test_times.size} test samples")
    if not ((estimate >= 0) & (estimate <= 1)).all():
        raise SurvivalDataError("survival probabilities must lie in [0, 1]")
    capped_times = np.minimum(test_times, train_times.max())
    try:
        return float(
            integrated_brier_score(
                Surv.from_arrays(train_events, train_times),
                Surv.from_arrays(test_events, capped_times),
                estimate,
                grid,
            )
        )
    except ValueError as error:
        raise SurvivalDataError(
            f"integrated Brier score on {len(test_times)} test samples ({int(test_events.sum())} events) "
            f"and {len(train_times)} training samples: {error}"
        ) from error


def survival_metrics(
    train_times: Any,
    train_events: Any,
    test_times: Any,
    test_events: Any,
    survival: Any,
    bins: SurvivalBins,
) -> dict[str, float]:
    """All three metrics from the per-bin survival (n_test, n_bins) of `survival_from_logits`.

    Risk is -sum(survival), as in `survival_from_logits`.
    """
    survival = as_numpy(survival, "survival").astype(np.float64)
    if survival.ndim != 2:
        raise SurvivalDataError(f"survival must have shape (n, n_bins), got {survival.shape}")
    risk = -survival.sum(axis=1)
    return {
        "c_index": harrell_c(test_times, test_events, risk),
        "c_index_ipcw": uno_c(train_times, train_events, test_times, test_events, risk),
        "integrated_brier_score": integrated_brier(
            train_times, train_events, test_times, test_events, survival, bins
        ),
    }
