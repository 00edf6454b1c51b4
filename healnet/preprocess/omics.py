"""Omics transform: fitted on the training split, saved with the model, applied by serving.

Steps per feature: sign(x)·log1p(|x|) (modalities named in `signed_log`), impute with the training
median, log1p (raw-RSEM-like modalities), z-score with the training mean/std, drop near-constant features
(min_std), keep the top-k by variance or by univariate Cox score on the training patients, group into tokens.
Training, evaluation and serving all go through `OmicsTransform.transform`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from einops import rearrange

from healnet.errors import HEALNetError

if TYPE_CHECKING:  # training passes DataFrames; serving must not import pandas (it imports pyarrow)
    import pandas as pd

COMBINED_MODALITY = "omic"
# 2 added signed_log, 3 the config's select; older states load without them (variance, no signed log)
STATE_FORMAT_VERSION = 3
READABLE_STATE_VERSIONS = (1, 2, 3)
# "auto" log1p: every observed value is >= 0 and the maximum exceeds this (raw RSEM counts).
AUTO_LOG1P_MIN_MAX = 100.0
LOG1P_MODES = ("auto", "always", "never")
# How top_k ranks a modality's features: by their spread, or by their univariate association with survival
# (the absolute Cox score statistic on the training patients; needs their times and events)
SELECTIONS = ("variance", "cox")
# PORPOISE's rnaseq values are z-scores that reach 10^4: without sign(x)·log1p(|x|), a variance filter
# keeps the genes with one extreme patient
RNASEQ = ("rnaseq",)


class OmicsTransformError(HEALNetError, ValueError):
    """Bad omics input or configuration; the message names the modality and feature."""


@dataclass(frozen=True)
class OmicsConfig:
    log1p: str = "auto"  # "auto" | "always" | "never"
    top_k: int | None = None  # keep k features per input modality, ranked as `select` says
    select: str = "variance"  # one of SELECTIONS
    min_std: float = 1e-6  # drop (near-)constant features
    combine: bool = False  # concatenate all omic modalities into one modality named "omic"
    tokens: str = "single"  # "single" | "features" | "groups:N"
    # input modalities mapped by sign(x)·log1p(|x|) before anything is fitted (heavy-tailed z-scores);
    # names of modalities a cohort does not have are ignored
    signed_log: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.log1p not in LOG1P_MODES:
            raise OmicsTransformError(f"log1p must be one of {LOG1P_MODES}, got {self.log1p!r}")
        if isinstance(self.signed_log, str) or not all(isinstance(m, str) for m in self.signed_log):
            raise OmicsTransformError(
                f"signed_log must be a sequence of modality names, got {self.signed_log!r}"
            )
        object.__setattr__(self, "signed_log", tuple(self.signed_log))  # a JSON list becomes a tuple
        if self.signed_log and self.log1p == "always":
            raise OmicsTransformError(
                "signed_log and log1p='always' are two logs of the same values; pick one"
            )
        if self.top_k is not None and self.top_k < 1:
            raise OmicsTransformError(f"top_k must be a positive integer or None, got {self.top_k}")
        if self.select not in SELECTIONS:
            raise OmicsTransformError(f"select must be one of {SELECTIONS}, got {self.select!r}")
        if self.select == "cox" and self.top_k is None:
            raise OmicsTransformError("select='cox' ranks features for top_k; give top_k as well")
        if self.min_std < 0:
            raise OmicsTransformError(f"min_std must be >= 0, got {self.min_std}")
        self.channels_per_token(1)  # validates the tokens string

    def channels_per_token(self, n_features: int) -> int:
        """Channels of one token for a modality with `n_features` kept features."""
        if self.tokens == "single":
            return n_features
        if self.tokens == "features":
            return 1
        prefix, _, size = self.tokens.partition(":")
        if prefix == "groups" and size.isdigit() and int(size) > 0:
            return int(size)
        raise OmicsTransformError(
            f"tokens must be 'single', 'features' or 'groups:N' (N > 0), got {self.tokens!r}"
        )


@dataclass(frozen=True)
class OmicsTokens:
    values: np.ndarray  # float32 (n, tokens, channels); zeros where not present
    present: np.ndarray  # bool (n,): the patient has a row in the modality's frame(s)
    imputed: np.ndarray  # int (n,): kept features imputed for present patients; 0 when absent
    imputed_fraction: np.ndarray  # float (n,): imputed / kept features


@dataclass(frozen=True)
class _FeatureStats:
    """Fitted statistics of the kept features of one input modality."""

    log1p: bool
    features: list[str]
    median: np.ndarray  # of the signed-log values when signed_log
    mean: np.ndarray
    std: np.ndarray
    signed_log: bool = False

    def apply(self, raw: np.ndarray) -> np.ndarray:
        """Signed log, impute, log1p and z-score raw values (n, features); NaN marks missing."""
        if self.signed_log:
            raw = _signed_log(raw)
        values = np.where(np.isnan(raw), self.median, raw)
        if self.log1p:
            values = np.log1p(np.clip(values, 0.0, None))  # counts cannot be negative
        return (values - self.mean) / self.std


class OmicsTransform:
    def __init__(self, config: OmicsConfig, stats: dict[str, _FeatureStats]):
        self.config = config
        self._stats = stats
        self.input_modalities = list(stats)
        self.input_feature_names = {name: list(s.features) for name, s in stats.items()}
        self.output_modalities = [COMBINED_MODALITY] if config.combine else list(stats)
        self.feature_names = {
            out: [f for m in self._inputs_of(out) for f in stats[m].features]
            for out in self.output_modalities
        }
        self._column_of = {(m, f): i for m, s in stats.items() for i, f in enumerate(s.features)}
        self._modality_of_feature = {f: m for m, s in stats.items() for f in s.features}

    @classmethod
    def fit(
        cls,
        frames: dict[str, pd.DataFrame],
        config: OmicsConfig = OmicsConfig(),
        survival: pd.DataFrame | None = None,
    ) -> OmicsTransform:
        """Fit on training frames (index patient_id, numeric feature columns), one per modality.

        `survival` (index patient_id; `survival_months`, `event`) holds the training patients' outcomes,
        which `select="cox"` ranks features by; every patient of every frame needs a row.
        """
        if not frames:
            raise OmicsTransformError("no omics modality to fit the transform on")
        if config.select == "cox" and survival is None:
            raise OmicsTransformError("select='cox' ranks features by survival: pass the training outcomes")
        stats = {name: _fit_modality(name, frame, config, survival) for name, frame in frames.items()}
        if config.combine:
            names = [f for s in stats.values() for f in s.features]
            duplicated = sorted({f for f in names if names.count(f) > 1})
            if duplicated:
                raise OmicsTransformError(
                    f"combine=True needs unique feature names across modalities; repeated: {duplicated[:5]}"
                )
        for out in [COMBINED_MODALITY] if config.combine else list(stats):
            inputs = list(stats) if config.combine else [out]
            if not any(stats[m].features for m in inputs):
                raise OmicsTransformError(
                    f"modality {out!r} has no feature left after the variance filter (min_std={config.min_std})"
                )
        return cls(config, stats)

    def _inputs_of(self, output_modality: str) -> list[str]:
        if output_modality not in self.output_modalities:
            raise OmicsTransformError(
                f"unknown omics modality {output_modality!r}; known: {self.output_modalities}"
            )
        return self.input_modalities if self.config.combine else [output_modality]

    def token_shape(self, modality: str) -> tuple[int, int]:
        """(n_tokens, channels) of one patient's tokens for an output modality."""
        self._inputs_of(modality)  # rejects unknown modalities
        n_features = len(self.feature_names[modality])
        channels = self.config.channels_per_token(n_features)
        return math.ceil(n_features / channels), channels

    def transform(
        self, frames: Mapping[str, pd.DataFrame], patient_ids: Sequence[str]
    ) -> dict[str, OmicsTokens]:
        """Tokens per output modality for `patient_ids`; extra modalities and columns are ignored."""
        patient_ids = list(patient_ids)
        raw, present = {}, {}
        for name, stats in self._stats.items():
            raw[name], present[name] = _raw_values(name, frames.get(name), stats.features, patient_ids)
        return self._tokens(raw, present)

    def _tokens(self, raw: dict[str, np.ndarray], present: dict[str, np.ndarray]) -> dict[str, OmicsTokens]:
        """Tokens per output modality from raw values (n, features) and presence (n,) per input modality."""
        missing = {name: np.isnan(values) for name, values in raw.items()}
        scaled = {name: self._stats[name].apply(values) for name, values in raw.items()}
        tokens = {}
        for out in self.output_modalities:
            inputs = self._inputs_of(out)
            is_present = np.logical_or.reduce([present[m] for m in inputs])
            values = np.concatenate([scaled[m] for m in inputs], axis=1)
            values[~is_present] = 0.0
            n_missing = np.concatenate([missing[m] for m in inputs], axis=1).sum(axis=1)
            imputed = np.where(is_present, n_missing, 0)
            tokens[out] = OmicsTokens(
                self._group(out, values), is_present, imputed, imputed / values.shape[1]
            )
        return tokens

    def _group(self, modality: str, values: np.ndarray) -> np.ndarray:
        n_tokens, channels = self.token_shape(modality)
        padded = np.zeros((len(values), n_tokens * channels), dtype=np.float32)
        padded[:, : values.shape[1]] = values
        return rearrange(padded, "n (t c) -> n t c", t=n_tokens, c=channels)

    def transform_records(
        self, cases: Sequence[Mapping[str, Mapping[str, float | None]]]
    ) -> tuple[dict[str, OmicsTokens], list[list[str]]]:
        """Tokens for cases given as features by name per modality, and per case the names the model does not use.

        With combine=True the features may also come under the combined name ("omic"). A modality
        absent from a case is not present; a given modality with missing features is imputed.
        Values go straight into the arrays (no DataFrame per case): this is the serving path.
        """
        n_cases = len(cases)
        raw = {m: np.full((n_cases, len(s.features)), np.nan) for m, s in self._stats.items()}
        present = {m: np.zeros(n_cases, dtype=bool) for m in self._stats}
        unknown: list[list[str]] = []
        for row, records in enumerate(cases):
            unused = []
            for modality, features in records.items():
                combined = self.config.combine and modality == COMBINED_MODALITY
                for target in self.input_modalities if combined else [modality]:
                    if target in present:
                        present[target][row] = True
                for feature, value in features.items():
                    owner = self._modality_of_feature.get(feature) if combined else modality
                    column = None if owner is None else self._column_of.get((owner, feature))
                    if owner is None or column is None:
                        unused.append(feature)
                    else:
                        raw[owner][row, column] = _as_float(modality, feature, value)
            unknown.append(unused)
        return self._tokens(raw, present), unknown

    def state_dict(self) -> dict:
        """JSON-serialisable state; floats survive json.dumps/loads exactly."""
        return {
            "format_version": STATE_FORMAT_VERSION,
            "config": asdict(self.config),
            "modalities": {
                name: {
                    "log1p": s.log1p,
                    "signed_log": s.signed_log,
                    "features": list(s.features),
                    "median": s.median.tolist(),
                    "mean": s.mean.tolist(),
                    "std": s.std.tolist(),
                }
                for name, s in self._stats.items()
            },
        }

    @classmethod
    def from_state_dict(cls, state: Mapping) -> OmicsTransform:
        if state.get("format_version") not in READABLE_STATE_VERSIONS:
            raise OmicsTransformError(
                f"omics transform state format {state.get('format_version')!r} is not supported "
                f"(expected one of {READABLE_STATE_VERSIONS})"
            )
        stats = {
            name: _FeatureStats(
                log1p=bool(s["log1p"]),
                features=list(s["features"]),
                median=np.asarray(s["median"], dtype=np.float64),
                mean=np.asarray(s["mean"], dtype=np.float64),
                std=np.asarray(s["std"], dtype=np.float64),
                signed_log=bool(s.get("signed_log", False)),  # absent from version 1 states
            )
            for name, s in state["modalities"].items()
        }
        return cls(OmicsConfig(**state["config"]), stats)


def _as_float(modality: str, feature: str, value: Any) -> float:
    """A record value as float; None means missing."""
    if value is None:
        return np.nan
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise OmicsTransformError(
            f"modality {modality!r}: feature {feature!r} has non-numeric value {value!r}"
        ) from None
    if math.isinf(number):
        raise OmicsTransformError(
            f"modality {modality!r}: feature {feature!r} is infinite; use null for a missing value"
        )
    return number


def _numeric_matrix(name: str, frame: pd.DataFrame, columns: Sequence[str]) -> np.ndarray:
    """float64 values of `columns` (absent columns are NaN); rejects text and infinite values."""
    wanted = set(columns)
    non_numeric = [
        c for c in frame.select_dtypes(exclude=["number", "bool", "boolean"]).columns if c in wanted
    ]
    if non_numeric:
        raise OmicsTransformError(f"modality {name!r}: non-numeric feature columns {non_numeric[:5]}")
    values = frame.reindex(columns=list(columns)).to_numpy(dtype=np.float64, na_value=np.nan)
    infinite = np.isinf(values)
    if infinite.any():
        row, col = np.argwhere(infinite)[0]
        raise OmicsTransformError(
            f"modality {name!r}: {int(infinite.sum())} infinite value(s), e.g. feature {columns[col]!r} "
            f"of patient {frame.index[row]!r}; use NaN for missing values"
        )
    return values


def _check_unique(name: str, frame: pd.DataFrame) -> None:
    for axis, labels in (("patient ids", frame.index), ("feature names", frame.columns)):
        if labels.has_duplicates:
            repeated = labels[labels.duplicated()].unique()[:5].tolist()
            raise OmicsTransformError(f"modality {name!r}: duplicated {axis} {repeated}")


def _fit_modality(
    name: str, frame: pd.DataFrame, config: OmicsConfig, survival: pd.DataFrame | None
) -> _FeatureStats:
    _check_unique(name, frame)
    if len(frame) == 0:
        raise OmicsTransformError(f"modality {name!r}: no training rows to fit on")
    features = [str(c) for c in frame.columns]
    raw = _numeric_matrix(name, frame, features)
    signed_log = name in config.signed_log
    logged = _signed_log(raw) if signed_log else raw
    median = _nanmedian_or_zero(logged)
    observed = logged[~np.isnan(logged)]
    if config.log1p == "always":
        log1p = True
    elif config.log1p == "never" or signed_log:
        log1p = False
    else:
        log1p = observed.size > 0 and observed.min() >= 0 and observed.max() > AUTO_LOG1P_MIN_MAX
    unscaled = _FeatureStats(
        log1p, features, median, np.zeros(len(features)), np.ones(len(features)), signed_log
    )
    values = unscaled.apply(raw)
    std = values.std(axis=0)
    keep = np.flatnonzero((std > 0) & (std >= config.min_std))
    if config.top_k is not None and len(keep) > config.top_k:
        if config.select == "cox":
            rank_by = np.abs(cox_score_statistic(values[:, keep], *_outcomes_of(name, frame, survival)))
        else:
            rank_by = std[keep]
        keep = np.sort(keep[np.argsort(-rank_by, kind="stable")[: config.top_k]])
    return _FeatureStats(
        log1p=bool(log1p),
        features=[features[i] for i in keep],
        median=median[keep],
        mean=values.mean(axis=0)[keep],
        std=std[keep],
        signed_log=signed_log,
    )


def _outcomes_of(
    name: str, frame: pd.DataFrame, survival: pd.DataFrame | None
) -> tuple[np.ndarray, np.ndarray]:
    """Times and events of the frame's patients, in its row order."""
    assert survival is not None  # OmicsTransform.fit checks it for select="cox"
    unknown = frame.index.difference(survival.index)
    if len(unknown):
        raise OmicsTransformError(
            f"modality {name!r}: no survival outcome for training patients {unknown[:5].tolist()}"
        )
    rows = survival.loc[frame.index]
    return rows["survival_months"].to_numpy(np.float64), rows["event"].to_numpy(bool)


def cox_score_statistic(values: np.ndarray, times: np.ndarray, events: np.ndarray) -> np.ndarray:
    """Per column of `values` (patients, features), the standardised score statistic U / sqrt(V) of a
    univariate Cox model at beta = 0 (Breslow's ties); for a 0/1 feature without tied times, the log-rank
    test of its two groups.

    U sums, over events, the patient's value minus the mean over its risk set (everyone with a time at least
    as long); V sums the risk sets' variances. Positive: higher values, higher hazard. A feature constant on
    every risk set scores 0.
    """
    order = np.argsort(-times, kind="stable")
    times, events, values = times[order], events[order], values[order]
    # risk set of the patient at position i: positions 0 .. at_risk[i] - 1 (times sorted descending)
    at_risk = np.searchsorted(-times, -times, side="right")
    first, second = np.cumsum(values, axis=0), np.cumsum(values**2, axis=0)
    event_rows = np.flatnonzero(events)
    size = at_risk[event_rows][:, None].astype(np.float64)
    mean = first[at_risk[event_rows] - 1] / size
    variance = np.maximum(second[at_risk[event_rows] - 1] / size - mean**2, 0.0)
    score = (values[event_rows] - mean).sum(axis=0)
    spread = np.sqrt(variance.sum(axis=0))
    return np.divide(score, spread, out=np.zeros_like(score), where=spread > 0)


def _signed_log(values: np.ndarray) -> np.ndarray:
    """sign(x)·log1p(|x|): a fixed per-value map that keeps order and NaN and tames extreme values."""
    return np.sign(values) * np.log1p(np.abs(values))


def _nanmedian_or_zero(raw: np.ndarray) -> np.ndarray:
    """Median per column ignoring NaN; 0 for columns with no observed value (dropped later as constant)."""
    observed = ~np.isnan(raw).all(axis=0)
    median = np.zeros(raw.shape[1])
    median[observed] = np.nanmedian(raw[:, observed], axis=0)
    return median


def _raw_values(
    name: str, frame: pd.DataFrame | None, features: Sequence[str], patient_ids: list[str]
) -> tuple[np.ndarray, np.ndarray]:
    """Raw values (n, features) with NaN for missing, and whether each patient has a row."""
    if frame is None:
        return np.full((len(patient_ids), len(features)), np.nan), np.zeros(len(patient_ids), dtype=bool)
    _check_unique(name, frame)
    present = frame.index.isin(patient_ids)
    rows = frame.loc[present].reindex(index=patient_ids)
    return _numeric_matrix(name, rows, features), np.isin(patient_ids, frame.index)
