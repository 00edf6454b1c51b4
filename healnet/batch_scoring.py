"""Batch scoring: a cohort's patients in shards, each shard answered by `Predictor` on a registered version
loaded as the service loads it (`healnet.registry.resolve`: the sha256-verified checkpoint), and the shards'
answers merged into one table with a summary.

The table has one row per patient: `patient_id`, `risk`, `survival` (the survival curve, one float per time
bin: a parquet list), `modalities_used` (a list of names) and `model_version`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from healnet.errors import HEALNetError

SCORE_COLUMNS = ("patient_id", "risk", "survival", "modalities_used", "model_version")
RISK_QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


class BatchScoringError(HEALNetError, ValueError):
    """A shard count, cohort or set of shard tables that batch scoring cannot work with."""


def resolve_version(model_version: str) -> tuple[str, list[str]]:
    """The registered version to score with (`model_version`, or the champion when empty), its checkpoint's
    sha256 verified, and the input kinds it reads (omic, clinical, wsi: what validation checks a cohort
    has). An unknown version or no champion is a RegistryError."""
    from healnet.checkpoint import read_manifest
    from healnet.data.modalities import input_kinds
    from healnet.registry import resolve

    tag, checkpoint = resolve(model_version or None)
    return tag, input_kinds([modality["name"] for modality in read_manifest(checkpoint)["modalities"]])


def shard_patient_ids(patient_ids: Sequence[str], shards: int) -> list[list[str]]:
    """The patients in `shards` contiguous blocks of near-equal size, in their order; fewer blocks when
    there are fewer patients than shards, so that no shard is empty."""
    if shards < 1:
        raise BatchScoringError(f"shards must be at least 1, got {shards}")
    if not patient_ids:
        raise BatchScoringError("the cohort has no patients to score")
    blocks = np.array_split(np.asarray(patient_ids, dtype=object), min(shards, len(patient_ids)))
    return [[str(patient) for patient in block] for block in blocks]


def score_patients(
    cohort_dir: Path, patient_ids: Sequence[str], model_version: str, features_dir: Path
) -> tuple[pd.DataFrame, list[float | None]]:
    """The answers of registered version `model_version` for these patients of the cohort (each patient as
    the case a client sends, with its slides' patch features from `features_dir` when the model reads
    slides), and the model's time-bin edges in months (None: open-ended)."""
    from healnet.data.cohort import Cohort
    from healnet.inference import Predictor
    from healnet.preprocess.state import WSI
    from healnet.registry import resolve
    from healnet.scoring import CohortPatients

    tag, checkpoint = resolve(model_version)
    predictor = Predictor.from_dir(checkpoint)
    features = features_dir if WSI in predictor.modalities else None
    patients = CohortPatients.load(Cohort.load(cohort_dir), patient_ids, features)
    predictions = patients.predict(predictor)
    frame = pd.DataFrame(
        {
            "patient_id": patients.patient_ids,
            "risk": [prediction.risk for prediction in predictions],
            "survival": [prediction.survival for prediction in predictions],
            "modalities_used": [prediction.modalities_used for prediction in predictions],
            "model_version": tag,
        }
    )
    return frame, predictions[0].bin_edges_months if predictions else []


def merge_shard_scores(shards: Sequence[pd.DataFrame]) -> pd.DataFrame:
    """The shards' tables as one, in shard order; a patient in two shards, or shards scored by different
    versions, is an error."""
    scores = pd.concat(list(shards), ignore_index=True)
    twice = scores["patient_id"][scores["patient_id"].duplicated()].tolist()
    if twice:
        raise BatchScoringError(f"patients scored in more than one shard: {twice[:5]}")
    versions = sorted(scores["model_version"].unique())
    if len(versions) != 1:
        raise BatchScoringError(f"the shards were scored by different model versions: {versions}")
    return scores[list(SCORE_COLUMNS)]


def score_summary(scores: pd.DataFrame, shards: int, seconds: float) -> dict[str, float | str]:
    """Patients, shards, patients per second over `seconds` of scoring, the model version and the risk
    quantiles (risk_q05 ... risk_q95)."""
    quantiles = np.quantile(scores["risk"].to_numpy(np.float64), RISK_QUANTILES)
    return {
        "patients": len(scores),
        "shards": shards,
        "scoring_seconds": round(seconds, 3),
        "patients_per_second": round(len(scores) / seconds, 2) if seconds > 0 else float("nan"),
        "model_version": str(scores["model_version"].iloc[0]),
        **{
            f"risk_q{round(q * 100):02d}": float(value)
            for q, value in zip(RISK_QUANTILES, quantiles, strict=True)
        },
    }
