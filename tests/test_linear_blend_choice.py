"""The blend with the linear path chosen once the members are trained: on each member's early-stopping
patients only, the best of the choices by Harrell's C, one weight for every member, and checkpoints that
round-trip (a weight of 0 included)."""

from dataclasses import replace

import numpy as np
import pytest
from test_ensemble import MODEL, TRAIN, make_data
from test_linear_path import WIDE, fit_wide

from healnet.checkpoint import load_checkpoint, save_checkpoint
from healnet.ensemble import HEALNetEnsemble
from healnet.model_card import checkpoint_facts
from healnet.model_card_markdown import linear_blend_sentence
from healnet.preprocess.clinical import CLINICAL
from healnet.recipes import RecipeError
from healnet.survival_metrics import harrell_c
from healnet.train_config import TrainConfig

CHOICES = (0.0, 0.25, 0.5, 0.75)
CHOOSING = replace(
    WIDE,
    model=replace(MODEL, linear_path=(CLINICAL,), linear_blend=0.25),
    train=replace(TRAIN, linear_blend_choices=CHOICES),
)


@pytest.fixture(scope="module")
def data():
    return make_data(n=60, covariates=True)


@pytest.fixture(scope="module")
def fitted(data):
    train_ids = list(data.clinical.index[:45])
    return fit_wide(data, train_ids, CHOOSING), train_ids


def test_the_best_choice_on_the_early_stopping_patients_is_every_members_blend(data, fitted):
    ensemble, train_ids = fitted
    choice = ensemble.members[0].metadata["linear_blend_choice"]
    assert set(choice["c_index"]) == {str(weight) for weight in CHOICES}
    best = max(choice["c_index"].values())
    assert choice["c_index"][str(choice["chosen"])] == best
    assert all(member.model.config.linear_blend == choice["chosen"] for member in ensemble.members)
    # each choice's C, recomputed on the same members trained without a choice: each early-stopping patient
    # scored by the member that did not train on it
    fixed = fit_wide(data, train_ids, replace(CHOOSING, train=TRAIN))
    stop_ids = [pid for _, stop in fixed.member_splits for pid in stop]
    assert sorted(stop_ids) == sorted(train_ids)
    clinical = data.clinical.loc[stop_ids]
    for weight in CHOICES:
        risks = []
        for member, (_, stop) in zip(fixed.members, fixed.member_splits, strict=True):
            member.model.config.linear_blend = weight
            risks.append(HEALNetEnsemble([member], [], "").risk(data, stop))
        recomputed = harrell_c(clinical["survival_months"], clinical["event"], np.concatenate(risks))
        assert recomputed == pytest.approx(choice["c_index"][str(weight)], abs=1e-9)


def test_the_choice_reads_training_patients_only(data, fitted):
    ensemble, train_ids = fitted
    test_ids = [pid for pid in data.clinical.index if pid not in set(train_ids)]
    changed = make_data(n=60, covariates=True)
    changed.clinical.loc[test_ids, "survival_months"] = 0.5
    changed.clinical.loc[test_ids, "event"] = 1
    changed.clinical.loc[test_ids, "age"] = 99.0
    again = fit_wide(changed, train_ids, CHOOSING)
    assert (
        again.members[0].metadata["linear_blend_choice"]
        == ensemble.members[0].metadata["linear_blend_choice"]
    )


def test_a_chosen_weight_of_zero_drops_the_intercepts_and_round_trips(tmp_path, data):
    only_zero = replace(CHOOSING, train=replace(CHOOSING.train, linear_blend_choices=(0.0,)))
    ensemble = fit_wide(data, list(data.clinical.index[:45]), only_zero)
    model = ensemble.members[0].model
    assert model.config.linear_blend == 0.0 and not hasattr(model, "linear_intercepts")
    ids = list(data.clinical.index)
    save_checkpoint(tmp_path / "model", ensemble.to_checkpoint())
    loaded = HEALNetEnsemble.from_checkpoint(load_checkpoint(tmp_path / "model"))
    assert loaded.members[0].model.config.linear_blend == 0.0
    np.testing.assert_allclose(loaded.risk(data, ids), ensemble.risk(data, ids), rtol=1e-6)


def test_a_chosen_blend_round_trips(tmp_path, data, fitted):
    ensemble, _ = fitted
    ids = list(data.clinical.index)
    save_checkpoint(tmp_path / "model", ensemble.to_checkpoint())
    loaded = HEALNetEnsemble.from_checkpoint(load_checkpoint(tmp_path / "model"))
    chosen = ensemble.members[0].metadata["linear_blend_choice"]["chosen"]
    assert loaded.members[0].model.config.linear_blend == chosen
    np.testing.assert_allclose(loaded.risk(data, ids), ensemble.risk(data, ids), rtol=1e-6)


def test_choices_need_a_blend_to_train_with_and_weights_below_one():
    with pytest.raises(RecipeError, match="linear_blend_choices"):
        replace(CHOOSING, model=replace(MODEL, linear_path=(CLINICAL,)))
    with pytest.raises(ValueError, match="linear_blend_choices"):
        TrainConfig(linear_blend_choices=(0.5, 1.0))
    assert CHOOSING.without_linear_path().train.linear_blend_choices == ()


def test_the_model_card_names_the_served_weight_and_how_it_was_chosen(tmp_path, fitted):
    ensemble, _ = fitted
    save_checkpoint(tmp_path / "model", ensemble.to_checkpoint())
    recipe = checkpoint_facts(tmp_path / "model")["recipe"]
    choice = ensemble.members[0].metadata["linear_blend_choice"]
    assert recipe["linear_blend"] == choice["chosen"] and recipe["linear_blend_choice"] == choice
    sentence = linear_blend_sentence(recipe)
    assert f"with weight {choice['chosen']:g}, chosen on the members' early-stopping patients" in sentence
    assert all(f"{float(weight):g}: " in sentence for weight in choice["c_index"])
    fixed = linear_blend_sentence({"linear_blend": 0.25, "linear_blend_choice": None})
    assert fixed == " Each prediction blends in the linear path's own survival curve with weight 0.25."
