"""Checkpoint: weights, model config, bin edges, feature names and preprocessing state, sha256-sealed.

A checkpoint is a folder holding `model.pt` (torch.save of plain types only, loaded with
`weights_only=True`) and `checkpoint.json`, which records the sha256 of `model.pt`. It holds the weights of
every member of an ensemble (one for a single model); the members share the config, bins and preprocessing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import torch

from healnet.errors import HEALNetError
from healnet.files import sha256_file
from healnet.model import HEALNet, HEALNetConfig
from healnet.preprocess.state import Preprocessor
from healnet.survival import SurvivalBins

WEIGHTS_FILE = "model.pt"
MANIFEST_FILE = "checkpoint.json"
FORMAT_VERSION = 2  # 2: the weights of several members; version 1 held one model's
READABLE_FORMAT_VERSIONS = (1, 2)


class CheckpointError(HEALNetError, RuntimeError):
    """A checkpoint that is missing, corrupted or of an unknown format."""


@dataclass
class Checkpoint:
    model_config: HEALNetConfig
    state_dicts: list[dict]  # one per ensemble member
    bins: SurvivalBins
    preprocessor: Preprocessor
    metadata: dict = field(default_factory=dict)
    # the training inputs' bins and counts (healnet.drift.reference.InputReference.to_dict()) for `healnet
    # drift`; None in checkpoints written before it: that version must be retrained to be watched
    input_reference: dict | None = None

    def build_models(self) -> list[HEALNet]:
        models = []
        for state_dict in self.state_dicts:
            model = HEALNet(self.model_config)
            model.load_state_dict(state_dict)
            models.append(model.eval())
        return models

    @property
    def feature_names(self) -> dict[str, list[str]]:
        names = dict(self.preprocessor.omics.feature_names) if self.preprocessor.omics else {}
        if self.preprocessor.clinical is not None:
            names["clinical"] = list(self.preprocessor.clinical.feature_names)
        if self.preprocessor.wsi_mean is not None:
            names["wsi"] = [f"f_{i}" for i in range(self.preprocessor.wsi_dim)]
        return names


def save_checkpoint(directory: Path, checkpoint: Checkpoint) -> str:
    """Write the checkpoint folder; returns the sha256 of the weights file."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    payload = {
        "format_version": FORMAT_VERSION,
        "members": [
            {key: value.detach().cpu() for key, value in state_dict.items()}
            for state_dict in checkpoint.state_dicts
        ],
        "model_config": checkpoint.model_config.to_dict(),
        "bins": checkpoint.bins.to_dict(),
        "preprocessing": checkpoint.preprocessor.state_dict(),
        "feature_names": checkpoint.feature_names,
        "metadata": checkpoint.metadata,
        "input_reference": checkpoint.input_reference,
    }
    weights = directory / WEIGHTS_FILE
    torch.save(payload, weights)
    digest = sha256_file(weights)
    manifest = {
        "format_version": FORMAT_VERSION,
        "weights": WEIGHTS_FILE,
        "sha256": digest,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "modalities": checkpoint.model_config.to_dict()["modalities"],
        "members": len(checkpoint.state_dicts),
        "bin_edges_months": checkpoint.bins.to_dict(),
        "metadata": checkpoint.metadata,
    }
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, default=str))
    return digest


def read_manifest(directory: Path) -> dict:
    path = Path(directory) / MANIFEST_FILE
    if not path.exists():
        raise CheckpointError(f"{directory} is not a checkpoint folder: {MANIFEST_FILE} is missing")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("sha256"), str):
        raise CheckpointError(f"{path} is not a checkpoint manifest: it records no sha256 of the weights")
    return manifest


def verify_checkpoint(directory: Path) -> str:
    """Check the weights against the recorded sha256; returns the digest."""
    manifest = read_manifest(directory)
    weights = Path(directory) / manifest.get("weights", WEIGHTS_FILE)
    if not weights.exists():
        raise CheckpointError(f"checkpoint weights {weights} are missing")
    actual = sha256_file(weights)
    if actual != manifest.get("sha256"):
        raise CheckpointError(
            f"checkpoint {weights} is corrupted: sha256 {actual} does not match the recorded {manifest.get('sha256')}"
        )
    return actual


def load_checkpoint(directory: Path, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Load a checkpoint folder, refusing weights whose sha256 does not match the manifest."""
    directory = Path(directory)
    verify_checkpoint(directory)
    try:
        payload = torch.load(directory / WEIGHTS_FILE, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises several types for unreadable pickles
        raise CheckpointError(f"cannot read {directory / WEIGHTS_FILE}: {error}") from error
    version = payload.get("format_version")
    if version not in READABLE_FORMAT_VERSIONS:
        raise CheckpointError(f"unsupported checkpoint format {version!r}")
    return Checkpoint(
        model_config=HEALNetConfig.from_dict(payload["model_config"]),
        state_dicts=[payload["state_dict"]] if version == 1 else payload["members"],
        bins=SurvivalBins.from_dict(payload["bins"]),
        preprocessor=Preprocessor.from_state_dict(payload["preprocessing"]),
        metadata=payload["metadata"],
        input_reference=payload.get("input_reference"),  # absent from checkpoints written before it
    )
