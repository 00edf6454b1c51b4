"""The reference of the training inputs: per feature, bins and the training patients' counts in them.

Fitted at training on the patients the preprocessing is fitted on, saved in the checkpoint as plain types
(`InputReference.to_dict`), read by the service to bin its requests (`summarise`) and by `healnet drift`.

- each omic table: per feature the model keeps, the training deciles of the values as requests send them
  (each decile edge also a bin of its own, for tied values: `ModalityBins`).
  Every step of the omics transform is increasing per feature (signed log, log1p, z-score), so these bins
  hold the same patients as the deciles of the values the model reads. Missing values are not counted:
  the transform imputes them with the training median, which would hide a shift behind a spike there.
- clinical: per covariate of the model, the deciles of a numeric one (a binary one gets two bins), the
  training levels of a categorical one (at most `MAX_LEVELS`; any other level falls in one last bin).
- wsi: per embedding dimension, the deciles of the per-slide mean patch embedding.
- patterns: how many training patients had each combination of inputs (`pattern_of`).

Numpy only: the service imports this module.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from healnet.errors import HEALNetError

REFERENCE_VERSION = 1
DECILES = 10  # a numeric feature's bins: the training deciles ...
NUMERIC_BINS = 2 * (DECILES - 1) + 1  # ... each of the 9 edges also a bin of its own (see ModalityBins)
MAX_LEVELS = 20  # levels of a categorical covariate kept as bins of their own
CLINICAL = "clinical"  # as healnet.preprocess.clinical.CLINICAL and healnet.preprocess.state.WSI
WSI = "wsi"
COMBINED_OMICS = "omic"  # a request's table name for every omic feature, with the combined grouping


class ReferenceError(HEALNetError, ValueError):
    """An input reference that cannot be read."""


@dataclass(frozen=True)
class ModalityBins:
    """The bins of one modality's features and the training patients' counts in them.

    edges: (features, DECILES - 1) the training deciles of each numeric feature; a value v falls in bin
    #{edges < v} + #{edges <= v}: the open intervals between the edges take the even bins, a value equal
    to an edge the odd one between them. Values tied in training (a mutation's 0 and 1, copy-number calls,
    a binary covariate) thus sit in bins of their own, and a value between them (another caller, a
    shifted scale) falls in a bin training never filled; for continuous values the odd bins stay empty.
    NaN rows belong to categorical features, binned by `levels` instead (a level outside them falls in bin
    len(levels)). reference: (features, bins) training counts."""

    features: list[str]
    edges: np.ndarray
    reference: np.ndarray
    levels: dict[int, list[str]] = field(default_factory=dict)

    @property
    def n_bins(self) -> int:
        return self.reference.shape[1]

    def histogram(
        self, numeric: np.ndarray, categorical: Mapping[int, Sequence[object]] | None = None
    ) -> np.ndarray:
        """Counts (features, bins) of rows of values (cases, features); NaN marks a missing value. The
        categorical features' values are given by feature index in `categorical` (None: missing)."""
        counts = np.zeros((len(self.features), self.n_bins), dtype=np.int64)
        numeric = np.asarray(numeric, dtype=np.float64).reshape(-1, len(self.features))
        with np.errstate(invalid="ignore"):
            values, edges = numeric[:, :, None], self.edges[None]
            bins = (values > edges).sum(axis=-1) + (values >= edges).sum(axis=-1)
        observed = np.isfinite(numeric)
        if self.levels:
            observed[:, list(self.levels)] = False
        rows, columns = np.nonzero(observed)
        np.add.at(counts, (columns, bins[rows, columns]), 1)
        for index, given in (categorical or {}).items():
            levels = self.levels[index]
            for value in given:
                if value is not None:
                    text = str(value)
                    counts[index, levels.index(text) if text in levels else len(levels)] += 1
        return counts

    @classmethod
    def fit(
        cls, features: Sequence[str], numeric: np.ndarray, categorical: Mapping[int, Sequence[object]] = {}
    ) -> ModalityBins:
        """Deciles of the observed values of each numeric column; the most frequent levels of each
        categorical one (given by index in `categorical`, its numeric column ignored)."""
        numeric = np.asarray(numeric, dtype=np.float64).reshape(-1, len(features))
        edges = np.full((len(features), DECILES - 1), np.inf)  # no observed value: every value in bin 0
        observed = np.isfinite(numeric).any(axis=0)
        if observed.any():
            finite = np.where(np.isfinite(numeric[:, observed]), numeric[:, observed], np.nan)
            edges[observed] = np.nanquantile(finite, np.arange(1, DECILES) / DECILES, axis=0).T
        edges[list(categorical)] = np.nan
        levels = {}
        for index, given in categorical.items():
            counted = Counter(str(value) for value in given if value is not None)
            levels[index] = [level for level, _ in counted.most_common(MAX_LEVELS)]
        bins = max([NUMERIC_BINS, *(len(kept) + 1 for kept in levels.values())])
        empty = cls(list(features), edges, np.zeros((len(features), bins), dtype=np.int64), levels)
        return cls(list(features), edges, empty.histogram(numeric, categorical), levels)

    def to_dict(self) -> dict:
        return {
            "features": list(self.features),
            "edges": [[None if np.isnan(e) else float(e) for e in row] for row in self.edges],
            "reference": self.reference.tolist(),
            "levels": {str(index): list(levels) for index, levels in self.levels.items()},
        }

    @classmethod
    def from_dict(cls, state: Mapping[str, Any]) -> ModalityBins:
        edges = np.array(
            [[np.nan if e is None else e for e in row] for row in state["edges"]], dtype=np.float64
        ).reshape(len(state["features"]), DECILES - 1)
        reference = np.asarray(state["reference"], dtype=np.int64).reshape(len(state["features"]), -1)
        levels = {int(index): list(kept) for index, kept in state["levels"].items()}
        if reference.shape[1] < max([NUMERIC_BINS, *(len(kept) + 1 for kept in levels.values())]):
            raise ReferenceError(
                f"the reference has {reference.shape[1]} bins per feature, not {NUMERIC_BINS}"
            )
        return cls(list(state["features"]), edges, reference, levels)


@dataclass
class InputCounts:
    """What the spool keeps of some cases: their number, per modality the counts (features, bins), and
    how many cases had each pattern of inputs. Marginal counts only: no two values of one case are linked."""

    cases: int
    modalities: dict[str, np.ndarray]
    patterns: Counter[str]

    def add(self, other: InputCounts) -> None:
        self.cases += other.cases
        for name, counts in other.modalities.items():
            if name in self.modalities:
                self.modalities[name] = self.modalities[name] + counts
            else:
                self.modalities[name] = counts.copy()
        self.patterns.update(other.patterns)

    def to_dict(self) -> dict:
        return {
            "cases": self.cases,
            "modalities": {name: counts.tolist() for name, counts in self.modalities.items()},
            "patterns": dict(self.patterns),
        }

    @classmethod
    def from_dict(cls, state: Mapping[str, Any]) -> InputCounts:
        return cls(
            int(state["cases"]),
            {name: np.asarray(counts, dtype=np.int64) for name, counts in state["modalities"].items()},
            Counter({str(k): int(v) for k, v in state["patterns"].items()}),
        )


@dataclass
class InputReference:
    """The training inputs' bins per modality (each omic table, clinical, wsi) and pattern counts."""

    omics: dict[str, ModalityBins]
    clinical: ModalityBins | None
    wsi: ModalityBins | None
    patterns: Counter[str]
    patients: int

    def __post_init__(self) -> None:
        self._column = {
            (table, name): index
            for table, bins in self.omics.items()
            for index, name in enumerate(bins.features)
        }
        self._table_of = {name: table for table, bins in self.omics.items() for name in bins.features}

    @property
    def modalities(self) -> dict[str, ModalityBins]:
        """Every binned modality by its label: the omic tables, then clinical and wsi when the model has them."""
        extra = {CLINICAL: self.clinical, WSI: self.wsi}
        return {**self.omics, **{name: bins for name, bins in extra.items() if bins is not None}}

    @property
    def identity(self) -> str:
        """A short digest of the bins: spool files name the reference their counts were binned by."""
        text = json.dumps(self.to_dict()["modalities"], sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def empty_counts(self) -> InputCounts:
        return InputCounts(
            0,
            {name: np.zeros_like(bins.reference) for name, bins in self.modalities.items()},
            Counter(),
        )

    def summarise(self, cases: Sequence[Any]) -> InputCounts:
        """The counts of cases with `omics` ({table: {feature: value}}), `clinical` ({covariate: value}) and
        `wsi_features` ((patches, dim) or None) attributes, as healnet.inference.Case has."""
        counts = self.empty_counts()
        counts.cases = len(cases)
        rows = {
            table: np.full((len(cases), len(bins.features)), np.nan) for table, bins in self.omics.items()
        }
        for row, case in enumerate(cases):
            self._fill_omics(rows, row, case.omics)
        for table, bins in self.omics.items():
            counts.modalities[table] += bins.histogram(rows[table])
        if self.clinical is not None:
            counts.modalities[CLINICAL] += self._clinical_histogram(self.clinical, cases)
        if self.wsi is not None:
            bags = [c.wsi_features for c in cases if c.wsi_features is not None and len(c.wsi_features)]
            if bags:
                means = np.stack([np.asarray(bag).mean(axis=0, dtype=np.float64) for bag in bags])
                counts.modalities[WSI] += self.wsi.histogram(means)
        counts.patterns.update(self.pattern_of(case) for case in cases)
        return counts

    def _fill_omics(self, rows: dict[str, np.ndarray], row: int, omics: Mapping[str, Mapping]) -> None:
        """Put one case's numeric values of the reference's features in row `row` of their table's rows."""
        column, table_of = self._column, self._table_of
        for given, features in omics.items():
            combined = given == COMBINED_OMICS
            if not combined and given not in rows:
                continue
            for name, value in features.items():
                table = table_of.get(name) if combined else given
                index = column.get((table, name))  # type: ignore[arg-type]
                if index is not None and isinstance(value, int | float) and not isinstance(value, bool):
                    rows[table][row, index] = value  # type: ignore[index]

    @staticmethod
    def _clinical_histogram(bins: ModalityBins, cases: Sequence[Any]) -> np.ndarray:
        numeric = np.full((len(cases), len(bins.features)), np.nan)
        categorical: dict[int, list[object]] = {index: [] for index in bins.levels}
        for row, case in enumerate(cases):
            for index, name in enumerate(bins.features):
                value = case.clinical.get(name)
                if index in categorical:
                    categorical[index].append(value)
                elif isinstance(value, int | float) and not isinstance(value, bool):
                    numeric[row, index] = value
        return bins.histogram(numeric, categorical)

    def pattern_of(self, case: Any) -> str:
        """The inputs a case gives, in the reference's order, joined by `+` (e.g. `cnv+mut+rnaseq+wsi`);
        `none` when it gives none of them. A table is given when the case names it (with the combined
        grouping, `omic` names every table), as the omics transform counts it present."""
        given = set(case.omics)
        names = [t for t in self.omics if t in given or COMBINED_OMICS in given]
        if self.clinical is not None and any(
            case.clinical.get(name) is not None for name in self.clinical.features
        ):
            names.append(CLINICAL)
        if self.wsi is not None and case.wsi_features is not None and len(case.wsi_features):
            names.append(WSI)
        return "+".join(names) or "none"

    def to_dict(self) -> dict:
        return {
            "version": REFERENCE_VERSION,
            "patients": self.patients,
            "omic_tables": list(self.omics),
            "modalities": {name: bins.to_dict() for name, bins in self.modalities.items()},
            "patterns": dict(self.patterns),
        }

    @classmethod
    def from_dict(cls, state: Mapping[str, Any]) -> InputReference:
        if not isinstance(state, Mapping) or state.get("version") != REFERENCE_VERSION:
            version = state.get("version") if isinstance(state, Mapping) else None
            raise ReferenceError(f"input reference version {version!r} is not {REFERENCE_VERSION}")
        modalities = {name: ModalityBins.from_dict(bins) for name, bins in state["modalities"].items()}
        return cls(
            {table: modalities[table] for table in state["omic_tables"]},
            modalities.get(CLINICAL),
            modalities.get(WSI),
            Counter({str(k): int(v) for k, v in state["patterns"].items()}),
            int(state["patients"]),
        )


def fit_input_reference(
    omic_frames: Mapping[str, Any],
    clinical: Any,
    wsi_bags: Mapping[str, np.ndarray],
    patient_ids: Iterable[str],
    preprocessor: Any,
) -> InputReference:
    """The reference of `patient_ids` (the patients `preprocessor` was fitted on) for the inputs the
    preprocessor reads: the omic tables' kept features, the clinical covariates, the patch embeddings.
    Frames are pandas DataFrames indexed by patient id; nothing here imports pandas."""
    ids = list(dict.fromkeys(patient_ids))
    omics = {}
    transform = preprocessor.omics
    for table, features in (transform.input_feature_names if transform else {}).items():
        frame = omic_frames[table]
        rows = frame[frame.index.isin(ids)].reindex(columns=features)
        omics[table] = ModalityBins.fit(features, rows.to_numpy(dtype=np.float64, na_value=np.nan))
    clinical_bins = None
    if preprocessor.clinical is not None:
        covariates = list(preprocessor.clinical.covariates)
        categorical_names = set(preprocessor.clinical.config.categorical)
        rows = clinical[clinical.index.isin(ids)].reindex(columns=covariates)
        numeric = np.full((len(rows), len(covariates)), np.nan)
        categorical = {}
        for index, name in enumerate(covariates):
            column = rows[name].tolist()
            if name in categorical_names:
                categorical[index] = [None if _missing(v) else v for v in column]
            else:
                numeric[:, index] = [np.nan if _missing(v) else float(v) for v in column]
        clinical_bins = ModalityBins.fit(covariates, numeric, categorical)
    wsi_bins = None
    bags = [np.asarray(wsi_bags[pid]) for pid in ids if pid in wsi_bags and len(wsi_bags[pid])]
    if preprocessor.wsi_mean is not None and bags:
        means = np.stack([bag.astype(np.float64).mean(axis=0) for bag in bags])
        wsi_bins = ModalityBins.fit([f"f_{i}" for i in range(means.shape[1])], means)
    reference = InputReference(omics, clinical_bins, wsi_bins, Counter(), len(ids))
    tables = {table: set(omic_frames[table].index) for table in omics}
    for pid in ids:
        names = [table for table in omics if pid in tables[table]]
        if clinical_bins is not None and pid in clinical.index:
            row = clinical.loc[pid, clinical_bins.features]
            if any(not _missing(value) for value in row.tolist()):
                names.append(CLINICAL)
        if wsi_bins is not None and pid in wsi_bags and len(wsi_bags[pid]):
            names.append(WSI)
        reference.patterns["+".join(names) or "none"] += 1
    return reference


def _missing(value: object) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value))
