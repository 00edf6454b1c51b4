"""A small HEALNet trained on random data and registered as champion: for tests, the load benchmark
and local smoke runs of `bentoml serve` without a real cohort (`python -m devtools.demo`)."""

from __future__ import annotations

import argparse
import base64
import io
import os
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from healnet.fitting import CohortData

OMIC_TABLES = ("mut", "cnv", "rnaseq")
DEMO_PATCH_SIZE = 224


@dataclass(frozen=True)
class DemoSpec:
    patients: int = 48
    features_per_table: int = 8
    wsi_dim: int = 31  # the width of the "stats" patch encoder, so that tile requests work too
    patches: tuple[int, int] = (4, 12)  # patches per bag, drawn uniformly in [low, high)
    epochs: int = 2
    # age and sex as a clinical modality with a linear path, in an ensemble of two (the tcga recipe's shape)
    clinical: bool = False
    model_options: tuple[tuple[str, int], ...] = (
        ("depth", 1),
        ("n_latents", 4),
        ("latent_dim", 16),
        ("cross_dim_head", 8),
        ("latent_heads", 2),
        ("latent_dim_head", 8),
    )
    seed: int = 0


def demo_feature_names(spec: DemoSpec) -> dict[str, list[str]]:
    """Feature names per omic table, unique across tables (GENE_table) as the combined grouping needs."""
    return {table: [f"G{i}_{table}" for i in range(spec.features_per_table)] for table in OMIC_TABLES}


def demo_cohort(spec: DemoSpec) -> CohortData:
    """Random clinical table, omic tables and patch bags for `spec.patients` TCGA-like patients."""
    from healnet.fitting import CohortData
    from healnet.preprocess.encoders import FeatureProvenance, StatsEncoder

    rng = np.random.default_rng(spec.seed)
    ids = [f"TCGA-{rng.integers(10, 99)}-{i:04d}" for i in range(spec.patients)]
    clinical = pd.DataFrame(
        {
            "survival_months": rng.uniform(1.0, 120.0, spec.patients),
            "event": rng.integers(0, 2, spec.patients),
            "age": rng.uniform(30.0, 90.0, spec.patients).round(),
            "is_female": rng.integers(0, 2, spec.patients),
        },
        index=pd.Index(ids, name="patient_id"),
    )
    omics = {
        table: pd.DataFrame(rng.normal(size=(spec.patients, len(names))), index=clinical.index, columns=names)
        for table, names in demo_feature_names(spec).items()
    }
    bags = {
        pid: rng.normal(size=(int(rng.integers(*spec.patches)), spec.wsi_dim)).astype(np.float32)
        for pid in ids
    }
    # the random bags stand in for the statistics encoder's features (same width), so tiles work too
    stats_like = spec.wsi_dim == StatsEncoder.dim
    provenance = FeatureProvenance(StatsEncoder.provenance, DEMO_PATCH_SIZE, 1.0) if stats_like else None
    return CohortData(clinical, omics, bags, provenance)


def train_demo_checkpoint(out_dir: Path, spec: DemoSpec = DemoSpec(), metadata: dict | None = None) -> Path:
    """Train on 75 % of the random patients, validate on the rest, save the checkpoint to `out_dir`."""
    from healnet.checkpoint import save_checkpoint
    from healnet.ensemble import HEALNetEnsemble
    from healnet.experiment import reference_risk_quantiles
    from healnet.preprocess.clinical import ClinicalConfig
    from healnet.recipes import DEMO, ModelOptions
    from healnet.train import TrainConfig

    data = demo_cohort(spec)
    ids = list(data.clinical.index)
    split = int(len(ids) * 0.75)
    chosen_options: dict[str, Any] = dict(spec.model_options)
    recipe = replace(
        DEMO,
        name="serving-demo",
        clinical=ClinicalConfig() if spec.clinical else None,
        model=ModelOptions(**chosen_options, linear_path=("clinical",) if spec.clinical else None),
        train=TrainConfig(epochs=spec.epochs, batch_size=16, seed=spec.seed, device="cpu"),
        members=2 if spec.clinical else 1,
    )
    modalities = ["omic", "clinical", "wsi"] if spec.clinical else ["omic", "wsi"]
    ensemble = HEALNetEnsemble.fit(data, ids[:split], ids[split:], recipe, modalities)
    quantiles = reference_risk_quantiles(ensemble.risk(data, ids[:split]))
    save_checkpoint(
        out_dir, ensemble.to_checkpoint({"reference_risk_quantiles": quantiles, **(metadata or {})})
    )
    return Path(out_dir)


def demo_payload(
    spec: DemoSpec = DemoSpec(),
    modalities: tuple[str, ...] = ("omic", "wsi"),
    patches: int = 8,
    seed: int = 0,
) -> dict:
    """A /predict body with every omic feature of the demo model and/or `patches` random patch features."""
    rng = np.random.default_rng(seed)
    payload: dict = {}
    if "omic" in modalities:
        payload["omics"] = {
            table: {name: round(float(rng.normal()), 4) for name in names}
            for table, names in demo_feature_names(spec).items()
        }
    if "wsi" in modalities:
        payload["wsi_features"] = rng.normal(size=(patches, spec.wsi_dim)).round(4).tolist()
    if "clinical" in modalities:
        payload["clinical"] = {"age": float(rng.integers(30, 90)), "is_female": int(rng.integers(0, 2))}
    return payload


def demo_tiles(count: int, size: int = 64, seed: int = 0, image_format: str = "PNG") -> list[str]:
    """Random RGB tiles as base64-encoded images, as /predict accepts them in wsi_tiles."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    tiles = []
    for _ in range(count):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(
            buffer, format=image_format
        )
        tiles.append(base64.b64encode(buffer.getvalue()).decode())
    return tiles


def register_demo_champion(spec: DemoSpec = DemoSpec()) -> str:
    """Train a demo model, register it in the current BentoML store and make it the champion; returns its tag."""
    from healnet.registry import register_model, set_champion

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = train_demo_checkpoint(Path(tmp) / "checkpoint", spec)
        tag = register_model(checkpoint, labels={"source": "devtools.demo"}, metadata={})
    set_champion(tag, "demo model trained on random data")
    return tag


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=DemoSpec.epochs)
    args = parser.parse_args()
    tag = register_demo_champion(DemoSpec(epochs=args.epochs))
    print(f"registered {tag} as champion in {os.environ.get('BENTOML_HOME', '~/bentoml')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
