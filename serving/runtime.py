"""The served model: which version to load, the loaded predictor with its contract, and stage timing."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from healnet.checkpoint import load_checkpoint
from healnet.device import select_device
from healnet.inference import Case, Prediction, Predictor
from healnet.preprocess.encoders import EncoderError, EncoderNotFoundError, PatchEncoder, find_encoder
from healnet.registry import RegistryError, resolve, version_tag
from serving.config import env_number
from serving.validation import ModelContract

MODEL_TAG_ENV = "HEALNET_MODEL_TAG"
DEVICE_ENV = "HEALNET_DEVICE"
FOLLOW_ENV = "HEALNET_FOLLOW_CHAMPION_S"
ENCODER_DIR_ENV = "HEALNET_ENCODER_DIR"
logger = logging.getLogger("healnet.serving")


def resolve_served_model(packed_tag: str | None = None) -> tuple[str, Path]:
    """Tag and sha256-verified checkpoint to serve: $HEALNET_MODEL_TAG; else, when following the champion,
    the registry's champion; else the model packed into the Bento, else the champion. Raises RegistryError
    (also for a pinned alias such as `latest`: a pin names one version) or CheckpointError."""
    pinned = os.environ.get(MODEL_TAG_ENV)
    if pinned:
        try:
            pinned = version_tag(pinned)
        except RegistryError as error:
            raise RegistryError(f"${MODEL_TAG_ENV}: {error}") from None
    return resolve(pinned or (None if champion_poll_seconds() else packed_tag))


def champion_poll_seconds() -> float | None:
    """$HEALNET_FOLLOW_CHAMPION_S: how often to look for a new champion in the registry; None when not
    following (unset or 0, or a model pinned by $HEALNET_MODEL_TAG). Following serves the registry's
    champion even from an image with a packed model. A bad value is a ConfigError."""
    seconds = env_number(FOLLOW_ENV, 0.0, float)
    return seconds if seconds > 0 and not os.environ.get(MODEL_TAG_ENV) else None


def serving_device() -> str:
    """$HEALNET_DEVICE: "auto" (CUDA when present, the default), "cpu" or "cuda"."""
    return str(select_device(os.environ.get(DEVICE_ENV, "auto")))


class TimedPredictor(Predictor):
    """Predictor whose `predict_timed` also reports the time of input preparation and of the forward pass."""

    def predict_timed(
        self, cases: Sequence[Case], return_attention: bool = False
    ) -> tuple[list[Prediction], float, float]:
        """Predictions, seconds spent preparing inputs, seconds in the forward pass and post-processing."""
        start = time.perf_counter()
        # Overflow shows in the outputs, which the service checks.
        with np.errstate(over="ignore", invalid="ignore"):
            batch = self.prepare_batch(cases)
            prepared = time.perf_counter()
            predictions = self.predict_prepared(batch, return_attention)
        return predictions, prepared - start, time.perf_counter() - prepared


@dataclass(frozen=True)
class ServedModel:
    tag: str
    predictor: TimedPredictor
    contract: ModelContract
    reference_risk_quantiles: dict[str, float] | None

    @classmethod
    def load(cls, tag: str, checkpoint_dir: Path) -> ServedModel:
        """Load weights and preprocessing, build the tile encoder, and run one warm-up prediction."""
        checkpoint = load_checkpoint(checkpoint_dir)
        device = serving_device()
        predictor = TimedPredictor(checkpoint, device=device)
        contract = ModelContract.from_predictor(predictor, *tile_encoder(predictor, device))
        warm_up = Case(
            omics={table: {} for table in contract.omic_tables},
            wsi_features=None if contract.wsi_dim is None else np.zeros((1, contract.wsi_dim), np.float32),
        )
        predictor.predict([warm_up])
        return cls(tag, predictor, contract, checkpoint.metadata.get("reference_risk_quantiles"))


def encoder_dirs() -> list[Path]:
    """$HEALNET_ENCODER_DIR: folders (separated by ':') holding patch-encoder weight files."""
    return [Path(part) for part in os.environ.get(ENCODER_DIR_ENV, "").split(os.pathsep) if part]


def tile_encoder(predictor: Predictor, device: str) -> tuple[PatchEncoder | None, str]:
    """The checkpoint's own patch encoder, or None and the reason tile requests are refused: the model
    has no slides, records no encoder, its weights file (matched by sha256) is not in encoder_dirs(), or
    that file is refused (a TorchScript file whose sha256 the operator has not trusted)."""
    if predictor.wsi_dim is None:
        return None, "the model has no slide modality"
    provenance = predictor.preprocessor.wsi_encoder
    if provenance is None:
        return None, "the model records no patch encoder (trained before 0.3, or on features given in memory)"
    try:
        return find_encoder(provenance, encoder_dirs(), device), ""
    except EncoderNotFoundError as error:
        reason = f"{error}; set ${ENCODER_DIR_ENV} to a folder with that file, or send wsi_features"
    except EncoderError as error:  # found, but refused (an untrusted TorchScript file) or unusable
        reason = f"{error}; or send wsi_features"
    logger.warning("requests with wsi_tiles will be refused: %s", reason)
    return None, reason
