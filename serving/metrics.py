"""Prometheus metrics of the service, named as in docs/architecture.md ("Serving metrics").

Created with prometheus_client at import: BentoML workers start with PROMETHEUS_MULTIPROC_DIR already
set, so these land in the multiprocess files that BentoML's /metrics aggregates. Labels are bounded:
modality names, presence patterns, pipeline stages, the rejection reasons (`Reason`) and the model's
clinical covariate names, never case data. healnet_risk_score waits for the model: its buckets follow the
model's survival bins.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import cache
from itertools import combinations
from typing import TypeVar

from prometheus_client import REGISTRY, Counter, Gauge, Histogram

from serving.reasons import Reason

STAGES = ("preprocess", "forward")
# why following the champion failed: the pointer, the version in the store, or loading it
RELOAD_FAILURE_REASONS = ("pointer_unreadable", "store_unreadable", "load_failed")
# equal buckets of the risk score -Σ S, which lies in [-n_bins, 0] for a model with n_bins survival bins
RISK_BUCKET_COUNT = 16
IMPUTED_BUCKETS = (0.0, 0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

REQUESTS = Counter(
    "healnet_requests_total", "Predicted cases by the modalities present, in the model's order.", ["pattern"]
)
MISSING_MODALITY = Counter(
    "healnet_missing_modality_total", "Predicted cases lacking a modality.", ["modality"]
)
OUT_OF_TRAINING_RANGE = Counter(
    "healnet_out_of_training_range_total",
    "Predicted cases with a clinical value inside its plausible range but outside the training patients' range.",
    ["field"],
)
IMPUTED_FRACTION = Histogram(
    "healnet_imputed_feature_fraction",
    "Share of omic features imputed, per predicted case that has omics.",
    buckets=IMPUTED_BUCKETS,
)
INFERENCE_DURATION = Histogram(
    "healnet_inference_duration_seconds",
    "Seconds per request in each stage: preprocess (decoding, validation, omics transform) and forward.",
    ["stage"],
    buckets=DURATION_BUCKETS,
)
BATCH_CASES = Histogram(
    "healnet_batch_cases",
    "Cases in the model pass that served each request, the largest for a batch served in several passes"
    " (adaptive batching merges concurrent requests).",
    buckets=BATCH_BUCKETS,
)
# Gauges: every worker holds the same value; "livemax" exports it once, without a pid label.
MODEL_INFO = Gauge(
    "healnet_model_info",
    "The model version served (always 1).",
    ["version", "tag"],
    multiprocess_mode="livemax",
)
REFERENCE_RISK = Gauge(
    "healnet_reference_risk_score",
    "Risk quantiles on the model's training split: the reference for drift alerts.",
    ["training_quantile"],
    multiprocess_mode="livemax",
)
RELOAD_FAILURES = Counter(
    "healnet_model_reload_failures_total",
    "Polls of the champion that failed, by reason (pointer_unreadable, store_unreadable, load_failed) and "
    "champion tag (empty when the pointer is unreadable); the current model kept answering.",
    ["reason", "tag"],
)
# the oldest of the pod's workers: a worker that stopped following shows
LAST_SUCCESSFUL_POLL = Gauge(
    "healnet_champion_last_successful_poll_timestamp_seconds",
    "Unix time when a worker following the champion last read the pointer and found its champion served.",
    multiprocess_mode="livemin",
)
VALIDATION_ERRORS = Counter("healnet_validation_errors_total", "Rejected requests by reason.", ["reason"])
DRIFT_SPOOL_ERRORS = Counter(
    "healnet_drift_spool_errors_total",
    "Batches of answered cases the drift spool failed to summarise or write, or dropped because it fell"
    " behind; the answers were not affected.",
)

for _rejection in Reason:
    VALIDATION_ERRORS.labels(_rejection)
for _stage in STAGES:
    INFERENCE_DURATION.labels(_stage)
for _reason in RELOAD_FAILURE_REASONS:
    RELOAD_FAILURES.labels(_reason, "")


Metric = TypeVar("Metric", Counter, Histogram)


def risk_buckets(n_bins: int) -> tuple[float, ...]:
    """Upper bounds of the risk-score buckets of a model with `n_bins` survival bins: RISK_BUCKET_COUNT
    equal steps from -n_bins to 0 (4 bins: -4.0, -3.75, ..., 0.0)."""
    return tuple(-n_bins + n_bins * step / RISK_BUCKET_COUNT for step in range(RISK_BUCKET_COUNT + 1))


class RiskScore:
    """healnet_risk_score, with the buckets of the served model's survival bins: created when the first
    model loads, and again when a model with another number of bins replaces it (the series of the old
    buckets then stop growing)."""

    def __init__(self) -> None:
        self.n_bins: int | None = None
        self.histogram: Histogram | None = None

    def follow(self, n_bins: int) -> None:
        if n_bins == self.n_bins:
            return
        if self.histogram is not None:
            REGISTRY.unregister(self.histogram)
        self.histogram = Histogram(
            "healnet_risk_score",
            "Risk score per predicted case (-sum of survival over the model's bins).",
            buckets=risk_buckets(n_bins),
        )
        self.n_bins = n_bins

    def observe(self, risk: float) -> None:
        if self.histogram is None:
            raise RuntimeError("a risk score before any model was loaded (metrics.model_loaded)")
        self.histogram.observe(risk)


RISK_SCORE = RiskScore()


@cache
def _labelled(metric: Metric, *values: str) -> Metric:
    """The metric's child for these label values, looked up once (the label sets are bounded)."""
    return metric.labels(*values)


def presence_patterns(modalities: Sequence[str]) -> list[str]:
    """Every non-empty subset of the modalities, joined by '+' in the model's order."""
    return [
        "+".join(subset)
        for size in range(1, len(modalities) + 1)
        for subset in combinations(modalities, size)
    ]


def model_loaded(
    tag: str,
    modalities: Sequence[str],
    reference_quantiles: Mapping[str, float] | None,
    training_range_fields: Sequence[str],
    n_bins: int,
) -> None:
    """Publish the served model and create its label values at zero, so rates start from the first scrape;
    the risk-score buckets follow its `n_bins` survival bins."""
    MODEL_INFO.labels(version=tag.partition(":")[2], tag=tag).set(1)
    RISK_SCORE.follow(n_bins)
    for training_quantile, value in (reference_quantiles or {}).items():
        REFERENCE_RISK.labels(training_quantile).set(float(value))
    for pattern in presence_patterns(modalities):
        REQUESTS.labels(pattern)
    for modality in modalities:
        MISSING_MODALITY.labels(modality)
    for field in training_range_fields:
        OUT_OF_TRAINING_RANGE.labels(field)


def model_unloaded(tag: str) -> None:
    """The version no longer answers: its model-info series drops to 0 (series cannot be removed from the
    multiprocess files that every worker writes)."""
    MODEL_INFO.labels(version=tag.partition(":")[2], tag=tag).set(0)


def model_reload_failed(reason: str, tag: str) -> None:
    if reason not in RELOAD_FAILURE_REASONS:
        raise ValueError(
            f"unknown reload failure reason {reason!r}; expected one of {RELOAD_FAILURE_REASONS}"
        )
    RELOAD_FAILURES.labels(reason, tag).inc()


def champion_polled() -> None:
    LAST_SUCCESSFUL_POLL.set_to_current_time()


def record_prediction(
    modalities_used: Sequence[str],
    modalities_missing: Sequence[str],
    imputed_fraction: float | None,
    risk: float,
    out_of_training_range: Sequence[str],
) -> None:
    _labelled(REQUESTS, "+".join(modalities_used)).inc()
    for modality in modalities_missing:
        _labelled(MISSING_MODALITY, modality).inc()
    for field in out_of_training_range:
        _labelled(OUT_OF_TRAINING_RANGE, field).inc()
    if imputed_fraction is not None:
        IMPUTED_FRACTION.observe(imputed_fraction)
    RISK_SCORE.observe(risk)


def record_rejection(reason: Reason) -> None:
    _labelled(VALIDATION_ERRORS, reason).inc()


def record_stage(stage: str, seconds: float) -> None:
    _labelled(INFERENCE_DURATION, stage).observe(seconds)


def record_batch(cases: int) -> None:
    BATCH_CASES.observe(cases)


def drift_spool_failed() -> None:
    DRIFT_SPOOL_ERRORS.inc()
