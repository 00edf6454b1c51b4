"""Helpers the pipeline steps call inside their container (installed with the project in the image)."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

from healnet.errors import HEALNetError


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
    """The key of the steps' cached results: `healnet.data.cohort.data_hash` of the cohort folder (every
    table a step reads, splits included, and the slide files' sizes and times) and of the code version
    (`code_version()`), so that neither other data nor other code reuses them."""
    from healnet.data.cohort import data_hash

    return data_hash(Path(cohort_dir), code_version=code_version())


def code_version() -> str:
    """The version of the code the steps run: the healnet package version and `git_sha()`."""
    from healnet import __version__

    return f"{__version__}+{git_sha()}"


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
    """Put every slide-feature file of the shard folders into `out_dir`, and write the shards' quarantine
    lists together as `out_dir/quarantine.csv`, so that training and evaluation take the quarantined slides
    as missing rather than unprocessed; returns how many feature files.

    `out_dir` is an artifact of its own (the pipeline's `merge_features` step), so it holds files, never
    links into other artifacts: a hard link where the file system allows one (no copy of large feature
    files), else a copy. Two shards writing the same feature file means the shards overlap: that is an error.
    """
    from healnet.preprocess.feature_files import QUARANTINE_FILE, read_quarantine, write_quarantine

    out_dir.mkdir(parents=True, exist_ok=True)
    owners: dict[str, str] = {}
    quarantined: dict[str, str] = {}
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
            _link_or_copy(path.resolve(), out_dir / path.name)
        for slide, reason in read_quarantine(shard).items():
            quarantined.setdefault(slide, reason)
    write_quarantine(out_dir / QUARANTINE_FILE, sorted(quarantined.items()))
    return len(owners)


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:  # another file system, or one without hard links
        shutil.copyfile(source, target)


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


def evaluation_html(evaluation: dict, title: str, data_hash: str) -> str:
    """The self-contained HTML report of `healnet.evaluate.evaluate_checkpoint`'s result (its plots
    embedded as base64 PNG, `healnet.evaluation_report`), with the run's data hash."""
    from healnet.evaluation_report import render_html

    return render_html(evaluation, title, {"data_hash": data_hash})


# evaluation.json keys that name files of the evaluation's scratch folder, left out of the artifact
EVALUATION_FILES = (
    "kaplan_meier_png",
    "calibration_png",
    "brier_png",
    "td_auc_png",
    "predictions_parquet",
    "evaluation_html",
)


def evaluation_json(evaluation: dict) -> dict:
    """The evaluation's numbers as the step's `evaluation` artifact holds them: without the file paths."""
    return {key: value for key, value in evaluation.items() if key not in EVALUATION_FILES}


def evaluation_metrics(evaluation: dict) -> dict[str, float]:
    """The step's KFP metrics: the three scores (non-finite: an error), the c-index interval where it is
    finite (NaN only when no resample holds a comparable pair), the test patients, events and resamples."""
    values = finite_metrics(evaluation, ("c_index", "c_index_ipcw", "integrated_brier_score"))
    for bound in ("c_index_ci_low", "c_index_ci_high"):
        if math.isfinite(evaluation[bound]):
            values[bound] = evaluation[bound]
    values["test_patients"] = evaluation["patients"]
    values["test_events"] = evaluation["events"]
    values["bootstrap_resamples"] = evaluation["bootstrap_resamples"]
    return values


def feature_folders(slide_shards: list, imported) -> list[str]:
    """The folders of the run's patch-feature files: every tiled shard's, and the imported artifact's
    encoder folder (`import_features` writes `<artifact>/<encoder key>/`) when it holds any."""
    from healnet.preprocess.feature_files import resolve_feature_dir

    folders = [artifact.path for artifact in slide_shards]
    if Path(imported.path).is_dir():
        folders.append(str(resolve_feature_dir(Path(imported.path))))
    return folders


def import_config(encoder_name: str, weights_sha256: str, mpp: float, patch_size: int):
    """The pipeline's import parameters as an `ImportConfig` (0 and "": the files' attributes, unknown
    weights); its checks raise on a missing encoder name or a malformed sha256."""
    from healnet.preprocess.feature_import import ImportConfig

    return ImportConfig(
        encoder_name=encoder_name,
        weights_sha256=weights_sha256 or None,
        patch_size=patch_size or None,
        mpp=mpp or None,
    )


def check_import(
    features_dir: str, encoder_name: str, weights_sha256: str, mpp: float, patch_size: int
) -> None:
    """Raise (one line) when an import from `features_dir` could not start: no such folder, no feature
    files in a known layout, or import settings that `ImportConfig` refuses."""
    from healnet.preprocess.feature_sources import detect_layout

    if not Path(features_dir).is_dir():
        raise PipelineStepError(f"features_dir {features_dir} is not a folder the step can read")
    config = import_config(encoder_name, weights_sha256, mpp, patch_size)
    layout = detect_layout(Path(features_dir), config.encoder_name)
    if not layout.sources:
        raise PipelineStepError(
            f"features_dir {features_dir} holds no feature files ({layout.kind} layout): expected CLAM "
            "h5_files/<slide>.h5 or pt_files/<slide>.pt, or a TRIDENT job's features_<encoder>/<slide>.h5"
        )


def champion_assessor(checkpoint_dir: Path, cohort_dir: str, candidate, test_features_dir: str):
    """How the gate and promote judge a registered version (a tag, or None: no champion) against the
    candidate at `checkpoint_dir`: `healnet.gate.assess_champion`, scoring a comparable one on the
    candidate's scored test patients of the cohort (with their slide features from `test_features_dir`
    when the candidate reads slides)."""
    from healnet.checkpoint import load_checkpoint
    from healnet.gate import assess_champion, model_inputs
    from healnet.scoring import test_patients_loader

    inputs = model_inputs(load_checkpoint(Path(checkpoint_dir)))
    load_patients = test_patients_loader(cohort_dir, candidate, inputs["modalities"], test_features_dir)
    return lambda tag: assess_champion(tag, inputs, load_patients)


def record_training(result: dict, data_hash: str, model, metrics) -> None:
    """Describe a trained model on the step's `model` and `metrics` artifacts from its metrics.json
    (`result`), the same whichever backend trained it."""
    model.metadata.update(
        {
            "sha256": result["sha256"],
            "modalities": result["modalities"],
            "recipe": result["recipe"],
            "members": result["members"],
            "best_epochs": result["best_epochs"],
            "device": result["device"],
            "data_hash": data_hash,
            # slides trained without (their patients keep other slides or lack the modality)
            "slides_quarantined": result["slides_quarantined"]["count"],
            "quarantined_slide_ids": result["slides_quarantined"]["slides"],
        }
    )
    for name, value in result["val"].items():
        if math.isfinite(value):
            metrics.log_metric(f"val_{name}", value)
        else:
            print(f"validation {name} is {value}: not logged as a metric")
    metrics.log_metric("epochs_run", result["epochs_run"])
    Path(metrics.path).write_text(json.dumps(metrics.metadata))  # the file too, not only the metadata


def candidate_card_files(
    version: str | None,
    *,
    model: Any,
    cohort_path: str,
    gate: dict,
    evaluation_file: str,
    validation_file: str,
    data_hash: str,
    code_version: str,
    run_id: str,
    run_name: str,
) -> dict[str, str]:
    """The model card files (model_card.json, model_card.md) of this run's candidate: `version` is its
    registered tag, None for a rejected candidate. `model` is the train step's Model artifact; `gate` the
    record of the gate that decided (gate.json, or the gate taken again at promotion)."""
    from healnet.model_card import card_files, pipeline_card

    card = pipeline_card(
        Path(model.path) / "checkpoint",
        cohort_path,
        gate,
        version,
        evaluation_file=evaluation_file,
        validation_file=validation_file,
        data_hash=data_hash,
        git_sha=code_version,
        run_id=run_id,
        run_name=run_name,
        slides_quarantined=model.metadata.get("slides_quarantined"),
    )
    return card_files(card)


def write_card_artifacts(files: dict[str, str], markdown_path: str, json_path: str) -> None:
    """The card's Markdown and JSON into the step's two artifacts."""
    from healnet.registry import CARD_JSON, CARD_MARKDOWN

    Path(markdown_path).write_text(files[CARD_MARKDOWN], encoding="utf-8")
    Path(json_path).write_text(files[CARD_JSON], encoding="utf-8")
