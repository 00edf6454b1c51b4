"""Clinical covariates as a modality: fitted on the training split, saved with the model, applied by serving.

Covariates come from the cohort's clinical table (one row per patient): numeric ones (age) and binary
ones (is_female) are imputed with the training median; categorical ones (histological subtype, stage,
grade) become one indicator per level seen in at least `min_level_count` training patients, the most
frequent level being the reference. Every feature is then z-scored with training statistics and
constant ones are dropped. A patient is missing the modality when none of its covariates is observed.
The tissue-source site is a batch marker, never a covariate.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, cast

import numpy as np
from einops import rearrange

from healnet.errors import HEALNetError
from healnet.preprocess.omics import OmicsTokens

if TYPE_CHECKING:  # training passes DataFrames; serving passes records and must not import pandas (pyarrow)
    import pandas as pd

CLINICAL = "clinical"
STATE_FORMAT_VERSION = 1


class ClinicalTransformError(HEALNetError, ValueError):
    """Bad clinical input or configuration; the message names the covariate."""


@dataclass(frozen=True)
class ClinicalConfig:
    numeric: tuple[str, ...] = ("age",)
    binary: tuple[str, ...] = ("is_female",)
    categorical: tuple[str, ...] = ("oncotree_code", "stage", "grade")
    # a level seen in fewer training patients joins the reference level: too rare to estimate
    min_level_count: int = 10

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


class ClinicalTransform:
    """Clinical covariates -> one token per feature (n, features, 1), with a presence mask."""

    def __init__(self, config: ClinicalConfig, features: list[_Feature]):
        if not features:
            raise ClinicalTransformError("no clinical feature varies in the training patients")
        self.config = config
        self.features = features
        self.covariates = list(dict.fromkeys(f.covariate for f in features))
        self.feature_names = [f.name for f in features]

    @classmethod
    def fit(cls, clinical: pd.DataFrame, config: ClinicalConfig = ClinicalConfig()) -> ClinicalTransform:
        """Fit on the training patients' clinical rows."""
        features = []
        for covariate in config.observed_covariates(clinical):
            column = _as_objects(clinical[covariate])
            if covariate in config.categorical:
                counts = clinical[covariate].dropna().astype(str).value_counts()
                levels = [level for level, n in counts.items() if n >= config.min_level_count][1:]
                candidates = [(f"{covariate}={level}", level, 0.0) for level in levels]
            else:
                values = _numeric(covariate, column)
                candidates = [(covariate, None, float(np.nanmedian(values)))]
            for name, level, fill in candidates:
                raw = _feature_column(covariate, column, level, fill)
                std = float(raw.std())
                if std > 0:
                    features.append(_Feature(name, covariate, level, fill, float(raw.mean()), std))
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
        Values go straight into arrays (no DataFrame): this is the serving path."""
        columns = {}
        for covariate in self.covariates:
            column = np.empty(len(records), dtype=object)
            column[:] = [
                _record_value(covariate, record.get(covariate), covariate in self.config.categorical)
                for record in records
            ]
            columns[covariate] = column
        unknown = [[name for name in record if name not in self.covariates] for record in records]
        return self._transform_columns(columns), unknown

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
        if state.get("format_version") != STATE_FORMAT_VERSION:
            raise ClinicalTransformError(
                f"clinical transform state format {state.get('format_version')!r} is not supported "
                f"(expected {STATE_FORMAT_VERSION})"
            )
        return cls(ClinicalConfig(**state["config"]), [_Feature(**f) for f in state["features"]])


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


def _record_value(covariate: str, value: object, categorical: bool) -> object:
    """A request's covariate value: None is missing; numbers must be finite."""
    if value is None or categorical:
        return value
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ClinicalTransformError(f"clinical covariate {covariate!r} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ClinicalTransformError(f"clinical covariate {covariate!r} must be finite, got {value!r}")
    return float(value)
