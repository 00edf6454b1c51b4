"""Synthetic TCGA-shaped demo cohort with a known survival signal in both omics and slides.

Each patient has two independent latent risk factors: one carried by a handful of omic features,
one by the tumour fraction of its slide texture. The true log-hazard is their sum, so a model that
sees both modalities can beat either alone.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

OMIC_SIZES = {"mut": 300, "cnv": 400, "rnaseq": 1500}
SIGNAL_FEATURES = {"mut": 6, "cnv": 10, "rnaseq": 24}
TABLE_NAME = "table.csv.gz"


@dataclass(frozen=True)
class SynthConfig:
    patients: int = 400
    seed: int = 0
    missing_slide_fraction: float = 0.1
    missing_omics_fraction: float = 0.1
    second_slide_fraction: float = 0.1
    omic_effect: float = 1.2
    wsi_effect: float = 1.2
    median_survival_months: float = 30.0
    slide_px: int = 1536

    def __post_init__(self) -> None:
        if self.patients < 20:
            raise ValueError(f"patients must be at least 20 for train/val/test splits, got {self.patients}")
        for name in ("missing_slide_fraction", "missing_omics_fraction", "second_slide_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value}")
        if self.missing_slide_fraction + self.missing_omics_fraction >= 1.0:
            raise ValueError("missing_slide_fraction + missing_omics_fraction must stay below 1")


def _barcodes(rng: np.random.Generator, n: int) -> list[str]:
    alphabet = np.array(list(string.ascii_uppercase + string.digits))
    seen: set[str] = set()
    while len(seen) < n:
        tss = "".join(rng.choice(alphabet, 2))
        participant = "".join(rng.choice(alphabet, 4))
        seen.add(f"TCGA-{tss}-{participant}")
    return sorted(seen)


def _gene_names(rng: np.random.Generator, n: int) -> list[str]:
    names = {
        f"G{''.join(rng.choice(list(string.ascii_uppercase), 3))}{rng.integers(1, 99)}" for _ in range(n * 2)
    }
    return sorted(names)[:n]


def _omics(rng: np.random.Generator, z: np.ndarray, genes: list[str], observed: np.ndarray) -> pd.DataFrame:
    """Omic features; the first SIGNAL_FEATURES of each modality follow the latent factor `z`.

    Rows outside `observed` are NaN (patients without omics).
    """
    n = len(z)
    blocks = {}
    offset = 0
    for modality, size in OMIC_SIZES.items():
        names = [f"{gene}_{modality}" for gene in genes[offset : offset + size]]
        offset += size
        k = SIGNAL_FEATURES[modality]
        signs = rng.choice([-1.0, 1.0], k)
        if modality == "rnaseq":
            values = rng.normal(size=(n, size))
            values[:, :k] = 0.8 * signs * z[:, None] + 0.6 * rng.normal(size=(n, k))
            values = np.round(values, 4)
        elif modality == "cnv":
            latent = rng.normal(size=(n, size))
            latent[:, :k] = 0.9 * signs * z[:, None] + 0.5 * rng.normal(size=(n, k))
            values = np.clip(np.round(latent * 0.9), -2, 2)
        else:
            logits = np.full((n, size), -3.0)
            logits[:, :k] = -1.0 + 1.5 * signs * z[:, None]
            values = (rng.random((n, size)) < 1.0 / (1.0 + np.exp(-logits))).astype(float)
            # Real mutation columns are never constant: every gene is mutated in some patient, not all.
            seen = values[observed]
            for column in np.flatnonzero(seen.min(0) == seen.max(0)):
                values[rng.choice(np.flatnonzero(observed), 2, replace=False), column] = 1.0 - seen[0, column]
        values[~observed] = np.nan
        blocks.update(dict(zip(names, values.T, strict=True)))
    return pd.DataFrame(blocks)


def _survival(
    rng: np.random.Generator, log_hazard: np.ndarray, median: float
) -> tuple[np.ndarray, np.ndarray]:
    """Exponential event times with uniform censoring; returns (months, censorship)."""
    scale = median / np.log(2.0)
    event_time = rng.exponential(scale * np.exp(-log_hazard))
    censor_time = rng.uniform(0.3 * median, 4.0 * median, size=len(log_hazard))
    months = np.maximum(np.minimum(event_time, censor_time), 0.1)
    censorship = (censor_time < event_time).astype(int)
    return np.round(months, 2), censorship


def synthesize_cohort(out_dir: Path, config: SynthConfig = SynthConfig(), progress: bool = True):
    """Write `table.csv.gz` (PORPOISE format), `slides/*.tiff` and the canonical cohort layout."""
    from healnet.data.cohort import ingest
    from healnet.data.synth_slides import write_synthetic_slide

    out_dir = Path(out_dir)
    slide_dir = out_dir / "slides"
    slide_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(config.seed)
    n = config.patients

    patients = _barcodes(rng, n)
    z_omic, z_wsi = rng.normal(size=n), rng.normal(size=n)
    log_hazard = config.omic_effect * z_omic + config.wsi_effect * z_wsi
    months, censorship = _survival(rng, log_hazard, config.median_survival_months)
    availability = rng.random(n)
    no_slide = availability < config.missing_slide_fraction
    no_omics = (availability >= config.missing_slide_fraction) & (
        availability < config.missing_slide_fraction + config.missing_omics_fraction
    )
    omics = _omics(rng, z_omic, _gene_names(rng, sum(OMIC_SIZES.values())), ~no_omics)
    tumour_fraction = 1.0 / (1.0 + np.exp(-1.5 * z_wsi))
    n_slides = np.where(rng.random(n) < config.second_slide_fraction, 2, 1)

    rows = []
    for i, patient in enumerate(tqdm(patients, desc="synth slides", disable=not progress)):
        for number in range(1, n_slides[i] + 1):
            uid = "".join(rng.choice(list("0123456789ABCDEF"), 8))
            slide_id = f"{patient}-01Z-00-DX{number}.{uid}.tiff"
            if not no_slide[i]:
                write_synthetic_slide(
                    slide_dir / slide_id,
                    float(tumour_fraction[i]),
                    seed=config.seed * 100_003 + i * 7 + number,
                    size_px=config.slide_px,
                )
            rows.append(
                {
                    "case_id": patient,
                    "slide_id": slide_id,
                    "age": int(rng.integers(35, 90)),
                    "site": patient[5:7],
                    "survival_months": months[i],
                    "censorship": censorship[i],
                    "is_female": int(rng.random() < 0.3),
                    "oncotree_code": "SYNTH",
                    "train": 1.0,
                    "_row": i,
                }
            )
    clinical = pd.DataFrame(rows)
    per_patient = ["age", "is_female"]
    clinical[per_patient] = clinical.groupby("case_id")[per_patient].transform("first")
    table = pd.concat(
        [clinical.drop(columns="_row"), omics.iloc[clinical["_row"]].reset_index(drop=True)], axis=1
    )
    table.to_csv(out_dir / TABLE_NAME, compression={"method": "gzip", "mtime": 0})
    truth = pd.DataFrame(
        {"patient_id": patients, "z_omic": z_omic, "z_wsi": z_wsi, "tumour_fraction": tumour_fraction}
    )
    truth.to_csv(out_dir / "truth.csv", index=False)
    return ingest(
        out_dir / TABLE_NAME,
        out_dir,
        name=f"synthetic-seed{config.seed}",
        seed=config.seed,
        slide_dir=slide_dir,
    )
