"""Patch encoders: pixels → features, shared by slide preprocessing and serving, and their provenance.

Every encoder carries an `EncoderProvenance` (name, weights sha256, output width, input size,
normalisation). Feature files record it, training refuses features of mixed encoders, the checkpoint
keeps it, and serving encodes tiles only with an encoder whose provenance matches the model's.
Torch, numpy and Pillow only (no OpenSlide, pandas or pyarrow), so that the service can encode tiles
without the slide-reading stack.
"""

from __future__ import annotations

import re
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from einops import rearrange
from PIL import Image

from healnet.errors import HEALNetError
from healnet.files import sha256_file

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


class TileError(HEALNetError, ValueError):
    """An image tile is not an RGB uint8 array."""


class EncoderError(HEALNetError, ValueError):
    """An encoder file that cannot be loaded or run, or features whose encoder does not match."""


# Input normalisations an encoder may expect; "none": raw uint8 pixels (the statistics encoder).
NORMALISATIONS = ("none", "imagenet")
ENCODER_INPUT_SIZE = 224  # px side of the probe batch that tells a weight file's feature width
TORCHSCRIPT_PREFIX, EXPORT_PREFIX = "torchscript:", "export:"


@dataclass(frozen=True)
class EncoderProvenance:
    """Which encoder made a set of patch features. Two feature sets are comparable only when their
    provenances are equal; `key` names their folder."""

    name: str  # "stats", the weight file's stem, or the name given when importing features
    weights_sha256: str | None  # None: no weights (the statistics encoder) or not known (imported)
    dim: int
    input_size: int
    normalisation: str

    def __post_init__(self) -> None:
        if self.normalisation not in NORMALISATIONS and not self.normalisation.startswith("custom:"):
            raise EncoderError(
                f"encoder normalisation must be one of {NORMALISATIONS} or 'custom:<description>', "
                f"got {self.normalisation!r}"
            )
        if self.dim < 1 or self.input_size < 1:
            raise EncoderError(
                f"encoder dim and input_size must be positive, got {self.dim}, {self.input_size}"
            )

    @property
    def key(self) -> str:
        """Folder name of this encoder's feature files: the name, and the weights' first 12 hex digits."""
        slug = re.sub(r"[^A-Za-z0-9._-]+", "-", self.name).strip("-") or "encoder"
        return slug if self.weights_sha256 is None else f"{slug}-{self.weights_sha256[:12]}"

    def describe(self) -> str:
        weights = f"weights sha256 {self.weights_sha256[:12]}…" if self.weights_sha256 else "no weights file"
        return f"{self.name} ({weights}, {self.dim} features, {self.input_size} px, {self.normalisation})"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, state: Mapping[str, Any]) -> EncoderProvenance:
        try:
            return cls(
                str(state["name"]),
                None if state.get("weights_sha256") is None else str(state["weights_sha256"]),
                int(state["dim"]),
                int(state["input_size"]),
                str(state["normalisation"]),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise EncoderError(f"malformed encoder provenance {dict(state)!r}: {error}") from error


class PatchEncoder(Protocol):
    name: str
    dim: int
    provenance: EncoderProvenance

    def encode(self, patches: np.ndarray) -> np.ndarray:
        """uint8 (n, patch_size, patch_size, 3) -> float32 (n, dim)."""
        ...


# ---------------------------------------------------------------------------------------------
# Encoders

STATS_FEATURE_NAMES: tuple[str, ...] = (
    # RGB intensities in [0, 1]
    *(f"rgb_mean_{c}" for c in "rgb"),
    *(f"rgb_std_{c}" for c in "rgb"),
    # HSV: hue as the unit vector of the mean colour-opponent direction, saturation and value
    "hue_cos",
    "hue_sin",
    "hsv_mean_s",
    "hsv_std_s",
    "hsv_mean_v",
    "hsv_std_v",
    # optical density -log10(I / 255) per channel, and Ruifrok-Johnston stain concentrations
    *(f"od_mean_{c}" for c in "rgb"),
    "haematoxylin_mean",
    "haematoxylin_std",
    "eosin_mean",
    "eosin_std",
    # texture on grey levels in [0, 1]
    "gradient_energy",  # mean squared finite difference, x and y summed
    "laplacian_var",  # variance of the 4-neighbour Laplacian
    "dark_fraction",  # grey < 0.4 (nuclei)
    "white_fraction",  # grey > 0.85 (glass)
    # coarse grey histogram: fraction of pixels in 8 equal bins over [0, 1]
    *(f"grey_hist_{i}" for i in range(8)),
)

# Stain optical-density vectors (rows: haematoxylin, eosin, DAB); its inverse unmixes OD into stains.
STAIN_MATRIX = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=np.float32)
STAIN_MATRIX /= np.linalg.norm(STAIN_MATRIX, axis=1, keepdims=True)
UNMIX_HE = np.linalg.inv(STAIN_MATRIX)[:, :2].astype(np.float32)
OPTICAL_DENSITY = (-np.log10(np.maximum(np.arange(256), 1) / 255.0)).astype(np.float32)
GREY_WEIGHTS = np.array([0.299, 0.587, 0.114], dtype=np.float32)
# dark and white thresholds, then the inner edges of the 8-bin grey histogram
GREY_EDGES = np.array([0.4, 0.85, *np.arange(1, 8) / 8], dtype=np.float32)


class StatsEncoder:
    """Weight-free colour and texture statistics per patch (`STATS_FEATURE_NAMES`), vectorised.

    Colour statistics sample every eighth pixel in each direction (784 of a 224 px patch); texture
    uses the green channel (the strongest H&E contrast) at every fourth pixel, i.e. nuclear-scale
    contrast at 4 px. Sampling keeps the encoder several times cheaper than reading the patch.
    """

    name = "stats"
    feature_names = STATS_FEATURE_NAMES
    dim = len(STATS_FEATURE_NAMES)
    provenance = EncoderProvenance("stats", None, len(STATS_FEATURE_NAMES), ENCODER_INPUT_SIZE, "none")

    def encode(self, patches: np.ndarray) -> np.ndarray:
        columns = colour_statistics(patches[:, ::8, ::8]) | texture_statistics(patches[:, ::4, ::4, 1])
        return np.stack([columns[name] for name in STATS_FEATURE_NAMES], axis=1).astype(np.float32)


def colour_statistics(pixels: np.ndarray) -> dict[str, np.ndarray]:
    """Colour features of (n, h, w, 3) uint8 pixels, each an (n,) array keyed by its name."""
    planes_u8 = np.ascontiguousarray(rearrange(pixels, "n h w c -> c n (h w)"))
    planes = planes_u8.astype(np.float32) / np.float32(255)
    red, green, blue = planes
    means, stds = planes.mean(-1), planes.std(-1)  # (3, n)

    value = np.maximum(np.maximum(red, green), blue)
    saturation = (value - np.minimum(np.minimum(red, green), blue)) / np.maximum(value, 1e-6)
    opponent = np.stack([means[0] - (means[1] + means[2]) / 2, np.sqrt(3) / 2 * (means[1] - means[2])])
    hue = opponent / np.maximum(np.linalg.norm(opponent, axis=0), 1e-6)

    optical_density = OPTICAL_DENSITY[planes_u8]
    haematoxylin, eosin = (
        sum(weight * od for weight, od in zip(UNMIX_HE[:, k], optical_density, strict=True)) for k in range(2)
    )
    grey = sum(weight * plane for weight, plane in zip(GREY_WEIGHTS, planes, strict=True))
    below = (grey[..., None] < GREY_EDGES).mean(1)  # (n, 9): fraction of pixels below each edge
    histogram = np.diff(below[:, 2:], axis=1, prepend=0.0, append=1.0)

    return {
        **{f"rgb_mean_{c}": means[i] for i, c in enumerate("rgb")},
        **{f"rgb_std_{c}": stds[i] for i, c in enumerate("rgb")},
        "hue_cos": hue[0],
        "hue_sin": hue[1],
        "hsv_mean_s": saturation.mean(-1),
        "hsv_std_s": saturation.std(-1),
        "hsv_mean_v": value.mean(-1),
        "hsv_std_v": value.std(-1),
        **{f"od_mean_{c}": od for c, od in zip("rgb", optical_density.mean(-1), strict=True)},
        "haematoxylin_mean": haematoxylin.mean(-1),
        "haematoxylin_std": haematoxylin.std(-1),
        "eosin_mean": eosin.mean(-1),
        "eosin_std": eosin.std(-1),
        "dark_fraction": below[:, 0],
        "white_fraction": 1.0 - below[:, 1],
        **{f"grey_hist_{i}": histogram[:, i] for i in range(8)},
    }


def texture_statistics(grey_u8: np.ndarray) -> dict[str, np.ndarray]:
    """Gradient energy and Laplacian variance of (n, h, w) uint8 grey images, in [0, 1] units."""
    image = grey_u8.astype(np.float32) / np.float32(255)
    dx, dy = np.diff(image, axis=2), np.diff(image, axis=1)
    laplacian = image[:, 1:-1, :-2] + image[:, 1:-1, 2:] + image[:, :-2, 1:-1] + image[:, 2:, 1:-1]
    laplacian -= 4 * image[:, 1:-1, 1:-1]
    return {
        "gradient_energy": np.square(dx).mean((1, 2)) + np.square(dy).mean((1, 2)),
        "laplacian_var": laplacian.reshape(len(image), -1).var(-1),
    }


@dataclass(frozen=True)
class FeatureProvenance:
    """The encoder and patch grid of a feature file; files are comparable only when these are equal."""

    encoder: EncoderProvenance
    patch_size: int
    target_mpp: float

    @property
    def tiling(self) -> dict:
        return {"patch_size": self.patch_size, "target_mpp": self.target_mpp}

    def describe(self) -> str:
        return f"{self.encoder.describe()}, {self.patch_size} px patches at {self.target_mpp} µm/px"


class WeightsEncoder:
    """A user's exported network (ResNet50-trunc, UNI, CONCH, ...) from a local file: TorchScript
    (`torch.jit.save`) or `torch.export` (`.pt2`). It takes ImageNet-normalised NCHW float input of
    ENCODER_INPUT_SIZE px (`scripts/export_encoders.py` wraps networks that expect another size or
    normalisation)."""

    def __init__(self, path: Path, exported: bool, device: str | None = None):
        import torch

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        try:
            if exported:
                self.model = torch.export.load(str(path)).module().to(self.device)
            else:
                self.model = torch.jit.load(str(path), map_location=self.device).eval()
        except (RuntimeError, ValueError, OSError, zipfile.BadZipFile) as error:
            kind = "torch.export (.pt2)" if exported else "TorchScript"
            raise EncoderError(f"{path} is not a loadable {kind} encoder: {error}") from error
        self.name = path.stem
        probe = np.zeros((1, ENCODER_INPUT_SIZE, ENCODER_INPUT_SIZE, 3), dtype=np.uint8)
        try:
            dim = self._forward(probe).shape[1]
        except RuntimeError as error:
            raise EncoderError(
                f"encoder {path} fails on a (1, 3, {ENCODER_INPUT_SIZE}, {ENCODER_INPUT_SIZE}) batch: {error}"
            ) from error
        self.dim = int(dim)
        self.provenance = EncoderProvenance(
            self.name, sha256_file(path), self.dim, ENCODER_INPUT_SIZE, "imagenet"
        )

    def _forward(self, patches: np.ndarray) -> np.ndarray:
        import torch

        scaled = (patches.astype(np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
        batch = torch.from_numpy(rearrange(scaled, "n h w c -> n c h w")).to(self.device)
        with torch.inference_mode():
            output = self.model(batch)
        return rearrange(output.float().cpu().numpy(), "n ... -> n (...)")

    def encode(self, patches: np.ndarray) -> np.ndarray:
        return self._forward(patches).astype(np.float32)


def make_encoder(spec: str = "stats", device: str | None = None) -> PatchEncoder:
    """`"stats"`, `"torchscript:PATH"`, `"export:PATH"`, or a PATH (`.pt2`: torch.export, else
    TorchScript). Weight files run on CUDA when available unless `device` says otherwise."""
    if spec == "stats":
        return StatsEncoder()
    exported = spec.startswith(EXPORT_PREFIX) or (
        not spec.startswith(TORCHSCRIPT_PREFIX) and spec.endswith(".pt2")
    )
    path = Path(spec.removeprefix(EXPORT_PREFIX).removeprefix(TORCHSCRIPT_PREFIX))
    if not path.is_file():
        raise EncoderError(
            f"encoder {spec!r}: expected 'stats' or the path of a TorchScript or torch.export (.pt2) file, "
            f"and {path} is not a file"
        )
    return WeightsEncoder(path, exported, device)


def find_encoder(
    provenance: EncoderProvenance, search_dirs: Sequence[Path], device: str | None = None
) -> PatchEncoder:
    """An encoder matching `provenance`: the statistics encoder, or the weight file in `search_dirs`
    whose sha256 is the provenance's. Raises EncoderError naming what is missing."""
    if provenance == StatsEncoder.provenance:
        return StatsEncoder()
    if provenance.weights_sha256 is None:
        raise EncoderError(
            f"the model's patch encoder {provenance.describe()} has no recorded weights file "
            "(features imported from elsewhere): send patch features, not tiles"
        )
    candidates = sorted(
        path
        for folder in search_dirs
        if folder.is_dir()
        for path in folder.iterdir()
        if path.is_file() and path.suffix in (".pt", ".pt2", ".ts", ".jit", ".pth")
    )
    for path in candidates:
        if sha256_file(path) == provenance.weights_sha256:
            encoder = make_encoder(str(path), device)
            if encoder.provenance.dim != provenance.dim:
                raise EncoderError(
                    f"encoder {path} gives {encoder.dim} features, the model expects {provenance.dim}"
                )
            return encoder
    where = ", ".join(str(folder) for folder in search_dirs) or "no encoder folder"
    raise EncoderError(
        f"the model's patch encoder {provenance.describe()} is not available here: no file with weights "
        f"sha256 {provenance.weights_sha256} in {where}"
    )


def encode_tiles(tiles: Sequence[np.ndarray], encoder: PatchEncoder, patch_size: int = 224) -> np.ndarray:
    """RGB uint8 tiles of any size → resized to `patch_size` → float32 (n, encoder.dim) features.

    The one path from pixels to features, shared by slide preprocessing and serving.
    """
    resized = []
    for index, tile in enumerate(tiles):
        if tile.dtype != np.uint8 or tile.ndim != 3 or tile.shape[2] != 3 or 0 in tile.shape:
            raise TileError(
                f"tile {index} must be a non-empty (h, w, 3) uint8 RGB array, got {tile.dtype} {tile.shape}"
            )
        if tile.shape[:2] != (patch_size, patch_size):
            tile = np.asarray(
                Image.fromarray(tile).resize((patch_size, patch_size), Image.Resampling.BILINEAR)
            )
        resized.append(tile)
    if not resized:
        return np.zeros((0, encoder.dim), dtype=np.float32)
    features = encoder.encode(np.stack(resized))
    if features.shape != (len(resized), encoder.dim):
        raise ValueError(
            f"encoder {encoder.name} returned {features.shape}, expected ({len(resized)}, {encoder.dim})"
        )
    return features.astype(np.float32, copy=False)
