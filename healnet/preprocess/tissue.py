"""Tissue detection on a slide thumbnail: which parts of a slide are tissue, and which grid cells hold
enough of it to be encoded (`healnet.preprocess.wsi` tiles the slide with it).

The mask is Otsu's threshold on HSV saturation, cleaned of tissue specks and small glass holes by area
(`clean_mask`); `cell_tissue_fractions` gives each patch of the grid its share of tissue, and
`draw_overlay` draws the mask and the kept patches over the thumbnail for a person to check.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from healnet.preprocess.encoders import TileError

MIN_TISSUE_SATURATION = 0.05  # below it a pixel is glass whatever Otsu says (blank slides)
# Tissue mask clean-up: tissue components smaller than this are specks (dust, debris, noise) and are
# dropped; glass holes smaller than this inside tissue are filled (0.01 mm², a 100 µm square).
MIN_TISSUE_AREA_UM2 = 10_000.0
MIN_AREA_FRACTION = 1e-3  # the same clean-up by thumbnail area, when the thumbnail's µm/px is not given


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of values in [0, 1]: the cut that maximises the between-class variance."""
    counts, edges = np.histogram(values, bins=bins, range=(0.0, 1.0))
    centres = (edges[:-1] + edges[1:]) / 2
    weight_low = np.cumsum(counts)
    weight_high = weight_low[-1] - weight_low
    sum_low = np.cumsum(counts * centres)
    mean_low = sum_low / np.maximum(weight_low, 1)
    mean_high = (sum_low[-1] - sum_low) / np.maximum(weight_high, 1)
    between = weight_low * weight_high * (mean_low - mean_high) ** 2
    return float(edges[np.argmax(between) + 1])


def tissue_mask(thumbnail_rgb: np.ndarray, min_area_px: float | None = None) -> np.ndarray:
    """Boolean tissue mask of an (h, w, 3) uint8 thumbnail: Otsu on HSV saturation, then cleaned up.

    Pixels below `MIN_TISSUE_SATURATION` are glass whatever Otsu says, so a blank slide has no tissue.
    The clean-up (`clean_mask`) drops tissue specks and fills glass holes smaller than `min_area_px`
    thumbnail pixels; by default `MIN_AREA_FRACTION` of the thumbnail (slide tiling passes
    `MIN_TISSUE_AREA_UM2` converted to thumbnail pixels).
    """
    if thumbnail_rgb.dtype != np.uint8 or thumbnail_rgb.ndim != 3 or thumbnail_rgb.shape[2] != 3:
        raise TileError(
            f"thumbnail must be an (h, w, 3) uint8 array, got {thumbnail_rgb.dtype} {thumbnail_rgb.shape}"
        )
    high = thumbnail_rgb.max(axis=2).astype(np.float32)
    low = thumbnail_rgb.min(axis=2).astype(np.float32)
    saturation = (high - low) / np.maximum(high, 1.0)
    mask = saturation >= max(otsu_threshold(saturation), MIN_TISSUE_SATURATION)
    if min_area_px is None:
        min_area_px = MIN_AREA_FRACTION * mask.size
    return clean_mask(mask, min_area_px)


def clean_mask(mask: np.ndarray, min_area_px: float) -> np.ndarray:
    """`mask` without its connected components (8-connected) smaller than `min_area_px` pixels, and
    with its holes (4-connected glass regions that do not touch the border) smaller than that filled.

    Area filters instead of an opening or closing: they remove isolated specks and fill small holes
    without shaving thin tissue strands or bridging neighbouring fragments."""
    if min_area_px <= 1 or not mask.any():
        return mask
    labels, count = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    cleaned = (sizes >= min_area_px)[labels] & mask
    glass, count = ndimage.label(~cleaned)  # 4-connected: glass does not leak through diagonal tissue
    sizes = np.bincount(glass.ravel(), minlength=count + 1)
    border = np.unique(np.concatenate([glass[0], glass[-1], glass[:, 0], glass[:, -1]]))
    hole = sizes < min_area_px
    hole[0] = False  # label 0 is the tissue itself
    hole[border] = False
    return cleaned | hole[glass]


def cell_tissue_fractions(
    mask: np.ndarray, level0_size: tuple[int, int], step0: float, n_rows: int, n_cols: int
) -> np.ndarray:
    """(n_rows, n_cols) fraction of mask pixels inside each grid cell of `step0` level-0 px."""
    integral = np.pad(mask.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    height, width = mask.shape

    def edges(count: int, scale: float, limit: int) -> tuple[np.ndarray, np.ndarray]:
        start = np.clip(np.round(np.arange(count) * step0 * scale).astype(int), 0, limit - 1)
        stop = np.clip(np.round(np.arange(1, count + 1) * step0 * scale).astype(int), start + 1, limit)
        return start, stop

    top, bottom = edges(n_rows, height / level0_size[1], height)
    left, right = edges(n_cols, width / level0_size[0], width)
    inside = (
        integral[bottom][:, right]
        - integral[top][:, right]
        - integral[bottom][:, left]
        + integral[top][:, left]
    )
    return inside / np.outer(bottom - top, right - left)


def draw_overlay(thumbnail: np.ndarray, mask: np.ndarray, boxes: np.ndarray) -> Image.Image:
    """The thumbnail with the tissue mask outlined in green and the kept patches boxed in blue."""
    padded = np.pad(mask, 1, mode="edge")
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    overlay = thumbnail.copy()
    overlay[mask & ~interior] = (0, 200, 0)
    image = Image.fromarray(overlay)
    draw = ImageDraw.Draw(image)
    for left, top, right, bottom in boxes:
        draw.rectangle((left, top, right - 1, bottom - 1), outline=(40, 90, 255))
    return image
