"""The fingerprint of a raw cohort source: what ingesting it would read, so that an unchanged source can
reuse its earlier ingest (the pipeline's cache key) and a changed one never does."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from healnet.errors import HEALNetError
from healnet.files import sha256_file


class SourceError(HEALNetError, ValueError):
    """A cohort source that does not exist or cannot be read."""


def _source_files(source: Path) -> list[Path]:
    if source.is_file():
        return [source]
    if source.is_dir():
        return sorted(path for path in source.rglob("*") if path.is_file())
    raise SourceError(f"cohort source {source} does not exist (a table file or a cBioPortal study folder)")


def _slide_stamps(slide_dir: Path) -> list[str]:
    """Name, size and modification time of each file in the slide folder (hashing whole-slide images
    would read gigabytes per run)."""
    if not slide_dir.is_dir():
        raise SourceError(f"slide folder {slide_dir} does not exist")
    stamps = []
    for path in sorted(slide_dir.rglob("*")):
        if path.is_file():
            stat = path.stat()
            stamps.append(f"{path.relative_to(slide_dir).as_posix()}:{stat.st_size}:{stat.st_mtime_ns}")
    return stamps


def source_fingerprint(source: Path, slide_dir: Path | None, settings: dict, code_version: str) -> str:
    """sha256 over the source's files (names and contents), the slide folder's file stamps, the ingest
    `settings` (split seed, folds, ...) and the code version that will ingest it."""
    source = Path(source)
    digest = hashlib.sha256()
    for path in _source_files(source):
        name = path.name if path == source else path.relative_to(source).as_posix()
        digest.update(f"{name}\0{sha256_file(path)}\0".encode())
    for stamp in _slide_stamps(Path(slide_dir)) if slide_dir else []:
        digest.update(f"slide\0{stamp}\0".encode())
    digest.update(json.dumps(settings, sort_keys=True).encode())
    digest.update(f"\0code\0{code_version}".encode())
    return digest.hexdigest()
