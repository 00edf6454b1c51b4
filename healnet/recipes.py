"""Named training recipes: every default of how HEALNet is trained, defined once.

`healnet train --recipe`, `healnet cv --recipe` and the pipeline's `recipe` parameter read them from here,
and the checkpoint and metrics.json record the recipe used. How the `tcga` recipe was chosen (inner
splits of training folds only): docs/results.md.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from healnet.errors import HEALNetError
from healnet.preprocess.clinical import CLINICAL, ClinicalConfig
from healnet.preprocess.omics import RNASEQ, OmicsConfig
from healnet.preprocess.state import OMIC
from healnet.train_config import TrainConfig


class RecipeError(HEALNetError, ValueError):
    """An unknown recipe name or an impossible recipe; the message says which."""


@dataclass(frozen=True)
class ModelOptions:
    """The architecture settings of `healnet.model.HEALNetConfig` that recipes choose (the recipes here,
    the serving demo's and the inner-selection candidates of scripts/inner_selection.py).

    None leaves a setting at HEALNetConfig's own default, the one place those defaults are written; the
    modalities, the number of bins (`Recipe.n_bins`) and the linear path's input size come from the data.
    """

    depth: int | None = None
    n_latents: int | None = None
    latent_dim: int | None = None
    cross_dim_head: int | None = None
    latent_heads: int | None = None
    latent_dim_head: int | None = None
    attn_dropout: float | None = None
    ff_dropout: float | None = None
    snn: bool | None = None
    # input kinds that also enter the logits linearly (see HEALNetConfig): "clinical", and "omic" for every
    # omic table's modality (healnet.fitting.linear_path_modalities)
    linear_path: tuple[str, ...] | None = None
    linear_blend: float | None = None  # weight of the linear path alone in the survival curve

    def chosen(self) -> dict[str, Any]:
        """The settings this recipe chooses, as HEALNetConfig keywords."""
        return {name: value for name, value in asdict(self).items() if value is not None}


@dataclass(frozen=True)
class Recipe:
    """How one HEALNet model (or ensemble) is trained.

    With `members` > 1, the training patients are split into `members` stratified parts; member i
    early-stops on part i and trains on the others, and the members' survival curves are averaged.
    """

    name: str
    omics: OmicsConfig
    model: ModelOptions
    train: TrainConfig
    clinical: ClinicalConfig | None = ClinicalConfig()  # None: no clinical modality
    members: int = 1
    n_bins: int = 4
    val_fraction: float = 0.15  # patients held out for early stopping when there is one member

    def __post_init__(self) -> None:
        if self.members < 1:
            raise RecipeError(f"members must be at least 1, got {self.members}")
        if self.train.linear_blend_choices and not self.model.linear_blend:
            raise RecipeError(
                "linear_blend_choices need a linear_blend above 0 to train with (the linear path's "
                "intercepts are fitted for a blend only)"
            )

    def to_dict(self) -> dict:
        return asdict(self)

    def without_linear_path(self) -> Recipe:
        """The same recipe with no modality's linear path (and so nothing to blend with it)."""
        return replace(
            self,
            model=replace(self.model, linear_path=None, linear_blend=None),
            train=replace(self.train, linear_blend_choices=()),
        )

    def seeded(self, seed: int) -> Recipe:
        """The same recipe with another seed (of the weights, the batch order and the members' parts)."""
        return replace(self, train=replace(self.train, seed=seed))


# The synthetic demo cohort's age and sex carry no risk, so its recipe leaves the clinical modality out.
DEMO = Recipe(
    name="demo",
    omics=OmicsConfig(combine=True),
    model=ModelOptions(depth=2, n_latents=16, latent_dim=64),
    train=TrainConfig(),
    clinical=None,
)

# Real TCGA omics and clinical covariates: a small model per table, strong weight decay (few events),
# an ensemble of 20, and age, sex and subtype as a modality (sex left out where fewer than 10 training
# patients are of the rarer sex: round 9 of docs/results.md). A linear path over the covariates and each
# table's features enters every logit; its own survival curve weighs a quarter of each prediction while
# the members train, and then the weight of the grid that ranks the members' early-stopping patients best
# (rounds 4 to 6).
TCGA = Recipe(
    name="tcga",
    omics=OmicsConfig(top_k=200, combine=False, tokens="single", signed_log=RNASEQ),
    model=ModelOptions(
        depth=1,
        n_latents=8,
        latent_dim=16,
        cross_dim_head=8,
        latent_dim_head=8,
        linear_path=(CLINICAL, OMIC),
        linear_blend=0.25,
    ),
    train=TrainConfig(
        epochs=40,
        patience=40,
        monitor="loss",
        batch_size=64,
        weight_decay=3e-2,
        linear_blend_choices=(0.0, 0.25, 0.5, 0.75),
    ),
    members=20,
    clinical=ClinicalConfig(pool_rare_binary=True),
)

RECIPES: dict[str, Recipe] = {recipe.name: recipe for recipe in (DEMO, TCGA)}

# The predeclared cross-validation protocol of `healnet cv` (docs/results.md): folds x repeats, seed.
CV_FOLDS, CV_REPEATS, CV_SEED = 5, 5, 0
# Predeclared protocols (`healnet cv --protocol`): (folds, repeats, seed). "heldout" is how cohorts that
# no choice has seen are run.
CV_PROTOCOLS: dict[str, tuple[int, int, int]] = {
    "predeclared": (CV_FOLDS, CV_REPEATS, CV_SEED),
    "heldout": (CV_FOLDS, 1, CV_SEED),
}
CV_MODELS = ("healnet", "age", "coxnet", "coxnet_topk", "coxnet_mid", "rsf")  # HEALNet, then the baselines
DEFAULT_RECIPE = DEMO.name


def get_recipe(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise RecipeError(f"unknown recipe {name!r}; known: {sorted(RECIPES)}") from None


# The recipe part that holds each setting `apply_overrides` sets (a setting name is in one part only:
# tests/test_recipes.py); None: the recipe itself.
OVERRIDABLE_PARTS: dict[str, type] = {"omics": OmicsConfig, "model": ModelOptions, "train": TrainConfig}
SETTING_PARTS: dict[str, str | None] = {
    **{field.name: part for part, kind in OVERRIDABLE_PARTS.items() for field in fields(kind)},
    **dict.fromkeys(("members", "n_bins", "val_fraction")),
}


def apply_overrides(recipe: Recipe, **given: Any) -> Recipe:
    """`recipe` with the given settings replaced; a setting given as None keeps the recipe's value.

    None is the one "not given" of every caller (`healnet train`, `healnet cv`, the pipeline's `train` step
    through `pipeline_overrides`), so an override cannot set a setting to None. A setting is named as in
    its part: a field of `OmicsConfig` (top_k, combine, tokens, signed_log, ...), `ModelOptions` (depth,
    n_latents, ...), `TrainConfig` (epochs, patience, seed, ...), or `members`, `n_bins`, `val_fraction`.
    Each override sets only its own setting: `epochs` leaves `patience` as the recipe has it.
    """
    unknown = sorted(set(given) - set(SETTING_PARTS))
    if unknown:
        raise RecipeError(f"no recipe setting is named {unknown}; known: {sorted(SETTING_PARTS)}")
    chosen = {name: value for name, value in given.items() if value is not None}
    try:  # each part checks its own settings when it is built
        parts = {
            part: replace(getattr(recipe, part), **values)
            for part in OVERRIDABLE_PARTS
            if (values := {name: value for name, value in chosen.items() if SETTING_PARTS[name] == part})
        }
        own = {name: value for name, value in chosen.items() if SETTING_PARTS[name] is None}
        return replace(recipe, **parts, **own)
    except ValueError as error:
        raise RecipeError(f"recipe {recipe.name!r} cannot take {chosen}: {error}") from None


def pipeline_recipe(name: str, **overrides: int) -> Recipe:
    """The pipeline's `train` step's recipe: the named one with its overrides applied. A KFP parameter cannot
    be None, so the pipeline writes "not given" as 0; here, and only here, 0 becomes None."""
    return apply_overrides(
        get_recipe(name), **{setting: value or None for setting, value in overrides.items()}
    )
