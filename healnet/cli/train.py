"""`healnet train`: train HEALNet on a cohort's holdout split."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from healnet.cli import recipe_default
from healnet.recipes import DEFAULT_RECIPE

HELP = (
    "Train HEALNet on a canonical cohort; writes RUN_DIR/checkpoint and RUN_DIR/metrics.json. Under torchrun "
    "(torchrun --nproc-per-node N -m healnet train ...) a single-model recipe trains data-parallel."
)

# names of recipe settings that an option overrides: option -> (recipe part, field)
TRAIN_OPTIONS = ("epochs", "batch_size", "lr", "weight_decay", "patience", "seed", "device")
MODEL_OPTIONS = {"depth": "depth", "latents": "n_latents", "latent_dim": "latent_dim"}
# the parts of metrics.json printed at the end of a run
PRINTED_METRICS = ("recipe", "members", "modalities", "best_epochs", "slides_quarantined", "val", "test")


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
    parser.add_argument(
        "--omics-grouping",
        choices=["combined", "per-table"],
        default=None,
        help="one omic modality, or one per table (mut, cnv, rnaseq) "
        + recipe_default(lambda r: "combined" if r.omics.combine else "per-table"),
    )
    parser.add_argument(
        "--omics-tokens",
        default=None,
        help="single | features | groups:N " + recipe_default(lambda r: r.omics.tokens),
    )
    parser.add_argument(
        "--top-k",
        type=int,
        default=None,
        help="highest-variance features kept per omic table "
        + recipe_default(lambda r: r.omics.top_k or "all"),
    )
    parser.add_argument(
        "--signed-log",
        default=None,
        help="comma-separated omic tables mapped by sign(x)·log1p(|x|) before fitting, e.g. rnaseq; saved with "
        "the model, so serving applies it too "
        + recipe_default(lambda r: ",".join(r.omics.signed_log) or "none"),
    )
    parser.add_argument("--split-repeat", type=int, default=0, help="which stored holdout split to use")
    recipe_options = {
        "--members": (int, "ensemble members", lambda r: r.members),
        "--epochs": (int, "training epochs per member", lambda r: r.train.epochs),
        "--batch-size": (int, "patients per training step", lambda r: r.train.batch_size),
        "--lr": (float, "peak learning rate of OneCycleLR", lambda r: r.train.lr),
        "--weight-decay": (float, "Adam weight decay (L2)", lambda r: r.train.weight_decay),
        "--patience": (int, "early-stopping patience in epochs", lambda r: r.train.patience),
        "--depth": (int, "number of fusion layers", lambda r: r.model.get("depth", "the model's")),
        "--latents": (int, "number of latent vectors", lambda r: r.model.get("n_latents", "the model's")),
        "--latent-dim": (
            int,
            "width of each latent vector",
            lambda r: r.model.get("latent_dim", "the model's"),
        ),
        "--seed": (int, "seed of the weight initialisation and the batch order", lambda r: r.train.seed),
        "--device": (str, "auto, cpu or cuda", lambda r: r.train.device),
    }
    for option, (kind, text, describe) in recipe_options.items():
        parser.add_argument(option, type=kind, default=None, help=f"{text} {recipe_default(describe)}")
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
            {k: metrics[k] for k in PRINTED_METRICS},
            indent=2,
        )
    )
    print(f"test c-index {metrics['test']['c_index']:.4f}; checkpoint written to {metrics['checkpoint']}")
    return 0
