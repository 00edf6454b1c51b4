"""`healnet train`: train HEALNet on a cohort's holdout split."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from healnet.recipes import DEFAULT_RECIPE

HELP = (
    "Train HEALNet on a canonical cohort; writes RUN_DIR/checkpoint and RUN_DIR/metrics.json. Under torchrun "
    "(torchrun --nproc-per-node N -m healnet train ...) a single-model recipe trains data-parallel."
)

# names of recipe settings that an option overrides: option -> (recipe part, field)
TRAIN_OPTIONS = ("epochs", "batch_size", "lr", "weight_decay", "patience", "seed", "device")
MODEL_OPTIONS = {"depth": "depth", "latents": "n_latents", "latent_dim": "latent_dim"}


def recipe_from_args(args: argparse.Namespace):
    """The named recipe with the options that were given applied over it."""
    from dataclasses import replace

    from healnet.recipes import get_recipe

    recipe = get_recipe(args.recipe)
    omics = {}
    if args.omics_grouping is not None:
        omics["combine"] = args.omics_grouping == "combined"
    if args.omics_tokens is not None:
        omics["tokens"] = args.omics_tokens
    if args.top_k is not None:
        omics["top_k"] = args.top_k
    if args.signed_log is not None:
        omics["signed_log"] = tuple(name for name in args.signed_log.split(",") if name)
    train = {name: getattr(args, name) for name in TRAIN_OPTIONS if getattr(args, name) is not None}
    model = {
        field: getattr(args, option)
        for option, field in MODEL_OPTIONS.items()
        if getattr(args, option) is not None
    }
    return replace(
        recipe,
        omics=replace(recipe.omics, **omics),
        train=replace(recipe.train, **train),
        model={**recipe.model, **model},
        members=args.members or recipe.members,
    )


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cohort", type=Path, required=True, help="canonical cohort folder (healnet ingest/synth)"
    )
    parser.add_argument("--out", type=Path, required=True, help="run folder for the checkpoint and metrics")
    parser.add_argument(
        "--features",
        type=Path,
        default=None,
        help="patch-feature folder (default: COHORT/features when present)",
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
    parser.add_argument(
        "--omics-grouping",
        choices=["combined", "per-table"],
        default=None,
        help="one omic modality, or one per table (mut, cnv, rnaseq)",
    )
    parser.add_argument("--omics-tokens", default=None, help="single | features | groups:N")
    parser.add_argument(
        "--top-k", type=int, default=None, help="highest-variance features kept per omic table"
    )
    parser.add_argument(
        "--signed-log",
        default=None,
        help="comma-separated omic tables mapped by sign(x)·log1p(|x|) before fitting, e.g. rnaseq; saved with "
        "the model, so serving applies it too",
    )
    parser.add_argument("--split-repeat", type=int, default=0, help="which stored holdout split to use")
    parser.add_argument("--members", type=int, default=None, help="ensemble members")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate of OneCycleLR")
    parser.add_argument("--weight-decay", type=float, default=None, help="Adam weight decay (L2)")
    parser.add_argument("--patience", type=int, default=None, help="early-stopping patience in epochs")
    parser.add_argument("--depth", type=int, default=None, help="number of fusion layers")
    parser.add_argument("--latents", type=int, default=None, help="number of latent vectors")
    parser.add_argument("--latent-dim", type=int, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--device", default=None, help="auto, cpu or cuda (default: the recipe's, auto)")
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
        recipe=recipe_from_args(args),
        progress=not args.no_progress,
        require_features=args.features is not None,
    )
    if int(os.environ.get("RANK", "0")) > 0:  # under torchrun the first process reports and writes
        return 0
    print(
        json.dumps(
            {k: metrics[k] for k in ("recipe", "members", "modalities", "best_epochs", "val", "test")},
            indent=2,
        )
    )
    print(f"test c-index {metrics['test']['c_index']:.4f}; checkpoint written to {metrics['checkpoint']}")
    return 0
