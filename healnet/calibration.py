"""Calibration of predicted survival on censored patients: at one time, predicted against Kaplan-Meier
observed survival per risk-quantile group; the integrated calibration index and calibration slope of a
Cox model of the outcome on the predicted cloglog (Austin et al. 2020); and D-calibration over the whole
curve (Haider et al. 2020). scikit-survival fits the Kaplan-Meier curves and the Cox models, scipy gives
the chi-square tail; what is written here is only what neither offers.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.stats import chi2

from healnet.survival import SurvivalDataError, check_survival_set

CALIBRATION_GROUPS = 4  # risk-quantile groups of the calibration plot (quartiles: tens of test patients)
D_CALIBRATION_BINS = 10  # as Haider et al.
CALIBRATION_RULE = (
    "Calibration is judged at the median time of the training deaths (the median test time when that is not "
    f"before the last test time); the risk groups are {CALIBRATION_GROUPS} quantile groups of the predicted "
    "survival at that time."
)
PROBABILITY_FLOOR = 1e-6  # predicted event probabilities are kept inside (floor, 1 - floor) for cloglog


def calibration_time(train_times: Any, train_events: Any, test_times: Any) -> float:
    """The time calibration is judged at: the median time of the training deaths, a time by which about
    half the deaths the model learnt from had happened; when that is not before the last test time, the
    median test time."""
    train_times, train_events = check_survival_set(train_times, train_events, "training")
    test_times = np.asarray(test_times, dtype=np.float64)
    time = float(np.median(train_times[train_events]))
    return time if time < test_times.max() else float(np.median(test_times))


def observed_survival(times: np.ndarray, events: np.ndarray, time: float) -> tuple[float, float, float]:
    """Kaplan-Meier survival at `time` with its 95 % log-log interval (scikit-survival)."""
    from sksurv.nonparametric import kaplan_meier_estimator

    grid, survival, (low, high) = kaplan_meier_estimator(events.astype(bool), times, conf_type="log-log")
    at = np.searchsorted(grid, time, side="right") - 1
    if at < 0:
        return 1.0, 1.0, 1.0
    return (
        float(survival[at]),
        float(np.nan_to_num(low[at], nan=0.0)),
        float(np.nan_to_num(high[at], nan=1.0)),
    )


def calibration_groups(
    times: Any, events: Any, predicted: Any, time: float, groups: int = CALIBRATION_GROUPS
) -> list[dict[str, float | int]]:
    """Patients in quantile groups of predicted survival at `time` (group 1: the lowest, the highest
    risk), each with its mean predicted survival and its Kaplan-Meier observed survival and interval."""
    times, events = np.asarray(times, dtype=np.float64), np.asarray(events, dtype=bool)
    predicted = np.asarray(predicted, dtype=np.float64)
    order = np.argsort(predicted, kind="stable")
    rows = []
    for number, members in enumerate(np.array_split(order, min(groups, len(order))), start=1):
        observed, low, high = observed_survival(times[members], events[members], time)
        rows.append(
            {
                "group": number,
                "n": int(members.size),
                "predicted": float(predicted[members].mean()),
                "observed": observed,
                "observed_low": low,
                "observed_high": high,
            }
        )
    return rows


def _cloglog(predicted_survival: np.ndarray) -> np.ndarray:
    """log(−log S): the complementary log-log of the predicted event probability 1 − S."""
    survival = np.clip(predicted_survival, PROBABILITY_FLOOR, 1.0 - PROBABILITY_FLOOR)
    return np.log(-np.log(survival))


def _spline_basis(x: np.ndarray) -> np.ndarray:
    """x and one restricted cubic spline term with knots at its 10th, 50th and 90th percentiles (Harrell's
    default for three knots): linear beyond the outer knots."""
    k1, k2, k3 = np.quantile(x, [0.1, 0.5, 0.9])
    if not k1 < k2 < k3:
        return x[:, None]

    def cube(values: np.ndarray) -> np.ndarray:
        return np.maximum(values, 0.0) ** 3

    term = cube(x - k1) - cube(x - k2) * (k3 - k1) / (k3 - k2) + cube(x - k3) * (k2 - k1) / (k3 - k2)
    return np.column_stack([x, term / (k3 - k1) ** 2])


def _cox_survival_at(features: np.ndarray, times: np.ndarray, events: np.ndarray, time: float):
    """A Cox model of the outcome on `features` (scikit-survival) and its survival at `time` per patient."""
    from sksurv.linear_model import CoxPHSurvivalAnalysis
    from sksurv.util import Surv

    model = CoxPHSurvivalAnalysis(alpha=1e-6, ties="breslow", n_iter=200)
    model.fit(features, Surv.from_arrays(events, times))
    curves = model.predict_survival_function(features)
    return model, np.array([curve(min(time, curve.x[-1])) for curve in curves])


def calibration_summary(times: Any, events: Any, predicted: Any, time: float) -> dict[str, float | None]:
    """The integrated calibration index at `time`: the mean absolute difference between the predicted
    event probability and a smooth observed one, from a Cox model of the outcome on a restricted cubic
    spline of the predicted cloglog (Austin, Harrell and van Klaveren 2020); and the calibration slope, the
    coefficient of a Cox model on the cloglog alone (1: calibrated spread; below 1: predictions too
    extreme). The slope is None when that model does not converge."""
    import warnings

    times, events = np.asarray(times, dtype=np.float64), np.asarray(events, dtype=bool)
    cloglog = _cloglog(np.asarray(predicted, dtype=np.float64))
    slope: float | None = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence warnings: judged by the result below
        try:
            linear, linear_observed = _cox_survival_at(cloglog[:, None], times, events, time)
            slope = float(linear.coef_[0]) if np.isfinite(linear.coef_[0]) else None
        except (ValueError, ArithmeticError, np.linalg.LinAlgError):
            linear_observed = None
        try:
            _, observed = _cox_survival_at(_spline_basis(cloglog), times, events, time)
        except (ValueError, ArithmeticError, np.linalg.LinAlgError):
            observed = linear_observed
    if observed is None:
        raise SurvivalDataError("no Cox model of the outcome on the predicted survival could be fitted")
    predicted_event = 1.0 - np.asarray(predicted, dtype=np.float64)
    return {"ici": float(np.mean(np.abs(predicted_event - (1.0 - observed)))), "slope": slope}


def d_calibration(
    events: Any, survival_at_time: Any, bins: int = D_CALIBRATION_BINS
) -> dict[str, float | int]:
    """D-calibration (Haider et al. 2020): under a calibrated model S_i(T_i) is uniform on [0, 1]. A death
    adds 1 to the bin of [0, 1] holding S_i(T_i); a patient censored at c = S_i(C_i) adds (c − lower)/c to
    the bin holding c and 1/(bins · c) to each bin below it (its death is spread uniformly over survival
    values under c). The statistic is Pearson's chi-square of the bin counts against n/bins, with
    bins − 1 degrees of freedom."""
    events = np.asarray(events, dtype=bool)
    values = np.clip(np.asarray(survival_at_time, dtype=np.float64), 0.0, 1.0)
    if values.shape != events.shape or values.size == 0:
        raise SurvivalDataError(f"need one survival value per patient, got {values.shape} for {events.shape}")
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.minimum((values * bins).astype(np.int64), bins - 1)
    counts = np.bincount(index[events], minlength=bins).astype(np.float64)
    for value, at in zip(values[~events], index[~events], strict=True):
        if value <= 0.0:
            counts[0] += 1.0
            continue
        counts[at] += (value - edges[at]) / value
        counts[:at] += 1.0 / (bins * value)
    expected = values.size / bins
    statistic = float(np.sum((counts - expected) ** 2 / expected))
    return {"bins": bins, "statistic": statistic, "p_value": float(chi2.sf(statistic, bins - 1))}
