"""One training run on a cohort: fit bins and preprocessing on the training patients, train, evaluate, save;
and loading what it saved."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch.distributed as dist

from healnet.checkpoint import load_checkpoint, save_checkpoint
from healnet.data.cohort import Cohort
from healnet.data.dataset import require_slide_features
from healnet.device import select_device
from healnet.ensemble import HEALNetEnsemble
from healnet.fitting import CohortData, fitting_patients
from healnet.recipes import Recipe
from healnet.train import DistributedTrainingError, join_process_group, process_rank


def run_training(
    cohort_dir: Path,
    out_dir: Path,
    recipe: Recipe,
    features_dir: Path | None = None,
    modalities: Sequence[str] | None = None,
    split_repeat: int = 0,
    progress: bool = True,
    require_features: bool = False,
) -> dict:
    """Train `recipe` on the cohort's holdout split; write `checkpoint/` and `metrics.json` to `out_dir`.

    Started by torchrun (WORLD_SIZE > 1), a single-model recipe trains data-parallel, one process per GPU
    (or CPU process on gloo), and the first process writes the outputs; an ensemble recipe is refused there.

    With one member, the model trains on the split's training patients and early-stops on its validation
    ones; an ensemble uses both (see `HEALNetEnsemble`). The test patients are only evaluated. Without
    explicit `modalities`, a cohort that lists slides but has no slide features is refused
    (`SlideFeaturesError`) rather than trained on omics alone; `require_features`: an explicit
    `features_dir` from which no features load is refused too. Slides that the feature folder quarantined
    are a missing modality for their patients (see `load_wsi_bags`).

    Returns the metrics that `metrics.json` holds, among them `slides_quarantined`: {"count": n,
    "slides": [slide ids]}, the cohort's slides left out because they were quarantined.
    """
    joined = join_process_group()
    try:
        return _train_and_save(
            Cohort.load(cohort_dir),
            Path(cohort_dir),
            Path(out_dir),
            recipe,
            features_dir,
            modalities,
            split_repeat,
            progress,
            require_features,
        )
    finally:
        if joined:
            dist.destroy_process_group()


def _train_and_save(
    cohort,
    cohort_dir: Path,
    out_dir: Path,
    recipe: Recipe,
    features_dir: Path | None,
    modalities: Sequence[str] | None,
    split_repeat: int,
    progress: bool,
    require_features: bool,
) -> dict:
    rank, world_size = process_rank()
    if world_size > 1 and recipe.members > 1:
        raise DistributedTrainingError(
            f"recipe {recipe.name!r} trains {recipe.members} members as one batched model on one device; "
            "data-parallel training (torchrun) is for single-model recipes: run it as one process"
        )
    if features_dir is None and (Path(cohort_dir) / "features").is_dir():
        features_dir = Path(cohort_dir) / "features"
    data = CohortData.from_cohort(cohort, features_dir, require_features)
    if modalities is None:
        require_slide_features(cohort, data.wsi_bags, features_dir, data.quarantined_slides)
    ids = {role: cohort.patients("holdout", split_repeat, 0, role) for role in ("train", "val", "test")}
    ensemble = HEALNetEnsemble.fit(
        data,
        ids["train"],
        ids["val"],
        recipe,
        modalities,
        progress=progress,
    )
    fitted_on = fitting_patients(ids["train"], ids["val"], recipe.members)
    results = [member.training for member in ensemble.members]
    metrics = {
        "recipe": recipe.name,
        "members": len(ensemble.members),
        "modalities": ensemble.modalities,
        "device": str(select_device(recipe.train.device)),
        "best_epochs": [result.best_epoch for result in results],
        "epochs_run": max(len(result.history) for result in results),
        "patients": {role: len(pids) for role, pids in ids.items()},
        "slides_quarantined": data.quarantine_summary(),
        "val": ensemble.evaluate(data, ids["val"], fitted_on),
        "test": ensemble.evaluate(data, ids["test"], fitted_on),
    }
    if rank > 0:  # every process holds the same weights; the first one writes them
        return metrics
    checkpoint_dir = out_dir / "checkpoint"
    sha = save_checkpoint(
        checkpoint_dir,
        ensemble.to_checkpoint(
            {
                "cohort": str(cohort_dir),
                "cohort_name": cohort.meta.get("name"),
                "split_repeat": split_repeat,
                "recipe_settings": recipe.to_dict(),
                "metrics": {"val": metrics["val"], "test": metrics["test"]},
                "reference_risk_quantiles": reference_risk_quantiles(ensemble.risk(data, fitted_on)),
            }
        ),
    )
    metrics["checkpoint"] = str(checkpoint_dir)
    metrics["sha256"] = sha
    (out_dir / "history.json").write_text(json.dumps([result.history for result in results], indent=1))
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def reference_risk_quantiles(training_risk: np.ndarray) -> dict[str, float]:
    """Risk quantiles on the training patients: the reference that serving exports for drift alerts."""
    return {str(q): float(np.quantile(training_risk, q)) for q in (0.1, 0.25, 0.5, 0.75, 0.9)}


def load_trained(checkpoint_dir: Path):
    """The checkpoint's model as a `HEALNetEnsemble` (a single model is an ensemble of one)."""
    return HEALNetEnsemble.from_checkpoint(load_checkpoint(checkpoint_dir))
