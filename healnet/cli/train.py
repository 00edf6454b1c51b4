"""`healnet train`: train HEALNet on a cohort's holdout split."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from healnet.cli.recipe_options import RECIPE_OPTIONS, add_recipe_options, recipe_from_args
from healnet.recipes import DEFAULT_RECIPE

HELP = (
    "Train HEALNet on a canonical cohort; writes RUN_DIR/checkpoint and RUN_DIR/metrics.json. Under torchrun "
    "(torchrun --nproc-per-node N -m healnet train ...) a single-model recipe trains data-parallel."
)

RECIPE_FLAGS = tuple(RECIPE_OPTIONS)  # every option that overrides a recipe setting
# the parts of metrics.json printed at the end of a run
PRINTED_METRICS = ("recipe", "members", "modalities", "best_epochs", "slides_quarantined", "val", "test")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cohort", type=Path, required=True, help="canonical cohort folder (healnet ingest/synth)"
    )
    parser.add_argument("--out", type=Path, required=True, help="run folder for the checkpoint and metrics")
    parser.add_argument(
        "--features",
        type=Path,
        default=None,
        help="patch-feature folder (default: COHORT/features when present); slides that its quarantine lists "
        "name are missing for their patients",
    )
    parser.add_argument(
        "--modalities",
        default=None,
        help="comma-separated input kinds: omic, clinical, wsi (default: all the cohort has)",
    )
    parser.add_argument(
        "--recipe",
        default=DEFAULT_RECIPE,
        help="named recipe (healnet/recipes.py) whose settings every option below overrides: demo, or tcga "
        "(omics + clinical covariates, a 20-member ensemble, as validated by `healnet cv`)",
    )
    parser.add_argument("--split-repeat", type=int, default=0, help="which stored holdout split to use")
    add_recipe_options(parser, RECIPE_FLAGS)
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run(args: argparse.Namespace) -> int:
    from healnet.experiment import run_training

    modalities = args.modalities.split(",") if args.modalities else None
    metrics = run_training(
        args.cohort,
        args.out,
        features_dir=args.features,
        modalities=modalities,
        split_repeat=args.split_repeat,
        recipe=recipe_from_args(args, RECIPE_FLAGS),
        progress=not args.no_progress,
        require_features=args.features is not None,
    )
    if int(os.environ.get("RANK", "0")) > 0:  # under torchrun the first process reports and writes
        return 0
    print(
        json.dumps(
            {k: metrics[k] for k in PRINTED_METRICS},
            indent=2,
        )
    )
    print(f"test c-index {metrics['test']['c_index']:.4f}; checkpoint written to {metrics['checkpoint']}")
    return 0
