"""Precomputed patch features as other tools write them (CLAM, TRIDENT): where a slide's files are, and
their arrays read within a memory budget (`healnet.preprocess.feature_import` checks and imports them).

Source layouts (`detect_layout`):

- CLAM: `SRC/h5_files/<slide>.h5` (datasets `features` (n, d) and `coords` (n, 2)) and/or
  `SRC/pt_files/<slide>.pt` (a tensor (n, d), without coordinates: they come from the slide's .h5 in
  `h5_files/` or `patches/`). CLAM files carry no magnification, so the µm/px must be given.
- TRIDENT: `JOB/<mag>x_<size>px_<overlap>px_overlap/features_<encoder>/<slide>.h5` (`features`, `coords`;
  attributes on `coords`: patch_size, patch_size_level0, level0_magnification, target_magnification);
  `.pt` features take their coordinates from `../patches/<slide>_patches.h5`. SRC may be the job folder,
  the magnification folder or the features folder.
- flat: a folder of `<slide>.h5` and/or `<slide>.pt` files, paired by file stem.

The slide id is the file stem, kept whole (TCGA ids such as `TCGA-XX-YYYY-01Z-00-DX1.<uuid>`). A file
whose arrays, by the shapes it declares, would need more memory to import than the per-slide budget is
refused before any data is read (`check_budget`), since a few KB of HDF5 can declare terabytes. h5py and
torch are imported lazily.
"""

from __future__ import annotations

import math
import re
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from healnet.errors import HEALNetError
from healnet.files import DEFAULT_MAX_SLIDE_BYTES
from healnet.preprocess.feature_files import SlideInputError

H5_SUFFIXES = (".h5", ".hdf5")
PT_SUFFIXES = (".pt", ".pth")
PATCHES_SUFFIX = "_patches"  # TRIDENT's coordinate files: patches/<slide>_patches.h5
FEATURE_KEYS = ("features", "feats")  # dataset names (h5) or dict keys (.pt) of the features
TRIDENT_GRID = re.compile(r"(\d+(?:\.\d+)?)x_(\d+)px_(\d+)px_overlap")
# Import holds an array about three times: as read, as checked float32 values, as the written columns.
IMPORT_COPIES = 3


class FeatureFileError(HEALNetError):
    """A slide's feature files cannot be imported; the message is the quarantine reason."""


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
