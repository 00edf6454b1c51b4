"""One training run on a cohort: fit bins and preprocessing on the training patients, train, evaluate."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist

from healnet.checkpoint import load_checkpoint, save_checkpoint
from healnet.data.dataset import SurvivalDataset, Targets, load_wsi_bags, require_slide_features
from healnet.data.modalities import ModalityError
from healnet.device import select_device
from healnet.model import HEALNet, HEALNetConfig, ModalitySpec
from healnet.preprocess.clinical import CLINICAL, ClinicalConfig, ClinicalTransform
from healnet.preprocess.encoders import FeatureProvenance
from healnet.preprocess.omics import OmicsConfig, OmicsTransform
from healnet.preprocess.state import OMIC, WSI, Preprocessor
from healnet.recipes import DEMO, Recipe
from healnet.survival import SurvivalBins, survival_from_logits
from healnet.survival_metrics import survival_metrics
from healnet.train import (
    DistributedTrainingError,
    TrainConfig,
    TrainResult,
    fit,
    join_process_group,
    make_loader,
    predict_logits,
    process_rank,
)

# omic modalities of several tokens (features or groups) get Fourier features of the token index, so that
# every token says which features it holds; a one-value token would otherwise be erased by the LayerNorm
OMIC_POSITION_BANDS = 6
PREDICT_BATCH = 32  # patients per forward pass when predicting


@dataclass
class CohortData:
    """Everything training needs, in memory: clinical targets, omic frames and patch bags."""

    clinical: pd.DataFrame
    omics: dict[str, pd.DataFrame]
    wsi_bags: dict[str, np.ndarray]
    wsi_provenance: FeatureProvenance | None = None  # the encoder and patch grid of the bags' files
    # slide id -> reason: slides the feature folder quarantined, left out of their patients' bags
    quarantined_slides: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_cohort(
        cls, cohort, features_dir: Path | None = None, require_features: bool = False
    ) -> CohortData:
        """`require_features`: no features loading from `features_dir` is a `SlideFeaturesError`."""
        if features_dir is None:
            return cls(cohort.clinical, dict(cohort.omics), {})
        slides = load_wsi_bags(cohort, features_dir, required=require_features)
        return cls(cohort.clinical, dict(cohort.omics), slides.bags, slides.provenance, slides.quarantined)

    def quarantine_summary(self) -> dict:
        """How many of the cohort's slides were quarantined, and which (sorted): for metrics and reports."""
        return {"count": len(self.quarantined_slides), "slides": sorted(self.quarantined_slides)}

    def available_modalities(self) -> list[str]:
        """Input kinds present: "omic" (every omic table together), "clinical" and "wsi"."""
        clinical = [CLINICAL] if ClinicalConfig().observed_covariates(self.clinical) else []
        return ([OMIC] if self.omics else []) + clinical + ([WSI] if self.wsi_bags else [])

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

    @property
    def training(self) -> TrainResult:
        """How the model trained; a model loaded from a checkpoint has no record of it."""
        if self.result is None:
            raise ValueError("this model was loaded, not trained here: it has no training record")
        return self.result

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
            clinical=data.clinical,
        )

    def predict(
        self, data: CohortData, patient_ids: Sequence[str], batch_size: int = PREDICT_BATCH
    ) -> np.ndarray:
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
        elif name == CLINICAL:
            # one token per covariate, always with index features: a model may have a single covariate
            n_features = cast(ClinicalTransform, preprocessor.clinical).n_features
            specs.append(
                ModalitySpec(
                    CLINICAL, 1, num_freq_bands=OMIC_POSITION_BANDS, max_freq=float(max(n_features, 3))
                )
            )
        else:
            specs.append(omic_spec(name, *cast(OmicsTransform, preprocessor.omics).token_shape(name)))
    linear_path = options.pop("linear_path", None)
    if linear_path in modalities:  # a run without that modality has no linear path
        options["linear_path"] = linear_path
        options["linear_path_inputs"] = preprocessor.tabular_token_size(linear_path)
    return HEALNetConfig(modalities=specs, n_bins=n_bins, **options)


def fitting_patients(train_ids: Sequence[str], val_ids: Sequence[str], members: int) -> list[str]:
    """The patients that bins and preprocessing are fitted on: a single model's training patients, or all
    of an ensemble's (each of its members early-stops on a part of them)."""
    return list(train_ids) if members == 1 else list(train_ids) + list(val_ids)


def fit_preprocessor(
    data: CohortData,
    train_ids: Sequence[str],
    modalities: Sequence[str] | None = None,
    omics_config: OmicsConfig = OmicsConfig(combine=True),
    clinical_config: ClinicalConfig | None = ClinicalConfig(),
    omics_transform: OmicsTransform | None = None,
) -> Preprocessor:
    """The preprocessing of the requested input kinds, fitted on `train_ids` only.

    `modalities` picks the input kinds, "omic", "clinical" and/or "wsi" (default: all the cohort has; the
    clinical modality only with a `clinical_config`); how omic tables become model modalities (one
    combined, or one per table) is `omics_config.combine`. A given `omics_transform` (already fitted on
    `train_ids`) is used as it is.
    """
    available = data.available_modalities()
    requested = list(modalities or available)
    unknown = [m for m in requested if m not in available]
    if unknown or not requested:
        raise ModalityError(f"modalities {requested} are not all in this cohort; available: {available}")
    use_omics = OMIC in requested
    return Preprocessor.fit(
        data.omics if use_omics else {},
        data.wsi_bags if WSI in requested else {},
        train_ids,
        omics_config if use_omics else None,
        wsi_provenance=data.wsi_provenance if WSI in requested else None,
        omics=omics_transform if use_omics else None,
        clinical=data.clinical,
        clinical_config=clinical_config if CLINICAL in requested else None,
    )


def build_training(
    data: CohortData,
    train_ids: Sequence[str],
    val_ids: Sequence[str],
    preprocessor: Preprocessor,
    bins: SurvivalBins,
    model_options: dict | None = None,
    train_config: TrainConfig = TrainConfig(),
) -> tuple[TrainedModel, SurvivalDataset, SurvivalDataset]:
    """The (seeded, untrained) model for a fitted preprocessor and bins, its training dataset and its
    early-stopping dataset on `val_ids`. `healnet.train.fit` or `healnet.ensemble.fit_members` trains them."""
    modalities = preprocessor.modalities
    config = model_config_for(preprocessor, modalities, bins.n_bins, **(model_options or {}))
    torch.manual_seed(train_config.seed)
    trained = TrainedModel(HEALNet(config), bins, preprocessor, modalities)
    train_set = trained.dataset(data, train_ids, train_config.max_patches, train_config.seed)
    val_set = trained.dataset(data, val_ids)
    trained.metadata = {"train_config": train_config.to_dict()}
    return trained, train_set, val_set


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
    clinical_config: ClinicalConfig | None = ClinicalConfig(),
) -> TrainedModel:
    """One model: bins and preprocessing fitted on `train_ids`, early stopping on `val_ids`."""
    train_clinical = data.clinical.loc[list(train_ids)]
    bins = SurvivalBins.fit(train_clinical["survival_months"], train_clinical["event"], n_bins)
    preprocessor = fit_preprocessor(data, train_ids, modalities, omics_config, clinical_config)
    trained, train_set, val_set = build_training(
        data, train_ids, val_ids, preprocessor, bins, model_options, train_config
    )
    trained.result = fit(trained.model, train_set, val_set, train_config, bins=bins, progress=progress)
    return trained


def run_training(
    cohort_dir: Path,
    out_dir: Path,
    recipe: Recipe = DEMO,
    features_dir: Path | None = None,
    modalities: Sequence[str] | None = None,
    split_repeat: int = 0,
    progress: bool = True,
    omics_transform: OmicsTransform | None = None,
    require_features: bool = False,
) -> dict:
    """Train `recipe` on the cohort's holdout split; write `checkpoint/` and `metrics.json` to `out_dir`.

    Started by torchrun (WORLD_SIZE > 1), a single-model recipe trains data-parallel, one process per GPU
    (or CPU process on gloo), and the first process writes the outputs; an ensemble recipe is refused there.

    With one member, the model trains on the split's training patients and early-stops on its validation
    ones; an ensemble uses both (see `HEALNetEnsemble`). The test patients are only evaluated. Without
    explicit `modalities`, a cohort that lists slides but has no slide features is refused
    (`SlideFeaturesError`) rather than trained on omics alone; `require_features`: an explicit
    `features_dir` from which no features load is refused too. Slides that the feature folder quarantined
    are a missing modality for their patients (see `load_wsi_bags`).

    Returns the metrics that `metrics.json` holds, among them `slides_quarantined`: {"count": n,
    "slides": [slide ids]}, the cohort's slides left out because they were quarantined.
    """
    from healnet.data.cohort import Cohort

    joined = join_process_group()
    try:
        return _train_and_save(
            Cohort.load(cohort_dir),
            Path(cohort_dir),
            Path(out_dir),
            recipe,
            features_dir,
            modalities,
            split_repeat,
            progress,
            omics_transform,
            require_features,
        )
    finally:
        if joined:
            dist.destroy_process_group()


def _train_and_save(
    cohort,
    cohort_dir: Path,
    out_dir: Path,
    recipe: Recipe,
    features_dir: Path | None,
    modalities: Sequence[str] | None,
    split_repeat: int,
    progress: bool,
    omics_transform: OmicsTransform | None,
    require_features: bool,
) -> dict:
    from healnet.ensemble import HEALNetEnsemble

    rank, world_size = process_rank()
    if world_size > 1 and recipe.members > 1:
        raise DistributedTrainingError(
            f"recipe {recipe.name!r} trains {recipe.members} members as one batched model on one device; "
            "data-parallel training (torchrun) is for single-model recipes: run it as one process"
        )
    if features_dir is None and (Path(cohort_dir) / "features").is_dir():
        features_dir = Path(cohort_dir) / "features"
    data = CohortData.from_cohort(cohort, features_dir, require_features)
    if modalities is None:
        require_slide_features(cohort, data.wsi_bags, features_dir, data.quarantined_slides)
    ids = {role: cohort.patients("holdout", split_repeat, 0, role) for role in ("train", "val", "test")}
    ensemble = HEALNetEnsemble.fit(
        data,
        ids["train"],
        ids["val"],
        recipe,
        modalities,
        seed=recipe.train.seed,
        progress=progress,
        omics_transform=omics_transform,
    )
    fitted_on = fitting_patients(ids["train"], ids["val"], recipe.members)
    results = [member.training for member in ensemble.members]
    metrics = {
        "recipe": recipe.name,
        "members": len(ensemble.members),
        "modalities": ensemble.modalities,
        "device": str(select_device(recipe.train.device)),
        "best_epochs": [result.best_epoch for result in results],
        "epochs_run": max(len(result.history) for result in results),
        "patients": {role: len(pids) for role, pids in ids.items()},
        "slides_quarantined": data.quarantine_summary(),
        "val": ensemble.evaluate(data, ids["val"], fitted_on),
        "test": ensemble.evaluate(data, ids["test"], fitted_on),
    }
    if rank > 0:  # every process holds the same weights; the first one writes them
        return metrics
    checkpoint_dir = out_dir / "checkpoint"
    sha = save_checkpoint(
        checkpoint_dir,
        ensemble.to_checkpoint(
            {
                "cohort": str(cohort_dir),
                "cohort_name": cohort.meta.get("name"),
                "split_repeat": split_repeat,
                "recipe_settings": recipe.to_dict(),
                "metrics": {"val": metrics["val"], "test": metrics["test"]},
                "reference_risk_quantiles": reference_risk_quantiles(ensemble.risk(data, fitted_on)),
            }
        ),
    )
    metrics["checkpoint"] = str(checkpoint_dir)
    metrics["sha256"] = sha
    (out_dir / "history.json").write_text(json.dumps([result.history for result in results], indent=1))
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def reference_risk_quantiles(training_risk: np.ndarray) -> dict[str, float]:
    """Risk quantiles on the training patients: the reference that serving exports for drift alerts."""
    return {str(q): float(np.quantile(training_risk, q)) for q in (0.1, 0.25, 0.5, 0.75, 0.9)}


def load_trained(checkpoint_dir: Path):
    """The checkpoint's model as a `HEALNetEnsemble` (a single model is an ensemble of one)."""
    from healnet.ensemble import HEALNetEnsemble

    return HEALNetEnsemble.from_checkpoint(load_checkpoint(checkpoint_dir))
