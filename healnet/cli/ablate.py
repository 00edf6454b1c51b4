"""`healnet ablate`: modality ablations of HEALNet on multimodal cohorts (omics + slide features)."""

from __future__ import annotations

import argparse
from pathlib import Path

TRUTH_FILE = "truth.csv"
HELP = (
    "Train HEALNet with omics only, slides only, both, and both with missing inputs; serve each with "
    "every modality and with one removed; print mean ± std c-index over splits and write a JSON report."
)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cohort",
        type=Path,
        action="append",
        required=True,
        help="canonical cohort folder with COHORT/features (repeat for several cohorts, e.g. synth seeds)",
    )
    parser.add_argument("--folds", type=int, default=5, help="K of the stratified K-fold per cohort")
    parser.add_argument("--repeats", type=int, default=1, help="independent K-fold partitions per cohort")
    parser.add_argument("--seed", type=int, default=0, help="seed of the splits and the models")
    parser.add_argument(
        "--missing", type=float, default=0.3, help="fraction of training patients missing one input kind"
    )
    parser.add_argument(
        "--modality-dropout",
        type=float,
        default=0.0,
        help="training only: mark each present modality missing with this probability per sample",
    )
    parser.add_argument(
        "--l1",
        type=float,
        default=1e-5,
        help="L1 penalty on all weights (the CV recipe keeps the library default)",
    )
    parser.add_argument("--members", type=int, default=1, help="HEALNet ensemble size per trained model")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--json", type=Path, default=None, help="write the full report here")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run(args: argparse.Namespace) -> int:
    from dataclasses import replace

    import pandas as pd
    import torch

    from healnet.ablation import AblationConfig, ablation_recipe, format_ablation, run_ablation
    from healnet.cv import write_report
    from healnet.data.cohort import Cohort
    from healnet.fitting import CohortData

    torch.set_num_threads(args.threads)
    cohorts, truths = {}, {}
    for folder in args.cohort:
        features = folder / "features"
        if not features.is_dir():
            raise SystemExit(f"{folder}: no features/ folder; run `healnet preprocess-slides` on it first")
        cohorts[str(folder)] = CohortData.from_cohort(Cohort.load(folder), features)
        if (folder / TRUTH_FILE).is_file():  # written by `healnet synth`
            truths[str(folder)] = pd.read_csv(folder / TRUTH_FILE, index_col="patient_id")
    recipe = ablation_recipe()
    recipe = replace(
        recipe,
        members=args.members,
        train=replace(recipe.train, modality_dropout=args.modality_dropout, l1=args.l1),
    )
    config = AblationConfig(
        folds=args.folds, repeats=args.repeats, seed=args.seed, missing_fraction=args.missing, recipe=recipe
    )
    report = run_ablation(
        cohorts, config, progress=not args.no_progress, truths=truths if len(truths) == len(cohorts) else None
    )
    print(format_ablation(report))
    if args.json is not None:
        write_report(report, args.json)
        print(f"report written to {args.json}")
    return 0
