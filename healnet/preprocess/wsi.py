"""Whole-slide image tiling: µm/px, patch grid, encoding and the run over many slides (the encoders are in
`healnet.preprocess.encoders`, tissue detection in `healnet.preprocess.tissue`, the feature file format in
`healnet.preprocess.feature_files`).

Slides are read with OpenSlide only. A slide becomes a bag of patches on a regular grid at
`TilingConfig.target_mpp` µm/px; patches whose tissue fraction (from the thumbnail's Otsu mask, cleaned
of specks and small holes) reaches `min_tissue_fraction` are encoded and written to
`out_dir/<feature_file_name(slide_id)>`. Slides that cannot be processed are quarantined with a reason,
never skipped silently: among them slide ids that cannot name a file (`check_file_name`) and, when a slide
root is given, slide files that resolve (symlinks followed) outside it; slides whose feature file is
already complete for the same encoder and tiling settings are skipped (resume) unless `overwrite=True`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import cast

import numpy as np
import openslide
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from einops import rearrange
from PIL import Image
from tqdm import tqdm

from healnet.errors import HEALNetError
from healnet.files import UnsafeNameError, check_file_name
from healnet.preprocess.encoders import PatchEncoder, encode_tiles, make_encoder
from healnet.preprocess.feature_files import (
    MPP_TOLERANCE,
    QUARANTINE_FILE,
    SLIDE_SUFFIXES,
    SlideInputError,
    feature_file_name,
    read_feature_metadata,
    set_aside_earlier_features,
    shard_file_name,
    slide_stem,
    write_quarantine,
    write_slide_features,
)
from healnet.preprocess.tissue import MIN_TISSUE_AREA_UM2, cell_tissue_fractions, draw_overlay, tissue_mask

THUMBNAIL_PX_PER_PATCH = 16  # a finer tissue mask only costs time ...
MIN_THUMBNAIL = 256  # ... but the thumbnail stays large enough to look at
# TIFF resolution tags coarser than this are an image editor's default (72, 96 or 300 dpi), not a scan.
MAX_TIFF_MPP = 50.0
MPP_SOURCES = ("openslide", "manifest", "tiff", "objective-power")  # in order of precedence


class SlideError(HEALNetError):
    """A slide that cannot be turned into patch features; the message is the quarantine reason."""


@dataclass(frozen=True)
class TilingConfig:
    """Patch grid settings. The thumbnail (tissue mask) is at most `thumbnail_max` px on its long side,
    and no finer than `THUMBNAIL_PX_PER_PATCH` px per patch unless that is under `MIN_THUMBNAIL` px;
    `batch_size` patches go to the encoder at once."""

    target_mpp: float = 1.0
    patch_size: int = 224
    min_tissue_fraction: float = 0.5
    thumbnail_max: int = 1024
    batch_size: int = 64

    def __post_init__(self) -> None:
        if self.target_mpp <= 0 or self.patch_size < 8 or self.thumbnail_max < 16 or self.batch_size < 1:
            raise SlideInputError(
                f"invalid tiling config {self}: need target_mpp > 0, patch_size >= 8, "
                "thumbnail_max >= 16 and batch_size >= 1"
            )
        if not 0.0 <= self.min_tissue_fraction <= 1.0:
            raise SlideInputError(f"min_tissue_fraction must lie in [0, 1], got {self.min_tissue_fraction}")


@dataclass(frozen=True)
class SlideResult:
    slide_id: str
    n_patches: int
    features_path: Path
    thumbnail_path: Path
    level: int
    mpp: float


@dataclass
class PreprocessReport:
    processed: list[SlideResult] = field(default_factory=list)
    quarantined: list[tuple[str, str]] = field(default_factory=list)  # (slide, reason)
    skipped: list[SlideResult] = field(default_factory=list)  # feature file already complete (resume)

    @property
    def n_patches(self) -> int:
        return sum(result.n_patches for result in self.processed)


def thumbnail_file_name(slide_id: str) -> str:
    return slide_stem(slide_id) + ".thumbnail.png"


def slide_mpp(slide: openslide.OpenSlide, manifest_mpp: float | None = None) -> float:
    """Level-0 µm/px (see `slide_mpp_and_source`)."""
    return slide_mpp_and_source(slide, manifest_mpp)[0]


def slide_mpp_and_source(slide: openslide.OpenSlide, manifest_mpp: float | None = None) -> tuple[float, str]:
    """Level-0 µm/px and where it comes from (`MPP_SOURCES`), the first usable of:

    - "openslide": `openslide.mpp-x` as the slide format records it (except for generic TIFFs, where
      OpenSlide 4 derives it from the resolution tags: those count as "tiff", whatever the version);
    - "manifest": the manifest's `mpp` column for this slide (`manifest_mpp`);
    - "tiff": the TIFF resolution tags, `tiff.XResolution` px per `tiff.ResolutionUnit` (inch or
      centimeter), unless coarser than `MAX_TIFF_MPP` (an image editor's 72 dpi is not a scan);
    - "objective-power": 10 / `openslide.objective-power` (20× ≈ 0.5 µm/px), a rough estimate.

    Raises `SlideError` (the quarantine reason) when none is usable.
    """
    properties = slide.properties
    problems: list[str] = []

    def positive(name: str, value: object, convert: Callable[[float], float] = float) -> float | None:
        try:
            mpp = convert(float(cast(str, value)))
        except (TypeError, ValueError, ZeroDivisionError):
            mpp = float("nan")
        if np.isfinite(mpp) and mpp > 0:
            return mpp
        problems.append(f"unusable {name}={value!r}")
        return None

    generic_tiff = properties.get(openslide.PROPERTY_NAME_VENDOR) == "generic-tiff"
    if openslide.PROPERTY_NAME_MPP_X in properties and not generic_tiff:
        mpp = positive(openslide.PROPERTY_NAME_MPP_X, properties[openslide.PROPERTY_NAME_MPP_X])
        if mpp is not None:
            return mpp, "openslide"
    if manifest_mpp is not None and (mpp := positive("manifest mpp", manifest_mpp)) is not None:
        return mpp, "manifest"
    um_per_unit = {"inch": 25_400.0, "centimeter": 10_000.0}.get(properties.get("tiff.ResolutionUnit", ""))
    if um_per_unit is not None and "tiff.XResolution" in properties:
        mpp = positive("tiff.XResolution", properties["tiff.XResolution"], lambda px: um_per_unit / px)
        if mpp is not None and mpp <= MAX_TIFF_MPP:
            return mpp, "tiff"
        if mpp is not None:
            problems.append(
                f"the TIFF resolution tags give {mpp:.1f} µm/px ({properties['tiff.XResolution']} px per "
                f"{properties['tiff.ResolutionUnit']}), an image editor's default rather than a scan"
            )
    if openslide.PROPERTY_NAME_OBJECTIVE_POWER in properties:
        power = properties[openslide.PROPERTY_NAME_OBJECTIVE_POWER]
        mpp = positive(openslide.PROPERTY_NAME_OBJECTIVE_POWER, power, lambda value: 10.0 / value)
        if mpp is not None:
            return mpp, "objective-power"
    found = f" ({'; '.join(problems)})" if problems else ""
    raise SlideError(
        "no resolution: neither openslide.mpp-x, TIFF resolution tags (inch or centimeter), "
        f"openslide.objective-power nor a manifest mpp gives the slide's µm/px{found}; give it in an "
        "`mpp` column of a manifest (slide_id, path, mpp)"
    )


def choose_level(level_mpps: Sequence[float], target_mpp: float) -> int:
    """The level with the largest µm/px that is still ≤ target (within `MPP_TOLERANCE`)."""
    finer = [level for level, mpp in enumerate(level_mpps) if mpp <= target_mpp * (1 + MPP_TOLERANCE)]
    if not finer:
        raise SlideError(
            f"slide resolution {level_mpps[0]:.3f} µm/px is coarser than the target {target_mpp} µm/px"
        )
    return max(finer, key=lambda level: level_mpps[level])


def consecutive_runs(columns: np.ndarray, max_length: int) -> list[np.ndarray]:
    """Split sorted column indices into runs of consecutive values, each at most `max_length` long."""
    runs = np.split(columns, np.flatnonzero(np.diff(columns) != 1) + 1)
    return [run[start : start + max_length] for run in runs for start in range(0, len(run), max_length)]


def to_rgb(region: Image.Image) -> np.ndarray:
    """OpenSlide's RGBA region (not premultiplied) composited over white, as (h, w, 3) uint8."""
    alpha = region.getchannel("A")
    if cast(tuple[int, int], alpha.getextrema())[0] < 255:  # transparent where the scanner captured nothing
        background = Image.new("RGB", region.size, "white")
        background.paste(region, mask=alpha)
        region = background
    return np.asarray(region.convert("RGB"))


# ---------------------------------------------------------------------------------------------
# One slide


def preprocess_slide(
    path: Path,
    out_dir: Path,
    encoder: PatchEncoder,
    config: TilingConfig = TilingConfig(),
    slide_id: str | None = None,
    mpp: float | None = None,
) -> SlideResult:
    """Tile one slide, encode its tissue patches and write its thumbnail, then its feature file (last,
    atomically: a feature file is only there when the slide is done).

    `mpp` is the manifest's µm/px for the slide, if any (see `slide_mpp_and_source`). Raises
    `SlideError` (the quarantine reason) when the slide id cannot name a file (`unsafe_name`), the slide
    is unreadable, has no resolution, is coarser
    than the target or has no tissue patch.
    """
    path, out_dir = Path(path), Path(out_dir)
    slide_id = slide_id or path.name
    if unsafe_name(slide_id):
        raise SlideError(unsafe_name(slide_id))
    if not path.is_file():
        raise SlideError(f"file not found: {path}")
    try:
        with openslide.OpenSlide(path) as slide:
            return _preprocess_open_slide(slide, out_dir, encoder, config, slide_id, mpp)
    except openslide.OpenSlideError as error:
        raise SlideError(f"unreadable slide ({type(error).__name__}): {error}") from error


def _preprocess_open_slide(
    slide: openslide.OpenSlide,
    out_dir: Path,
    encoder: PatchEncoder,
    config: TilingConfig,
    slide_id: str,
    manifest_mpp: float | None = None,
) -> SlideResult:
    mpp, mpp_source = slide_mpp_and_source(slide, manifest_mpp)
    level = choose_level([mpp * downsample for downsample in slide.level_downsamples], config.target_mpp)
    downsample = slide.level_downsamples[level]
    read_size = max(1, round(config.patch_size * config.target_mpp / (mpp * downsample)))
    level_width, level_height = slide.level_dimensions[level]
    n_rows, n_cols = level_height // read_size, level_width // read_size
    if n_rows == 0 or n_cols == 0:
        raise SlideError(
            f"slide level {level} ({level_width}×{level_height} px) is smaller than one {read_size} px patch"
        )

    side = min(config.thumbnail_max, max(MIN_THUMBNAIL, THUMBNAIL_PX_PER_PATCH * max(n_rows, n_cols)))
    thumbnail = np.asarray(slide.get_thumbnail((side, side)).convert("RGB"))
    thumbnail_mpp = mpp * slide.dimensions[0] / thumbnail.shape[1]
    mask = tissue_mask(thumbnail, min_area_px=MIN_TISSUE_AREA_UM2 / thumbnail_mpp**2)
    fractions = cell_tissue_fractions(mask, slide.dimensions, read_size * downsample, n_rows, n_cols)
    kept = fractions >= config.min_tissue_fraction
    if not kept.any():
        raise SlideError(
            f"no tissue: no patch reaches tissue fraction {config.min_tissue_fraction} "
            f"(the mask covers {mask.mean():.1%} of the thumbnail)"
        )

    def level0(index: np.ndarray | int) -> np.ndarray:
        return np.round(np.asarray(index) * read_size * downsample).astype(np.int64)

    batches: list[np.ndarray] = []
    tiles: list[np.ndarray] = []  # tiles wait until a full batch goes to the encoder
    coord_runs: list[np.ndarray] = []
    for row in np.flatnonzero(kept.any(axis=1)):
        for run in consecutive_runs(np.flatnonzero(kept[row]), config.batch_size):
            # one read per run of neighbouring patches, cut into patches with numpy
            region = slide.read_region(
                (int(level0(int(run[0]))), int(level0(int(row)))), level, (len(run) * read_size, read_size)
            )
            tiles.extend(rearrange(to_rgb(region), "h (n w) c -> n h w c", n=len(run)))
            coord_runs.append(np.stack([level0(run), np.full(len(run), level0(int(row)))], axis=1))
            if len(tiles) >= config.batch_size:
                batches.append(encode_tiles(tiles, encoder, config.patch_size))
                tiles = []
    batches.append(encode_tiles(tiles, encoder, config.patch_size))
    features, coords = np.concatenate(batches), np.concatenate(coord_runs)

    out_dir.mkdir(parents=True, exist_ok=True)
    thumbnail_path = out_dir / thumbnail_file_name(slide_id)
    scale = np.array(thumbnail.shape[1::-1]) / np.array(slide.dimensions)  # thumbnail px per level-0 px
    boxes = np.concatenate([coords * scale, (coords + level0(1)) * scale], axis=1)
    draw_overlay(thumbnail, mask, boxes).save(thumbnail_path, compress_level=1)
    features_path = out_dir / feature_file_name(slide_id)
    metadata = {
        **tiling_metadata(encoder, config),
        "slide_mpp": mpp,
        "slide_mpp_source": mpp_source,
        "level": level,
        "slide_id": slide_id,
        "feature_names": list(getattr(encoder, "feature_names", [])),
    }
    write_slide_features(features_path, features, coords, metadata)
    return SlideResult(slide_id, len(features), features_path, thumbnail_path, level, mpp)


def tiling_metadata(encoder: PatchEncoder, config: TilingConfig) -> dict:
    """The feature file metadata that must match for a resumed run to keep the file."""
    return {
        "encoder": encoder.provenance.to_dict(),
        "target_mpp": config.target_mpp,
        "patch_size": config.patch_size,
        "min_tissue_fraction": config.min_tissue_fraction,
        "thumbnail_max": config.thumbnail_max,
    }


def completed_slide(
    out_dir: Path,
    slide_id: str,
    encoder: PatchEncoder,
    config: TilingConfig,
    manifest_mpp: float | None = None,
) -> SlideResult | None:
    """An earlier run's result for this slide when its outputs are complete and were made with the
    same encoder provenance, tiling settings and µm/px source; None when the slide must be computed.

    Complete: the thumbnail and a readable feature file (written last and atomically) whose metadata
    matches `tiling_metadata`, the slide id and the manifest's µm/px (a file that used the manifest's
    value needs the same value, one that did not needs no manifest value or an OpenSlide one)."""
    features_path = out_dir / feature_file_name(slide_id)
    thumbnail_path = out_dir / thumbnail_file_name(slide_id)
    if not (features_path.is_file() and thumbnail_path.is_file()):
        return None
    try:
        parquet = pq.ParquetFile(features_path)
        n_patches, names = parquet.metadata.num_rows, parquet.schema_arrow.names
        metadata = read_feature_metadata(features_path)
    except (OSError, ValueError, pa.ArrowException):  # truncated or not a parquet file: recompute
        return None
    expected = {**tiling_metadata(encoder, config), "slide_id": slide_id}
    if any(metadata.get(key) != value for key, value in expected.items()):
        return None
    if names != ["x", "y", *(f"f_{i}" for i in range(encoder.dim))] or n_patches == 0:
        return None
    source, mpp, level = metadata.get("slide_mpp_source"), metadata.get("slide_mpp"), metadata.get("level")
    if manifest_mpp is None:
        matches_mpp = source in MPP_SOURCES and source != "manifest"
    else:
        matches_mpp = source == "openslide" or (source == "manifest" and mpp == manifest_mpp)
    if not (matches_mpp and isinstance(mpp, int | float) and isinstance(level, int)):
        return None
    return SlideResult(slide_id, n_patches, features_path, thumbnail_path, level, float(mpp))


# ---------------------------------------------------------------------------------------------
# Many slides


def resolve_slide_inputs(inputs: str | Path | Iterable[str | Path]) -> list[tuple[str, Path | None]]:
    """(slide_id, path) pairs sorted by slide id, from a folder, a manifest, one slide or a list of paths.

    A manifest is a .csv or .parquet with columns slide_id and path (a cohort's slides.parquet is one);
    relative paths are resolved against the manifest's folder, and an empty path (a slide listed
    without a file) gives None. Folder slides and listed paths use the file name as slide id.
    """
    if isinstance(inputs, str | Path):
        source = Path(inputs)
        pairs: list[tuple[str, Path | None]]
        if source.is_dir():
            pairs = [
                (p.name, p) for p in source.iterdir() if p.is_file() and p.suffix.lower() in SLIDE_SUFFIXES
            ]
        elif source.suffix.lower() in {".csv", ".parquet"}:
            pairs = read_manifest(source)
        elif source.suffix.lower() in SLIDE_SUFFIXES:
            pairs = [(source.name, source)]
        else:
            raise SlideInputError(
                f"{source} is neither a folder of slides, a manifest (.csv or .parquet) "
                f"nor a slide ({', '.join(sorted(SLIDE_SUFFIXES))})"
            )
    else:
        pairs = [(Path(p).name, Path(p)) for p in inputs]
    return sorted(pairs, key=lambda pair: (pair[0], str(pair[1] or "")))


def read_manifest(manifest: Path) -> list[tuple[str, Path | None]]:
    table = read_manifest_table(manifest)
    return [
        (str(slide_id), manifest.parent / path if isinstance(path, str) and path else None)
        for slide_id, path in zip(table["slide_id"], table["path"], strict=True)
    ]


def read_manifest_table(manifest: Path) -> pd.DataFrame:
    """A manifest's rows, checked: columns slide_id and path, no empty slide id."""
    if not manifest.is_file():
        raise SlideInputError(f"manifest not found: {manifest}")
    table = pd.read_parquet(manifest) if manifest.suffix.lower() == ".parquet" else pd.read_csv(manifest)
    missing = {"slide_id", "path"} - set(table.columns)
    if missing:
        raise SlideInputError(
            f"manifest {manifest} lacks column(s) {sorted(missing)}; it has {list(table.columns)}"
        )
    unnamed = table.index[table["slide_id"].isna() | (table["slide_id"].astype(str) == "")].tolist()
    if unnamed:
        raise SlideInputError(f"manifest {manifest}: rows {unnamed[:10]} have an empty slide_id")
    return table


def manifest_mpps(inputs: str | Path | Iterable[str | Path]) -> dict[str, float]:
    """slide_id -> µm/px from the optional `mpp` column of a manifest (empty cells give none); {} for
    other inputs. A value that is not a positive number is a SlideInputError."""
    if not isinstance(inputs, str | Path) or Path(inputs).suffix.lower() not in {".csv", ".parquet"}:
        return {}
    manifest = Path(inputs)
    table = read_manifest_table(manifest)
    if "mpp" not in table.columns:
        return {}
    given = table["mpp"].notna() & (table["mpp"].astype(str).str.strip() != "")
    mpp = pd.to_numeric(table["mpp"].where(given), errors="coerce")
    bad = table.index[given & ~(np.isfinite(mpp) & (mpp > 0))].tolist()
    if bad:
        raise SlideInputError(
            f"manifest {manifest}: rows {bad[:10]} have an mpp that is not a positive number of µm per pixel"
        )
    return {
        str(slide_id): float(value)
        for slide_id, value in zip(table["slide_id"][given], mpp[given], strict=True)
    }


def preprocess_slides(
    inputs: str | Path | Iterable[str | Path],
    out_dir: Path,
    encoder: str | PatchEncoder = "stats",
    config: TilingConfig = TilingConfig(),
    shard: tuple[int, int] = (0, 1),
    progress: bool = True,
    overwrite: bool = False,
    slide_root: Path | None = None,
) -> PreprocessReport:
    """Preprocess the shard `sorted slides[i::n]` of `inputs` into `out_dir`; bad slides are quarantined.

    A slide id that cannot name a file (`check_file_name`: empty, '/', '\\', a leading '.', control
    characters) is quarantined. With `slide_root`, a slide file that resolves (symlinks followed) outside
    it is quarantined "outside the slide root" and never opened; the others are opened at their resolved
    path.

    Resumes: a slide whose outputs an earlier run completed with the same encoder and settings
    (`completed_slide`) is skipped and listed in `report.skipped`, unless `overwrite`; an interrupted
    run's `.partial` feature file is removed, and a slide quarantined on recompute keeps an earlier run's
    feature file only as `<file>.superseded` (`set_aside_earlier_features`). A manifest's optional `mpp`
    column gives the µm/px of slides that do not record one (`slide_mpp_and_source`). Writes `out_dir/report.json` (and
    `quarantine.csv` when any slide was quarantined); a sharded run names them per shard
    (`shard_file_name`). Raises `SlideInputError` when the input has no slides or `slide_root` is not a
    folder.
    """
    index, count = shard
    if not (isinstance(index, int) and isinstance(count, int) and 0 <= index < count):
        raise SlideInputError(f"shard must be (i, n) with 0 <= i < n, got {shard}")
    if slide_root is not None and not Path(slide_root).is_dir():
        raise SlideInputError(f"slide root {slide_root} is not a folder")
    entries = resolve_slide_inputs(inputs)
    if not entries:
        raise SlideInputError(f"no slides found in {inputs}")
    unsafe_ids = {slide_id: reason for slide_id, _ in entries if (reason := unsafe_name(slide_id))}
    first_owner: dict[str, tuple[str, Path]] = {}  # feature file name -> the entry that writes it
    for slide_id, path in entries:
        if path is not None and slide_id not in unsafe_ids:
            first_owner.setdefault(feature_file_name(slide_id), (slide_id, path))
    mpps = manifest_mpps(inputs)
    encoder = make_encoder(encoder) if isinstance(encoder, str) else encoder
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    report = PreprocessReport()
    root = None if slide_root is None else Path(slide_root).resolve()
    for slide_id, path in tqdm(entries[index::count], desc="slides", unit="slide", disable=not progress):
        if slide_id in unsafe_ids:
            report.quarantined.append((slide_id, unsafe_ids[slide_id]))
            continue
        if path is None:
            report.quarantined.append((slide_id, "no file: the manifest gives no path for this slide"))
            continue
        opened = path if root is None else path.resolve()  # the file itself, not a link to elsewhere
        if root is not None and not opened.is_relative_to(root):
            report.quarantined.append((slide_id, f"outside the slide root {root}: the file is {opened}"))
            continue
        owner_id, owner_path = first_owner[feature_file_name(slide_id)]
        if (owner_id, owner_path) != (slide_id, path):
            reason = (
                f"duplicate feature file {feature_file_name(slide_id)}: {owner_id} ({owner_path}) writes it"
            )
            report.quarantined.append((slide_id, reason))
            continue
        # only this shard's own slides: other shards may be writing theirs into the same folder
        partial = out_dir / (feature_file_name(slide_id) + ".partial")
        partial.unlink(missing_ok=True)
        done = None if overwrite else completed_slide(out_dir, slide_id, encoder, config, mpps.get(slide_id))
        if done is not None:
            report.skipped.append(done)
            continue
        try:
            report.processed.append(
                preprocess_slide(opened, out_dir, encoder, config, slide_id, mpps.get(slide_id))
            )
        except SlideError as error:
            report.quarantined.append((slide_id, set_aside_earlier_features(out_dir, slide_id, str(error))))
    write_report(report, out_dir, encoder, config, shard)
    return report


def unsafe_name(slide_id: str) -> str:
    """Why a slide id cannot name the slide's files (`check_file_name`), or "" when it can."""
    try:
        check_file_name(slide_id, "slide id")
    except UnsafeNameError as error:
        return str(error)
    return ""


def result_summary(result: SlideResult) -> dict:
    return {
        **asdict(result),
        "features_path": str(result.features_path),
        "thumbnail_path": str(result.thumbnail_path),
    }


def write_report(
    report: PreprocessReport,
    out_dir: Path,
    encoder: PatchEncoder,
    config: TilingConfig,
    shard: tuple[int, int],
) -> None:
    summary = {
        "encoder": encoder.name,
        "dim": encoder.dim,
        "config": asdict(config),
        "shard": list(shard),
        "n_patches": report.n_patches,
        "processed": [result_summary(result) for result in report.processed],
        "n_skipped": len(report.skipped),  # already done by an earlier run with the same settings
        "skipped": [result_summary(result) for result in report.skipped],
        "quarantined": [{"slide": slide, "reason": reason} for slide, reason in report.quarantined],
    }
    (out_dir / shard_file_name("report.json", shard)).write_text(json.dumps(summary, indent=2))
    write_quarantine(out_dir / shard_file_name(QUARANTINE_FILE, shard), report.quarantined)
