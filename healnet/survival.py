"""Discrete-time survival maths: time bins, the HEALNet/PORPOISE NLL loss, hazards → survival → risk.
Torch and numpy only, so that serving can import it; the evaluation metrics are in
`healnet.survival_metrics` (scikit-survival).

Conventions: `event` is 1 when death was observed and 0 when censored; times are in months.
Bin k covers [edges[k], edges[k+1]); a time equal to an inner edge belongs to the upper bin.
The model's hazard h_k is P(T in bin k | T >= edges[k]); survival S_k = prod_{j<=k} (1 - h_j)
and risk = -sum_k S_k (higher risk = earlier death).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from einops import rearrange
from torch import Tensor

from healnet.errors import HEALNetError

LOG_EPS = 1e-7


class SurvivalDataError(HEALNetError, ValueError):
    """Survival times, events, labels or predictions that cannot be used as given."""


def as_numpy(values: Any, name: str) -> np.ndarray:
    if isinstance(values, Tensor):
        values = values.detach().cpu().numpy()
    array = np.asarray(values)
    if array.dtype == object:
        raise SurvivalDataError(f"{name} must be numeric, got an object array")
    return array


def _check_times(times: Any, name: str = "times") -> np.ndarray:
    array = as_numpy(times, name).astype(np.float64)
    if array.ndim != 1:
        raise SurvivalDataError(f"{name} must be one-dimensional, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise SurvivalDataError(f"{name} contains {int((~np.isfinite(array)).sum())} non-finite value(s)")
    if (array < 0).any():
        raise SurvivalDataError(
            f"{name} contains {int((array < 0).sum())} negative value(s), min {array.min()}"
        )
    return array


def _check_events(events: Any, n: int, name: str = "events") -> np.ndarray:
    array = as_numpy(events, name)
    if array.shape != (n,):
        raise SurvivalDataError(f"{name} must have shape ({n},) to match the times, got {array.shape}")
    if not np.isin(array, (0, 1)).all():
        raise SurvivalDataError(
            f"{name} must be 0 (censored) or 1 (death), got values {np.unique(array)[:10]}"
        )
    return array.astype(bool)


def check_survival_set(times: Any, events: Any, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Times and events of one evaluation set; it needs an event and two distinct times to rank anything."""
    times = _check_times(times, f"{name} times")
    events = _check_events(events, len(times), f"{name} events")
    if not events.any():
        raise SurvivalDataError(f"{name} set has no events: all {len(times)} samples are censored")
    if np.unique(times).size < 2:
        raise SurvivalDataError(
            f"{name} set has no two distinct times: all {len(times)} times equal {times[0]}"
        )
    return times, events


@dataclass(frozen=True)
class SurvivalBins:
    """Time bins for the discrete-time model; `edges` = [0, inner quantiles..., inf] in months."""

    edges: np.ndarray

    def __post_init__(self) -> None:
        edges = np.array(self.edges, dtype=np.float64)
        if edges.ndim != 1 or edges.size < 2:
            raise SurvivalDataError(
                f"edges must be a 1-D array of at least 2 values, got shape {edges.shape}"
            )
        if edges[0] != 0.0 or edges[-1] != np.inf:
            raise SurvivalDataError(f"edges must start at 0.0 and end at inf, got {edges.tolist()}")
        if not (np.diff(edges) > 0).all():
            raise SurvivalDataError(f"edges must be strictly increasing, got {edges.tolist()}")
        edges.setflags(write=False)
        object.__setattr__(self, "edges", edges)

    @classmethod
    def fit(cls, times: Any, events: Any, n_bins: int) -> SurvivalBins:
        """Inner edges at the quantiles of the uncensored times only (censored times do not move them)."""
        if n_bins < 1:
            raise SurvivalDataError(f"n_bins must be at least 1, got {n_bins}")
        times = _check_times(times)
        uncensored = times[_check_events(events, len(times))]
        if uncensored.size < n_bins:
            raise SurvivalDataError(
                f"cannot fit {n_bins} survival bins from {uncensored.size} uncensored time(s) "
                f"(of {times.size} samples): need at least {n_bins}"
            )
        inner = np.quantile(uncensored, np.linspace(0.0, 1.0, n_bins + 1)[1:-1])
        if n_bins > 1 and (inner[0] <= 0.0 or not (np.diff(inner) > 0).all()):
            raise SurvivalDataError(
                f"the uncensored times have too few distinct positive values for {n_bins} bins: "
                f"quantile edges {inner.tolist()}"
            )
        return cls(np.concatenate([[0.0], inner, [np.inf]]))

    @property
    def n_bins(self) -> int:
        return self.edges.size - 1

    def assign(self, times: Any) -> np.ndarray:
        """Bin index of each time; the first bin starts at 0 and the last one is open-ended."""
        return np.searchsorted(self.edges[1:-1], _check_times(times), side="right").astype(np.int64)

    def to_dict(self) -> dict[str, list[float | str]]:
        """JSON-serialisable form; the open last edge is written as the string "inf"."""
        return {"edges": [float(edge) for edge in self.edges[:-1]] + ["inf"]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SurvivalBins:
        if "edges" not in data:
            raise SurvivalDataError(f"survival bins need an 'edges' entry, got keys {sorted(data)}")
        return cls(np.array([float(edge) for edge in data["edges"]]))

    def inverse_frequency_weights(self, labels: Any) -> np.ndarray:
        """Per-bin weights 1/count, normalised to mean 1 over the bins present; absent bins get 0."""
        labels = as_numpy(labels, "labels")
        if labels.ndim != 1 or labels.size == 0:
            raise SurvivalDataError(f"labels must be a non-empty 1-D array, got shape {labels.shape}")
        if not np.isin(labels, np.arange(self.n_bins)).all():
            raise SurvivalDataError(
                f"labels must be bin indices in [0, {self.n_bins - 1}], got {np.unique(labels)}"
            )
        counts = np.bincount(labels.astype(np.int64), minlength=self.n_bins)
        present = counts > 0
        weights = np.zeros(self.n_bins)
        weights[present] = 1.0 / counts[present]
        return weights / weights[present].mean()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SurvivalBins) and np.array_equal(self.edges, other.edges)

    def __hash__(self) -> int:
        return hash(tuple(self.edges.tolist()))


def nll_per_sample(logits: Tensor, labels: Tensor, events: Tensor, alpha: float = 0.4) -> Tensor:
    """Discrete-time negative log-likelihood of HEALNet/PORPOISE per sample (batch,); see `nll_loss`."""
    if logits.ndim != 2:
        raise SurvivalDataError(f"logits must have shape (batch, n_bins), got {tuple(logits.shape)}")
    batch, n_bins = logits.shape
    if labels.shape != (batch,) or events.shape != (batch,):
        raise SurvivalDataError(
            f"labels and events must have shape ({batch},), got {tuple(labels.shape)} and {tuple(events.shape)}"
        )
    if batch == 0:
        raise SurvivalDataError("the batch is empty")
    if labels.min() < 0 or labels.max() >= n_bins:
        raise SurvivalDataError(
            f"labels must be bin indices in [0, {n_bins - 1}], got {labels.unique().tolist()}"
        )
    if not ((events == 0) | (events == 1)).all():
        raise SurvivalDataError(f"events must be 0 (censored) or 1 (death), got {events.unique().tolist()}")
    if not 0.0 <= alpha <= 1.0:
        raise SurvivalDataError(f"alpha must be in [0, 1], got {alpha}")

    hazards, survival, _ = survival_from_logits(logits)
    survival_padded = torch.cat([torch.ones_like(survival[:, :1]), survival], dim=1)
    bin_index = rearrange(labels.long(), "b -> b 1")
    event = events.to(logits.dtype)

    def log_at(values: Tensor, index: Tensor) -> Tensor:
        return rearrange(torch.gather(values, 1, index).clamp(min=LOG_EPS).log(), "b 1 -> b")

    uncensored = -event * (log_at(survival_padded, bin_index) + log_at(hazards, bin_index))
    censored = -(1.0 - event) * log_at(survival_padded, bin_index + 1)
    return (1.0 - alpha) * (censored + uncensored) + alpha * uncensored


def nll_loss(
    logits: Tensor, labels: Tensor, events: Tensor, alpha: float = 0.4, bin_weights: Tensor | None = None
) -> Tensor:
    """Discrete-time negative log-likelihood of HEALNet/PORPOISE, (weighted) mean over the batch.

    loss_i = (1 - alpha) * (censored_i + uncensored_i) + alpha * uncensored_i, where for bin y:
    uncensored = -event * (log S_padded[y] + log h[y]) and censored = -(1 - event) * log S_padded[y + 1].
    With `bin_weights` (n_bins,), sample i weighs bin_weights[y_i] and the mean is sum(w l) / sum(w).
    """
    per_sample = nll_per_sample(logits, labels, events, alpha)
    n_bins = logits.shape[1]
    if bin_weights is None:
        return per_sample.mean()
    weights = torch.as_tensor(bin_weights, dtype=logits.dtype, device=logits.device)
    if weights.shape != (n_bins,):
        raise SurvivalDataError(f"bin_weights must have shape ({n_bins},), got {tuple(weights.shape)}")
    sample_weights = weights[labels.long()]
    if sample_weights.sum() <= 0:
        raise SurvivalDataError("bin_weights give the whole batch zero weight")
    return (sample_weights * per_sample).sum() / sample_weights.sum()


def survival_from_logits(logits: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """hazards = sigmoid(logits) (b, k); survival = cumprod(1 - hazards) (b, k); risk = -sum(survival) (b,)."""
    hazards = torch.sigmoid(logits)
    survival = torch.cumprod(1.0 - hazards, dim=1)
    return hazards, survival, -survival.sum(dim=1)


def survival_from_curve(survival: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(hazards, survival, risk) of a survival curve (batch, n_bins), e.g. an ensemble's mean curve:
    h_k = 1 − S_k / S_(k−1) with S_0 = 1, and risk = −ΣS."""
    previous = torch.cat([torch.ones_like(survival[:, :1]), survival[:, :-1]], dim=1)
    hazards = 1.0 - survival / previous.clamp(min=torch.finfo(survival.dtype).tiny)
    return hazards, survival, -survival.sum(dim=1)


def step_survival(survival: Any, bins: SurvivalBins, times: Any) -> np.ndarray:
    """The model's survival function at `times`, shape (n_samples, n_times).

    S(t) = S_padded[k] = P(T >= edges[k]) for edges[k] <= t < edges[k+1], k = number of bin ends
    (edges[1:]) <= t: exact at each edge and held constant up to the next one (right-continuous,
    like Kaplan-Meier). The last survival column (beyond the open last bin) is never reached.
    """
    survival = as_numpy(survival, "survival").astype(np.float64)
    if survival.ndim != 2 or survival.shape[1] != bins.n_bins:
        raise SurvivalDataError(f"survival must have shape (n, {bins.n_bins}), got {survival.shape}")
    survival_padded = np.concatenate([np.ones((survival.shape[0], 1)), survival], axis=1)
    return survival_padded[:, bins.assign(times)]
