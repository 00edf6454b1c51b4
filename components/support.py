"""Helpers the pipeline steps call inside their container (installed with the project in the image)."""

from __future__ import annotations

import base64
import hashlib
import html
import math
import os
import subprocess
from pathlib import Path

from healnet.errors import HEALNetError

# The tables whose contents define a cohort's data version; the slides enter by the manifest's contents and
# each slide file's size and modification time (hashing whole-slide images would read gigabytes per run).
HASHED_TABLES = ("clinical.parquet",)
HASHED_FOLDERS = ("omics",)
SLIDE_MANIFEST = "slides.parquet"


class PipelineStepError(HEALNetError, RuntimeError):
    """A pipeline step met inputs it cannot work with; the message names the problem."""


def use_registry(registry_dir: str) -> None:
    """Point BentoML's model store and the champion pointer at `registry_dir` (empty: keep the
    environment's BENTOML_HOME / HEALNET_REGISTRY_DIR). Call before anything imports bentoml."""
    if registry_dir:
        path = str(Path(registry_dir).resolve())
        os.environ["BENTOML_HOME"] = path
        os.environ["HEALNET_REGISTRY_DIR"] = path


def cohort_data_hash(cohort_dir: str | Path) -> str:
    """sha256 over the cohort's clinical and omics parquet files and slide manifest (names and contents) and
    over each listed slide file's size and modification time, so that changed slides invalidate cached
    slide features."""
    from healnet.files import sha256_file

    root = Path(cohort_dir)
    files = [root / name for name in HASHED_TABLES]
    for folder in HASHED_FOLDERS:
        files += sorted((root / folder).glob("*.parquet"))
    if (root / SLIDE_MANIFEST).is_file():
        files.append(root / SLIDE_MANIFEST)
    missing = [str(path) for path in files if not path.is_file()]
    if missing:
        raise PipelineStepError(f"cannot hash cohort {root}: missing {missing}")
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(sha256_file(path).encode())
    for slide_id, stamp in _slide_stamps(root):
        digest.update(f"{slide_id}\0{stamp}\0".encode())
    return digest.hexdigest()


def _slide_stamps(root: Path) -> list[tuple[str, str]]:
    """(slide id, "size:mtime_ns" or "absent") of every slide with a file in the manifest."""
    if not (root / SLIDE_MANIFEST).is_file():
        return []
    from healnet.data.cohort import Cohort

    cohort = Cohort.load(root)
    stamps = []
    for slide_id in cohort.slides.loc[cohort.slides["path"].notna(), "slide_id"]:
        path = cohort.slide_path(slide_id)
        stat = path.stat() if path.is_file() else None
        stamps.append((str(slide_id), f"{stat.st_size}:{stat.st_mtime_ns}" if stat else "absent"))
    return sorted(stamps)


def git_sha() -> str:
    """The code version: $HEALNET_GIT_SHA (baked into the image), else `git rev-parse HEAD` of this
    checkout (with "-dirty" when it has uncommitted changes), else "unknown"."""
    if os.environ.get("HEALNET_GIT_SHA"):
        return os.environ["HEALNET_GIT_SHA"]
    here = Path(__file__).resolve().parent

    def git(*args: str) -> str:
        command = ["git", "-C", str(here), *args]
        return subprocess.run(command, capture_output=True, text=True, check=True, timeout=10).stdout.strip()

    try:
        sha = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{sha}-dirty" if dirty else sha


def merge_feature_shards(shard_dirs: list[str], out_dir: Path) -> int:
    """Link every slide-feature file of the shard folders into `out_dir`; returns how many.

    Two shards writing the same feature file means the shards overlap: that is an error.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    owners: dict[str, str] = {}
    for shard_dir in shard_dirs:
        shard = Path(shard_dir)
        if not shard.is_dir():
            raise PipelineStepError(f"slide-feature shard {shard} is not a folder")
        for path in sorted(shard.glob("*.parquet")):
            if path.name in owners:
                raise PipelineStepError(
                    f"feature file {path.name} is in two shards: {owners[path.name]} and {shard}"
                )
            owners[path.name] = str(shard)
            (out_dir / path.name).symlink_to(path.resolve())
    return len(owners)


def finite_metrics(evaluation: dict, names: tuple[str, ...]) -> dict[str, float]:
    """The named metrics as floats; a missing or non-finite one is an error (the gate cannot judge it)."""
    values = {}
    for name in names:
        value = evaluation.get(name)
        if not isinstance(value, int | float) or not math.isfinite(value):
            raise PipelineStepError(
                f"evaluation metric {name} is {value!r}; the test split may be too small or have no events"
            )
        values[name] = float(value)
    return values


def evaluation_html(evaluation: dict, title: str) -> str:
    """A self-contained HTML report: the metrics table and the Kaplan-Meier plot as a base64 PNG."""
    png = Path(evaluation["kaplan_meier_png"]).read_bytes()
    rows = "\n".join(
        f"<tr><th>{html.escape(str(key))}</th><td>{html.escape(_shown(value))}</td></tr>"
        for key, value in evaluation.items()
        if key != "kaplan_meier_png"
    )
    image = base64.b64encode(png).decode("ascii")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}
th,td{{border:1px solid #ccc;padding:4px 10px;text-align:left}}</style></head>
<body><h1>{html.escape(title)}</h1>
<table>
{rows}
</table>
<h2>Kaplan-Meier curves of the predicted risk groups</h2>
<img alt="Kaplan-Meier plot" src="data:image/png;base64,{image}">
</body></html>
"""


def _shown(value: object) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)
