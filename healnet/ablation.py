"""Modality ablations of HEALNet on a multimodal cohort: what each input adds, and what losing one costs.

Models are trained on each split with: omics only, slides (WSI) only, both, and both with
`missing_fraction` of the training patients missing one input kind (chosen at random per patient).
Each model is served on the complete test patients and, for two-input models, with one input kind
removed for every test patient. Requirement: served without a modality, the model's C is no more than
0.01 below that of the model trained on the remaining modality alone (its specialist).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from healnet.cv import mean_std
from healnet.data.splits import kfold_splits
from healnet.ensemble import HEALNetEnsemble
from healnet.errors import HEALNetError
from healnet.fitting import CohortData
from healnet.preprocess.state import OMIC, WSI
from healnet.recipes import TCGA, Recipe
from healnet.survival_metrics import harrell_c

KINDS = (OMIC, WSI)
SERVED = ("both", OMIC, WSI)  # what the test patients have at inference


class AblationError(HEALNetError, ValueError):
    """A cohort or configuration the ablation cannot run on; the message says why."""


def ablation_recipe() -> Recipe:
    """The CV recipe as one model on omics and slides, keeping every omic feature: synthetic features all
    have unit variance, so a top-k by variance would keep a random subset and drop most of the signal.
    Synthetic features are Gaussian, so no signed log; synthetic age and sex carry no risk, so no clinical
    modality. Batch size, weight decay and epochs are those the ablation table in docs/results.md was
    measured with (the CV recipe's before it moved to 64, 3e-2 and 40 epochs)."""
    recipe = TCGA.without_linear_path()
    return replace(
        recipe,
        members=1,
        clinical=None,
        omics=replace(recipe.omics, top_k=None, signed_log=()),
        train=replace(recipe.train, batch_size=16, weight_decay=1e-4, epochs=20, patience=20),
    )


@dataclass(frozen=True)
class AblationConfig:
    folds: int = 5
    repeats: int = 1
    seed: int = 0
    missing_fraction: float = 0.3
    recipe: Recipe = field(default_factory=ablation_recipe)

    def __post_init__(self) -> None:
        if not 0.0 < self.missing_fraction < 1.0:
            raise AblationError(f"missing_fraction must be in (0, 1), got {self.missing_fraction}")

    def to_dict(self) -> dict:
        return asdict(self)


def without(data: CohortData, kind: str) -> CohortData:
    """The cohort with one input kind ("omic" or "wsi") removed for every patient."""
    if kind not in KINDS:
        raise AblationError(f"kind must be one of {KINDS}, got {kind!r}")
    return CohortData(
        data.clinical,
        {} if kind == OMIC else data.omics,
        {} if kind == WSI else data.wsi_bags,
        None if kind == WSI else data.wsi_provenance,
    )


def with_missing(data: CohortData, patient_ids: Sequence[str], fraction: float, seed: int = 0) -> CohortData:
    """Remove one input kind, chosen at random, for `fraction` of `patient_ids` (rounded down)."""
    rng = np.random.default_rng(seed)
    chosen = rng.choice(list(patient_ids), int(fraction * len(patient_ids)), replace=False)
    drop_wsi = rng.random(len(chosen)) < 0.5
    no_omics, no_wsi = set(chosen[~drop_wsi]), set(chosen[drop_wsi])
    omics = {name: frame[~frame.index.isin(no_omics)] for name, frame in data.omics.items()}
    bags = {pid: bag for pid, bag in data.wsi_bags.items() if pid not in no_wsi}
    return CohortData(data.clinical, omics, bags, data.wsi_provenance)


def oracle_scores(data: CohortData, truth: pd.DataFrame, test_ids: Sequence[str]) -> dict[str, float]:
    """Harrell's C of the true risk factors (synth's truth.csv: z_omic, z_wsi) on the test patients.

    No model can beat these in expectation, e.g. served without slides a model can at best reach the
    omic factor's C; "both" ranks by z_omic + z_wsi (synth's default, equal effects).
    """
    test = data.clinical.loc[list(test_ids)]
    factors = truth.loc[list(test_ids)]
    risks = {OMIC: factors["z_omic"], WSI: factors["z_wsi"], "both": factors["z_omic"] + factors["z_wsi"]}
    return {name: harrell_c(test["survival_months"], test["event"], risk) for name, risk in risks.items()}


def run_split(
    data: CohortData,
    train_ids: Sequence[str],
    val_ids: Sequence[str],
    test_ids: Sequence[str],
    config: AblationConfig,
    seed: int = 0,
    truth: pd.DataFrame | None = None,
) -> dict[str, dict[str, float]]:
    """Harrell's C per trained model ("omic", "wsi", "both", "missing") and per served input ("both", "omic", "wsi").

    With `truth` (the true risk factors per patient), also the "oracle" C of those factors.
    """
    pool = list(train_ids) + list(val_ids)
    served = {"both": data, OMIC: without(data, WSI), WSI: without(data, OMIC)}

    def score(training_data: CohortData, kinds: list[str], serve: Sequence[str]) -> dict[str, float]:
        model = HEALNetEnsemble.fit(training_data, train_ids, val_ids, config.recipe.seeded(seed), kinds)
        return {name: model.evaluate(served[name], test_ids, pool)["c_index"] for name in serve}

    missing = with_missing(data, pool, config.missing_fraction, seed)
    scores = {
        OMIC: score(data, [OMIC], [OMIC]),
        WSI: score(data, [WSI], [WSI]),
        "both": score(data, [OMIC, WSI], SERVED),
        "missing": score(missing, [OMIC, WSI], SERVED),
    }
    if truth is not None:
        scores["oracle"] = oracle_scores(data, truth, test_ids)
    return scores


# served without a modality, the model may fall this far below the specialist of the remaining one
SPECIALIST_TOLERANCE = 0.01


def requirement(means: dict[str, dict[str, float]], trained: str = "both") -> dict[str, dict]:
    """Per removed modality: the C of `trained` served without it, against the specialist trained on the
    kept modality alone; it holds when the gap (specialist minus served) is at most SPECIALIST_TOLERANCE.

    `needed` is the C that serving without it must reach; `oracle` (when known) the best C the kept risk
    factor allows.
    """
    checks = {}
    for removed, kept in ((WSI, OMIC), (OMIC, WSI)):
        served = means[trained][kept]
        specialist = means[kept][kept]
        checks[f"without_{removed}"] = {
            "served": served,
            "specialist": specialist,
            "gap": specialist - served,
            "needed": specialist - SPECIALIST_TOLERANCE,
            "oracle": means["oracle"][kept] if "oracle" in means else None,
            "holds": bool(specialist - served <= SPECIALIST_TOLERANCE),
        }
    return checks


def run_ablation(
    cohorts: dict[str, CohortData],
    config: AblationConfig | None = None,
    progress: bool = True,
    truths: dict[str, pd.DataFrame] | None = None,
) -> dict:
    """All splits of every cohort; per-split C, means and stds over all splits, and the requirement check.

    `truths` (optional, per cohort name: true risk factors indexed by patient) adds oracle rows; give it
    for every cohort or none, so that the means average the same splits.
    """
    config = config or AblationConfig()
    truths = truths or {}
    if truths and set(truths) != set(cohorts):
        raise AblationError(f"truths are given for {sorted(truths)} but the cohorts are {sorted(cohorts)}")
    jobs = []
    for name, data in cohorts.items():
        missing = [kind for kind in KINDS if kind not in data.available_modalities()]
        if missing:
            raise AblationError(
                f"cohort {name!r} has no {missing}: the ablation needs omics and slide features"
            )
        clinical = data.clinical
        splits = kfold_splits(
            clinical.index, clinical["event"], folds=config.folds, repeats=config.repeats, seed=config.seed
        )
        jobs += [
            (name, int(repeat), int(fold), split)
            for (repeat, fold), split in splits.groupby(["repeat", "fold"])
        ]
    started = time.perf_counter()
    splits_out = []
    for name, repeat, fold, split in tqdm(jobs, desc="ablation splits", unit="split", disable=not progress):
        ids = {
            role: split.loc[split["role"] == role, "patient_id"].tolist() for role in ("train", "val", "test")
        }
        seed = config.seed * 1000 + repeat * config.folds + fold
        scores = run_split(
            cohorts[name], ids["train"], ids["val"], ids["test"], config, seed, truths.get(name)
        )
        splits_out.append({"cohort": name, "repeat": repeat, "fold": fold, "c_index": scores})
    summary = {
        trained: {serve: mean_std([s["c_index"][trained][serve] for s in splits_out]) for serve in row}
        for trained, row in splits_out[0]["c_index"].items()
    }
    means = {trained: {serve: v["mean"] for serve, v in row.items()} for trained, row in summary.items()}
    return {
        "config": config.to_dict(),
        "cohorts": {name: len(data.clinical) for name, data in cohorts.items()},
        "summary": summary,
        "requirement": {trained: requirement(means, trained) for trained in ("both", "missing")},
        "splits": splits_out,
        "seconds": time.perf_counter() - started,
    }


def format_ablation(report: dict) -> str:
    """Rows: how the model was trained; columns: what the test patients have at inference."""
    labels = {
        OMIC: "omics only",
        WSI: "WSI only",
        "both": "both",
        "missing": f"both, {report['config']['missing_fraction']:.0%} missing",
        "oracle": "true risk factors",
    }
    lines = [f"{'trained with':<24}" + "".join(f"{'served ' + labels[s]:>22}" for s in SERVED)]
    for trained, row in report["summary"].items():
        cells = [f"{row[s]['mean']:.3f} ± {row[s]['std']:.3f}" if s in row else "-" for s in SERVED]
        lines.append(f"{labels[trained]:<24}" + "".join(f"{cell:>22}" for cell in cells))
    for trained, checks in report["requirement"].items():
        for removed, check in checks.items():
            oracle = "" if check["oracle"] is None else f"; true-factor bound {check['oracle']:.3f}"
            lines.append(
                f"{labels[trained]}, served {removed.replace('_', ' ')}: C {check['served']:.3f}, specialist "
                f"{check['specialist']:.3f}, needs C >= {check['needed']:.3f}{oracle} -> "
                f"{'holds' if check['holds'] else 'FAILS'}"
            )
    return "\n".join(lines)
