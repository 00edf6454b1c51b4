"""Attention heatmaps of a slide: where a trained HEALNet looks, drawn over the slide for a pathologist.

HEALNet's latents attend to the patches of a slide once per layer; softmax over the patches makes each
layer's attention (averaged over heads and latents) sum to 1. `draw_heatmap` writes a PNG: the slide
thumbnail with each patch's attention as a semi-transparent colour map over the patch grid, one panel
per layer plus their mean, a colour bar, and the top-k patches as tiles read from the slide. Without the
slide file the patches are drawn on a blank canvas and the tiles show positions and scores only.
`healnet.explain` predicts a slide of a training run and draws it with this module.

Attention is drawn as `attention × patches`: 1 is what every patch gets under uniform attention, so the
scale means the same on slides with 30 or 30,000 patches.

A service response with `attention_coords` (a request with `wsi_coords` and `return_attention`) draws
the same picture: `draw_heatmap(SlideAttention.from_response(body), "heatmap.png")`. Serving never
imports this module: drawing and reading slides take matplotlib and OpenSlide (imported lazily).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from healnet.errors import HEALNetError
from healnet.inference import Prediction
from healnet.preprocess.state import WSI

DEFAULT_FOOTPRINT = 224.0  # level-0 px of a patch when neither metadata nor spacing tells
THUMBNAIL_SIDE = 1024  # px, long side of the thumbnail drawn under the attention
TILE_PX = 192  # px side of a top-k tile
PANEL_INCHES = 4.0
TILE_INCHES = 1.7
COLOURBAR_INCHES = 1.2
TITLE_INCHES = 0.7
DPI = 100
CANVAS = (0.93, 0.93, 0.93)  # the blank slide when the slide file is not available
OVERLAY_ALPHA = 0.5
COLOUR_MAP = "turbo"
SCALE_LABEL = "attention × patches (1 = uniform)"


class ExplainError(HEALNetError):
    """A slide, its features, a layer or a response that cannot be explained; the message says why."""


@dataclass
class SlideAttention:
    """The attention of a slide's patches and where the patches are.

    `layers` (n_layers, n_patches): one row per model layer, each summing to 1 over the patches; from a
    service response it holds the mean only (`per_layer` False)."""

    coords: np.ndarray  # (n, 2) int64: level-0 px [x, y] of each patch's top-left corner
    layers: np.ndarray  # (n_layers, n) float64
    footprint: float  # level-0 px side of one patch
    per_layer: bool = True
    slide_id: str = ""

    def __post_init__(self) -> None:
        self.coords = np.asarray(self.coords, dtype=np.int64).reshape(-1, 2)
        self.layers = np.atleast_2d(np.asarray(self.layers, dtype=np.float64))
        if len(self.coords) == 0 or self.layers.shape[1] != len(self.coords):
            raise ExplainError(
                f"need one [x, y] per patch and one attention per patch, got {len(self.coords)} coordinates "
                f"and attention of shape {self.layers.shape}"
            )
        if not np.isfinite(self.layers).all() or not self.footprint > 0:
            raise ExplainError(
                f"attention must be finite and the patch footprint positive ({self.footprint})"
            )

    @property
    def n_patches(self) -> int:
        return len(self.coords)

    @property
    def mean(self) -> np.ndarray:
        """Attention per patch averaged over the layers."""
        return self.layers.mean(0)

    def values(self, layer: int | None = None) -> np.ndarray:
        """The mean (None) or one layer's attention (1 = the first layer)."""
        if layer is None:
            return self.mean
        if not self.per_layer:
            raise ExplainError("this attention holds the mean over the layers only (a service response)")
        if not 1 <= layer <= len(self.layers):
            raise ExplainError(f"layer {layer} does not exist: the model has {len(self.layers)} layer(s)")
        return self.layers[layer - 1]

    def top_k(self, k: int, layer: int | None = None) -> np.ndarray:
        """Indices of the k patches with the highest attention, highest first (ties: file order)."""
        values = self.values(layer)
        return np.argsort(-values, kind="stable")[: max(0, k)]

    @classmethod
    def from_prediction(
        cls, prediction: Prediction, coords: np.ndarray, footprint: float, slide_id: str = ""
    ) -> SlideAttention:
        """The slide attention of a prediction made with `return_attention`."""
        if not prediction.attention_layers or WSI not in prediction.attention_layers:
            raise ExplainError("the prediction holds no slide attention: predict with return_attention")
        return cls(coords, np.asarray(prediction.attention_layers[WSI]), footprint, True, slide_id)

    @classmethod
    def from_response(
        cls, response: Mapping[str, Any] | Any, footprint: float | None = None, slide_id: str = ""
    ) -> SlideAttention:
        """From a /predict response body (a dict, or the service's PredictResponse): `attention["wsi"]`
        and `attention_coords`. The patch footprint defaults to the median spacing of the coordinates."""
        if hasattr(response, "model_dump"):
            response = response.model_dump()
        attention = (response.get("attention") or {}).get(WSI)
        coords = response.get("attention_coords")
        if attention is None or coords is None:
            raise ExplainError(
                "the response holds no slide attention with coordinates: send the slide with wsi_coords "
                "(one [x, y] per patch) and return_attention=true"
            )
        coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
        footprint = footprint or coordinate_spacing(coords)
        return cls(coords, np.asarray([attention]), footprint, False, slide_id)

    def to_json(self, top: np.ndarray | None = None, ranked_by: int | None = None) -> dict[str, Any]:
        """Per patch: x, y, attention (mean over layers) and, per layer, attention_layers (layer 1 first);
        `top`: the top patches' indices, listed with their rank and the attention they were ranked by."""
        patches = []
        for index, (x, y) in enumerate(self.coords.tolist()):
            patch: dict[str, Any] = {"x": x, "y": y, "attention": float(self.mean[index])}
            if self.per_layer:
                patch["attention_layers"] = [float(value) for value in self.layers[:, index]]
            patches.append(patch)
        return {
            "slide_id": self.slide_id,
            "n_patches": self.n_patches,
            "n_layers": len(self.layers) if self.per_layer else None,
            "patch_footprint_px": self.footprint,
            "coordinates": "level-0 px of each patch's top-left corner",
            "attention": "mean over heads and latents; each layer sums to 1 over the patches",
            "top_k": [
                {
                    "rank": rank,
                    "index": int(i),
                    "x": int(self.coords[i, 0]),
                    "y": int(self.coords[i, 1]),
                    "attention": float(self.values(ranked_by)[i]),
                }
                for rank, i in enumerate([] if top is None else top, start=1)
            ],
            "top_k_ranked_by": "mean" if ranked_by is None else f"layer {ranked_by}",
            "patches": patches,
        }


def coordinate_spacing(coords: np.ndarray) -> float:
    """The patch grid step in level-0 px: the median gap between neighbouring distinct x (and y) values."""
    gaps = []
    for axis in (0, 1):
        values = np.unique(np.asarray(coords)[:, axis])
        gaps.append(np.diff(values))
    steps = np.concatenate(gaps)
    steps = steps[steps > 0]
    return float(np.median(steps)) if len(steps) else DEFAULT_FOOTPRINT


def parse_layer(text: str | int) -> str | int:
    """'all', 'mean' or a layer number (1 = the first)."""
    if isinstance(text, int) or str(text).strip().isdigit():
        number = int(text)
        if number < 1:
            raise ExplainError(f"layers are numbered from 1, got {number}")
        return number
    if str(text) not in ("all", "mean"):
        raise ExplainError(f"layer must be 'all', 'mean' or a layer number, got {text!r}")
    return str(text)


def panels(attention: SlideAttention, layer: str | int = "all") -> list[tuple[str, int | None]]:
    """(title, layer number or None for the mean) of each heatmap panel."""
    layer = parse_layer(layer)
    count = len(attention.layers)
    if isinstance(layer, int):
        attention.values(layer)  # refuses a layer the model does not have
        return [(f"layer {layer} of {count}", layer)]
    if layer == "mean" or not attention.per_layer:
        label = f"mean of {count} layers" if attention.per_layer and count > 1 else "mean over layers"
        return [(label, None)]
    if count == 1:
        return [("layer 1 (the only one)", None)]
    return [*((f"layer {i}", i) for i in range(1, count + 1)), (f"mean of {count} layers", None)]


def rasterise(
    coords: np.ndarray,
    values: np.ndarray,
    footprint: float,
    origin: tuple[float, float],
    size: tuple[float, float],
    shape: tuple[int, int],
) -> np.ndarray:
    """(h, w) grid over the level-0 box `origin` + `size`: each patch's square filled with its value,
    NaN where no patch lies; where patches overlap the higher value shows."""
    height, width = shape
    scale = np.array([width / size[0], height / size[1]])
    start = np.floor((coords - np.asarray(origin)) * scale).astype(int)
    stop = np.maximum(start + 1, np.ceil((coords + footprint - np.asarray(origin)) * scale).astype(int))
    start = np.clip(start, 0, [width, height])
    stop = np.clip(stop, 0, [width, height])
    grid = np.full(shape, np.nan, dtype=np.float32)
    for index in np.argsort(values, kind="stable"):  # the highest last
        (left, top), (right, bottom) = start[index], stop[index]
        grid[top:bottom, left:right] = values[index]
    return grid


@dataclass
class SlideImages:
    """What the slide file gives the drawing: its thumbnail, level-0 size and the top-k tiles."""

    thumbnail: np.ndarray | None = None  # (h, w, 3) uint8
    size: tuple[int, int] | None = None  # level-0 (width, height)
    tiles: list[np.ndarray] = field(default_factory=list)  # (TILE_PX, TILE_PX, 3) uint8 per top patch


def read_slide_images(
    path: Path, coords: np.ndarray, footprint: float, thumbnail_side: int = THUMBNAIL_SIDE
) -> SlideImages:
    """The slide's thumbnail (OpenSlide get_thumbnail) and the patches at `coords` (read_region at the
    level closest to TILE_PX px per patch)."""
    import openslide
    from PIL import Image

    from healnet.preprocess.wsi import to_rgb

    try:
        with openslide.OpenSlide(Path(path)) as slide:
            thumbnail = np.asarray(slide.get_thumbnail((thumbnail_side, thumbnail_side)).convert("RGB"))
            level = slide.get_best_level_for_downsample(footprint / TILE_PX)
            downsample = slide.level_downsamples[level]
            side = max(1, round(footprint / downsample))
            tiles = []
            for x, y in np.asarray(coords).tolist():
                region = to_rgb(slide.read_region((int(x), int(y)), level, (side, side)))
                tiles.append(np.asarray(Image.fromarray(region).resize((TILE_PX, TILE_PX))))
            return SlideImages(thumbnail, slide.dimensions, tiles)
    except (openslide.OpenSlideError, OSError) as error:
        raise ExplainError(f"cannot read the slide {path}: {error}") from error


def figure_size(n_panels: int, top_k: int) -> tuple[float, float]:
    """Inches (width, height) of the heatmap figure; its PNG is DPI times that."""
    width = max(n_panels * PANEL_INCHES + COLOURBAR_INCHES, top_k * TILE_INCHES, 6.0)
    height = PANEL_INCHES + TITLE_INCHES + (TILE_INCHES + 0.4 if top_k else 0.0)
    return width, height


def render_heatmap(
    attention: SlideAttention,
    out: Path,
    images: SlideImages | None = None,
    layer: str | int = "all",
    top_k: int = 8,
    title: str = "",
    palette: bool = False,
) -> Path:
    """Write the heatmap PNG: one panel per layer (and the mean), a shared colour bar, and the top-k
    patches (by the mean, or by the one layer drawn) as tiles; without `images` on a blank canvas.
    `palette`: a 256-colour PNG, about a quarter of the size (for documents), else RGB."""
    import io

    import matplotlib
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle
    from PIL import Image

    images = images or SlideImages()
    shown = panels(attention, layer)
    ranked_by = shown[0][1] if len(shown) == 1 else None
    top = attention.top_k(top_k, ranked_by)
    n, footprint = attention.n_patches, attention.footprint

    if images.thumbnail is not None and images.size is not None:
        origin, size = (0.0, 0.0), (float(images.size[0]), float(images.size[1]))
        background = images.thumbnail
    else:  # the patches' bounding box with a margin of half a patch
        low = attention.coords.min(0) - footprint / 2
        high = attention.coords.max(0) + 1.5 * footprint
        origin, size = (float(low[0]), float(low[1])), (float(high[0] - low[0]), float(high[1] - low[1]))
        scale = THUMBNAIL_SIDE / max(size)
        shape = (max(1, round(size[1] * scale)), max(1, round(size[0] * scale)))
        background = np.empty((*shape, 3), dtype=np.float32)
        background[:] = CANVAS
    extent = (origin[0], origin[0] + size[0], origin[1] + size[1], origin[1])
    scaled = {number: attention.values(number) * n for _, number in shown}
    vmax = float(np.percentile(np.concatenate(list(scaled.values())), 99)) or 1.0
    norm = Normalize(0.0, vmax)
    colours = matplotlib.colormaps[COLOUR_MAP].with_extremes(bad=(0, 0, 0, 0))

    width, height = figure_size(len(shown), top_k)
    figure = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    top_height = PANEL_INCHES + TITLE_INCHES
    upper: Any = figure
    lower: Any = None
    if top_k:
        parts: Any = figure.subfigures(2, 1, height_ratios=[top_height, height - top_height])
        upper, lower = parts
    axes = np.atleast_1d(upper.subplots(1, len(shown)))
    for ax, (label, number) in zip(axes, shown, strict=True):
        ax.imshow(background, extent=extent, interpolation="antialiased")
        grid = rasterise(attention.coords, scaled[number], footprint, origin, size, background.shape[:2])
        ax.imshow(grid, extent=extent, cmap=colours, norm=norm, alpha=OVERLAY_ALPHA, interpolation="nearest")
        ax.set_title(label, fontsize=11)
        ax.set_axis_off()
    last = axes[-1]
    for rank, index in enumerate(top, start=1):
        x, y = attention.coords[index]
        last.add_patch(Rectangle((x, y), footprint, footprint, fill=False, edgecolor="white", linewidth=1.2))
        last.text(
            x + footprint * 0.06,
            y + footprint * 0.06,
            str(rank),
            color="white",
            fontsize=8,
            fontweight="bold",
            ha="left",
            va="top",
            bbox={"facecolor": "black", "alpha": 0.5, "pad": 1, "linewidth": 0},
            clip_on=True,
        )
    scale_bar = ScalarMappable(norm, colours)  # opaque, unlike the overlay
    upper.colorbar(scale_bar, ax=list(axes), shrink=0.85, extend="max", label=SCALE_LABEL)
    upper.suptitle(title or attention.slide_id or "slide attention", fontsize=12)

    if lower is not None:
        tile_axes = np.atleast_1d(lower.subplots(1, top_k))
        values = attention.values(ranked_by)
        for rank, ax in enumerate(tile_axes, start=1):
            ax.set_axis_off()
            if rank > len(top):
                continue
            index = int(top[rank - 1])
            x, y = attention.coords[index]
            caption = f"#{rank}  {values[index] * n:.2f}\n({x}, {y})"
            if rank <= len(images.tiles):
                ax.imshow(images.tiles[rank - 1])
                ax.set_title(caption, fontsize=8)
            else:
                ax.text(0.5, 0.5, caption, ha="center", va="center", fontsize=9, transform=ax.transAxes)
                ax.add_patch(
                    Rectangle((0.05, 0.05), 0.9, 0.9, fill=False, edgecolor="0.6", transform=ax.transAxes)
                )
        lower.suptitle(
            f"top {len(top)} patches by {'the mean attention' if ranked_by is None else f'layer {ranked_by}'}"
            + ("" if images.tiles else " (no slide file: positions and scores only)"),
            fontsize=10,
        )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, facecolor="white")
    buffer.seek(0)
    with Image.open(buffer) as drawn:  # RGB: the alpha channel is opaque anyway and costs a third
        rgb = drawn.convert("RGB")
        (rgb.quantize(256, method=Image.Quantize.FASTOCTREE) if palette else rgb).save(out, optimize=True)
    return out


def draw_heatmap(
    attention: SlideAttention,
    out: Path,
    slide_path: Path | None = None,
    layer: str | int = "all",
    top_k: int = 8,
    title: str = "",
    palette: bool = False,
) -> Path:
    """`render_heatmap` over the slide's thumbnail and tiles when `slide_path` is given, else on a blank
    canvas. Works as well from a service response (`SlideAttention.from_response`)."""
    shown = panels(attention, layer)
    top = attention.top_k(top_k, shown[0][1] if len(shown) == 1 else None)
    images = None
    if slide_path is not None:
        images = read_slide_images(slide_path, attention.coords[top], attention.footprint)
    return render_heatmap(attention, out, images, layer, top_k, title, palette)
