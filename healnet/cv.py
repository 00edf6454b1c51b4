"""Patient-level repeated K-fold cross-validation of HEALNet against CoxNet and a random survival forest.

All models see the same folds in the same run. Within a fold, everything that is fitted (survival bins,
omics transforms, the baselines' features, CoxNet's penalty) is fitted on the training fold only, and
HEALNet's early stopping uses validation patients carved out of the training fold; the test fold is only
predicted. How the defaults were chosen (inner splits of BLCA and BRCA training folds, never a test
fold): docs/results.md.
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from joblib import Parallel, delayed
from tqdm.auto import tqdm

from healnet.baselines import (
    BaselineFeatures,
    CoxNetConfig,
    CoxNetFit,
    ForestConfig,
    age_risk,
    fit_coxnet,
    fit_forest,
)
from healnet.data.splits import kfold_splits
from healnet.ensemble import HEALNetEnsemble
from healnet.errors import HEALNetError
from healnet.fitting import CohortData
from healnet.preprocess.clinical import ClinicalConfig
from healnet.preprocess.omics import RNASEQ, OmicsConfig
from healnet.recipes import CV_FOLDS, CV_MODELS, CV_REPEATS, CV_SEED, TCGA, Recipe
from healnet.survival_metrics import harrell_c, uno_c

MODELS = CV_MODELS
BASELINES = MODELS[1:]
LABELS = {
    "healnet": "HEALNet",
    "healnet_single": "HEALNet (one member)",
    "age": "Age alone",
    "coxnet": "CoxNet, clinical + all omics",
    "coxnet_topk": "CoxNet, clinical + top-k omics",
    "coxnet_mid": "CoxNet mid-path, clinical+omics",
    "rsf": "Random survival forest",
}
METRICS = ("c_index", "c_index_ipcw", "integrated_brier_score")


class CVError(HEALNetError, ValueError):
    """A cross-validation that cannot run as configured; the message says why."""


@dataclass(frozen=True)
class CVConfig:
    folds: int = CV_FOLDS
    repeats: int = CV_REPEATS
    seed: int = CV_SEED
    models: tuple[str, ...] = MODELS
    modalities: tuple[str, ...] | None = None  # HEALNet input kinds ("omic", "clinical", "wsi"); default: all
    healnet: Recipe = TCGA
    coxnet: CoxNetConfig = CoxNetConfig(omics=OmicsConfig(top_k=None, signed_log=RNASEQ))
    coxnet_topk: CoxNetConfig = CoxNetConfig()
    coxnet_mid: CoxNetConfig = CoxNetConfig(
        omics=OmicsConfig(top_k=None, signed_log=RNASEQ), penalty="path_middle"
    )
    forest: ForestConfig = ForestConfig()
    clinical: ClinicalConfig = ClinicalConfig()  # the baselines' clinical covariates

    def __post_init__(self) -> None:
        unknown = sorted(set(self.models) - set(MODELS))
        if unknown or not self.models:
            raise CVError(f"models must be a non-empty subset of {MODELS}, got {list(self.models)}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class FoldResult:
    record: dict  # JSON-ready: ids counts, metrics and seconds per model
    healnet: HEALNetEnsemble | None = None
    features: dict[str, BaselineFeatures] = field(default_factory=dict)  # per baseline
    coxnet: CoxNetFit | None = None


def _risk_metrics(
    clinical: pd.DataFrame, train_ids: list[str], test_ids: list[str], risk: np.ndarray
) -> dict:
    train, test = clinical.loc[train_ids], clinical.loc[test_ids]
    return {
        "c_index": harrell_c(test["survival_months"], test["event"], risk),
        "c_index_ipcw": uno_c(
            train["survival_months"], train["event"], test["survival_months"], test["event"], risk
        ),
    }


def run_fold(
    data: CohortData,
    train_ids: Sequence[str],
    val_ids: Sequence[str],
    test_ids: Sequence[str],
    config: CVConfig | None = None,
    seed: int = 0,
) -> FoldResult:
    """Fit every model of `config.models` on the training fold (train_ids + val_ids) and score it on test_ids."""
    config = config or CVConfig()
    train_ids, val_ids, test_ids = list(train_ids), list(val_ids), list(test_ids)
    pool = train_ids + val_ids
    leaked = set(pool) & set(test_ids)
    if leaked or len(set(pool)) != len(pool):
        raise CVError(f"training and test patients overlap or repeat: {sorted(leaked)[:5]}")
    clinical = data.clinical
    test = clinical.loc[test_ids]
    result = FoldResult(
        {
            "n_train": len(train_ids),
            "n_val": len(val_ids),
            "n_test": len(test_ids),
            "test_events": int(test["event"].sum()),
            "models": {},
        }
    )
    models = result.record["models"]

    if "healnet" in config.models:
        started = time.perf_counter()
        ensemble = HEALNetEnsemble.fit(
            data, train_ids, val_ids, config.healnet.seeded(seed), config.modalities
        )
        seconds = time.perf_counter() - started
        models["healnet"] = {
            **ensemble.evaluate(data, test_ids, pool),
            "seconds": seconds,
            "best_epochs": [member.training.best_epoch for member in ensemble.members],
            "bin_edges": ensemble.bins.to_dict()["edges"],
        }
        if "linear_blend_choice" in ensemble.members[0].metadata:
            models["healnet"]["linear_blend_choice"] = ensemble.members[0].metadata["linear_blend_choice"]
        if len(ensemble.members) > 1:
            models["healnet_single"] = {**ensemble.evaluate(data, test_ids, pool, members=1)}
        result.healnet = ensemble

    pool_clinical = clinical.loc[pool]
    times = pool_clinical["survival_months"].to_numpy()
    events = pool_clinical["event"].to_numpy()
    for name in [name for name in BASELINES if name in config.models]:
        started = time.perf_counter()
        extra = {}
        if name == "age":
            risk = age_risk(pool_clinical, clinical.loc[test_ids])
        else:
            features = BaselineFeatures.fit(data, pool, _baseline_omics(config, name), config.clinical)
            x_train, x_test = features(data, pool), features(data, test_ids)
            extra["features"] = x_train.shape[1]
            result.features[name] = features
            if name == "rsf":
                risk = fit_forest(x_train, times, events, config.forest, seed).predict(x_test)
            else:
                fitted = fit_coxnet(x_train, times, events, getattr(config, name), seed)
                risk = fitted.risk(x_test)
                extra |= {"alpha": fitted.alpha, "nonzero_coefficients": fitted.n_nonzero}
                if name == "coxnet":
                    result.coxnet = fitted
        models[name] = {
            **_risk_metrics(clinical, pool, test_ids, risk),
            "seconds": time.perf_counter() - started,
            **extra,
        }
    return result


def _baseline_omics(config: CVConfig, name: str) -> OmicsConfig:
    return config.forest.omics if name == "rsf" else getattr(config, name).omics


def mean_std(values: Sequence[float]) -> dict:
    array = np.asarray(values, dtype=np.float64)
    return {"mean": float(array.mean()), "std": float(array.std(ddof=1)) if len(array) > 1 else 0.0}


def paired_difference(folds: list[dict], model: str, baseline: str) -> dict:
    """`model` minus `baseline` in Harrell's C, fold by fold: mean, std, standard error, folds higher."""
    difference = np.asarray([f["models"][model]["c_index"] - f["models"][baseline]["c_index"] for f in folds])
    spread = mean_std(difference.tolist())
    return {
        **spread,
        "standard_error": spread["std"] / np.sqrt(len(difference)),
        "folds_higher": int(np.sum(difference > 0)),
    }


def summarize(folds: list[dict]) -> dict:
    """Mean and std over folds per model and metric; the best baseline by mean Harrell C, and HEALNet's
    paired difference to each baseline."""
    names = list(dict.fromkeys(name for fold in folds for name in fold["models"]))
    summary: dict = {
        name: {
            metric: mean_std([fold["models"][name][metric] for fold in folds])
            for metric in (*METRICS, "seconds")
            if metric in folds[0]["models"][name]
        }
        for name in names
    }
    baselines = [name for name in BASELINES if name in names]
    if baselines:
        best = max(baselines, key=lambda name: summary[name]["c_index"]["mean"])
        summary["best_baseline"] = best
    if "healnet" in names:
        for baseline in baselines:
            summary["healnet"][f"c_index_minus_{baseline}"] = paired_difference(folds, "healnet", baseline)
    return summary


def _fold_record(
    data: CohortData, ids: dict[str, list[str]], config: CVConfig, seed: int, threads: int | None
) -> dict:
    """One fold's JSON record; `threads` sets torch's threads in a worker process (None: leave as is)."""
    if threads is not None:
        torch.set_num_threads(threads)
    return run_fold(data, ids["train"], ids["val"], ids["test"], config, seed=seed).record


def cross_validate(
    data: CohortData, config: CVConfig | None = None, progress: bool = True, jobs: int = 1
) -> dict:
    """Repeated stratified K-fold CV of every model on the same folds; returns the JSON-ready report.

    With `jobs` > 1, folds run in that many worker processes (one torch thread each); every fold has its
    own seed, so the report is the same for any `jobs`.
    """
    config = config or CVConfig()
    if jobs < 1:
        raise CVError(f"jobs must be at least 1, got {jobs}")
    clinical = data.clinical
    splits = kfold_splits(
        clinical.index,
        clinical["event"].to_numpy(),
        folds=config.folds,
        repeats=config.repeats,
        seed=config.seed,
        val_fraction=config.healnet.val_fraction,
    )
    tasks = []
    for (repeat_key, fold_key), split in splits.groupby(["repeat", "fold"]):
        repeat, fold = int(repeat_key), int(fold_key)
        ids = {
            role: split.loc[split["role"] == role, "patient_id"].tolist() for role in ("train", "val", "test")
        }
        tasks.append((repeat, fold, config.seed * 1000 + repeat * config.folds + fold, ids))
    started = time.perf_counter()
    # with jobs == 1 joblib runs the folds in this process, at the caller's torch threads
    records = Parallel(n_jobs=jobs, return_as="generator")(
        delayed(_fold_record)(data, ids, config, seed, 1 if jobs > 1 else None) for _, _, seed, ids in tasks
    )
    folds = []
    bar = tqdm(
        zip(tasks, records, strict=True), total=len(tasks), desc="cv folds", unit="fold", disable=not progress
    )
    for (repeat, fold, seed, ids), record in bar:
        folds.append({"repeat": repeat, "fold": fold, "seed": seed, **record, "test_ids": ids["test"]})
        bar.set_postfix(
            {
                name: f"{mean_std([f['models'][name]['c_index'] for f in folds])['mean']:.3f}"
                for name in folds[-1]["models"]
            }
        )
    return {
        "patients": len(clinical),
        "events": int(clinical["event"].sum()),
        "config": config.to_dict(),
        "summary": summarize(folds),
        "folds": folds,
        "seconds": time.perf_counter() - started,
        "environment": {
            "jobs": jobs,
            "torch_threads": 1 if jobs > 1 else torch.get_num_threads(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "machine": platform.machine(),
        },
    }


def format_table(report: dict, title: str = "") -> str:
    """Plain-text table: mean ± std over folds of Harrell's and Uno's C and the integrated Brier score, fit
    seconds per fold, and HEALNet's paired difference to the best baseline."""
    summary = report["summary"]
    n_folds = len(report["folds"])
    lines = [
        f"{title}{' ' if title else ''}{report['patients']} patients, {report['events']} events, "
        f"{n_folds} test folds ({report['config']['folds']} folds x {report['config']['repeats']} repeats)",
        f"{'model':<32} {'Harrell C':>15} {'Uno C (IPCW)':>15} {'IBS':>15} {'fit s/fold':>11}",
    ]
    for name, metrics in summary.items():
        if name == "best_baseline":
            continue
        seconds = f"{metrics['seconds']['mean']:.1f}" if "seconds" in metrics else "-"
        cells = [
            f"{metrics[m]['mean']:.3f} ± {metrics[m]['std']:.3f}" if m in metrics else "-" for m in METRICS
        ]
        lines.append(
            f"{LABELS.get(name, name):<32} {cells[0]:>15} {cells[1]:>15} {cells[2]:>15} {seconds:>11}"
        )
    best = summary.get("best_baseline")
    paired = summary.get("healnet", {}).get(f"c_index_minus_{best}")
    if paired:
        lines.append(
            f"best baseline by mean Harrell C: {LABELS[best]}; HEALNet − it (paired): {paired['mean']:+.3f} "
            f"(standard error {paired['standard_error']:.3f}), higher in {paired['folds_higher']}/{n_folds} folds"
        )
    lines.append(f"total {report['seconds']:.0f} s")
    return "\n".join(lines)


def pool_cohorts(reports: dict[str, dict]) -> dict:
    """HEALNet's paired difference in Harrell's C, pooled over cohorts: per cohort the mean over its folds
    and its standard error; pooled, the mean over cohorts with the standard error sqrt(sum se^2) / n
    (cohorts are independent). Against each cohort's own best baseline, and against each baseline that
    every cohort has."""
    if len(reports) < 2:
        raise CVError(f"pooling needs at least 2 cohorts, got {len(reports)}")
    missing = [name for name, report in reports.items() if "healnet" not in report["summary"]]
    if missing:
        raise CVError(f"reports without HEALNet cannot be pooled: {missing}")

    def pooled(differences: list[dict]) -> dict:
        errors = np.asarray([d["standard_error"] for d in differences])
        return {
            "mean": float(np.mean([d["mean"] for d in differences])),
            "standard_error": float(np.sqrt(np.sum(errors**2)) / len(errors)),
            "cohorts_higher": int(sum(d["mean"] > 0 for d in differences)),
        }

    cohorts = {}
    for name, report in reports.items():
        summary = report["summary"]
        best = summary["best_baseline"]
        cohorts[name] = {"best_baseline": best, **summary["healnet"][f"c_index_minus_{best}"]}
    shared = [
        b for b in BASELINES if all(f"c_index_minus_{b}" in r["summary"]["healnet"] for r in reports.values())
    ]
    return {
        "cohorts": cohorts,
        "best_baseline": pooled(list(cohorts.values())),
        "baselines": {
            b: pooled([r["summary"]["healnet"][f"c_index_minus_{b}"] for r in reports.values()])
            for b in shared
        },
    }


def format_pooled(pooled: dict) -> str:
    """Plain-text lines of `pool_cohorts`' result."""
    lines = [f"{'cohort':<24} {'best baseline':<40} {'HEALNet − it':>13} {'s.e.':>6}"]
    for name, cohort in pooled["cohorts"].items():
        label = LABELS.get(cohort["best_baseline"], cohort["best_baseline"])
        lines.append(f"{name:<24} {label:<40} {cohort['mean']:>+13.3f} {cohort['standard_error']:>6.3f}")
    n = len(pooled["cohorts"])
    best = pooled["best_baseline"]
    lines.append(
        f"pooled over {n} cohorts, HEALNet − each cohort's best baseline: {best['mean']:+.3f} "
        f"(standard error {best['standard_error']:.3f}), higher in {best['cohorts_higher']}/{n} cohorts"
    )
    for name, difference in pooled["baselines"].items():
        lines.append(
            f"  HEALNet − {LABELS.get(name, name)}: {difference['mean']:+.3f} "
            f"(standard error {difference['standard_error']:.3f})"
        )
    return "\n".join(lines)


def write_report(report: dict, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1) + "\n")
