"""Import precomputed patch features (CLAM, TRIDENT) as our per-slide feature files.

Pathology cohorts often come with patch features already computed by a foundation model. This module
reads them, checks every slide, and writes `out/<encoder key>/<slide>.parquet` in the format of
`healnet.preprocess.feature_files` (x, y, f_0..f_{d-1}, with the encoder's provenance), so that training,
serving and heatmaps treat them like the features of `healnet preprocess-slides`.

The sources are read by `healnet.preprocess.feature_sources` (CLAM, TRIDENT and flat layouts,
`detect_layout`). The slide id is the file stem, kept whole (TCGA ids such as
`TCGA-XX-YYYY-01Z-00-DX1.<uuid>`). Coordinates are level-0 pixels (x, y) of the patch's top-left corner.
A magnification becomes µm/px by the convention 10 / magnification (20× ≈ 0.5 µm/px, 40× ≈ 0.25), as in
`slide_mpp` and in TRIDENT.

A slide whose files cannot be read or fail a check (2-D floating features of the import's width, finite,
at least one patch; coordinates (n, 2) of whole non-negative pixels, one per patch, no duplicates; the
import's patch grid) is quarantined with the reason, never written. So is a slide whose id cannot name a
file (`check_file_name`), and one whose arrays, by the shapes the files declare, would need more memory to
import than the per-slide budget (`ImportConfig.max_slide_bytes`): shapes are checked before any data is
read, since a few KB of HDF5 can declare terabytes.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from healnet.files import DEFAULT_MAX_SLIDE_BYTES, UnsafeNameError, check_file_name
from healnet.preprocess.encoders import EncoderProvenance, FeatureProvenance
from healnet.preprocess.feature_files import (
    MPP_TOLERANCE,
    QUARANTINE_FILE,
    SlideInputError,
    feature_file_name,
    read_feature_provenance,
    write_quarantine,
    write_slide_features,
)
from healnet.preprocess.feature_sources import (
    FeatureFileError,
    FeatureSource,
    SlideData,
    SourceLayout,
    detect_layout,
    read_source,
)

SHA256 = re.compile(r"[0-9a-f]{64}")


def magnification_to_mpp(magnification: float) -> float:
    """µm/px of a nominal objective magnification: 10 / magnification (20× ≈ 0.5 µm/px, 40× ≈ 0.25)."""
    return 10.0 / magnification


@dataclass(frozen=True)
class ImportConfig:
    """The encoder that computed the features (it cannot be read from CLAM or TRIDENT files) and,
    optionally, the patch grid and feature width; `patch_size` and `mpp` override the files' attributes."""

    encoder_name: str
    weights_sha256: str | None = None  # None: the weights are not known, tiles cannot be encoded in serving
    normalisation: str = "imagenet"
    input_size: int = 224
    encoder_dim: int | None = None  # None: the width of the files (the most common one)
    patch_size: int | None = None  # patch side in px at `mpp`; None: the files' patch_size attribute
    mpp: float | None = None  # µm/px of the patches; None: 10 / the files' target_magnification
    max_slide_bytes: int = DEFAULT_MAX_SLIDE_BYTES  # memory one slide's arrays may need (`import_bytes`)

    def __post_init__(self) -> None:
        if not self.encoder_name.strip():
            raise SlideInputError(
                "--encoder-name must name the encoder (e.g. uni_v1, conch_v1, resnet50_trunc)"
            )
        try:  # it names the output folder
            check_file_name(self.encoder_name, "--encoder-name")
        except UnsafeNameError as error:
            raise SlideInputError(str(error)) from error
        if self.max_slide_bytes < 1:
            raise SlideInputError(f"the per-slide memory budget must be positive, got {self.max_slide_bytes}")
        if self.weights_sha256 is not None:
            digest = self.weights_sha256.strip().lower()
            if not SHA256.fullmatch(digest):
                raise SlideInputError(
                    f"--weights-sha256 must be 64 hex digits (sha256sum of the weights file), "
                    f"got {self.weights_sha256!r}"
                )
            object.__setattr__(self, "weights_sha256", digest)
        for name in ("encoder_dim", "patch_size", "input_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise SlideInputError(f"{name} must be positive, got {value}")
        if self.mpp is not None and not self.mpp > 0:
            raise SlideInputError(f"--mpp must be positive µm per pixel, got {self.mpp}")
        self.encoder(1)  # the normalisation is valid

    def encoder(self, dim: int) -> EncoderProvenance:
        return EncoderProvenance(
            self.encoder_name, self.weights_sha256, dim, self.input_size, self.normalisation
        )


def check_slide(features: np.ndarray, coords: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """(float32 features, int64 coords) when they pass every check, else FeatureFileError with the reason."""
    features, coords = np.asarray(features), np.asarray(coords)
    if features.ndim != 2:
        raise FeatureFileError(f"features must be 2-D (patches × features), got shape {features.shape}")
    if not np.issubdtype(features.dtype, np.floating):
        raise FeatureFileError(f"features must be floating point, got {features.dtype}")
    if len(features) == 0:
        raise FeatureFileError("no patches: the features have 0 rows")
    if features.shape[1] != dim:
        raise FeatureFileError(f"{features.shape[1]} features per patch, the import's encoder gives {dim}")
    with np.errstate(over="ignore"):  # values beyond float32 become inf, refused just below
        values = features.astype(np.float32)
    finite = np.isfinite(values)
    if not finite.all():
        rows = int((~finite).any(axis=1).sum())
        raise FeatureFileError(
            f"{int((~finite).sum())} non-finite feature value(s) (NaN or inf in float32) in {rows} patch(es)"
        )
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise FeatureFileError(f"coords must be (patches, 2) x, y, got shape {coords.shape}")
    if len(coords) != len(features):
        raise FeatureFileError(f"{len(coords)} coordinates for {len(features)} patches")
    if np.issubdtype(coords.dtype, np.floating):
        if not (np.isfinite(coords).all() and (coords == np.round(coords)).all()):
            raise FeatureFileError("coords must be whole level-0 pixels; some are fractional or not finite")
    elif not np.issubdtype(coords.dtype, np.integer):
        raise FeatureFileError(f"coords must be integers (level-0 pixels), got {coords.dtype}")
    pixels = coords.astype(np.int64)
    if (pixels < 0).any():
        raise FeatureFileError(f"negative coordinates (smallest x, y: {pixels.min(axis=0).tolist()})")
    unique, counts = np.unique(pixels, axis=0, return_counts=True)
    if len(unique) < len(pixels):
        example = unique[np.argmax(counts > 1)].tolist()
        raise FeatureFileError(f"{len(pixels) - len(unique)} duplicate coordinate(s), e.g. {example}")
    return values, pixels


# ---------------------------------------------------------------------------------------------
# The patch grid


@dataclass(frozen=True)
class Grid:
    """A slide's patch grid as its files tell it (None: not said)."""

    patch_size: int | None
    magnification: float | None  # target magnification (TRIDENT)

    @classmethod
    def of(cls, attributes: dict[str, Any], hints: dict[str, Any]) -> Grid:
        merged = hints | attributes

        def number(name: str) -> float | None:
            try:
                value = float(merged[name])
            except (KeyError, TypeError, ValueError):
                return None
            return value if value > 0 else None  # TRIDENT writes -1 for "unknown"

        patch_size = number("patch_size")
        return cls(None if patch_size is None else round(patch_size), number("target_magnification"))


def _most_common(values: Sequence[Any]) -> Any:
    present = [value for value in values if value is not None]
    return Counter(present).most_common(1)[0][0] if present else None


def _same_mpp(a: float, b: float) -> bool:
    return abs(a - b) <= MPP_TOLERANCE * max(a, b)


def patch_size_level0(attributes: dict[str, Any], patch_size: int) -> int | None:
    """A patch's side in level-0 px when the attributes tell it (TRIDENT's patch_size_level0, CLAM's
    downsample of the patch level, or the two magnifications)."""
    try:
        if "patch_size_level0" in attributes:
            return round(float(attributes["patch_size_level0"]))
        if "downsample" in attributes:
            downsample = attributes["downsample"]
            return round(patch_size * float(downsample[0] if isinstance(downsample, list) else downsample))
        if "level0_magnification" in attributes and "target_magnification" in attributes:
            ratio = float(attributes["level0_magnification"]) / float(attributes["target_magnification"])
            return round(patch_size * ratio) if ratio > 0 else None
    except (TypeError, ValueError, IndexError, ZeroDivisionError):
        return None
    return None


# ---------------------------------------------------------------------------------------------
# Many slides


@dataclass(frozen=True)
class ImportedSlide:
    slide_id: str
    n_patches: int
    features_path: Path
    source: Path


@dataclass
class ImportReport:
    layout: str
    source: Path
    out_dir: Path
    provenance: FeatureProvenance | None = None
    imported: list[ImportedSlide] = field(default_factory=list)
    quarantined: list[tuple[str, str]] = field(default_factory=list)  # (slide, reason)

    @property
    def n_patches(self) -> int:
        return sum(slide.n_patches for slide in self.imported)


def import_features(source: Path, out: Path, config: ImportConfig, progress: bool = True) -> ImportReport:
    """Import the patch features in `source` (any layout of `detect_layout`) into
    `out/<encoder key>/<slide>.parquet`, with `report.json` (and `quarantine.csv` when a slide was
    quarantined) in that folder.

    The feature width is `config.encoder_dim`, else the most common width of the files; the patch grid is
    `config.patch_size` and `config.mpp`, else the most common grid of the files' attributes. A slide that
    differs, or fails `check_slide`, is quarantined. Raises SlideInputError when `source` holds no feature
    files, when neither the config nor the files give the patch size or µm/px (the message names the flag),
    or when the output folder already holds features of another encoder or grid.
    """
    layout = detect_layout(Path(source), config.encoder_name)
    if not layout.sources:
        raise SlideInputError(
            f"no feature files (.h5, .pt) in {layout.root} ({layout.kind} layout); expected CLAM "
            "h5_files/<slide>.h5 or pt_files/<slide>.pt, TRIDENT features_<encoder>/<slide>.h5, or .h5/.pt files"
        )
    out_dir = Path(out) / config.encoder(1).key
    report = ImportReport(layout.kind, layout.root, out_dir)
    quarantined: dict[str, str] = {}

    owners: dict[str, str] = {}  # output file name -> the slide that writes it
    for entry in layout.sources:
        try:
            check_file_name(entry.slide_id, "slide id")
        except UnsafeNameError as error:
            quarantined[entry.slide_id] = str(error)
            continue
        owner = owners.setdefault(feature_file_name(entry.slide_id), entry.slide_id)
        if owner != entry.slide_id:
            quarantined[entry.slide_id] = (
                f"duplicate feature file {feature_file_name(owner)}: {owner} writes it"
            )

    # pass 1: shapes and attributes only, to choose the width and grid that most slides share
    headers: dict[str, SlideData] = {}
    for entry in tqdm(layout.sources, desc="inspect", unit="slide", disable=not progress, leave=False):
        if entry.slide_id in quarantined:
            continue
        try:
            header = read_source(entry, load=False, max_bytes=config.max_slide_bytes)
        except FeatureFileError as error:
            quarantined[entry.slide_id] = str(error)
            continue
        shape = header.features[0]
        if len(shape) != 2:
            quarantined[entry.slide_id] = f"features must be 2-D (patches × features), got shape {shape}"
        else:
            headers[entry.slide_id] = header
    grids = {slide: Grid.of(header.attributes, layout.attributes) for slide, header in headers.items()}
    dim = config.encoder_dim or _most_common([header.features[0][1] for header in headers.values()])
    patch_size = config.patch_size or _most_common([grid.patch_size for grid in grids.values()])
    magnification = _most_common([grid.magnification for grid in grids.values()])
    if headers and patch_size is None:
        raise SlideInputError(
            f"no patch size: the files in {layout.root} have no patch_size attribute; give --patch-size "
            "(the patch side in pixels at --mpp)"
        )
    mpp = config.mpp or (None if magnification is None else magnification_to_mpp(magnification))
    if headers and mpp is None:
        raise SlideInputError(
            f"no resolution: the files in {layout.root} have no target_magnification attribute (CLAM files "
            "never do); give --mpp (the patches' µm per pixel, e.g. 0.5 for 20×, 0.25 for 40×)"
        )
    for slide, grid in grids.items():
        reason = _grid_mismatch(grid, config, patch_size, magnification)
        if reason:
            quarantined[slide] = reason

    if dim is not None and patch_size is not None and mpp is not None:
        report.provenance = FeatureProvenance(config.encoder(int(dim)), int(patch_size), float(mpp))
        check_destination(out_dir, report.provenance)
    out_dir.mkdir(parents=True, exist_ok=True)

    # pass 2: read, check and write each slide
    for entry in tqdm(layout.sources, desc="slides", unit="slide", disable=not progress):
        if entry.slide_id in quarantined or report.provenance is None:
            continue
        try:
            imported = _import_one(entry, out_dir, report.provenance, layout, config.max_slide_bytes)
            report.imported.append(imported)
        except FeatureFileError as error:
            quarantined[entry.slide_id] = str(error)
    report.quarantined = [(slide, quarantined[slide]) for slide in sorted(quarantined)]
    for slide, _ in report.quarantined:  # an earlier import's file of a slide now refused would mislead
        stale = out_dir / feature_file_name(slide)
        if owners.get(stale.name) == slide and stale.exists():
            stale.unlink()
    write_import_report(report)
    return report


def _grid_mismatch(grid: Grid, config: ImportConfig, patch_size: int, magnification: float | None) -> str:
    if grid.patch_size is None and config.patch_size is None:
        return "no patch size: the file has no patch_size attribute (give --patch-size to import it)"
    if grid.patch_size is not None and grid.patch_size != patch_size:
        told = "--patch-size" if config.patch_size else "the import's (most slides')"
        return f"patch size {grid.patch_size} px differs from {told} {patch_size} px"
    if grid.magnification is None and config.mpp is None:
        return "no resolution: the file has no target_magnification attribute (give --mpp to import it)"
    if (
        grid.magnification is not None
        and magnification is not None
        and not _same_mpp(grid.magnification, magnification)
    ):
        return f"target magnification {grid.magnification:g}× differs from the import's {magnification:g}×"
    return ""


def _import_one(
    entry: FeatureSource,
    out_dir: Path,
    provenance: FeatureProvenance,
    layout: SourceLayout,
    max_bytes: int,
) -> ImportedSlide:
    data = read_source(entry, load=True, max_bytes=max_bytes)
    features, coords = check_slide(data.features, data.coords, provenance.encoder.dim)
    attributes = layout.attributes | data.attributes
    level = attributes.get("patch_level")
    metadata = {
        "encoder": provenance.encoder.to_dict(),
        "target_mpp": provenance.target_mpp,
        "patch_size": provenance.patch_size,
        "slide_mpp": None,  # not in CLAM or TRIDENT files (a nominal magnification is not a resolution)
        "level": level if isinstance(level, int) else None,
        "slide_id": entry.slide_id,
        "patch_size_level0": patch_size_level0(attributes, provenance.patch_size),
        "imported_from": {
            "layout": layout.kind,
            "features": str(data.features_file),
            "coords": str(data.coords_file),
            "attributes": attributes,
        },
    }
    path = out_dir / feature_file_name(entry.slide_id)
    write_slide_features(path, features, coords, metadata)
    return ImportedSlide(entry.slide_id, len(features), path, data.features_file)


def check_destination(out_dir: Path, provenance: FeatureProvenance) -> None:
    """Refuse to add features to a folder that holds another encoder's or grid's: training refuses mixed
    folders, so the mix would only show later."""
    if not out_dir.is_dir():
        return
    for path in sorted(out_dir.glob("*.parquet")):
        existing = read_feature_provenance(path)
        if existing != provenance:
            raise SlideInputError(
                f"{out_dir} already holds features of {existing.describe()} (e.g. {path.name}); this import's "
                f"are {provenance.describe()} and would not be comparable: import into another --out, or "
                "remove the folder"
            )


def write_import_report(report: ImportReport) -> None:
    summary = {
        "layout": report.layout,
        "source": str(report.source),
        "out_dir": str(report.out_dir),
        "encoder": None if report.provenance is None else report.provenance.encoder.to_dict(),
        "tiling": None if report.provenance is None else report.provenance.tiling,
        "n_patches": report.n_patches,
        "imported": [
            {
                "slide": slide.slide_id,
                "n_patches": slide.n_patches,
                "features_path": str(slide.features_path),
                "source": str(slide.source),
            }
            for slide in report.imported
        ],
        "quarantined": [{"slide": slide, "reason": reason} for slide, reason in report.quarantined],
    }
    report.out_dir.mkdir(parents=True, exist_ok=True)
    (report.out_dir / "report.json").write_text(json.dumps(summary, indent=2))
    write_quarantine(report.out_dir / QUARANTINE_FILE, report.quarantined)
