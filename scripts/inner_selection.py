"""Compare recipe candidates on inner splits of outer training folds; no outer test fold is ever read.

For each outer training fold of repeat 0 of `healnet cv`'s splits (stratified patient-level K-fold, the same
seed), a stratified 75/25 split (random_state = SET + fold) gives an inner training and an inner test set.
Every candidate and baseline is fitted on the inner training set and scored on the inner test set.
The protocol and the rule that picks a candidate are in docs/results.md, written before the run.

    python scripts/inner_selection.py --table ../shared/data/tcga/tcga_blca_all_clean.csv.gz --round 2 \
        --set 500 --json build/inner/blca_500.json
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from joblib import Parallel, delayed
from sklearn.model_selection import train_test_split

from healnet.cv import BASELINES, CVConfig, run_fold
from healnet.data.cohort import ingest
from healnet.data.splits import kfold_splits
from healnet.fitting import CohortData
from healnet.preprocess.clinical import CLINICAL, ClinicalConfig
from healnet.preprocess.state import OMIC
from healnet.recipes import TCGA, Recipe

# The `tcga` recipe as rounds 7 to 9 started from: round 6's choice, with every clinical covariate kept.
ROUND_7_BASE = replace(TCGA, clinical=ClinicalConfig())
# The `tcga` recipe as rounds 5 and 6 started from: round 4's choice (clinical linear path, blend 0.25).
ROUND_5_BASE = replace(
    ROUND_7_BASE,
    model=replace(ROUND_7_BASE.model, linear_path=(CLINICAL,), linear_blend=0.25),
    train=replace(ROUND_7_BASE.train, linear_blend_choices=()),
)
# The `tcga` recipe as rounds 3 and 4 started from: before round 4 chose the blend.
ROUND_4_BASE = replace(ROUND_5_BASE, model=replace(ROUND_5_BASE.model, linear_blend=0.0))
# The `tcga` recipe as rounds 1 and 2 started from: 20 epochs, before round 2 chose 40.
ROUND_BASE = replace(ROUND_4_BASE, train=replace(ROUND_4_BASE.train, epochs=20, patience=20))
# Rounds 5 and 6: the blend weight chosen per training set on the members' early-stopping patients.
CHOSEN_BLEND_TRAINING = replace(ROUND_5_BASE.train, linear_blend_choices=(0.0, 0.25, 0.5, 0.75))
WIDE_BLEND_CHOSEN = replace(
    ROUND_5_BASE,
    model=replace(ROUND_5_BASE.model, linear_path=(CLINICAL, OMIC)),
    train=CHOSEN_BLEND_TRAINING,
)


def _changed(model: dict | None = None, **train: Any) -> Recipe:
    """The rounds' starting recipe with some model settings and training settings changed."""
    return replace(
        ROUND_BASE, model=replace(ROUND_BASE.model, **(model or {})), train=replace(ROUND_BASE.train, **train)
    )


# Each round's candidates, as declared in docs/results.md before its run.
ROUNDS: dict[int, dict[str, Recipe]] = {
    1: {
        "omics_only": replace(ROUND_BASE.without_linear_path(), clinical=None),
        "clinical_token": ROUND_BASE.without_linear_path(),
        "clinical_token_linear": ROUND_BASE,
    },
    2: {
        "current": ROUND_BASE,
        "epochs_40": _changed(epochs=40, patience=40),
        "dropout": _changed({"ff_dropout": 0.3, "attn_dropout": 0.1}),
        "snn": _changed({"snn": True}),
        "bin_weights": _changed(bin_weights=True),
        "weight_decay_0.1": _changed(weight_decay=1e-1),
        "reference_choices": _changed(
            {"snn": True, "ff_dropout": 0.3, "attn_dropout": 0.1}, bin_weights=True
        ),
    },
    3: {
        "current": ROUND_4_BASE,
        "wide_linear": replace(ROUND_4_BASE, model=replace(ROUND_4_BASE.model, linear_path=(CLINICAL, OMIC))),
    },
    4: {
        "current": ROUND_4_BASE,
        "blend_0.25": replace(ROUND_4_BASE, model=replace(ROUND_4_BASE.model, linear_blend=0.25)),
        "blend_0.5": replace(ROUND_4_BASE, model=replace(ROUND_4_BASE.model, linear_blend=0.5)),
    },
    5: {
        "current": ROUND_5_BASE,
        "blend_chosen": replace(ROUND_5_BASE, train=CHOSEN_BLEND_TRAINING),
        "wide_blend_chosen": WIDE_BLEND_CHOSEN,
    },
    6: {"current": ROUND_5_BASE, "wide_blend_chosen": WIDE_BLEND_CHOSEN},
    7: {
        "current": ROUND_7_BASE,
        "cox_screened": replace(ROUND_7_BASE, omics=replace(ROUND_7_BASE.omics, select="cox")),
    },
    8: {
        "current": ROUND_7_BASE,
        "elastic_omics": replace(ROUND_7_BASE, train=replace(ROUND_7_BASE.train, linear_omics_l1_ratio=0.5)),
        "elastic_all": replace(
            ROUND_7_BASE,
            train=replace(ROUND_7_BASE.train, linear_omics_l1_ratio=0.5, linear_clinical_shares_penalty=True),
        ),
    },
    9: {
        "current": ROUND_7_BASE,
        "rare_binary_out": replace(ROUND_7_BASE, clinical=ClinicalConfig(pool_rare_binary=True)),
    },
}


def inner_sets(data: CohortData, folds: int, seed: int, set_seed: int) -> list[tuple[list[str], list[str]]]:
    clinical = data.clinical
    splits = kfold_splits(clinical.index, clinical["event"].to_numpy(), folds=folds, repeats=1, seed=seed)
    sets = []
    for fold, split in splits.groupby("fold"):
        pool = split.loc[split["role"] != "test", "patient_id"].tolist()
        events = clinical.loc[pool, "event"].to_numpy()
        train, test = train_test_split(
            pool, test_size=0.25, stratify=events, random_state=set_seed + int(fold)
        )
        sets.append((list(train), list(test)))
    return sets


def score(
    data: CohortData, name: str, config: CVConfig, train: list[str], test: list[str], seed: int
) -> dict:
    torch.set_num_threads(1)
    started = time.perf_counter()
    record = run_fold(data, train, [], test, config, seed=seed).record["models"]
    return {"candidate": name, "seconds": time.perf_counter() - started, "models": record}


def inner_set_parser(description: str | None, default_set: int) -> argparse.ArgumentParser:
    """The options of a run on inner sets: the table, which sets, parallel jobs and the JSON report."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--table", type=Path, required=True)
    parser.add_argument("--set", type=int, default=default_set, help="inner split seed offset")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--json", type=Path, required=True)
    return parser


def load_inner_sets(args: argparse.Namespace) -> tuple[CohortData, list[tuple[list[str], list[str]]]]:
    data = CohortData.from_cohort(ingest(args.table))
    return data, inner_sets(data, args.folds, args.seed, args.set)


def main() -> None:
    parser = inner_set_parser(__doc__, default_set=400)
    parser.add_argument("--round", type=int, default=2, choices=sorted(ROUNDS), help="which candidates")
    args = parser.parse_args()
    data, sets = load_inner_sets(args)
    tasks = [
        (name, replace(CVConfig(), models=("healnet",), healnet=recipe))
        for name, recipe in ROUNDS[args.round].items()
    ] + [("baselines", replace(CVConfig(), models=BASELINES))]
    jobs = [
        delayed(score)(data, name, config, train, test, args.seed * 1000 + index)
        for name, config in tasks
        for index, (train, test) in enumerate(sets)
    ]
    results = Parallel(n_jobs=args.jobs)(jobs)
    by_candidate: dict[str, list[float]] = {}
    seconds: dict[str, list[float]] = {}
    for result in results:
        seconds.setdefault(result["candidate"], []).append(result["seconds"])
        for model, metrics in result["models"].items():
            key = result["candidate"] if model == "healnet" else model
            if model != "healnet_single":
                by_candidate.setdefault(key, []).append(metrics["c_index"])
    summary: dict[str, dict[str, Any]] = {
        key: {"mean": float(np.mean(v)), "per_set": v} for key, v in by_candidate.items()
    }
    for key in summary.keys() & seconds.keys():  # HEALNet candidates; the baselines are timed together
        summary[key]["median_seconds"] = float(np.median(seconds[key]))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps({"round": args.round, "set": args.set, "summary": summary, "results": results}, indent=1)
    )
    for key, value in summary.items():
        timing = f"  {value['median_seconds']:.1f} s/fit" if "median_seconds" in value else ""
        print(f"{key:<24} {value['mean']:.4f}  " + " ".join(f"{c:.3f}" for c in value["per_set"]) + timing)


if __name__ == "__main__":
    main()
