"""Named training recipes: every default of how HEALNet is trained, defined once.

`healnet train --recipe`, `healnet cv --recipe` and the pipeline's `recipe` parameter read them from here,
and the checkpoint and metrics.json record the recipe used. How the `tcga` recipe was chosen (inner
splits of training folds only): docs/results.md.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from healnet.errors import HEALNetError
from healnet.preprocess.clinical import CLINICAL, ClinicalConfig
from healnet.preprocess.omics import RNASEQ, OmicsConfig
from healnet.train_config import TrainConfig


class RecipeError(HEALNetError, ValueError):
    """An unknown recipe name or an impossible recipe; the message says which."""


@dataclass(frozen=True)
class Recipe:
    """How one HEALNet model (or ensemble) is trained.

    With `members` > 1, the training patients are split into `members` stratified parts; member i
    early-stops on part i and trains on the others, and the members' survival curves are averaged.
    """

    name: str
    omics: OmicsConfig
    model: dict
    train: TrainConfig
    clinical: ClinicalConfig | None = ClinicalConfig()  # None: no clinical modality
    members: int = 1
    n_bins: int = 4
    val_fraction: float = 0.15  # patients held out for early stopping when there is one member

    def __post_init__(self) -> None:
        if self.members < 1:
            raise RecipeError(f"members must be at least 1, got {self.members}")

    def to_dict(self) -> dict:
        return asdict(self)

    def without_linear_path(self) -> Recipe:
        """The same recipe with no modality's linear path."""
        return replace(self, model={k: v for k, v in self.model.items() if k != "linear_path"})


# The synthetic demo cohort's age and sex carry no risk, so its recipe leaves the clinical modality out.
DEMO = Recipe(
    name="demo",
    omics=OmicsConfig(combine=True),
    model={"depth": 2, "n_latents": 16, "latent_dim": 64},
    train=TrainConfig(),
    clinical=None,
)

# Real TCGA omics and clinical covariates: a small model per table, strong weight decay (few events),
# an ensemble of 20, and age, sex and subtype both as a modality and as a linear path.
TCGA = Recipe(
    name="tcga",
    omics=OmicsConfig(top_k=200, combine=False, tokens="single", signed_log=RNASEQ),
    model={
        "depth": 1,
        "n_latents": 8,
        "latent_dim": 16,
        "cross_dim_head": 8,
        "latent_dim_head": 8,
        "linear_path": CLINICAL,
    },
    train=TrainConfig(epochs=40, patience=40, monitor="loss", batch_size=64, weight_decay=3e-2),
    members=20,
)

RECIPES: dict[str, Recipe] = {recipe.name: recipe for recipe in (DEMO, TCGA)}

# The predeclared cross-validation protocol of `healnet cv` (docs/results.md): folds x repeats, seed.
CV_FOLDS, CV_REPEATS, CV_SEED = 5, 5, 0
CV_MODELS = ("healnet", "age", "coxnet", "coxnet_topk", "rsf")  # HEALNet, then the baselines
DEFAULT_RECIPE = DEMO.name


def get_recipe(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise RecipeError(f"unknown recipe {name!r}; known: {sorted(RECIPES)}") from None
