"""Small synthetic H&E-like whole-slide images as pyramidal tiled TIFFs that OpenSlide opens.

A slide is white glass around one irregular tissue blob; the tissue mixes pink fibrous stroma with
contiguous tumour patches full of dark-purple nuclei. `tumour_fraction` is the fraction of the tissue
area that is tumour, so a patch-level bag is heterogeneous and its colour statistics carry the signal.
Colours come from Beer-Lambert mixing of haematoxylin and eosin optical densities.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from healnet.errors import HEALNetError

TILE_SIZE = 256
MIN_LEVEL_SIZE = 200
JPEG_QUALITY = 80
N_SHADES = 16
BACKGROUND, STROMA, TUMOUR, NUCLEUS = range(4)
N_CLASSES = 4

# Ruifrok & Johnston optical-density vectors (RGB) of the two stains.
HAEMATOXYLIN_OD = np.array([0.65, 0.70, 0.29], dtype=np.float32)
EOSIN_OD = np.array([0.07, 0.99, 0.11], dtype=np.float32)


class SyntheticSlideError(HEALNetError, ValueError):
    """Raised when the requested synthetic slide cannot be made."""


def write_synthetic_slide(
    path: Path, tumour_fraction: float, seed: int, *, size_px: int = 1792, mpp: float = 1.0
) -> Path:
    """Write a square pyramidal JPEG-tiled TIFF of `size_px` px at `mpp` µm/px; same seed, same bytes.

    Levels are top-level pages (full size, then /2, /4, ... down to about 200 px), lower ones flagged
    reduced-resolution, with resolution tags so OpenSlide reports `openslide.mpp-x/y`.
    """
    if not 0.0 <= tumour_fraction <= 1.0:
        raise SyntheticSlideError(f"tumour_fraction must lie in [0, 1], got {tumour_fraction}")
    if size_px < 2 * MIN_LEVEL_SIZE or mpp <= 0:
        raise SyntheticSlideError(f"need size_px >= {2 * MIN_LEVEL_SIZE} and mpp > 0, got {size_px}, {mpp}")
    image = synthetic_he_image(size_px, tumour_fraction, np.random.default_rng(seed))
    path = Path(path)
    levels = [image]
    while min(levels[-1].shape[:2]) // 2 >= MIN_LEVEL_SIZE:
        levels.append(halve(levels[-1]))
    with tifffile.TiffWriter(path) as tiff:  # one worker: deterministic and single-core
        for index, level in enumerate(levels):
            downsample = image.shape[1] / level.shape[1]
            tiff.write(
                level,
                photometric="rgb",
                tile=(TILE_SIZE, TILE_SIZE),
                compression="jpeg",
                compressionargs={"level": JPEG_QUALITY},
                subfiletype=0 if index == 0 else 1,
                resolution=(1e4 / (mpp * downsample), 1e4 / (mpp * downsample)),  # pixels per cm
                resolutionunit="CENTIMETER",
                metadata=None,
                maxworkers=1,
            )
    return path


def halve(image: np.ndarray) -> np.ndarray:
    """2×2 mean-pool an (h, w, 3) uint8 image."""
    return np.asarray(Image.fromarray(image).reduce(2))


def smooth_noise(rng: np.random.Generator, grid: int, size: int) -> np.ndarray:
    """A smooth random field: a `grid`×`grid` normal sample upsampled bicubically to `size`×`size`."""
    coarse = rng.standard_normal((grid, grid)).astype(np.float32)
    return np.asarray(Image.fromarray(coarse, mode="F").resize((size, size), Image.Resampling.BICUBIC))


def stain_colour(haematoxylin: float, eosin: float) -> np.ndarray:
    """RGB uint8 colour of the given stain optical densities (Beer-Lambert)."""
    optical_density = haematoxylin * HAEMATOXYLIN_OD + eosin * EOSIN_OD + 0.02
    return np.clip(255.0 * np.exp(-optical_density), 0, 255).astype(np.uint8)


def colour_table() -> np.ndarray:
    """(N_CLASSES * N_SHADES, 3) uint8 colours, indexed by `class * N_SHADES + shade`."""
    shades = np.linspace(0.0, 1.0, N_SHADES)
    stains = {  # (haematoxylin, eosin) optical densities as a function of shade in [0, 1]
        BACKGROUND: lambda s: (0.0, 0.01 * s),
        STROMA: lambda s: (0.06 + 0.04 * s, 0.2 + 0.5 * s),
        TUMOUR: lambda s: (0.4 + 0.15 * s, 0.3),
        NUCLEUS: lambda s: (1.0 + 0.4 * s, 0.2),
    }
    return np.stack([stain_colour(*stains[cls](shade)) for cls in range(N_CLASSES) for shade in shades])


def synthetic_he_image(size: int, tumour_fraction: float, rng: np.random.Generator) -> np.ndarray:
    """An (size, size, 3) uint8 H&E-like image; see the module docstring."""
    axis = np.linspace(-1.0, 1.0, size, dtype=np.float32)
    radius2 = axis[:, None] ** 2 + axis[None, :] ** 2
    tissue_field = 0.55 * smooth_noise(rng, 5, size) - 2.2 * radius2
    tissue_area = rng.uniform(0.62, 0.72)
    tissue = tissue_field > np.quantile(tissue_field[::8, ::8], 1.0 - tissue_area)

    # Contiguous tumour patches covering `tumour_fraction` of the tissue.
    tumour_field = smooth_noise(rng, 9, size)
    tissue_values = tumour_field[::8, ::8][tissue[::8, ::8]]
    threshold = -np.inf if tumour_fraction >= 1.0 else np.quantile(tissue_values, 1.0 - tumour_fraction)
    tumour = tissue & (tumour_field > threshold)

    # Nuclei: thresholded fine noise, dense in tumour, sparse in stroma.
    nuclei = tissue & (smooth_noise(rng, size // 5, size) > np.where(tumour, 0.45, 1.2))
    classes = tissue.astype(np.uint8) + tumour
    classes[nuclei] = NUCLEUS

    # Shade: warped fibre stripes (visible in stroma) plus per-pixel grain.
    angle = rng.uniform(0.0, np.pi)
    phase = (axis[None, :] * np.cos(angle) + axis[:, None] * np.sin(angle)) * 140.0
    stripes = np.sin(phase + 6.0 * smooth_noise(rng, 6, size))
    shade = ((stripes + 1.0) * (N_SHADES - 4) / 2).astype(np.uint8)
    shade += rng.integers(0, 4, (size, size), dtype=np.uint8)

    # Gather RGBX colours as uint32 words, then view them as bytes.
    table = np.zeros((N_CLASSES * N_SHADES, 4), dtype=np.uint8)
    table[:, :3] = colour_table()
    words = table.view(np.uint32).ravel()[classes * np.uint8(N_SHADES) + shade]
    return np.ascontiguousarray(words.view(np.uint8).reshape(size, size, 4)[..., :3])
