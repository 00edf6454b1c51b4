"""Feature files: one slide's patch features as parquet, and the folder that holds them.

A feature file is `<folder>/<feature_file_name(slide_id)>`: columns x, y (level-0 px of each patch's
top-left corner) and f_0..f_{d-1} float32, with metadata under `METADATA_PREFIX` (the encoder's provenance,
the patch grid, the slide id). `healnet preprocess-slides` (`healnet.preprocess.wsi`) and `healnet
import-features` (`healnet.preprocess.feature_import`) write them; training, evaluation and heatmaps read
them here, without the tiling code. A feature folder also holds the quarantine lists of the slides a run
refused (`quarantine.csv`, one per shard of a sharded run), and keeps an earlier run's file of a slide
that a later run refused only as `<file>.superseded`.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from healnet.errors import HEALNetError
from healnet.files import from_spreadsheet_cell, spreadsheet_cell
from healnet.preprocess.encoders import EncoderError, EncoderProvenance, FeatureProvenance, StatsEncoder

# the formats OpenSlide 4 reads (DICOM and Zeiss CZI included); only these are cut from a slide id
SLIDE_SUFFIXES = frozenset(
    {".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif", ".czi", ".dcm"}
)
# Two µm/px within 2 % are one resolution (0.499 × 2 vs 1.0): tiling takes a slide level up to 2 % coarser
# than the target as fine enough, and an import takes feature grids that close as one grid.
MPP_TOLERANCE = 0.02
METADATA_PREFIX = "healnet."
# An earlier feature file of a slide that a later run quarantined: kept, but no longer read as features
SUPERSEDED_SUFFIX = ".superseded"
# The slides a run could not turn into features, with the reason; a sharded run writes one per shard
QUARANTINE_FILE = "quarantine.csv"
QUARANTINE_COLUMNS = ["slide", "reason"]


class SlideInputError(HEALNetError, ValueError):
    """The slide input (folder, manifest or list) or a feature file is malformed."""


def slide_stem(slide_id: str) -> str:
    """The slide id's file name without a slide extension; other dotted parts (TCGA UUIDs) stay."""
    name = Path(slide_id).name
    suffix = Path(name).suffix
    return name[: -len(suffix)] if suffix.lower() in SLIDE_SUFFIXES else name


def feature_file_name(slide_id: str) -> str:
    """The name of a slide's feature file: `slide_stem(slide_id) + ".parquet"`."""
    return slide_stem(slide_id) + ".parquet"


def write_slide_features(path: Path, features: np.ndarray, coords: np.ndarray, metadata: dict) -> None:
    """Parquet with x, y (level-0 px, patch top-left) and f_0..f_{d-1} float32; `metadata` as JSON values."""
    columns = {"x": coords[:, 0].astype(np.int64), "y": coords[:, 1].astype(np.int64)}
    columns |= {f"f_{i}": features[:, i].astype(np.float32) for i in range(features.shape[1])}
    table = pa.table(columns).replace_schema_metadata(
        {METADATA_PREFIX + key: json.dumps(value) for key, value in metadata.items()}
    )
    partial = path.with_name(path.name + ".partial")
    pq.write_table(table, partial)
    partial.replace(path)


def read_slide_features(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(features float32 (n, d), coords int64 (n, 2) as x, y) from a feature file."""
    path = Path(path)
    if not path.is_file():
        raise SlideInputError(f"feature file not found: {path}")
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as error:
        raise unreadable_feature_file(path, error) from error
    names = table.column_names
    expected = ["x", "y", *(f"f_{i}" for i in range(len(names) - 2))]
    if names != expected:
        raise SlideInputError(f"{path}: columns must be x, y, f_0..f_(d-1) in order, got {names[:6]}...")
    coords = np.stack([table.column(name).to_numpy() for name in ("x", "y")], axis=1).astype(np.int64)
    features = np.empty((table.num_rows, len(names) - 2), dtype=np.float32)
    for index, name in enumerate(names[2:]):
        features[:, index] = table.column(name).to_numpy()
    return features, coords


def unreadable_feature_file(path: Path, error: Exception) -> SlideInputError:
    """The error for a feature file that is not readable parquet (truncated, or another format)."""
    return SlideInputError(
        f"{path}: unreadable feature file ({type(error).__name__}: {error}); remove it and compute it again "
        "with `healnet preprocess-slides` or `healnet import-features`"
    )


def read_feature_provenance(path: Path) -> FeatureProvenance:
    """Encoder and patch grid recorded in a feature file; a file without them is a SlideInputError."""
    metadata = read_feature_metadata(path)
    encoder = metadata.get("encoder")
    if encoder == StatsEncoder.name:  # written before provenance was recorded: the only weight-free encoder
        encoder = StatsEncoder.provenance.to_dict()
    if not isinstance(encoder, dict) or "patch_size" not in metadata or "target_mpp" not in metadata:
        raise SlideInputError(
            f"{path}: no encoder provenance (encoder, patch_size, target_mpp) in the file; recompute it with "
            "`healnet preprocess-slides` or bring it in with `healnet import-features`"
        )
    try:
        return FeatureProvenance(
            EncoderProvenance.from_dict(encoder), int(metadata["patch_size"]), float(metadata["target_mpp"])
        )
    except (EncoderError, TypeError, ValueError) as error:
        raise SlideInputError(f"{path}: malformed encoder provenance: {error}") from error


def resolve_feature_dir(features_dir: Path) -> Path:
    """The folder of one encoder's feature files: `features_dir` itself when it is one (`is_feature_folder`),
    else its only encoder subfolder (`preprocess-slides` and `import-features` write `OUT/<encoder key>/`).
    Several encoder subfolders are a SlideInputError naming them: features of different encoders are not
    comparable, so the caller must choose one."""
    features_dir = Path(features_dir)
    if not features_dir.is_dir() or is_feature_folder(features_dir):
        return features_dir
    keyed = sorted(
        folder for folder in features_dir.iterdir() if folder.is_dir() and is_feature_folder(folder)
    )
    if len(keyed) > 1:
        names = ", ".join(folder.name for folder in keyed)
        raise SlideInputError(
            f"{features_dir} holds features of {len(keyed)} encoders ({names}); choose one, e.g. "
            f"--features {keyed[0]}"
        )
    return keyed[0] if keyed else features_dir


def is_feature_folder(folder: Path) -> bool:
    """Whether `folder` is one encoder's output: it holds feature files, or quarantine lists (a run whose
    every slide was quarantined wrote no feature file, yet says which slides it refused)."""
    return any(folder.glob("*.parquet")) or bool(quarantine_files(folder))


def read_feature_metadata(path: Path) -> dict:
    """The schema metadata of a feature file (encoder, target_mpp, patch_size, slide_mpp, ...); an
    unreadable file is a SlideInputError naming it."""
    try:
        metadata = pq.read_schema(path).metadata or {}
    except (OSError, pa.ArrowException) as error:
        raise unreadable_feature_file(path, error) from error
    return {
        key.decode().removeprefix(METADATA_PREFIX): json.loads(value)
        for key, value in metadata.items()
        if key.decode().startswith(METADATA_PREFIX)
    }


def shard_file_name(name: str, shard: tuple[int, int]) -> str:
    """`report.json` unsharded, `report.shard-1-of-4.json` for shard (1, 4): shards never overwrite."""
    index, count = shard
    if count == 1:
        return name
    stem, suffix = name.rsplit(".", 1)
    return f"{stem}.shard-{index}-of-{count}.{suffix}"


def shard_files(folder: Path, name: str) -> list[Path]:
    """The files in `folder` named `shard_file_name(name, shard)` for any shard, the unsharded `name`
    included, sorted by name; none when the folder is absent."""
    if not folder.is_dir():
        return []
    stem, suffix = name.rsplit(".", 1)
    pattern = re.compile(rf"{re.escape(stem)}(\.shard-\d+-of-\d+)?\.{re.escape(suffix)}")
    return sorted(path for path in folder.iterdir() if path.is_file() and pattern.fullmatch(path.name))


def set_aside_earlier_features(out_dir: Path, slide_id: str, reason: str) -> str:
    """Rename the feature file an earlier run wrote for a slide that this run failed to recompute (other
    settings, or `overwrite`) to `<file>.superseded`, so that training does not read features of settings
    this run no longer stands for; nothing is deleted. Returns the quarantine reason, saying so."""
    earlier = out_dir / feature_file_name(slide_id)
    if not earlier.exists():
        return reason
    kept = earlier.with_name(earlier.name + SUPERSEDED_SUFFIX)
    earlier.replace(kept)
    return f"{reason}; the earlier run's feature file is kept as {kept.name}"


def write_quarantine(path: Path, quarantined: Sequence[tuple[str, str]]) -> None:
    """The quarantined slides and their reasons as CSV (slide, reason), each cell as `spreadsheet_cell`
    (a slide id cannot be a formula); no file when there are none, so that a previous run's list cannot
    mislead."""
    if not quarantined:
        path.unlink(missing_ok=True)
        return
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(QUARANTINE_COLUMNS)
        writer.writerows([spreadsheet_cell(cell) for cell in row] for row in quarantined)


def quarantine_files(features_dir: Path) -> list[Path]:
    """The quarantine lists of a feature folder: `quarantine.csv` of an unsharded `preprocess-slides` run
    or of `import-features`, and `quarantine.shard-<i>-of-<n>.csv` of each shard's run."""
    return shard_files(Path(features_dir), QUARANTINE_FILE)


def read_quarantine(features_dir: Path) -> dict[str, str]:
    """slide -> reason for every slide that a quarantine list of the feature folder names (all of
    `quarantine_files`, so the shards of one run together give the whole quarantine); {} when there are
    none. A list that is not a CSV with the columns slide and reason is a SlideInputError naming it."""
    quarantined: dict[str, str] = {}
    for path in quarantine_files(features_dir):
        try:
            with path.open(newline="") as handle:
                reader = csv.DictReader(handle)
                if reader.fieldnames != QUARANTINE_COLUMNS:
                    raise SlideInputError(
                        f"{path}: a quarantine list needs the columns {QUARANTINE_COLUMNS}, "
                        f"got {reader.fieldnames}"
                    )
                for row in reader:
                    if not row["slide"]:
                        raise SlideInputError(f"{path}: line {reader.line_num} names no slide")
                    slide = from_spreadsheet_cell(row["slide"])
                    quarantined.setdefault(slide, from_spreadsheet_cell(row["reason"] or ""))
        except (OSError, UnicodeDecodeError, csv.Error) as error:
            raise SlideInputError(f"{path}: unreadable quarantine list ({error})") from error
    return quarantined
