"""Preprocessing state fitted on the training split and shipped inside the checkpoint.

Training, evaluation and serving all turn raw omics and patch features into model inputs through
`Preprocessor`, so the three cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from healnet.preprocess.clinical import CLINICAL, ClinicalConfig, ClinicalTransform
from healnet.preprocess.encoders import EncoderProvenance, FeatureProvenance
from healnet.preprocess.omics import OmicsConfig, OmicsTokens, OmicsTransform

if TYPE_CHECKING:  # training passes DataFrames; serving must not import pandas (it imports pyarrow)
    import pandas as pd

OMIC = "omic"  # every omic table together, as a modality to train on
WSI = "wsi"


@dataclass
class Preprocessor:
    """Omics and clinical transforms plus a z-score of patch features, all fitted on training patients only."""

    omics: OmicsTransform | None
    wsi_mean: np.ndarray | None = None
    wsi_std: np.ndarray | None = None
    # the encoder and patch grid of the training features (None: no slides, or bags given in memory)
    wsi_encoder: EncoderProvenance | None = None
    tiling: dict = field(default_factory=dict)
    clinical: ClinicalTransform | None = None

    @classmethod
    def fit(
        cls,
        omic_frames: Mapping[str, pd.DataFrame],
        wsi_bags: Mapping[str, np.ndarray],
        train_ids: Sequence[str],
        omics_config: OmicsConfig | None,
        wsi_provenance: FeatureProvenance | None = None,
        clinical: pd.DataFrame | None = None,
        clinical_config: ClinicalConfig | None = None,
    ) -> Preprocessor:
        """Fit every transform on `train_ids` only. The clinical modality is fitted when both the clinical
        table and `clinical_config` are given."""
        train = set(train_ids)
        omics = None
        if omics_config is not None and omic_frames:
            train_frames = {name: frame[frame.index.isin(train)] for name, frame in omic_frames.items()}
            # the training patients' outcomes: `select="cox"` ranks omic features by them
            survival = clinical[clinical.index.isin(train)] if clinical is not None else None
            omics = OmicsTransform.fit(train_frames, omics_config, survival)
        clinical_transform = None
        if clinical is not None and clinical_config is not None:
            clinical_transform = ClinicalTransform.fit(clinical[clinical.index.isin(train)], clinical_config)
        wsi_mean = wsi_std = None
        train_bags = [bag for pid, bag in wsi_bags.items() if pid in train and len(bag)]
        if train_bags:
            stacked = np.concatenate(train_bags)
            wsi_mean = stacked.mean(0).astype(np.float32)
            wsi_std = np.maximum(stacked.std(0), 1e-6).astype(np.float32)
        encoder = wsi_provenance.encoder if wsi_provenance and train_bags else None
        tiling = wsi_provenance.tiling if wsi_provenance and train_bags else {}
        return cls(omics, wsi_mean, wsi_std, encoder, tiling, clinical_transform)

    @property
    def modalities(self) -> list[str]:
        names = list(self.omics.output_modalities) if self.omics else []
        names += [CLINICAL] if self.clinical else []
        return names + ([WSI] if self.wsi_mean is not None else [])

    @property
    def tabular_modalities(self) -> list[str]:
        """The modalities of one fixed-shape token tensor per patient: omics and clinical."""
        return [name for name in self.modalities if name != WSI]

    @property
    def wsi_dim(self) -> int:
        if self.wsi_mean is None:
            raise ValueError("this model was trained without slides")
        return len(self.wsi_mean)

    def tabular_token_size(self, modality: str) -> int:
        """Values per patient (tokens x channels) of an omic or the clinical modality."""
        if modality == CLINICAL and self.clinical:
            return self.clinical.n_features
        if self.omics is None:
            raise ValueError(f"modality {modality!r} is not one of this model's: it has no omics")
        n_tokens, channels = self.omics.token_shape(modality)
        return n_tokens * channels

    def tabular_tokens(
        self,
        frames: Mapping[str, pd.DataFrame],
        clinical: pd.DataFrame | None,
        patient_ids: Sequence[str],
    ) -> dict[str, OmicsTokens]:
        """Tokens of the omic modalities and, when the model has it, the clinical modality."""
        tokens = self.omics.transform(dict(frames), list(patient_ids)) if self.omics else {}
        if self.clinical:
            tokens[CLINICAL] = self.clinical.transform(clinical, list(patient_ids))
        return tokens

    def scale_wsi(self, bag: np.ndarray) -> np.ndarray:
        """Z-score one bag of patch features (n_patches, dim) with the training statistics."""
        bag = np.asarray(bag, dtype=np.float32)
        if bag.ndim != 2 or bag.shape[1] != self.wsi_dim:
            raise ValueError(f"patch features must have shape (n_patches, {self.wsi_dim}), got {bag.shape}")
        return (bag - self.wsi_mean) / self.wsi_std

    def state_dict(self) -> dict:
        return {
            "omics": self.omics.state_dict() if self.omics else None,
            "wsi_mean": None if self.wsi_mean is None else self.wsi_mean.tolist(),
            "wsi_std": None if self.wsi_std is None else self.wsi_std.tolist(),
            "wsi_encoder": self.wsi_encoder.to_dict() if self.wsi_encoder else None,
            "tiling": self.tiling,
            "clinical": self.clinical.state_dict() if self.clinical else None,
        }

    @classmethod
    def from_state_dict(cls, state: dict) -> Preprocessor:
        def array(key: str) -> np.ndarray | None:
            return None if state[key] is None else np.asarray(state[key], dtype=np.float32)

        omics = OmicsTransform.from_state_dict(state["omics"]) if state["omics"] else None
        # states written before the clinical modality have no "clinical" key
        clinical = ClinicalTransform.from_state_dict(state["clinical"]) if state.get("clinical") else None
        # before 0.3 this was always the string "stats", whatever encoder made the features: not evidence
        encoder = state.get("wsi_encoder")
        provenance = EncoderProvenance.from_dict(encoder) if isinstance(encoder, dict) else None
        return cls(omics, array("wsi_mean"), array("wsi_std"), provenance, dict(state["tiling"]), clinical)
