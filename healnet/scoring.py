"""A checkpoint's predictions for a cohort's patients through the serving path.

Each patient becomes the `Case` a client of the service would send (omics by table, clinical covariates,
patch features; exactly the model's features), and `Predictor`, the code that serves, answers them on the
checkpoint folder as the registry holds it. Evaluation and the promotion gate score models this way, so that a
model is judged by the numbers it will serve.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import cast

import numpy as np
import pandas as pd

from healnet.errors import HEALNetError
from healnet.fitting import PREDICT_BATCH, CohortData
from healnet.inference import Case, Prediction, Predictor
from healnet.preprocess.clinical import CLINICAL, ClinicalTransform
from healnet.preprocess.omics import OmicsTransform
from healnet.preprocess.state import WSI

PREDICTION_COLUMNS = ("patient_id", "survival_months", "event", "risk")


class PredictionsFileError(HEALNetError, ValueError):
    """A predictions table that is not one written by `ScoredPatients.to_parquet`."""


@dataclass(frozen=True, eq=False)
class ScoredPatients:
    """Patients' outcomes and one model's risk for each (−Σ of its survival curve; higher: earlier death)."""

    patient_ids: list[str]
    times: np.ndarray
    events: np.ndarray
    risk: np.ndarray

    @property
    def event_count(self) -> int:
        return int(np.sum(self.events))

    def to_parquet(self, path: Path) -> Path:
        frame = pd.DataFrame(
            {
                "patient_id": self.patient_ids,
                "survival_months": self.times,
                "event": self.events.astype(int),
                "risk": self.risk,
            }
        )
        frame.to_parquet(path, index=False)
        return Path(path)

    @classmethod
    def read_parquet(cls, path: Path) -> ScoredPatients:
        frame = pd.read_parquet(path)
        missing = [column for column in PREDICTION_COLUMNS if column not in frame.columns]
        if missing:
            raise PredictionsFileError(f"{path} is not a predictions table: it lacks the columns {missing}")
        return cls(
            frame["patient_id"].astype(str).tolist(),
            frame["survival_months"].to_numpy(np.float64),
            frame["event"].to_numpy(np.int64),
            frame["risk"].to_numpy(np.float64),
        )


@dataclass
class CohortPatients:
    """Some patients of a cohort with everything their cases need, loaded once."""

    data: CohortData
    patient_ids: list[str]

    @classmethod
    def load(cls, cohort, patient_ids: Sequence[str], features_dir: Path | None = None) -> CohortPatients:
        """The patients' tables, and their slides' patch features from `features_dir` (None: no slides).
        Only these patients' feature files are read."""
        ids = list(patient_ids)
        own_slides = replace(cohort, slides=cohort.slides[cohort.slides["patient_id"].isin(ids)])
        return cls(CohortData.from_cohort(own_slides, features_dir), ids)

    @property
    def times(self) -> np.ndarray:
        return self.data.clinical.loc[self.patient_ids, "survival_months"].to_numpy(np.float64)

    @property
    def events(self) -> np.ndarray:
        return self.data.clinical.loc[self.patient_ids, "event"].to_numpy(np.int64)

    def cases(self, predictor: Predictor) -> list[Case]:
        """Each patient's case with exactly the model's inputs: its omic features by table (None where the
        patient's row lacks a value; a table without the patient's row is left out), its clinical covariates
        and its patch features. Missing values are what serving imputes."""
        omics: list[dict[str, dict[str, float | None]]] = [{} for _ in self.patient_ids]
        if predictor.omic_modalities:
            transform = cast(OmicsTransform, predictor.preprocessor.omics)
            for table, state in transform.state_dict()["modalities"].items():
                frame = self.data.omics.get(table)
                if frame is None:
                    continue
                rows = frame.reindex(index=self.patient_ids, columns=state["features"])
                values = rows.to_numpy(np.float64)
                has_row = np.isin(self.patient_ids, frame.index)
                for tables, row, present in zip(omics, values, has_row, strict=True):
                    if present:
                        tables[table] = {
                            feature: None if np.isnan(value) else float(value)
                            for feature, value in zip(state["features"], row, strict=True)
                        }
        clinical: list[dict[str, float | str | None]] = [{} for _ in self.patient_ids]
        if CLINICAL in predictor.modalities:
            transform_clinical = cast(ClinicalTransform, predictor.preprocessor.clinical)
            categorical = set(transform_clinical.config.categorical)
            rows = self.data.clinical.reindex(index=self.patient_ids, columns=transform_clinical.covariates)
            for covariates, (_, row) in zip(clinical, rows.iterrows(), strict=True):
                for covariate, value in row.items():
                    # the service's request schema: text for categorical covariates, numbers for the others
                    covariates[str(covariate)] = (
                        None if pd.isna(value) else str(value) if covariate in categorical else float(value)
                    )
        bags = self.data.wsi_bags if WSI in predictor.modalities else {}
        return [
            Case(omics=omic_tables, clinical=covariates, wsi_features=bags.get(patient_id))
            for patient_id, omic_tables, covariates in zip(self.patient_ids, omics, clinical, strict=True)
        ]

    def predict(self, predictor: Predictor, batch_size: int = PREDICT_BATCH) -> list[Prediction]:
        """The model's answer for every patient, `batch_size` cases per model pass."""
        cases = self.cases(predictor)
        return [
            prediction
            for start in range(0, len(cases), batch_size)
            for prediction in predictor.predict(cases[start : start + batch_size])
        ]

    def scored(self, survival: np.ndarray) -> ScoredPatients:
        """The patients with the risk −Σ S of their survival curves (n_patients, n_bins)."""
        return ScoredPatients(self.patient_ids, self.times, self.events, -np.asarray(survival).sum(axis=1))

    def score(self, predictor: Predictor) -> ScoredPatients:
        return self.scored(survival_matrix(self.predict(predictor)))


def test_patients_loader(
    cohort_dir: str | Path, scored: ScoredPatients, modalities: Sequence[str], features_dir: str | Path
) -> Callable[[], CohortPatients]:
    """A function that loads the scored patients of the cohort for a model of `modalities`, with their
    slide features from `features_dir` when the model reads slides: the gate calls it only for a champion
    it can compare, so that nothing is read for one it cannot."""
    from healnet.data.cohort import Cohort

    def load() -> CohortPatients:
        features = Path(features_dir) if WSI in modalities else None
        return CohortPatients.load(Cohort.load(Path(cohort_dir)), scored.patient_ids, features)

    return load


def survival_matrix(predictions: Sequence[Prediction]) -> np.ndarray:
    """(n_patients, n_bins) survival of each prediction, float64."""
    return np.array([prediction.survival for prediction in predictions], dtype=np.float64)


def copy_patient_features(cohort, patient_ids: Sequence[str], features_dir: Path, out_dir: Path) -> int:
    """Copy the feature files of these patients' slides from `features_dir` into `out_dir`, with the
    quarantine entries of their slides that have none, so that `out_dir` is a feature folder for these
    patients alone: what a later step needs to score them again, a fraction of the cohort's features.
    Returns how many feature files were copied."""
    from healnet.preprocess.feature_files import (
        QUARANTINE_FILE,
        feature_file_name,
        read_quarantine,
        resolve_feature_dir,
        write_quarantine,
    )

    source = resolve_feature_dir(Path(features_dir))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    slides = cohort.slides.loc[cohort.slides["patient_id"].isin(list(patient_ids)), "slide_id"]
    names = {feature_file_name(slide_id) for slide_id in slides}
    copied = 0
    for name in sorted(names):
        if (source / name).is_file():
            shutil.copyfile(source / name, out_dir / name)
            copied += 1
    quarantined = [
        (slide, reason)
        for slide, reason in read_quarantine(source).items()
        if feature_file_name(slide) in names and not (source / feature_file_name(slide)).is_file()
    ]
    write_quarantine(out_dir / QUARANTINE_FILE, sorted(quarantined))
    return copied
