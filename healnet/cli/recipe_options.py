"""The command-line options that override a recipe setting, defined once for `healnet train` and `healnet cv`.

An option not given is None, which `healnet.recipes.apply_overrides` reads as "keep the recipe's value".
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from healnet.cli import recipe_default
from healnet.preprocess.omics import SELECTIONS
from healnet.recipes import Recipe, apply_overrides, get_recipe

GROUPINGS = {"combined": True, "per-table": False}  # --omics-grouping -> OmicsConfig.combine


def _choice(options: Mapping[str, Any]) -> Callable[[str], Any]:
    """An option type that takes one of `options`' names and gives its value."""

    def parse(text: str) -> Any:
        if text not in options:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(options)}, not {text!r}")
        return options[text]

    return parse


def _table_names(text: str) -> tuple[str, ...]:
    return tuple(name for name in text.split(",") if name)


@dataclass(frozen=True)
class RecipeOption:
    flag: str
    setting: str  # the name `apply_overrides` takes, and the option's dest
    kind: Callable[[str], Any]
    text: str
    describe: Callable[[Recipe], Any]  # one recipe's value, for the help's default
    metavar: str | None = None


RECIPE_OPTIONS = {
    option.flag: option
    for option in (
        RecipeOption(
            "--omics-grouping",
            "combine",
            _choice(GROUPINGS),
            "one omic modality, or one per table (mut, cnv, rnaseq)",
            lambda r: "combined" if r.omics.combine else "per-table",
            metavar="{combined,per-table}",
        ),
        RecipeOption(
            "--omics-tokens", "tokens", str, "single | features | groups:N", lambda r: r.omics.tokens
        ),
        RecipeOption(
            "--top-k",
            "top_k",
            int,
            "features kept per omic table, ranked as --omics-select says",
            lambda r: r.omics.top_k or "all",
        ),
        RecipeOption(
            "--omics-select",
            "select",
            _choice({name: name for name in SELECTIONS}),
            "how --top-k ranks an omic table's features: variance, or cox (the univariate Cox score on "
            "the training patients)",
            lambda r: r.omics.select,
            metavar="{" + ",".join(SELECTIONS) + "}",
        ),
        RecipeOption(
            "--signed-log",
            "signed_log",
            _table_names,
            "comma-separated omic tables mapped by sign(x)·log1p(|x|) before fitting, e.g. rnaseq; saved with "
            "the model, so serving applies it too",
            lambda r: ",".join(r.omics.signed_log) or "none",
        ),
        RecipeOption(
            "--linear-l1-ratio",
            "linear_omics_l1_ratio",
            float,
            "share of the linear path's omic penalty that is a lasso (an elastic net, which sets most omic "
            "weights to zero); 0: a ridge alone",
            lambda r: r.train.linear_omics_l1_ratio,
        ),
        RecipeOption("--members", "members", int, "ensemble members", lambda r: r.members),
        RecipeOption("--epochs", "epochs", int, "training epochs per member", lambda r: r.train.epochs),
        RecipeOption(
            "--batch-size", "batch_size", int, "patients per training step", lambda r: r.train.batch_size
        ),
        RecipeOption("--lr", "lr", float, "peak learning rate of OneCycleLR", lambda r: r.train.lr),
        RecipeOption(
            "--weight-decay", "weight_decay", float, "Adam weight decay (L2)", lambda r: r.train.weight_decay
        ),
        RecipeOption(
            "--patience", "patience", int, "early-stopping patience in epochs", lambda r: r.train.patience
        ),
        RecipeOption(
            "--depth", "depth", int, "number of fusion layers", lambda r: r.model.depth or "the model's"
        ),
        RecipeOption(
            "--latents",
            "n_latents",
            int,
            "number of latent vectors",
            lambda r: r.model.n_latents or "the model's",
        ),
        RecipeOption(
            "--latent-dim",
            "latent_dim",
            int,
            "width of each latent vector",
            lambda r: r.model.latent_dim or "the model's",
        ),
        RecipeOption(
            "--seed",
            "seed",
            int,
            "seed of the weight initialisation and the batch order",
            lambda r: r.train.seed,
        ),
        RecipeOption("--device", "device", str, "auto, cpu or cuda", lambda r: r.train.device),
    )
}


def add_recipe_options(parser: argparse.ArgumentParser, flags: Sequence[str]) -> None:
    """Add the options `flags` (keys of RECIPE_OPTIONS), each None unless given."""
    for flag in flags:
        option = RECIPE_OPTIONS[flag]
        parser.add_argument(
            flag,
            dest=option.setting,
            type=option.kind,
            default=None,
            metavar=option.metavar or flag[2:].upper().replace("-", "_"),  # as argparse names the flag
            help=f"{option.text} {recipe_default(option.describe)}",
        )


def recipe_from_args(args: argparse.Namespace, flags: Sequence[str]) -> Recipe:
    """The recipe named by `args.recipe` with the options `flags` that were given applied over it."""
    settings = {RECIPE_OPTIONS[flag].setting for flag in flags}
    return apply_overrides(
        get_recipe(args.recipe), **{setting: getattr(args, setting) for setting in settings}
    )
