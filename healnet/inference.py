"""Prediction for single cases with any subset of modalities, through the training preprocessing."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from healnet.checkpoint import Checkpoint, load_checkpoint
from healnet.data.dataset import collate_cases
from healnet.errors import HEALNetError
from healnet.preprocess.clinical import CLINICAL, ClinicalTransform
from healnet.preprocess.omics import OmicsTransform
from healnet.preprocess.state import WSI
from healnet.survival import survival_from_curve, survival_from_logits


class CaseError(HEALNetError, ValueError):
    """A case whose parts do not fit together (patch coordinates that are not one [x, y] per patch)."""


@dataclass
class Case:
    """One patient: omics by table and feature name, clinical covariates by name, and/or patch features.

    `wsi_coords` (optional): the level-0 [x, y] of each patch, in the order of `wsi_features`; the model
    does not use them, a prediction with attention returns them next to the patches' attention."""

    omics: Mapping[str, Mapping[str, float | None]] = field(default_factory=dict)  # None: missing
    wsi_features: np.ndarray | None = None
    clinical: Mapping[str, float | str | None] = field(default_factory=dict)
    wsi_coords: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.wsi_coords is None:
            return
        coords = np.asarray(self.wsi_coords)
        patches = 0 if self.wsi_features is None else len(self.wsi_features)
        if coords.shape != (patches, 2) or not np.issubdtype(coords.dtype, np.integer):
            raise CaseError(
                f"wsi_coords must be one integer [x, y] per patch ({patches} patches), got an array of "
                f"shape {coords.shape} and type {coords.dtype}"
            )
        self.wsi_coords = coords.astype(np.int64, copy=False)


@dataclass
class Prediction:
    risk: float
    survival: list[float]
    hazards: list[float]
    bin_edges_months: list[float | None]
    modalities_used: list[str]
    modalities_missing: list[str]
    imputed_features: int  # omic features of the present modalities that were missing and imputed
    imputed_fraction: float
    unknown_features: list[str]
    # clinical covariates given a plausible value outside the training patients' range
    out_of_training_range: list[str]
    # with return_attention: per modality, the attention of each token averaged over layers, heads and
    # latents (each layer's sums to 1 over the tokens) ...
    attention: dict[str, list[float]] | None = None
    # ... the same per layer (layers × tokens) ...
    attention_layers: dict[str, list[list[float]]] | None = None
    # ... and the case's wsi_coords, the [x, y] of each patch in the order of attention["wsi"]
    attention_coords: list[list[int]] | None = None


@dataclass
class PreparedBatch:
    """Model inputs of several cases, with what preprocessing found per case."""

    inputs: dict[str, torch.Tensor]
    present: dict[str, torch.Tensor]
    token_mask: dict[str, torch.Tensor]
    imputed_features: list[int]
    imputed_fraction: list[float]
    unknown_features: list[list[str]]
    out_of_training_range: list[list[str]]
    wsi_coords: list[np.ndarray | None] = field(default_factory=list)  # per case, when given


class Predictor:
    """A loaded checkpoint that turns cases into survival predictions; built once, used per request."""

    def __init__(self, checkpoint: Checkpoint, device: str = "cpu"):
        self.checkpoint = checkpoint
        self.device = torch.device(device)
        self.members = [model.to(self.device) for model in checkpoint.build_models()]
        self.preprocessor = checkpoint.preprocessor
        self.modalities = [spec.name for spec in checkpoint.model_config.modalities]
        self.omic_modalities = [m for m in self.modalities if m not in (WSI, CLINICAL)]

    @classmethod
    def from_dir(cls, checkpoint_dir: Path, device: str = "cpu") -> Predictor:
        return cls(load_checkpoint(checkpoint_dir), device)

    @property
    def wsi_dim(self) -> int | None:
        return self.preprocessor.wsi_dim if WSI in self.modalities else None

    def prepare_batch(self, cases: Sequence[Case]) -> PreparedBatch:
        """Preprocess cases into one padded model batch (the CPU-side stage of a prediction)."""
        items: list[dict[str, Any]] = [{"omics": {}, "time": 0.0, "event": 0.0, "label": 0} for _ in cases]
        imputed = np.zeros(len(cases))
        imputed_features = np.zeros(len(cases), dtype=int)
        unknown: list[list[str]] = [[] for _ in cases]
        if self.omic_modalities:
            omics = cast(OmicsTransform, self.preprocessor.omics)  # the model has omic modalities
            tokens, unknown = omics.transform_records([case.omics for case in cases])
            for i, item in enumerate(items):
                item["omics"] = {
                    name: (tokens[name].values[i], bool(tokens[name].present[i]))
                    for name in self.omic_modalities
                }
            present = np.stack([tokens[name].present for name in self.omic_modalities])
            fractions = np.stack([tokens[name].imputed_fraction for name in self.omic_modalities])
            counted = present.sum(axis=0)
            imputed_features = np.stack([tokens[name].imputed for name in self.omic_modalities]).sum(axis=0)
            imputed = np.divide(fractions.sum(axis=0), counted, out=imputed, where=counted > 0)
        if CLINICAL in self.modalities:
            transform = cast(ClinicalTransform, self.preprocessor.clinical)
            records = [case.clinical for case in cases]
            clinical, unknown_covariates = transform.transform_records(records)
            outside_training_range = transform.outside_training_range(records)
            for i, item in enumerate(items):
                item["omics"][CLINICAL] = (clinical.values[i], bool(clinical.present[i]))
        else:  # covariates given to a model without the clinical modality are not used
            unknown_covariates = [list(case.clinical) for case in cases]
            outside_training_range = [[] for _ in cases]
        unknown = [
            [*names, *covariates] for names, covariates in zip(unknown, unknown_covariates, strict=True)
        ]
        if WSI in self.modalities:
            for item, case in zip(items, cases, strict=True):
                bag = case.wsi_features
                item[WSI] = None if bag is None or len(bag) == 0 else self.preprocessor.scale_wsi(bag)
        batch = collate_cases(items, self.wsi_dim or 0)
        return PreparedBatch(
            {k: v.to(self.device) for k, v in batch["inputs"].items()},
            {k: v.to(self.device) for k, v in batch["present"].items()},
            {k: v.to(self.device) for k, v in batch["token_mask"].items()},
            imputed_features.tolist(),
            imputed.tolist(),
            unknown,
            outside_training_range,
            [case.wsi_coords for case in cases],
        )

    @torch.no_grad()
    def predict_prepared(self, batch: PreparedBatch, return_attention: bool = False) -> list[Prediction]:
        """The forward pass of every member and the survival outputs of their mean survival curve."""
        curves: list[torch.Tensor] = []
        attentions: list[dict[str, list[torch.Tensor]]] = []
        for model in self.members:
            out = model(batch.inputs, batch.present, batch.token_mask, return_attention=return_attention)
            logits, attention = out if return_attention else (out, None)
            curves.append(survival_from_logits(logits.float())[1])
            if attention is not None:
                attentions.append(attention)
        hazards, survival, risk = (t.cpu().numpy() for t in survival_from_curve(torch.stack(curves).mean(0)))
        attention = mean_attention(attentions) if return_attention else None
        edges = [None if not np.isfinite(e) else float(e) for e in self.checkpoint.bins.edges]
        results = []
        for i, (imputed_features, imputed, unknown, outside_training_range) in enumerate(
            zip(
                batch.imputed_features,
                batch.imputed_fraction,
                batch.unknown_features,
                batch.out_of_training_range,
                strict=True,
            )
        ):
            used = [m for m in self.modalities if bool(batch.present[m][i])]
            mean, layers = self._attention(attention, i, batch.token_mask) if attention else (None, None)
            coords = batch.wsi_coords[i] if attention and i < len(batch.wsi_coords) else None
            results.append(
                Prediction(
                    risk=float(risk[i]),
                    survival=survival[i].tolist(),
                    hazards=hazards[i].tolist(),
                    bin_edges_months=edges,
                    modalities_used=used,
                    modalities_missing=[m for m in self.modalities if m not in used],
                    imputed_features=imputed_features,
                    imputed_fraction=imputed,
                    unknown_features=unknown,
                    out_of_training_range=outside_training_range,
                    attention=mean,
                    attention_layers=layers,
                    attention_coords=None if coords is None else coords.tolist(),
                )
            )
        return results

    def predict(self, cases: Sequence[Case], return_attention: bool = False) -> list[Prediction]:
        return self.predict_prepared(self.prepare_batch(cases), return_attention)

    @staticmethod
    def _attention(
        attention: dict, index: int, token_mask: dict
    ) -> tuple[dict[str, list[float]], dict[str, list[list[float]]]]:
        """Per-token attention of one case, padding removed: the mean over layers, heads and latents, and
        the mean over heads and latents per layer (layers × tokens)."""
        means, per_layer = {}, {}
        for name, layers in attention.items():
            weights = torch.stack([layer[index].float() for layer in layers]).mean(dim=(1, 2))
            if name in token_mask:
                weights = weights[:, token_mask[name][index]]
            means[name] = weights.mean(0).cpu().tolist()
            per_layer[name] = weights.cpu().tolist()
        return means, per_layer


def mean_attention(attentions: list[dict[str, list[torch.Tensor]]]) -> dict[str, list[torch.Tensor]]:
    """The members' attention weights averaged, per modality and layer."""
    return {
        name: [
            torch.stack([member[name][layer] for member in attentions]).mean(0)
            for layer in range(len(layers))
        ]
        for name, layers in attentions[0].items()
    }
