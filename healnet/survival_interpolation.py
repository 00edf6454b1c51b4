"""The model's survival between its bin edges, for the metrics that need S(t) at any time t (the
time-dependent AUC, the Brier curve, calibration, D-calibration). Numpy only.

HEALNet predicts one survival value per time bin (`healnet.survival`): S at the end of each bin. Known at
the edges: S(0) = 1 and S(edges[k]) = survival[:, k - 1] for every inner edge. Between two edges it is
interpolated linearly; after the last inner edge (the open last bin) it is held at its last value, since
the model says nothing about when, within the open bin, deaths happen.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from healnet.survival import SurvivalBins, SurvivalDataError, as_numpy

SURVIVAL_INTERPOLATION = (
    "HEALNet predicts {n_bins} time bins, so survival is known only at the bin edges (0, {edges} months); "
    "between two edges it is interpolated linearly, and after {last} months (the open last bin) it is "
    "held at its last value."
)


def interpolation_note(bins: SurvivalBins) -> str:
    """The sentence the evaluation report gives for how survival between bin edges is read."""
    inner = bins.edges[1:-1]
    edges = ", ".join(f"{edge:.1f}" for edge in inner) or "no inner edge"
    last = f"{inner[-1]:.1f}" if inner.size else "0"
    return SURVIVAL_INTERPOLATION.format(n_bins=bins.n_bins, edges=edges, last=last)


def _knots(survival: Any, bins: SurvivalBins) -> tuple[np.ndarray, np.ndarray]:
    """The interpolation knots (0 and the inner edges) and each sample's survival at them."""
    survival = as_numpy(survival, "survival").astype(np.float64)
    if survival.ndim != 2 or survival.shape[1] != bins.n_bins:
        raise SurvivalDataError(f"survival must have shape (n, {bins.n_bins}), got {survival.shape}")
    values = np.concatenate([np.ones((survival.shape[0], 1)), survival[:, :-1]], axis=1)
    return bins.edges[:-1], values


def _between(knots: np.ndarray, times: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each time: the knots below and above it, and how far it lies between them (1 past the last)."""
    if not np.isfinite(times).all() or (times < 0).any():
        raise SurvivalDataError("times must be finite and non-negative")
    if knots.size == 1:  # one bin, no inner edge: survival stays 1 (the open bin says nothing more)
        zero = np.zeros(times.shape, dtype=np.int64)
        return zero, zero, np.zeros(times.shape)
    upper = np.clip(np.searchsorted(knots, times, side="right"), 1, knots.size - 1)
    lower = upper - 1
    fraction = np.clip((times - knots[lower]) / (knots[upper] - knots[lower]), 0.0, 1.0)
    return lower, upper, fraction


def interpolated_survival(survival: Any, bins: SurvivalBins, times: Any) -> np.ndarray:
    """S(t) of each sample at each of `times`, shape (n_samples, n_times): 1 at 0, survival[:, k - 1] at
    inner edge k, linear in between, constant after the last inner edge. Monotone where the bin
    survival is, and equal to `healnet.survival.step_survival` at every edge."""
    knots, values = _knots(survival, bins)
    times = as_numpy(times, "times").astype(np.float64).reshape(-1)
    lower, upper, fraction = _between(knots, times)
    return values[:, lower] + fraction * (values[:, upper] - values[:, lower])


def survival_at_own_time(survival: Any, bins: SurvivalBins, times: Any) -> np.ndarray:
    """S_i(t_i): each sample's interpolated survival at its own time, shape (n_samples,)."""
    knots, values = _knots(survival, bins)
    times = as_numpy(times, "times").astype(np.float64).reshape(-1)
    if values.shape[0] != times.size:
        raise SurvivalDataError(f"survival has {values.shape[0]} rows for {times.size} times")
    lower, upper, fraction = _between(knots, times)
    rows = np.arange(times.size)
    return values[rows, lower] + fraction * (values[rows, upper] - values[rows, lower])
