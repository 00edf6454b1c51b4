"""Preprocessing state fitted on the training split and shipped inside the checkpoint.

Training, evaluation and serving all turn raw omics and patch features into model inputs through
`Preprocessor`, so the three cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from healnet.preprocess.omics import OmicsConfig, OmicsTokens, OmicsTransform

WSI = "wsi"


@dataclass
class Preprocessor:
    """Omics transform plus a z-score of patch features, both fitted on training patients only."""

    omics: OmicsTransform | None
    wsi_mean: np.ndarray | None = None
    wsi_std: np.ndarray | None = None
    wsi_encoder: str = "stats"
    tiling: dict = field(default_factory=dict)

    @classmethod
    def fit(
        cls,
        omic_frames: Mapping[str, pd.DataFrame],
        wsi_bags: Mapping[str, np.ndarray],
        train_ids: Sequence[str],
        omics_config: OmicsConfig | None,
        wsi_encoder: str = "stats",
        tiling: dict | None = None,
        omics: OmicsTransform | None = None,
    ) -> Preprocessor:
        """Fit on `train_ids`; a given `omics` transform (already fitted on them) is used as is."""
        train = set(train_ids)
        if omics is None and omics_config is not None and omic_frames:
            train_frames = {name: frame[frame.index.isin(train)] for name, frame in omic_frames.items()}
            omics = OmicsTransform.fit(train_frames, omics_config)
        wsi_mean = wsi_std = None
        train_bags = [bag for pid, bag in wsi_bags.items() if pid in train and len(bag)]
        if train_bags:
            stacked = np.concatenate(train_bags)
            wsi_mean = stacked.mean(0).astype(np.float32)
            wsi_std = np.maximum(stacked.std(0), 1e-6).astype(np.float32)
        return cls(omics, wsi_mean, wsi_std, wsi_encoder, dict(tiling or {}))

    @property
    def modalities(self) -> list[str]:
        names = list(self.omics.output_modalities) if self.omics else []
        return names + ([WSI] if self.wsi_mean is not None else [])

    @property
    def wsi_dim(self) -> int:
        if self.wsi_mean is None:
            raise ValueError("this model was trained without slides")
        return len(self.wsi_mean)

    def omic_tokens(
        self, frames: Mapping[str, pd.DataFrame], patient_ids: Sequence[str]
    ) -> dict[str, OmicsTokens]:
        return self.omics.transform(dict(frames), list(patient_ids)) if self.omics else {}

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
            "wsi_encoder": self.wsi_encoder,
            "tiling": self.tiling,
        }

    @classmethod
    def from_state_dict(cls, state: dict) -> Preprocessor:
        def array(key: str) -> np.ndarray | None:
            return None if state[key] is None else np.asarray(state[key], dtype=np.float32)

        omics = OmicsTransform.from_state_dict(state["omics"]) if state["omics"] else None
        return cls(omics, array("wsi_mean"), array("wsi_std"), state["wsi_encoder"], dict(state["tiling"]))
