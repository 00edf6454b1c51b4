"""Import precomputed patch features (CLAM, TRIDENT) as our per-slide feature files.

Pathology cohorts often come with patch features already computed by a foundation model. This module
reads them, checks every slide, and writes `out/<encoder key>/<slide>.parquet` in the format of
`healnet.preprocess.wsi` (x, y, f_0..f_{d-1}, with the encoder's provenance), so that training, serving and
heatmaps treat them like the features of `healnet preprocess-slides`.

Source layouts (`detect_layout`):

- CLAM: `SRC/h5_files/<slide>.h5` (datasets `features` (n, d) and `coords` (n, 2)) and/or
  `SRC/pt_files/<slide>.pt` (a tensor (n, d), without coordinates: they come from the slide's .h5 in
  `h5_files/` or `patches/`). CLAM files carry no magnification, so the µm/px must be given.
- TRIDENT: `JOB/<mag>x_<size>px_<overlap>px_overlap/features_<encoder>/<slide>.h5` (`features`, `coords`;
  attributes on `coords`: patch_size, patch_size_level0, level0_magnification, target_magnification);
  `.pt` features take their coordinates from `../patches/<slide>_patches.h5`. SRC may be the job folder,
  the magnification folder or the features folder.
- flat: a folder of `<slide>.h5` and/or `<slide>.pt` files, paired by file stem.

The slide id is the file stem, kept whole (TCGA ids such as `TCGA-XX-YYYY-01Z-00-DX1.<uuid>`). Coordinates
are level-0 pixels (x, y) of the patch's top-left corner. A magnification becomes µm/px by the convention
10 / magnification (20× ≈ 0.5 µm/px, 40× ≈ 0.25), as in `slide_mpp` and in TRIDENT.

A slide whose files cannot be read or fail a check (2-D floating features of the import's width, finite,
at least one patch; coordinates (n, 2) of whole non-negative pixels, one per patch, no duplicates; the
import's patch grid) is quarantined with the reason, never written. So is a slide whose id cannot name a
file (`check_file_name`), and one whose arrays, by the shapes the files declare, would need more memory to
import than the per-slide budget (`ImportConfig.max_slide_bytes`): shapes are checked before any data is
read, since a few KB of HDF5 can declare terabytes. h5py and torch are imported lazily.
"""

from __future__ import annotations

import json
import math
import re
import zipfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from healnet.errors import HEALNetError
from healnet.files import DEFAULT_MAX_SLIDE_BYTES, UnsafeNameError, check_file_name
from healnet.preprocess.encoders import EncoderProvenance, FeatureProvenance
from healnet.preprocess.wsi import (
    MPP_TOLERANCE,
    QUARANTINE_FILE,
    SlideInputError,
    feature_file_name,
    read_feature_provenance,
    write_quarantine,
    write_slide_features,
)

H5_SUFFIXES = (".h5", ".hdf5")
PT_SUFFIXES = (".pt", ".pth")
PATCHES_SUFFIX = "_patches"  # TRIDENT's coordinate files: patches/<slide>_patches.h5
FEATURE_KEYS = ("features", "feats")  # dataset names (h5) or dict keys (.pt) of the features
TRIDENT_GRID = re.compile(r"(\d+(?:\.\d+)?)x_(\d+)px_(\d+)px_overlap")
SHA256 = re.compile(r"[0-9a-f]{64}")
# Import holds an array about three times: as read, as checked float32 values, as the written columns.
IMPORT_COPIES = 3


class FeatureFileError(HEALNetError):
    """A slide's feature files cannot be imported; the message is the quarantine reason."""


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


# ---------------------------------------------------------------------------------------------
# Layouts


@dataclass(frozen=True)
class FeatureSource:
    """One slide's files, in order of preference: the features come from the first that has them (an
    .h5 with a `features` dataset, or a .pt), the coordinates from the first with a `coords` dataset."""

    slide_id: str
    paths: tuple[Path, ...]


@dataclass(frozen=True)
class SourceLayout:
    kind: str  # "clam", "trident" or "flat"
    root: Path  # the folder the feature files are in
    sources: tuple[FeatureSource, ...]
    attributes: dict[str, Any] = field(default_factory=dict)  # grid read from a TRIDENT folder name


def _files(folder: Path, suffixes: Sequence[str]) -> dict[str, Path]:
    """stem -> file, for the files of `folder` with one of `suffixes` (none when the folder is absent)."""
    if not folder.is_dir():
        return {}
    return {p.stem: p for p in sorted(folder.iterdir()) if p.is_file() and p.suffix.lower() in suffixes}


def _pair(*groups: dict[str, Path]) -> tuple[FeatureSource, ...]:
    """Sources by stem; a slide's files keep the order of `groups`."""
    stems = sorted({stem for group in groups for stem in group})
    return tuple(
        FeatureSource(stem, tuple(group[stem] for group in groups if stem in group)) for stem in stems
    )


def _patch_files(folder: Path) -> dict[str, Path]:
    """TRIDENT's `<slide>_patches.h5` (and CLAM's `patches/<slide>.h5`) by slide stem."""
    return {stem.removesuffix(PATCHES_SUFFIX): path for stem, path in _files(folder, H5_SUFFIXES).items()}


def detect_layout(source: Path, encoder_name: str | None = None) -> SourceLayout:
    """The layout of `source`: CLAM (`h5_files/`, `pt_files/`), TRIDENT (a `features_<encoder>` folder,
    found below a job or magnification folder; `encoder_name` chooses among several) or a flat folder of
    .h5/.pt files. Raises SlideInputError when `source` is not a folder or the choice is ambiguous."""
    source = Path(source)
    if not source.is_dir():
        raise SlideInputError(
            f"{source} is not a folder of patch features (CLAM h5_files/ and pt_files/, a TRIDENT job folder "
            "with features_<encoder>/, or a folder of .h5/.pt files)"
        )
    if (source / "h5_files").is_dir() or (source / "pt_files").is_dir():
        h5s, pts = _files(source / "h5_files", H5_SUFFIXES), _files(source / "pt_files", PT_SUFFIXES)
        return SourceLayout("clam", source, _pair(h5s, pts, _patch_files(source / "patches")))
    features_dir = _trident_features_dir(source, encoder_name)
    if features_dir is not None:
        match = TRIDENT_GRID.fullmatch(features_dir.parent.name)
        attributes = {}
        if match:
            attributes = {"target_magnification": float(match[1]), "patch_size": int(match[2])}
        h5s, pts = _files(features_dir, H5_SUFFIXES), _files(features_dir, PT_SUFFIXES)
        sources = _pair(h5s, pts, _patch_files(features_dir.parent / "patches"))
        return SourceLayout("trident", features_dir, sources, attributes)
    every_h5 = _files(source, H5_SUFFIXES)
    h5s = {stem: path for stem, path in every_h5.items() if not stem.endswith(PATCHES_SUFFIX)}
    patches = {
        stem.removesuffix(PATCHES_SUFFIX): path
        for stem, path in every_h5.items()
        if stem.endswith(PATCHES_SUFFIX)
    }
    return SourceLayout("flat", source, _pair(h5s, _files(source, PT_SUFFIXES), patches))


def _trident_features_dir(source: Path, encoder_name: str | None) -> Path | None:
    if source.name.startswith("features_"):
        return source
    candidates = sorted(d for d in source.iterdir() if d.is_dir() and d.name.startswith("features_"))
    if not candidates:
        grids = sorted(d for d in source.iterdir() if d.is_dir() and TRIDENT_GRID.fullmatch(d.name))
        candidates = sorted(
            d for grid in grids for d in grid.iterdir() if d.is_dir() and d.name.startswith("features_")
        )
    if len(candidates) > 1 and encoder_name is not None:
        chosen = [d for d in candidates if d.name == f"features_{encoder_name}"]
        candidates = chosen or candidates
    if len(candidates) > 1:
        names = ", ".join(str(d.relative_to(source)) for d in candidates)
        raise SlideInputError(
            f"{source} holds {len(candidates)} TRIDENT feature folders ({names}); import one at a time: "
            f"pass its folder, e.g. {candidates[0]}"
        )
    return candidates[0] if candidates else None


# ---------------------------------------------------------------------------------------------
# Reading one slide


def _plain(value: Any) -> Any:
    """An HDF5 attribute as a JSON value."""
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    if isinstance(value, np.ndarray):
        return [_plain(item) for item in value.tolist()]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    return value if isinstance(value, str | int | float | bool) or value is None else str(value)


def _h5_dataset(handle: Any, names: Sequence[str]) -> Any:
    """The root dataset called one of `names`, else the only dataset of that name anywhere in the file."""
    import h5py

    for name in names:
        item = handle.get(name)
        if isinstance(item, h5py.Dataset):
            return item
    found: list[Any] = []
    handle.visititems(
        lambda path, obj: (
            found.append(obj) if isinstance(obj, h5py.Dataset) and path.rsplit("/", 1)[-1] in names else None
        )
    )
    return found[0] if len(found) == 1 else None


def import_bytes(shape: Sequence[int], itemsize: int) -> int:
    """Memory that importing an array of `shape` needs: IMPORT_COPIES copies of at least 4 bytes a value."""
    return IMPORT_COPIES * math.prod(shape) * max(itemsize, 4)


def check_budget(path: Path, what: str, shape: Sequence[int], dtype: Any, max_bytes: int) -> None:
    """FeatureFileError (the quarantine reason) when the array a file declares would need more memory to
    import than `max_bytes`; called before the array is read."""
    needed = import_bytes(shape, np.dtype(dtype).itemsize)
    if needed > max_bytes:
        raise FeatureFileError(
            f"{path.name} declares {what} of shape {tuple(shape)} {np.dtype(dtype)}, about "
            f"{needed / 2**30:.1f} GiB to import, over the per-slide memory budget of "
            f"{max_bytes / 2**30:.1f} GiB (--max-slide-gib)"
        )


def _read_h5(path: Path, load: bool, max_bytes: int) -> tuple[Any, Any, dict[str, Any]]:
    """(features, coords, attributes) of an .h5: arrays with `load`, else their shapes; None when absent.
    Each array's declared shape is checked against `max_bytes` before it is read."""
    import h5py

    with h5py.File(path, "r") as handle:
        features, coords = _h5_dataset(handle, FEATURE_KEYS), _h5_dataset(handle, ("coords",))
        attributes: dict[str, Any] = {}
        for item in (handle, features, coords):  # the coords' attributes (the patch grid) win
            if item is not None:
                attributes |= {str(key): _plain(value) for key, value in item.attrs.items()}

        def get(dataset: Any, what: str) -> Any:
            if dataset is None:
                return None
            check_budget(path, what, dataset.shape, dataset.dtype, max_bytes)
            return dataset[()] if load else (tuple(dataset.shape), dataset.dtype)

        return get(features, "features"), get(coords, "coords"), attributes


def _read_pt(path: Path, load: bool, max_bytes: int) -> tuple[Any, Any, dict[str, Any]]:
    """(features, coords, {}) of a .pt: a tensor (CLAM, TRIDENT) or a dict with features/feats and coords.
    Memory-mapped, so that the shapes are checked against `max_bytes` before any data is read."""
    import torch

    try:
        content = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as error:
        if zipfile.is_zipfile(path):  # torch.save's zip maps; one rewritten with compression does not
            raise FeatureFileError(
                f"{path.name} cannot be memory-mapped ({error}), so its shapes cannot be checked before it "
                "is read: save it again with torch.save"
            ) from error
        # the legacy format cannot be mapped; its data is its size on disk, read whole
        check_budget(path, "a legacy (non-zip) torch file", (path.stat().st_size,), np.uint8, max_bytes)
        content = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(content, dict):
        features = next((content[key] for key in FEATURE_KEYS if key in content), None)
        coords = content.get("coords")
    elif isinstance(content, torch.Tensor):
        features, coords = content, None
    else:
        raise FeatureFileError(
            f"{path.name} holds a {type(content).__name__}, not a tensor of patch features"
        )

    def get(tensor: Any, what: str) -> Any:
        if tensor is None:
            return None
        if not isinstance(tensor, torch.Tensor):
            tensor = torch.as_tensor(tensor)
        dtype = np.dtype(np.float32 if tensor.is_floating_point() else np.int64)
        check_budget(path, what, tuple(tensor.shape), dtype, max_bytes)
        if not load:
            return tuple(tensor.shape), dtype
        return (tensor.float() if tensor.is_floating_point() else tensor).numpy()

    return get(features, "features"), get(coords, "coords"), {}


@dataclass
class SlideData:
    """What a source gives: features and coords (arrays, or (shape, dtype) when only inspected)."""

    features: Any
    coords: Any
    attributes: dict[str, Any]
    features_file: Path
    coords_file: Path


def read_source(
    source: FeatureSource, load: bool = True, max_bytes: int = DEFAULT_MAX_SLIDE_BYTES
) -> SlideData:
    """Features, coordinates and attributes of one slide; FeatureFileError (the quarantine reason) when a
    file is unreadable, declares an array over `max_bytes` (`check_budget`), or the features or
    coordinates are missing."""
    features = coords = None
    features_file = coords_file = None
    attributes: dict[str, Any] = {}
    for path in source.paths:
        if features is not None and coords is not None:
            break
        reader = _read_pt if path.suffix.lower() in PT_SUFFIXES else _read_h5
        try:
            found_features, found_coords, found_attributes = reader(path, load, max_bytes)
        except FeatureFileError:
            raise
        except Exception as error:  # any failure to read is this file's problem, reported by name
            first_line = next((line for line in str(error).splitlines() if line.strip()), "")
            reason = f"{type(error).__name__}: {first_line}"
            reason = reason if len(reason) <= 200 else reason[:199] + "…"
            raise FeatureFileError(f"unreadable file {path.name} ({reason})") from error
        if features is None and found_features is not None:
            features, features_file = found_features, path
        if coords is None and found_coords is not None:
            coords, coords_file = found_coords, path
        attributes = found_attributes | attributes  # the earlier file's attributes win
    names = ", ".join(p.name for p in source.paths)
    if features is None or features_file is None:
        raise FeatureFileError(f"no features: no `features` dataset or tensor in {names}")
    if coords is None or coords_file is None:
        raise FeatureFileError(
            f"no coordinates: {names} hold no `coords` dataset (a .pt takes them from the slide's .h5: CLAM "
            "h5_files/<slide>.h5, TRIDENT patches/<slide>_patches.h5); heatmaps need them"
        )
    return SlideData(features, coords, attributes, features_file, coords_file)


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
