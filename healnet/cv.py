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
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from joblib import Parallel, delayed
from tqdm.auto import tqdm

from healnet.baselines import (
    RNASEQ,
    CoxNetConfig,
    CoxNetFit,
    ForestConfig,
    OmicsMatrix,
    fit_coxnet,
    fit_forest,
)
from healnet.data.splits import kfold_splits
from healnet.experiment import CohortData, TrainedModel, train_model
from healnet.preprocess.omics import OmicsConfig
from healnet.survival import SurvivalBins, harrell_c, survival_from_logits, survival_metrics, uno_c
from healnet.train import TrainConfig

MODELS = ("healnet", "coxnet", "rsf")
LABELS = {
    "healnet": "HEALNet",
    "healnet_single": "HEALNet (one member)",
    "coxnet": "CoxNet",
    "rsf": "Random survival forest",
}
METRICS = ("c_index", "c_index_ipcw")


class CVError(ValueError):
    """A cross-validation that cannot run as configured; the message says why."""


def default_model_options() -> dict:
    return {"depth": 1, "n_latents": 8, "latent_dim": 16, "cross_dim_head": 8, "latent_dim_head": 8}


@dataclass(frozen=True)
class HEALNetRecipe:
    """How HEALNet is trained in each fold: a small model, per-table omic modalities, an ensemble.

    With `members` > 1, the training fold is split into `members` stratified parts; member i is
    early-stopped on part i and trained on the others, and the members' survival curves are averaged.
    Strong weight decay (3e-2) keeps each member from fitting noise when events are few (BRCA: 13.6%);
    batches of 64 make a member about 2.4x cheaper (BRCA), which pays for 20 members.
    """

    omics: OmicsConfig = OmicsConfig(top_k=200, combine=False, tokens="single", signed_log=RNASEQ)
    model: dict = field(default_factory=default_model_options)
    train: TrainConfig = TrainConfig(epochs=20, patience=20, monitor="loss", batch_size=64, weight_decay=3e-2)
    members: int = 20
    n_bins: int = 4

    def __post_init__(self) -> None:
        if self.members < 1:
            raise CVError(f"members must be at least 1, got {self.members}")


@dataclass(frozen=True)
class CVConfig:
    folds: int = 5
    repeats: int = 3
    seed: int = 0
    val_fraction: float = 0.15  # HEALNet's validation carve-out when it has a single member
    models: tuple[str, ...] = MODELS
    modalities: tuple[str, ...] | None = None  # HEALNet input kinds ("omic", "wsi"); default: all
    healnet: HEALNetRecipe = HEALNetRecipe()
    coxnet: CoxNetConfig = CoxNetConfig()
    forest: ForestConfig = ForestConfig()

    def __post_init__(self) -> None:
        unknown = sorted(set(self.models) - set(MODELS))
        if unknown or not self.models:
            raise CVError(f"models must be a non-empty subset of {MODELS}, got {list(self.models)}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class HEALNetEnsemble:
    members: list[TrainedModel]
    bins: SurvivalBins
    member_splits: list[tuple[list[str], list[str]]]  # (train ids, early-stopping ids) per member

    @classmethod
    def fit(
        cls,
        data: CohortData,
        train_ids: Sequence[str],
        val_ids: Sequence[str],
        recipe: HEALNetRecipe | None = None,
        modalities: Sequence[str] | None = None,
        seed: int = 0,
    ) -> HEALNetEnsemble:
        """Bins on the whole training fold (train_ids + val_ids); members as in `HEALNetRecipe`."""
        recipe = recipe or HEALNetRecipe()
        pool = list(train_ids) + list(val_ids)
        clinical = data.clinical.loc[pool]
        bins = SurvivalBins.fit(clinical["survival_months"], clinical["event"], recipe.n_bins)
        if recipe.members == 1:
            parts = [(list(train_ids), list(val_ids))]
        else:
            inner = kfold_splits(pool, clinical["event"], folds=recipe.members, seed=seed, val_fraction=0.0)
            parts = [
                (
                    split.loc[split["role"] == "train", "patient_id"].tolist(),
                    split.loc[split["role"] == "test", "patient_id"].tolist(),
                )
                for _, split in inner.groupby("fold")
            ]
        members = [
            train_model(
                data,
                fit_ids,
                stop_ids,
                modalities,
                recipe.omics,
                recipe.model,
                replace(recipe.train, seed=seed + index),
                progress=False,
                bins=bins,
            )
            for index, (fit_ids, stop_ids) in enumerate(parts)
        ]
        return cls(members, bins, parts)

    def survival(
        self, data: CohortData, patient_ids: Sequence[str], members: int | None = None
    ) -> np.ndarray:
        """Mean survival per bin (patients, n_bins) over the first `members` members (default: all)."""
        curves = [
            survival_from_logits(torch.from_numpy(member.predict(data, patient_ids)))[1].numpy()
            for member in self.members[:members]
        ]
        return np.mean(curves, axis=0)

    def evaluate(
        self, data: CohortData, test_ids: Sequence[str], train_ids: Sequence[str], members: int | None = None
    ) -> dict:
        train, test = data.clinical.loc[list(train_ids)], data.clinical.loc[list(test_ids)]
        return survival_metrics(
            train["survival_months"].to_numpy(),
            train["event"].to_numpy(),
            test["survival_months"].to_numpy(),
            test["event"].to_numpy(),
            self.survival(data, test_ids, members),
            self.bins,
        )


@dataclass
class FoldResult:
    record: dict  # JSON-ready: ids counts, metrics and seconds per model
    healnet: HEALNetEnsemble | None = None
    features: dict[str, OmicsMatrix] = field(default_factory=dict)  # per baseline
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
        ensemble = HEALNetEnsemble.fit(data, train_ids, val_ids, config.healnet, config.modalities, seed)
        seconds = time.perf_counter() - started
        models["healnet"] = {
            **ensemble.evaluate(data, test_ids, pool),
            "seconds": seconds,
            "best_epochs": [member.result.best_epoch for member in ensemble.members],
            "bin_edges": ensemble.bins.to_dict()["edges"],
        }
        if len(ensemble.members) > 1:
            models["healnet_single"] = {**ensemble.evaluate(data, test_ids, pool, members=1)}
        result.healnet = ensemble

    baselines = [name for name in ("coxnet", "rsf") if name in config.models]
    if baselines and not data.omics:
        raise CVError(f"the baselines {baselines} need omics, and this cohort has none")
    times = clinical.loc[pool, "survival_months"].to_numpy()
    events = clinical.loc[pool, "event"].to_numpy()
    for name in baselines:
        started = time.perf_counter()
        baseline_config = config.coxnet if name == "coxnet" else config.forest
        features = OmicsMatrix.fit(data.omics, pool, baseline_config.omics)
        x_train, x_test = features(data.omics, pool), features(data.omics, test_ids)
        if name == "coxnet":
            result.coxnet = fit_coxnet(x_train, times, events, config.coxnet, seed)
            risk = result.coxnet.risk(x_test)
            extra = {"alpha": result.coxnet.alpha, "nonzero_coefficients": result.coxnet.n_nonzero}
        else:
            risk = fit_forest(x_train, times, events, config.forest, seed).predict(x_test)
            extra = {}
        models[name] = {
            **_risk_metrics(clinical, pool, test_ids, risk),
            "seconds": time.perf_counter() - started,
            "features": x_train.shape[1],
            **extra,
        }
        result.features[name] = features
    return result


def mean_std(values: Sequence[float]) -> dict:
    array = np.asarray(values, dtype=np.float64)
    return {"mean": float(array.mean()), "std": float(array.std(ddof=1)) if len(array) > 1 else 0.0}


def summarize(folds: list[dict]) -> dict:
    """Mean and std over folds per model and metric, and HEALNet's paired difference to each baseline."""
    names = list(dict.fromkeys(name for fold in folds for name in fold["models"]))
    summary = {
        name: {
            metric: mean_std([fold["models"][name][metric] for fold in folds])
            for metric in (*METRICS, "seconds")
            if metric in folds[0]["models"][name]
        }
        for name in names
    }
    if "healnet" in names:
        for baseline in ("coxnet", "rsf"):
            if baseline in names:
                difference = [
                    f["models"]["healnet"]["c_index"] - f["models"][baseline]["c_index"] for f in folds
                ]
                summary["healnet"][f"c_index_minus_{baseline}"] = {
                    **mean_std(difference),
                    "folds_higher": int(np.sum(np.asarray(difference) > 0)),
                }
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
        val_fraction=config.val_fraction,
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
    """Plain-text table: mean ± std over folds of Harrell's and Uno's C, fit seconds per fold."""
    summary = report["summary"]
    n_folds = len(report["folds"])
    lines = [
        f"{title}{' ' if title else ''}{report['patients']} patients, {report['events']} events, "
        f"{n_folds} test folds ({report['config']['folds']} folds x {report['config']['repeats']} repeats)",
        f"{'model':<24} {'Harrell C':>15} {'Uno C (IPCW)':>15} {'fit s/fold':>11}",
    ]
    for name, metrics in summary.items():
        seconds = f"{metrics['seconds']['mean']:.1f}" if "seconds" in metrics else "-"
        cells = [f"{metrics[m]['mean']:.3f} ± {metrics[m]['std']:.3f}" for m in METRICS]
        lines.append(f"{LABELS.get(name, name):<24} {cells[0]:>15} {cells[1]:>15} {seconds:>11}")
    for baseline in ("coxnet", "rsf"):
        paired = summary.get("healnet", {}).get(f"c_index_minus_{baseline}")
        if paired:
            lines.append(
                f"HEALNet − {LABELS[baseline]} (paired Harrell C): {paired['mean']:+.3f} ± {paired['std']:.3f}, "
                f"higher in {paired['folds_higher']}/{n_folds} folds"
            )
    lines.append(f"total {report['seconds']:.0f} s")
    return "\n".join(lines)


def write_report(report: dict, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1) + "\n")
