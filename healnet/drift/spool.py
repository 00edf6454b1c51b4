"""The spool: what the service keeps of its requests for `healnet drift`, and reading it back.

A writer sums the counts of the cases it is given (`InputReference.summarise`) in memory and writes them
as one small JSON file once the window holds `window_cases` cases (never fewer than `MIN_WINDOW_CASES`:
no file describes fewer patients), and on `close` when it holds at least `MIN_WINDOW_CASES`; a smaller
remainder is dropped. Files are written to a temporary name and renamed, so a reader never sees half a
file; each process names its own (host, pid, sequence). After each write the folder is trimmed to
`max_files` files and `max_bytes` bytes, the oldest deleted first.

Numpy only: the service imports this module.
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from healnet.drift.reference import InputCounts, InputReference
from healnet.errors import HEALNetError

SPOOL_FORMAT = 1
# The fewest cases one spool file sums: a file's counts describe at least this many patients.
MIN_WINDOW_CASES = 20
SUFFIX = ".drift.json"


class SpoolError(HEALNetError, ValueError):
    """A spool folder with nothing to compare, or a spool setting out of bounds."""


@dataclass(frozen=True)
class SpoolBounds:
    window_cases: int = 100  # cases per file
    max_files: int = 1000
    max_bytes: int = 256 * 1024 * 1024

    def __post_init__(self) -> None:
        if self.window_cases < MIN_WINDOW_CASES:
            raise SpoolError(
                f"a spool window holds at least {MIN_WINDOW_CASES} cases, not {self.window_cases}"
            )
        if self.max_files < 1 or self.max_bytes < 1:
            raise SpoolError("the spool needs room for at least one file")


class SpoolWriter:
    """Sums cases binned by `reference` and writes a file per window into `directory`; thread-safe."""

    # numbers the files of every writer of the process, so that two writers never pick the same name
    _sequence = itertools.count(1)

    def __init__(self, directory: Path, reference: InputReference, model_tag: str, bounds: SpoolBounds):
        self.directory = Path(directory)
        self.reference = reference
        self.reference_id = reference.identity
        self.model_tag = model_tag
        self.bounds = bounds
        self.window = reference.empty_counts()
        self.started = _now()
        self.prefix = f"{_safe(socket.gethostname())}-{os.getpid()}-{_safe(self.reference_id)}"
        self.lock = threading.Lock()
        self.directory.mkdir(parents=True, exist_ok=True)

    def record(self, cases: Sequence[Any]) -> Path | None:
        """Add the cases to the window; returns the file written when the window was full."""
        counts = self.reference.summarise(cases)
        with self.lock:
            self.window.add(counts)
            if self.window.cases < self.bounds.window_cases:
                return None
            return self._flush()

    def close(self) -> Path | None:
        """Write what the window holds when it is at least MIN_WINDOW_CASES cases; drop it otherwise."""
        with self.lock:
            if self.window.cases < MIN_WINDOW_CASES:
                self.window = self.reference.empty_counts()
                return None
            return self._flush()

    def _flush(self) -> Path:
        window, self.window = self.window, self.reference.empty_counts()
        started, self.started = self.started, _now()
        body = {
            "format": SPOOL_FORMAT,
            "model_tag": self.model_tag,
            "reference": self.reference_id,
            "started": started,
            "ended": self.started,
            **window.to_dict(),
        }
        path = self.directory / f"{self.prefix}-{next(SpoolWriter._sequence):08d}{SUFFIX}"
        temporary = path.with_name(f".{path.name}.tmp")
        try:
            temporary.write_text(json.dumps(body, separators=(",", ":")))
            os.replace(temporary, path)
        finally:
            temporary.unlink(missing_ok=True)  # left only when the write failed (a full volume)
        trim(self.directory, self.bounds)
        return path


def trim(directory: Path, bounds: SpoolBounds) -> list[Path]:
    """Delete the oldest spool files until at most `max_files` files and `max_bytes` bytes remain;
    returns those deleted. Files another writer deletes meanwhile are skipped."""
    files = []
    for path in Path(directory).glob(f"*{SUFFIX}"):
        try:
            stat = path.stat()
        except FileNotFoundError:
            continue
        files.append((stat.st_mtime_ns, path.name, stat.st_size, path))
    files.sort()
    total = sum(size for _, _, size, _ in files)
    deleted = []
    while files and (len(files) > bounds.max_files or total > bounds.max_bytes):
        _, _, size, path = files.pop(0)
        path.unlink(missing_ok=True)
        total -= size
        deleted.append(path)
    return deleted


@dataclass
class SpoolContents:
    counts: InputCounts
    files: int
    skipped: dict[str, int]  # reference id -> files binned by another reference (another model)
    first: str | None
    last: str | None


def read_spool(directory: Path, reference: InputReference) -> SpoolContents:
    """The sum of the spool files binned by `reference`; files of other references are counted apart.
    Unreadable files are a SpoolError naming them."""
    directory = Path(directory)
    if not directory.is_dir():
        raise SpoolError(f"spool folder {directory} does not exist")
    identity = reference.identity
    total = reference.empty_counts()
    files, skipped, times = 0, dict[str, int](), []
    for path in sorted(directory.glob(f"*{SUFFIX}")):
        try:
            body = json.loads(path.read_text())
            if body.get("format") != SPOOL_FORMAT:
                raise ValueError(f"format {body.get('format')!r} is not {SPOOL_FORMAT}")
            if body["reference"] != identity:
                skipped[body["reference"]] = skipped.get(body["reference"], 0) + 1
                continue
            counts = InputCounts.from_dict(body)
            shapes = {name: bins.reference.shape for name, bins in reference.modalities.items()}
            if {name: c.shape for name, c in counts.modalities.items()} != shapes:
                raise ValueError("its counts do not have the shape of the reference's bins")
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise SpoolError(f"spool file {path} is unreadable: {error}") from None
        total.add(counts)
        files += 1
        times += [body["started"], body["ended"]]
    return SpoolContents(total, files, skipped, min(times, default=None), max(times, default=None))


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "._" else "_" for c in text)
