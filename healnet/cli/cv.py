"""`healnet cv`: repeated K-fold cross-validation of HEALNet against CoxNet and a random survival forest."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from healnet.cli.ingest import quarantine_lines
from healnet.cli.recipe_options import add_recipe_options, recipe_from_args
from healnet.recipes import CV_FOLDS, CV_MODELS, CV_REPEATS, CV_SEED, TCGA

HELP = (
    "Cross-validate HEALNet against age alone, CoxNet and a random survival forest on the same patient-level "
    "folds (everything fitted on training folds only); print mean ± std c-index, the best baseline and "
    "HEALNet's paired difference to it, and write a JSON report."
)
QUARANTINE_SHOWN = 5  # rows listed on stderr; the JSON report keeps them all
# the options that override a setting of the HEALNet recipe (healnet.cli.recipe_options)
RECIPE_FLAGS = ("--members", "--epochs", "--patience", "--batch-size", "--weight-decay", "--top-k")


def configure(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--table", type=Path, help="PORPOISE table (tcga_<cohort>_all_clean.csv.gz) to ingest in memory"
    )
    source.add_argument("--cohort", type=Path, help="canonical cohort folder (healnet ingest/synth)")
    parser.add_argument(
        "--features",
        type=Path,
        default=None,
        help="patch-feature folder; COHORT/features when present and not given",
    )
    parser.add_argument(
        "--modalities",
        default=None,
        help="HEALNet input kinds, comma-separated: omic, clinical, wsi; all the cohort has when not given",
    )
    parser.add_argument(
        "--recipe",
        default=TCGA.name,
        help="named HEALNet recipe (healnet/recipes.py): tcga (omics + clinical, 20-member ensemble) or demo",
    )
    parser.add_argument("--folds", type=int, default=CV_FOLDS, help="K of the stratified K-fold")
    parser.add_argument("--repeats", type=int, default=CV_REPEATS, help="independent K-fold partitions")
    parser.add_argument("--seed", type=int, default=CV_SEED, help="seed of the folds and of every model")
    parser.add_argument(
        "--models",
        default=",".join(CV_MODELS),
        help="comma-separated subset of healnet, age (age alone), coxnet (clinical + all omics), "
        "coxnet_topk (clinical + top-k omics), coxnet_mid (clinical + all omics, the middle penalty of "
        "its path), rsf (forest on clinical + top-k omics)",
    )
    add_recipe_options(parser, RECIPE_FLAGS)
    parser.add_argument("--threads", type=int, default=1, help="torch threads and forest jobs")
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="folds run in this many worker processes (one thread each); the results do not depend on it",
    )
    parser.add_argument(
        "--json", type=Path, default=None, help="write the full report (per fold and summary) here"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run(args: argparse.Namespace) -> int:
    from dataclasses import replace

    import torch

    from healnet.cv import CVConfig, cross_validate, format_table, write_report
    from healnet.data.cohort import Cohort, ingest
    from healnet.fitting import CohortData

    torch.set_num_threads(args.threads)
    if args.table is not None:
        cohort = ingest(args.table)
        features = args.features
    else:
        cohort = Cohort.load(args.cohort)
        default_features = args.cohort / "features"
        features = args.features or (default_features if default_features.is_dir() else None)
    data = CohortData.from_cohort(cohort, features, require_features=args.features is not None)

    recipe = recipe_from_args(args, RECIPE_FLAGS)
    defaults = CVConfig()
    config = replace(
        defaults,
        folds=args.folds,
        repeats=args.repeats,
        seed=args.seed,
        models=tuple(args.models.split(",")),
        modalities=tuple(args.modalities.split(",")) if args.modalities else None,
        healnet=recipe,
        forest=replace(defaults.forest, n_jobs=args.threads),
    )
    if len(cohort.quarantine):
        # rows the reader could not use are left out of every model: say so before the hours of fitting
        where = f"in the report's quarantine ({args.json})" if args.json else "(give --json to keep them all)"
        print("\n".join(quarantine_lines(cohort, where, shown=QUARANTINE_SHOWN)), file=sys.stderr)
    report = cross_validate(data, config, progress=not args.no_progress, jobs=args.jobs)
    report["source"] = str(args.table or args.cohort)
    report["quarantine"] = cohort.quarantine.to_dict(orient="records")
    print(format_table(report, title=f"{cohort.meta.get('name', '')}:"))
    if args.json is not None:
        write_report(report, args.json)
        print(f"report written to {args.json}")
    return 0
