"""What a training run is built from: a cohort's data in memory, the preprocessing and bins fitted on the
fitting patients, and the seeded, untrained model with its datasets. `healnet.experiment` (one run on a
cohort) and `healnet.ensemble` (the members' training) both build on it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import numpy as np
import pandas as pd
import torch

from healnet.data.dataset import SurvivalDataset, Targets, load_wsi_bags
from healnet.data.modalities import ModalityError
from healnet.model import HEALNet, HEALNetConfig, ModalitySpec
from healnet.preprocess.clinical import CLINICAL, ClinicalConfig, ClinicalTransform
from healnet.preprocess.encoders import FeatureProvenance
from healnet.preprocess.omics import OmicsConfig, OmicsTransform
from healnet.preprocess.state import OMIC, WSI, Preprocessor
from healnet.recipes import ModelOptions
from healnet.survival import SurvivalBins, survival_from_logits
from healnet.survival_metrics import survival_metrics
from healnet.train import TrainConfig, TrainResult, make_loader, predict_logits

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
    preprocessor: Preprocessor, modalities: Sequence[str], n_bins: int, options: ModelOptions
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
    chosen = options.chosen()
    linear_path = linear_path_modalities(chosen.pop("linear_path", None), modalities)
    linear_blend = chosen.pop("linear_blend", 0.0)
    if linear_path:  # a run without any of those modalities has no linear path, and nothing to blend
        chosen["linear_path"] = linear_path
        chosen["linear_path_inputs"] = tuple(preprocessor.tabular_token_size(name) for name in linear_path)
        chosen["linear_blend"] = linear_blend
    return HEALNetConfig(modalities=specs, n_bins=n_bins, **chosen)


def linear_path_modalities(kinds: str | Sequence[str] | None, modalities: Sequence[str]) -> tuple[str, ...]:
    """The model modalities of the recipe's linear path, in the model's order: a kind names the clinical
    modality, or "omic" every omic table's modality; a kind the run lacks adds none."""
    wanted = {kinds} if isinstance(kinds, str) else set(kinds or ())
    return tuple(
        name for name in modalities if name in wanted or (OMIC in wanted and name not in (CLINICAL, WSI))
    )


def fitting_patients(train_ids: Sequence[str], val_ids: Sequence[str], members: int) -> list[str]:
    """The patients that bins and preprocessing are fitted on: a single model's training patients, or all
    of an ensemble's (each of its members early-stops on a part of them)."""
    return list(train_ids) if members == 1 else list(train_ids) + list(val_ids)


def fit_preprocessor(
    data: CohortData,
    train_ids: Sequence[str],
    modalities: Sequence[str] | None,
    omics_config: OmicsConfig,
    clinical_config: ClinicalConfig | None,
) -> Preprocessor:
    """The preprocessing of the requested input kinds, fitted on `train_ids` only.

    `modalities` picks the input kinds, "omic", "clinical" and/or "wsi" (default: all the cohort has; the
    clinical modality only with a `clinical_config`); how omic tables become model modalities (one
    combined, or one per table) is `omics_config.combine`.
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
        clinical=data.clinical,
        clinical_config=clinical_config if CLINICAL in requested else None,
    )


def build_training(
    data: CohortData,
    train_ids: Sequence[str],
    val_ids: Sequence[str],
    preprocessor: Preprocessor,
    bins: SurvivalBins,
    model_options: ModelOptions,
    train_config: TrainConfig,
) -> tuple[TrainedModel, SurvivalDataset, SurvivalDataset]:
    """The (seeded, untrained) model for a fitted preprocessor and bins, its training dataset and its
    early-stopping dataset on `val_ids`. `healnet.train.fit` or `healnet.ensemble.fit_members` trains them."""
    modalities = preprocessor.modalities
    config = model_config_for(preprocessor, modalities, bins.n_bins, model_options)
    torch.manual_seed(train_config.seed)
    trained = TrainedModel(HEALNet(config), bins, preprocessor, modalities)
    train_set = trained.dataset(data, train_ids, train_config.max_patches, train_config.seed)
    val_set = trained.dataset(data, val_ids)
    trained.metadata = {"train_config": train_config.to_dict()}
    return trained, train_set, val_set
