"""One training run on a cohort: fit bins and preprocessing on the training patients, train, evaluate."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from healnet.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from healnet.data.dataset import SurvivalDataset, Targets, load_wsi_bags
from healnet.model import HEALNet, HEALNetConfig, ModalitySpec
from healnet.preprocess.omics import OmicsConfig, OmicsTransform
from healnet.preprocess.state import WSI, Preprocessor
from healnet.survival import SurvivalBins, survival_from_logits, survival_metrics
from healnet.train import TrainConfig, TrainResult, fit, make_loader, predict_logits, select_device

OMIC = "omic"
# omic modalities of several tokens (features or groups) get Fourier features of the token index, so that
# every token says which features it holds; a one-value token would otherwise be erased by the LayerNorm
OMIC_POSITION_BANDS = 6


@dataclass
class CohortData:
    """Everything training needs, in memory: clinical targets, omic frames and patch bags."""

    clinical: pd.DataFrame
    omics: dict[str, pd.DataFrame]
    wsi_bags: dict[str, np.ndarray]

    @classmethod
    def from_cohort(cls, cohort, features_dir: Path | None = None) -> CohortData:
        bags = {}
        if features_dir is not None:
            bags = load_wsi_bags(cohort, features_dir)
        return cls(cohort.clinical, dict(cohort.omics), bags)

    def available_modalities(self) -> list[str]:
        """Input kinds present: "omic" (every omic table together) and "wsi"."""
        return ([OMIC] if self.omics else []) + ([WSI] if self.wsi_bags else [])

    def targets(self, patient_ids: Sequence[str], bins: SurvivalBins) -> Targets:
        rows = self.clinical.loc[list(patient_ids)]
        times = rows["survival_months"].to_numpy(np.float32)
        return Targets(times, rows["event"].to_numpy(np.float32), bins.assign(times))


@dataclass
class TrainedModel:
    model: HEALNet
    bins: SurvivalBins
    preprocessor: Preprocessor
    modalities: list[str]
    result: TrainResult | None = None
    metadata: dict = field(default_factory=dict)

    def dataset(
        self, data: CohortData, patient_ids: Sequence[str], max_patches: int | None = None, seed: int = 0
    ):
        return SurvivalDataset(
            patient_ids,
            self.preprocessor,
            data.omics,
            data.wsi_bags,
            data.targets(patient_ids, self.bins),
            self.modalities,
            max_patches,
            seed,
        )

    def predict(self, data: CohortData, patient_ids: Sequence[str], batch_size: int = 32) -> np.ndarray:
        """Logits for the given patients (all patches of each bag)."""
        device = next(self.model.parameters()).device
        loader = make_loader(self.dataset(data, patient_ids), batch_size, False, device)
        return predict_logits(self.model, loader, device)

    def evaluate(self, data: CohortData, patient_ids: Sequence[str], train_ids: Sequence[str]) -> dict:
        logits = torch.from_numpy(self.predict(data, patient_ids))
        survival = survival_from_logits(logits)[1]
        train = data.clinical.loc[list(train_ids)]
        test = data.clinical.loc[list(patient_ids)]
        return survival_metrics(
            train["survival_months"].to_numpy(),
            train["event"].to_numpy(),
            test["survival_months"].to_numpy(),
            test["event"].to_numpy(),
            survival.numpy(),
            self.bins,
        )

    def to_checkpoint(self, metadata: dict | None = None) -> Checkpoint:
        return Checkpoint(
            self.model.config,
            self.model.state_dict(),
            self.bins,
            self.preprocessor,
            {**self.metadata, **(metadata or {})},
        )

    @classmethod
    def from_checkpoint(cls, checkpoint: Checkpoint) -> TrainedModel:
        return cls(
            checkpoint.build_model(),
            checkpoint.bins,
            checkpoint.preprocessor,
            [spec.name for spec in checkpoint.model_config.modalities],
            metadata=checkpoint.metadata,
        )


def omic_spec(name: str, n_tokens: int, channels: int) -> ModalitySpec:
    if n_tokens == 1:
        return ModalitySpec(name, channels)
    return ModalitySpec(name, channels, num_freq_bands=OMIC_POSITION_BANDS, max_freq=float(max(n_tokens, 3)))


def model_config_for(
    preprocessor: Preprocessor, modalities: Sequence[str], n_bins: int, **options
) -> HEALNetConfig:
    specs = []
    for name in modalities:
        if name == WSI:
            specs.append(ModalitySpec(WSI, preprocessor.wsi_dim))
        else:
            specs.append(omic_spec(name, *preprocessor.omics.token_shape(name)))
    return HEALNetConfig(modalities=specs, n_bins=n_bins, **options)


def train_model(
    data: CohortData,
    train_ids: Sequence[str],
    val_ids: Sequence[str],
    modalities: Sequence[str] | None = None,
    omics_config: OmicsConfig = OmicsConfig(combine=True),
    model_options: dict | None = None,
    train_config: TrainConfig = TrainConfig(),
    n_bins: int = 4,
    progress: bool = True,
    omics_transform: OmicsTransform | None = None,
    bins: SurvivalBins | None = None,
) -> TrainedModel:
    """Fit bins and preprocessing on `train_ids` only, then train HEALNet with early stopping on `val_ids`.

    Given `bins` (fitted on training patients by the caller, e.g. shared by an ensemble) are used as they are.

    `modalities` picks the input kinds, "omic" and/or "wsi" (default: all the cohort has); how omic
    tables become model modalities (one combined, or one per table) is `omics_config.combine`.
    """
    available = data.available_modalities()
    requested = list(modalities or available)
    unknown = [m for m in requested if m not in available]
    if unknown or not requested:
        raise ValueError(f"modalities {requested} are not all in this cohort; available: {available}")
    if bins is None:
        train_clinical = data.clinical.loc[list(train_ids)]
        bins = SurvivalBins.fit(train_clinical["survival_months"], train_clinical["event"], n_bins)
    use_omics = OMIC in requested
    use_wsi = WSI in requested
    preprocessor = Preprocessor.fit(
        data.omics if use_omics else {},
        data.wsi_bags if use_wsi else {},
        train_ids,
        omics_config if use_omics else None,
        omics=omics_transform if use_omics else None,
    )
    model_modalities = preprocessor.modalities
    config = model_config_for(preprocessor, model_modalities, bins.n_bins, **(model_options or {}))
    torch.manual_seed(train_config.seed)
    trained = TrainedModel(HEALNet(config), bins, preprocessor, model_modalities)
    train_set = trained.dataset(data, train_ids, train_config.max_patches, train_config.seed)
    val_set = trained.dataset(data, val_ids)
    trained.result = fit(trained.model, train_set, val_set, train_config, bins=bins, progress=progress)
    trained.metadata = {"train_config": train_config.to_dict(), "omics_config": omics_config.__dict__}
    return trained


def run_training(
    cohort_dir: Path,
    out_dir: Path,
    features_dir: Path | None = None,
    modalities: Sequence[str] | None = None,
    split_repeat: int = 0,
    train_config: TrainConfig = TrainConfig(),
    model_options: dict | None = None,
    omics_config: OmicsConfig = OmicsConfig(combine=True),
    progress: bool = True,
    omics_transform: OmicsTransform | None = None,
) -> dict:
    """Train on the cohort's holdout split; write `checkpoint/` and `metrics.json` to `out_dir`."""
    from healnet.data.cohort import Cohort

    cohort = Cohort.load(cohort_dir)
    if features_dir is None and (Path(cohort_dir) / "features").is_dir():
        features_dir = Path(cohort_dir) / "features"
    data = CohortData.from_cohort(cohort, features_dir)
    ids = {role: cohort.patients("holdout", split_repeat, 0, role) for role in ("train", "val", "test")}
    trained = train_model(
        data,
        ids["train"],
        ids["val"],
        modalities,
        omics_config,
        model_options,
        train_config,
        progress=progress,
        omics_transform=omics_transform,
    )
    metrics = {
        "modalities": trained.modalities,
        "device": str(select_device(train_config.device)),
        "best_epoch": trained.result.best_epoch,
        "epochs_run": len(trained.result.history),
        "patients": {role: len(pids) for role, pids in ids.items()},
        "val": trained.evaluate(data, ids["val"], ids["train"]),
        "test": trained.evaluate(data, ids["test"], ids["train"]),
    }
    out_dir = Path(out_dir)
    checkpoint_dir = out_dir / "checkpoint"
    sha = save_checkpoint(
        checkpoint_dir,
        trained.to_checkpoint(
            {
                "cohort": str(cohort_dir),
                "cohort_name": cohort.meta.get("name"),
                "split_repeat": split_repeat,
                "metrics": {"val": metrics["val"], "test": metrics["test"]},
                "reference_risk_quantiles": reference_risk_quantiles(trained, data, ids["train"]),
            }
        ),
    )
    metrics["checkpoint"] = str(checkpoint_dir)
    metrics["sha256"] = sha
    (out_dir / "history.json").write_text(json.dumps(trained.result.history, indent=1))
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def reference_risk_quantiles(
    trained: TrainedModel, data: CohortData, train_ids: Sequence[str]
) -> dict[str, float]:
    """Risk quantiles on the training patients: the reference that serving exports for drift alerts."""
    risk = survival_from_logits(torch.from_numpy(trained.predict(data, train_ids)))[2].numpy()
    return {str(q): float(np.quantile(risk, q)) for q in (0.1, 0.25, 0.5, 0.75, 0.9)}


def load_trained(checkpoint_dir: Path) -> TrainedModel:
    return TrainedModel.from_checkpoint(load_checkpoint(checkpoint_dir))
