"""The tables the expectation suites run on, computed from a cohort with pandas and OpenSlide."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from healnet.data.barcodes import patient_prefix

FEATURE_COLUMNS = ["modality", "feature", "numeric", "n_patients", "fraction_missing", "n_non_finite", "std"]
SAMPLE_COLUMNS = ["patient_id", "modality", "n_non_finite", "fraction_missing", "in_clinical"]
SPLIT_EVENT_COLUMNS = [
    "split",
    "scheme",
    "repeat",
    "fold",
    "role",
    "patients",
    "events",
    "patients_without_clinical",
]
SLIDE_COLUMNS = [
    "patient_id",
    "slide_id",
    "path",
    "exists",
    "opens",
    "has_resolution",
    "mpp_x",
    "objective_power",
    "vendor",
    "error",
    "in_clinical",
]


def clinical_table(clinical: pd.DataFrame) -> pd.DataFrame:
    """The clinical table with patient_id as a column."""
    return clinical.rename_axis("patient_id").reset_index()


def _numeric_values(frame: pd.DataFrame) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Numeric column names, their float64 values, and the numeric flag of every column."""
    numeric = np.array([pd.api.types.is_numeric_dtype(frame[c]) for c in frame.columns], dtype=bool)
    columns = [str(c) for c, ok in zip(frame.columns, numeric, strict=True) if ok]
    values = frame.loc[:, numeric].to_numpy(dtype=np.float64, na_value=np.nan)
    return columns, values, numeric


def omics_feature_summary(omics: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """One row per (modality, feature): missing fraction, non-finite count and std of the finite values.

    A feature without any finite value has std 0 (it carries no information).
    """
    parts = []
    for modality, frame in omics.items():
        _, values, numeric = _numeric_values(frame)
        finite = np.where(np.isfinite(values), values, np.nan)
        n_rows = len(frame)
        all_missing = np.isnan(finite).all(axis=0) if n_rows else np.ones(values.shape[1], dtype=bool)
        std = np.zeros(values.shape[1])
        std[~all_missing] = np.nanstd(finite[:, ~all_missing], axis=0)
        summary = pd.DataFrame(
            {"modality": modality, "feature": [str(c) for c in frame.columns], "numeric": numeric}
        )
        summary["n_patients"] = n_rows
        summary["fraction_missing"] = np.nan
        summary["n_non_finite"] = 0
        summary["std"] = np.nan
        summary.loc[numeric, "fraction_missing"] = np.isnan(values).mean(axis=0) if n_rows else 1.0
        summary.loc[numeric, "n_non_finite"] = np.isinf(values).sum(axis=0)
        summary.loc[numeric, "std"] = std
        parts.append(summary)
    return _concat(parts, FEATURE_COLUMNS)


def omics_sample_summary(omics: Mapping[str, pd.DataFrame], clinical_ids: pd.Index) -> pd.DataFrame:
    """One row per (patient, modality): non-finite count, missing fraction, presence in the clinical table."""
    parts = []
    for modality, frame in omics.items():
        _, values, _ = _numeric_values(frame)
        parts.append(
            pd.DataFrame(
                {
                    "patient_id": frame.index.astype(str),
                    "modality": modality,
                    "n_non_finite": np.isinf(values).sum(axis=1),
                    "fraction_missing": np.isnan(values).mean(axis=1) if values.shape[1] else 1.0,
                    "in_clinical": frame.index.isin(clinical_ids),
                }
            )
        )
    return _concat(parts, SAMPLE_COLUMNS)


def probe_slide(path: Path) -> dict:
    """Whether the file exists and OpenSlide opens it, and its resolution (mpp, objective power).

    Checks that cannot run (nothing to open, nothing opened) are None rather than False.
    """
    import openslide

    probe: dict[str, Any] = {"exists": path.is_file(), "opens": None, "has_resolution": None, "mpp_x": None}
    probe.update(objective_power=None, vendor=None, error=None)
    if not probe["exists"]:
        probe["error"] = f"no such file: {path}"
        return probe
    try:
        with openslide.OpenSlide(str(path)) as slide:
            properties = dict(slide.properties)
    except (openslide.OpenSlideError, OSError) as error:
        probe.update(opens=False, error=f"OpenSlide cannot open {path.name}: {error}")
        return probe
    probe["mpp_x"] = _as_float(properties.get(openslide.PROPERTY_NAME_MPP_X))
    probe["objective_power"] = _as_float(properties.get(openslide.PROPERTY_NAME_OBJECTIVE_POWER))
    probe.update(opens=True, vendor=properties.get(openslide.PROPERTY_NAME_VENDOR))
    probe["has_resolution"] = probe["mpp_x"] is not None or probe["objective_power"] is not None
    return probe


def slide_summary(slides: pd.DataFrame, root: Path | None, clinical_ids: pd.Index) -> pd.DataFrame:
    """Probe every manifest row that names a file; rows without a path are listed with checks left None.

    Relative paths are relative to the cohort folder `root`.
    """
    rows = []
    for row in slides.itertuples(index=False):
        record = {"patient_id": row.patient_id, "slide_id": row.slide_id, "path": None}
        record.update(exists=None, opens=None, has_resolution=None, mpp_x=None)
        record.update(objective_power=None, vendor=None, error="no file in the manifest")
        if isinstance(row.path, str) and row.path:
            path = Path(row.path)
            if not path.is_absolute() and root is not None:
                path = Path(root) / path
            record["path"] = str(path)
            record.update(probe_slide(path))
        record["in_clinical"] = row.patient_id in clinical_ids
        rows.append(record)
    return pd.DataFrame(rows, columns=SLIDE_COLUMNS).astype(
        {
            "exists": object,
            "opens": object,
            "has_resolution": object,
            "mpp_x": float,
            "objective_power": float,
        }
    )


def accounting_table(
    meta: Mapping, name: str, quarantine: pd.DataFrame | None = None, kept_patients: pd.Index | None = None
) -> pd.DataFrame:
    """One row: rows in, kept and quarantined at ingestion, kept + quarantined, and the quarantined shares
    of rows and of patients (a patient counts as lost when none of its rows was kept; a quarantined row
    belongs to the patient part of its id, so several rows of one patient count once)."""
    counts = {key: _as_float(meta.get(key)) for key in ("rows_in", "rows_kept", "rows_quarantined")}
    accounted = None
    if counts["rows_kept"] is not None and counts["rows_quarantined"] is not None:
        accounted = counts["rows_kept"] + counts["rows_quarantined"]
    row_fraction = patient_fraction = 0.0
    if counts["rows_in"] and counts["rows_quarantined"] is not None:
        row_fraction = counts["rows_quarantined"] / counts["rows_in"]
    if quarantine is not None and kept_patients is not None:
        # a row counts for the patient its id names: a cBioPortal sample's patient, not the sample itself
        named = {patient_prefix(value) or value for value in quarantine["id"].dropna().astype(str)}
        lost = named - set(kept_patients.astype(str))
        seen = len(lost) + len(kept_patients)
        patient_fraction = len(lost) / seen if seen else 0.0
    row = {
        "cohort": name,
        **counts,
        "rows_accounted": accounted,
        "quarantined_row_fraction": row_fraction,
        "quarantined_patient_fraction": patient_fraction,
    }
    return pd.DataFrame([row]).astype(
        {"rows_in": float, "rows_kept": float, "rows_quarantined": float, "rows_accounted": float}
    )


def split_events(splits: pd.DataFrame, clinical: pd.DataFrame) -> pd.DataFrame:
    """One row per split a model is trained, tuned or tested on: every role of each holdout repeat and
    each K-fold fold's test patients, with its patients, events and patients without a clinical row."""
    checked = splits[(splits["scheme"] == "holdout") | (splits["role"] == "test")]
    known = checked["patient_id"].isin(clinical.index)
    # per patient, robust to the defects the clinical suite reports (repeated patients, no event column)
    died = (clinical.get("event", pd.Series(0, index=clinical.index)) == 1).groupby(level=0).any()
    events = checked["patient_id"].map(died).eq(True).astype("int64")
    keys = ["scheme", "repeat", "fold", "role"]
    table = (
        checked.assign(events=events, patients_without_clinical=~known)
        .groupby(keys, sort=True)
        .agg(
            patients=("patient_id", "size"),
            events=("events", "sum"),
            patients_without_clinical=("patients_without_clinical", "sum"),
        )
        .reset_index()
    )
    table.insert(
        0,
        "split",
        [
            f"{scheme} repeat {repeat}" + (f" fold {fold}" if scheme == "kfold" else "") + f" {role}"
            for scheme, repeat, fold, role in table[keys].itertuples(index=False)
        ],
    )
    return table[SPLIT_EVENT_COLUMNS].astype(
        {"patients": "int64", "events": "int64", "patients_without_clinical": "int64"}
    )


def _as_float(value: Any) -> float | None:
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


def _concat(parts: list[pd.DataFrame], columns: list[str]) -> pd.DataFrame:
    if not parts:
        return pd.DataFrame({c: pd.Series(dtype=object) for c in columns})
    return pd.concat(parts, ignore_index=True)[columns]
