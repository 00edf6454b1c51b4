"""Evaluation metrics of survival predictions via scikit-survival: Harrell's C, Uno's C and the integrated
Brier score. Training and evaluation import it; serving does not (scikit-survival stays out of its image).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sksurv.exceptions import NoComparablePairException
from sksurv.metrics import concordance_index_censored, concordance_index_ipcw, integrated_brier_score
from sksurv.util import Surv

from healnet.survival import SurvivalBins, SurvivalDataError, as_numpy, check_survival_set, step_survival


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
