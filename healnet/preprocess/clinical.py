"""Clinical covariates as a modality: fitted on the training split, saved with the model, applied by serving.

Covariates come from the cohort's clinical table (one row per patient): numeric ones (age) and binary
ones (is_female) are imputed with the training median; categorical ones (histological subtype, stage,
grade) become one indicator per level seen in at least `min_level_count` training patients, the most
frequent level being the reference (with `pool_rare_binary`, a binary covariate whose less common value is
that rare is left out). Every feature is then z-scored with training statistics and constant ones are
dropped. A patient is missing the modality when none of its covariates is observed.
The tissue-source site is a batch marker, never a covariate.

A value outside its covariate's plausible range (an age of 300, `is_female` = 2) is an entry or unit
error, refused where cases come in as records; a plausible value outside the range of the training
patients is answered, and named by `outside_training_range`, as the model has not seen its like.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from enum import Enum
from typing import TYPE_CHECKING, cast

import numpy as np
from einops import rearrange

from healnet.errors import HEALNetError
from healnet.preprocess.omics import OmicsTokens

if TYPE_CHECKING:  # training passes DataFrames; serving passes records and must not import pandas (pyarrow)
    import pandas as pd

CLINICAL = "clinical"
STATE_FORMAT_VERSION = 2  # 2 added each numeric feature's training range; version 1 states load without it
READABLE_STATE_VERSIONS = (1, 2)


class ClinicalTransformError(HEALNetError, ValueError):
    """Bad clinical input or configuration; the message names the covariate."""


class ClinicalProblem(Enum):
    """What makes a case's covariate value unreadable."""

    WRONG_TYPE = "wrong_type"  # not text for a categorical covariate, not a number for another one
    NOT_FINITE = "not_finite"
    IMPLAUSIBLE = "implausible"  # outside the covariate's plausible range: an entry or unit error


class ClinicalValueError(ClinicalTransformError):
    """A case's covariate value the model cannot read; the message names it as `clinical['name']`, the
    field of the service's request."""

    def __init__(self, problem: ClinicalProblem, message: str):
        super().__init__(message)
        self.problem = problem


@dataclass(frozen=True)
class PlausibleRange:
    """The values a covariate can take in a real patient, bounds included."""

    low: float
    high: float
    whole: bool = False  # only whole numbers (a binary covariate is 0 or 1)

    def holds(self, value: float) -> bool:
        return self.low <= value <= self.high and (not self.whole or float(value).is_integer())

    def __str__(self) -> str:
        if self.whole and self.high - self.low == 1:
            return f"{self.low:g} or {self.high:g}"
        return f"{self.low:g} to {self.high:g}"


# Numeric covariates whose plausible values the code knows (age in years); every binary covariate is 0/1.
PLAUSIBLE_RANGES = {"age": PlausibleRange(0.0, 120.0)}
BINARY_RANGE = PlausibleRange(0.0, 1.0, whole=True)


@dataclass(frozen=True)
class ClinicalConfig:
    numeric: tuple[str, ...] = ("age",)
    binary: tuple[str, ...] = ("is_female",)
    categorical: tuple[str, ...] = ("oncotree_code", "stage", "grade")
    # a level seen in fewer training patients joins the reference level: too rare to estimate
    min_level_count: int = 10
    # the same for a binary covariate: one whose less common value fewer than min_level_count training
    # patients hold is left out (a handful of men in a breast cohort cannot be estimated either)
    pool_rare_binary: bool = False

    def __post_init__(self) -> None:
        for name in ("numeric", "binary", "categorical"):
            value = getattr(self, name)
            if isinstance(value, str):
                raise ClinicalTransformError(f"{name} must be a sequence of column names, got {value!r}")
            object.__setattr__(self, name, tuple(value))  # a JSON list becomes a tuple
        if self.min_level_count < 1:
            raise ClinicalTransformError(f"min_level_count must be >= 1, got {self.min_level_count}")

    @property
    def covariates(self) -> tuple[str, ...]:
        return self.numeric + self.binary + self.categorical

    def plausible_range(self, covariate: str) -> PlausibleRange | None:
        """The plausible values of a numeric or binary covariate; None when the code knows none."""
        if covariate in self.binary:
            return BINARY_RANGE
        return PLAUSIBLE_RANGES.get(covariate) if covariate in self.numeric else None

    def observed_covariates(self, clinical: pd.DataFrame) -> list[str]:
        """The configured covariates that `clinical` has, with at least one observed value."""
        return [c for c in self.covariates if c in clinical.columns and clinical[c].notna().any()]


@dataclass(frozen=True)
class _Feature:
    name: str  # the covariate, or "covariate=level" for an indicator
    covariate: str
    level: str | None  # None: the covariate's value itself
    fill: float  # imputed raw value (training median; 0 for an indicator)
    mean: float
    std: float
    # smallest and largest observed raw value of the training patients (None: an indicator, or a state
    # written before version 2)
    training_min: float | None = None
    training_max: float | None = None


class ClinicalTransform:
    """Clinical covariates -> one token per feature (n, features, 1), with a presence mask."""

    def __init__(self, config: ClinicalConfig, features: list[_Feature]):
        if not features:
            raise ClinicalTransformError("no clinical feature varies in the training patients")
        self.config = config
        self.features = features
        self.covariates = list(dict.fromkeys(f.covariate for f in features))
        self.feature_names = [f.name for f in features]
        self.plausible_ranges = {
            c: bounds for c in self.covariates if (bounds := config.plausible_range(c)) is not None
        }
        self.training_ranges = {
            f.covariate: (f.training_min, f.training_max)
            for f in features
            if f.training_min is not None and f.training_max is not None
        }

    @classmethod
    def fit(cls, clinical: pd.DataFrame, config: ClinicalConfig = ClinicalConfig()) -> ClinicalTransform:
        """Fit on the training patients' clinical rows."""
        features = []
        for covariate in config.observed_covariates(clinical):
            column = _as_objects(clinical[covariate])
            training_range: tuple[float | None, float | None] = (None, None)
            if covariate in config.categorical:
                counts = clinical[covariate].dropna().astype(str).value_counts()
                levels = [level for level, n in counts.items() if n >= config.min_level_count][1:]
                candidates = [(f"{covariate}={level}", level, 0.0) for level in levels]
            else:
                values = _numeric(covariate, column)
                if covariate in config.binary and config.pool_rare_binary and _rare_binary(values, config):
                    continue
                candidates = [(covariate, None, float(np.nanmedian(values)))]
                training_range = float(np.nanmin(values)), float(np.nanmax(values))
            for name, level, fill in candidates:
                raw = _feature_column(covariate, column, level, fill)
                std = float(raw.std())
                if std > 0:
                    features.append(
                        _Feature(name, covariate, level, fill, float(raw.mean()), std, *training_range)
                    )
        return cls(config, features)

    @property
    def n_features(self) -> int:
        return len(self.features)

    def transform(self, clinical: pd.DataFrame | None, patient_ids: Sequence[str]) -> OmicsTokens:
        """Tokens for `patient_ids` (a patient without a clinical row, or no table at all, is missing the
        modality)."""
        rows = (
            None if clinical is None else clinical.reindex(index=list(patient_ids), columns=self.covariates)
        )
        return self._transform_columns(
            {
                c: np.full(len(patient_ids), None, dtype=object) if rows is None else _as_objects(rows[c])
                for c in self.covariates
            }
        )

    def transform_records(
        self, records: Sequence[Mapping[str, object]]
    ) -> tuple[OmicsTokens, list[list[str]]]:
        """Tokens for cases given as {covariate: value}, and per case the names the model does not use.
        Values go straight into arrays (no DataFrame): this is the serving path. A value of the model's
        covariates that `check_value` refuses is a ClinicalValueError."""
        columns = {}
        for covariate in self.covariates:
            column = np.empty(len(records), dtype=object)
            column[:] = [self.check_value(covariate, record.get(covariate)) for record in records]
            columns[covariate] = column
        unknown = [[name for name in record if name not in self.covariates] for record in records]
        return self._transform_columns(columns), unknown

    def check_value(self, covariate: str, value: object) -> float | str | None:
        """A case's value of `covariate` as the model reads it: None is missing; a categorical covariate of
        the config takes text; any other name a finite number, within its plausible range for the model's
        numeric and binary covariates. Otherwise a ClinicalValueError, with the message the service answers.
        """
        if value is None:
            return None
        field = f"clinical[{covariate!r}]"
        if covariate in self.config.categorical:
            if not isinstance(value, str):
                raise ClinicalValueError(ClinicalProblem.WRONG_TYPE, f"{field} must be text, got {value!r}")
            return value
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ClinicalValueError(ClinicalProblem.WRONG_TYPE, f"{field} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ClinicalValueError(ClinicalProblem.NOT_FINITE, f"{field} is {value}: use null for missing")
        bounds = self.plausible_ranges.get(covariate)
        if bounds is not None and not bounds.holds(value):
            raise ClinicalValueError(
                ClinicalProblem.IMPLAUSIBLE, f"{field} is {value:g}, outside its plausible range {bounds}"
            )
        return float(value)

    def outside_training_range(self, records: Sequence[Mapping[str, object]]) -> list[list[str]]:
        """Per case given as {covariate: value}, the numeric covariates whose value lies outside the
        training patients' range (none for a state that does not record it)."""
        return [
            [
                covariate
                for covariate, (low, high) in self.training_ranges.items()
                if isinstance(value := record.get(covariate), int | float) and not low <= value <= high
            ]
            for record in records
        ]

    def _transform_columns(self, columns: Mapping[str, np.ndarray]) -> OmicsTokens:
        """The one transform of training and serving: per covariate, an object array with None for missing."""
        observed = np.stack([columns[c] != None for c in self.covariates], axis=1)  # noqa: E711 (elementwise)
        values = np.stack(
            [_feature_column(f.covariate, columns[f.covariate], f.level, f.fill) for f in self.features],
            axis=1,
        )
        return self._tokens(values, observed)

    def _tokens(self, values: np.ndarray, observed: np.ndarray) -> OmicsTokens:
        present = np.asarray(observed.any(axis=1), dtype=bool)
        means = np.array([f.mean for f in self.features])
        stds = np.array([f.std for f in self.features])
        scaled = ((values - means) / stds).astype(np.float32)
        scaled[~present] = 0.0
        imputed = np.where(present, (~observed).sum(axis=1), 0)
        return OmicsTokens(
            rearrange(scaled, "n f -> n f 1"), present, imputed, imputed / max(len(self.covariates), 1)
        )

    def state_dict(self) -> dict:
        return {
            "format_version": STATE_FORMAT_VERSION,
            "config": asdict(self.config),
            "features": [asdict(f) for f in self.features],
        }

    @classmethod
    def from_state_dict(cls, state: Mapping) -> ClinicalTransform:
        if state.get("format_version") not in READABLE_STATE_VERSIONS:
            raise ClinicalTransformError(
                f"clinical transform state format {state.get('format_version')!r} is not supported "
                f"(expected one of {READABLE_STATE_VERSIONS})"
            )
        return cls(ClinicalConfig(**state["config"]), [_Feature(**f) for f in state["features"]])


def _rare_binary(values: np.ndarray, config: ClinicalConfig) -> bool:
    """Whether fewer than `config.min_level_count` of a binary covariate's observed values differ from
    its most common one."""
    _, counts = np.unique(values[~np.isnan(values)], return_counts=True)
    return int(counts.sum() - counts.max(initial=0)) < config.min_level_count


def _as_objects(column: pd.Series) -> np.ndarray:
    """A table column as an object array with None for every kind of missing value (NaN, NA, NaT)."""
    return column.astype(object).where(column.notna(), None).to_numpy(dtype=object)


def _numeric(covariate: str, column: np.ndarray) -> np.ndarray:
    """float64 values of an object column, NaN for None; text or infinite values are errors."""
    values = np.full(len(column), np.nan)
    for index, value in enumerate(column):
        if value is None:
            continue
        try:
            values[index] = float(cast(float, value))
        except (TypeError, ValueError):
            values[index] = np.nan
        if math.isnan(values[index]):
            raise ClinicalTransformError(f"clinical covariate {covariate!r} has non-numeric value {value!r}")
    if np.isinf(values).any():
        raise ClinicalTransformError(f"clinical covariate {covariate!r} has an infinite value")
    return values


def _feature_column(covariate: str, column: np.ndarray, level: str | None, fill: float) -> np.ndarray:
    """An indicator of `level` (missing: 0), or the numeric values with missing ones filled."""
    if level is not None:
        return np.array([value is not None and str(value) == level for value in column], dtype=np.float64)
    values = _numeric(covariate, column)
    return np.where(np.isnan(values), fill, values)
