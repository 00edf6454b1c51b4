"""One way to override a recipe: `healnet train`, `healnet cv` and the pipeline's `train` step all end in
`healnet.recipes.apply_overrides`, with None as the one "not given"."""

import inspect
import json
from dataclasses import fields, replace

import pytest

from components import model_steps
from healnet.cli import build_parser
from healnet.cli import cv as cv_command
from healnet.cli import train as train_command
from healnet.cli.recipe_options import recipe_from_args
from healnet.model import HEALNetConfig
from healnet.recipes import (
    OVERRIDABLE_PARTS,
    RECIPES,
    SETTING_PARTS,
    TCGA,
    ModelOptions,
    RecipeError,
    apply_overrides,
    get_recipe,
    pipeline_recipe,
)


def train_recipe(*options: str):
    args = build_parser().parse_args(["train", "--cohort", "c", "--out", "o", *options])
    return recipe_from_args(args, train_command.RECIPE_FLAGS)


def cv_recipe(*options: str):
    args = build_parser().parse_args(["cv", "--cohort", "c", *options])
    return recipe_from_args(args, cv_command.RECIPE_FLAGS)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_cli_cv_and_the_pipeline_give_the_same_effective_recipe(name):
    options = ["--recipe", name, "--epochs", "3", "--batch-size", "8", "--patience", "2"]
    from_train, from_cv = train_recipe(*options), cv_recipe(*options)
    from_pipeline = pipeline_recipe(name, epochs=3, batch_size=8, patience=2, seed=0)
    recipe = get_recipe(name)
    expected = replace(recipe, train=replace(recipe.train, epochs=3, batch_size=8, patience=2))
    assert from_train == from_cv == from_pipeline == expected


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_nothing_given_keeps_the_named_recipe(name):
    assert (
        train_recipe("--recipe", name)
        == cv_recipe("--recipe", name)
        == pipeline_recipe(name, epochs=0, batch_size=0, patience=0, seed=0)
        == get_recipe(name)
    )


def test_the_train_step_takes_its_recipe_from_pipeline_recipe():
    source = inspect.getsource(model_steps.train.python_func)
    assert (
        "pipeline_recipe(recipe, epochs=epochs, batch_size=batch_size, patience=patience, seed=seed)"
        in source
    )
    assert "replace(" not in source  # no second way of applying an override


def test_cli_options_reach_every_part_of_the_recipe():
    recipe = train_recipe(
        "--recipe", "tcga", "--omics-grouping", "combined", "--signed-log", "", "--latents", "4",
        "--members", "3", "--seed", "7", "--lr", "0.01",
    )  # fmt: skip
    assert recipe.omics == replace(TCGA.omics, combine=True, signed_log=())
    assert recipe.model == replace(TCGA.model, n_latents=4)
    assert recipe.train == replace(TCGA.train, seed=7, lr=0.01)
    assert recipe.members == 3


def test_epochs_leave_patience_as_the_recipe_has_it():
    overridden = cv_recipe("--recipe", "tcga", "--epochs", "10")
    assert (overridden.train.epochs, overridden.train.patience) == (10, TCGA.train.patience)
    assert cv_recipe("--recipe", "tcga", "--epochs", "10", "--patience", "10").train.patience == 10


def test_an_unknown_setting_is_refused_and_none_is_not_given():
    with pytest.raises(RecipeError, match="no recipe setting is named \\['epoch'\\]"):
        apply_overrides(TCGA, epoch=3)
    assert apply_overrides(TCGA, top_k=None, members=None) == TCGA
    assert apply_overrides(TCGA, top_k=50).omics.top_k == 50


def test_an_impossible_value_is_a_recipe_error_that_names_it():
    with pytest.raises(RecipeError, match="cannot take \\{'epochs': 0\\}: epochs and batch_size must be"):
        apply_overrides(TCGA, epochs=0)
    with pytest.raises(RecipeError, match="linear_omics_l1_ratio must be in \\[0, 1\\]"):
        cv_recipe("--recipe", "tcga", "--linear-l1-ratio", "1.5")
    assert cv_recipe("--recipe", "tcga", "--linear-l1-ratio", "0.5").train.linear_omics_l1_ratio == 0.5


def test_every_setting_name_belongs_to_one_part():
    names = [field.name for kind in OVERRIDABLE_PARTS.values() for field in fields(kind)]
    assert len(names) == len(set(names))
    assert {name for name, part in SETTING_PARTS.items() if part is None} == {
        "members",
        "n_bins",
        "val_fraction",
    }


def test_model_options_pass_only_what_the_recipe_chooses():
    assert {field.name for field in fields(ModelOptions)} <= {field.name for field in fields(HEALNetConfig)}
    assert ModelOptions(depth=1, linear_path=("clinical",)).chosen() == {
        "depth": 1,
        "linear_path": ("clinical",),
    }
    settings = json.loads(json.dumps(TCGA.to_dict()))  # as the checkpoint and metrics.json record it
    assert settings["model"]["n_latents"] == 8 and settings["model"]["ff_dropout"] is None
