"""The wide linear path (clinical covariates and omic tables), with a ridge or an elastic net on its omic
weights: fitted on training patients only, a missing modality adds nothing, its penalty chosen on the
training patients, and checkpoints round-trip."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from test_ensemble import MODEL, OMICS, TRAIN, make_data

from healnet.checkpoint import load_checkpoint, save_checkpoint
from healnet.ensemble import HEALNetEnsemble
from healnet.fitting import linear_path_modalities
from healnet.linear_path import path_inputs, with_omics_ridge
from healnet.model import HEALNet, HEALNetConfig, ModalitySpec, ModelInputError, blend_survival
from healnet.preprocess.clinical import CLINICAL, ClinicalConfig
from healnet.preprocess.state import OMIC
from healnet.recipes import Recipe

WIDE = Recipe(
    name="wide",
    omics=replace(OMICS, tokens="single"),
    model=replace(MODEL, linear_path=(CLINICAL, OMIC)),
    train=TRAIN,
    clinical=ClinicalConfig(),
    members=3,
)


def fit_wide(data, train_ids, recipe=WIDE):
    return HEALNetEnsemble.fit(data, train_ids, [], recipe, modalities=("omic", "clinical"))


@pytest.fixture(scope="module")
def data():
    return make_data(n=60, covariates=True)


# the same path with an elastic net on its omic weights instead of a ridge
ELASTIC = replace(WIDE, train=replace(TRAIN, linear_omics_l1_ratio=0.5))


@pytest.fixture(scope="module", params=[WIDE, ELASTIC], ids=["ridge", "elastic-net"])
def fitted(request, data):
    train_ids = list(data.clinical.index[:45])
    return fit_wide(data, train_ids, request.param), train_ids, request.param


def test_the_kinds_name_the_clinical_and_every_omic_modality_in_model_order():
    modalities = ["mut", "rnaseq", CLINICAL, "wsi"]
    assert linear_path_modalities((CLINICAL, OMIC), modalities) == ("mut", "rnaseq", CLINICAL)
    assert linear_path_modalities(CLINICAL, modalities) == (CLINICAL,)  # a recipe written before tuples
    assert linear_path_modalities((OMIC,), ["wsi"]) == ()


def test_the_path_covers_every_table_and_the_covariates_with_a_chosen_omic_ridge(fitted):
    ensemble, _, _ = fitted
    config = ensemble.members[0].model.config
    assert set(config.linear_path) == {"rnaseq", "mut", CLINICAL}
    assert sum(config.linear_path_inputs) == ensemble.members[0].model.linear_path.in_features
    ridges = {member.metadata["train_config"]["linear_omics_ridge"] for member in ensemble.members}
    assert len(ridges) == 1 and ridges.pop() in TRAIN.linear_omics_ridges
    for member in ensemble.members:
        weight = member.model.linear_path.weight
        assert not weight.requires_grad and weight.abs().sum() > 0


def test_the_path_is_fitted_on_training_patients_only(data, fitted):
    ensemble, train_ids, recipe = fitted
    test_ids = [pid for pid in data.clinical.index if pid not in set(train_ids)]
    changed = make_data(n=60, covariates=True)
    changed.clinical.loc[test_ids, "survival_months"] = 0.5
    changed.clinical.loc[test_ids, "event"] = 1
    for frame in changed.omics.values():
        frame.loc[test_ids] = frame.loc[test_ids].to_numpy()[::-1] * 7.0
    again = fit_wide(changed, train_ids, recipe)
    for first, second in zip(ensemble.members, again.members, strict=True):
        torch.testing.assert_close(first.model.linear_path.weight, second.model.linear_path.weight)
        assert first.metadata["train_config"] == second.metadata["train_config"]


CLINICAL_SPEC = ModalitySpec(CLINICAL, 1, num_freq_bands=6, max_freq=3.0)


def linear_model(specs: list[ModalitySpec], sizes: dict[str, int], weight: list[float], **extra) -> HEALNet:
    """A small seeded model in evaluation mode whose linear path reads `sizes` (modality: values) with
    the given weights."""
    torch.manual_seed(0)
    config = HEALNetConfig(
        modalities=specs,
        n_bins=4,
        depth=1,
        n_latents=4,
        latent_dim=16,
        linear_path=tuple(sizes),
        linear_path_inputs=tuple(sizes.values()),
        **extra,
    )
    model = HEALNet(config).eval()
    with torch.no_grad():
        model.linear_path.weight.copy_(torch.tensor([weight]))
    return model


def wide_model() -> HEALNet:
    specs = [ModalitySpec("mut", 3), ModalitySpec("rnaseq", 4), CLINICAL_SPEC]
    return linear_model(specs, {"mut": 3, "rnaseq": 4, CLINICAL: 2}, list(map(float, range(1, 10))))


def test_a_table_a_sample_lacks_adds_nothing_to_its_linear_term():
    model = wide_model()
    inputs = {"mut": torch.ones(2, 1, 3), "rnaseq": torch.ones(2, 1, 4), CLINICAL: torch.ones(2, 2, 1)}
    has = {name: torch.tensor([True, True]) for name in inputs}
    both = model._linear_offset(inputs, has)
    assert both[:, 0].tolist() == [45.0, 45.0]  # 1 + 2 + ... + 9
    without_rnaseq = {**has, "rnaseq": torch.tensor([False, True])}
    garbage = {**inputs, "rnaseq": torch.full((2, 1, 4), float("nan"))}
    offset = model._linear_offset(garbage, without_rnaseq)
    assert offset[0, 0].item() == 45.0 - (4 + 5 + 6 + 7)
    # a modality left out of the request adds nothing either, and the rest of the path still counts
    no_mut = model._linear_offset({k: v for k, v in inputs.items() if k != "mut"}, has)
    assert no_mut[:, 0].tolist() == [45.0 - 6, 45.0 - 6]
    with pytest.raises(ModelInputError, match="rnaseq.*expects 4 values"):
        model._linear_offset({**inputs, "rnaseq": torch.ones(2, 2, 4)}, has)


def test_a_config_needs_a_size_for_every_linear_modality():
    with pytest.raises(ModelInputError, match="linear_path"):
        HEALNetConfig(
            modalities=[ModalitySpec("mut", 3)], n_bins=4, linear_path=("mut",), linear_path_inputs=(3, 4)
        )


def test_a_checkpoint_round_trips_the_wide_path(tmp_path, data, fitted):
    ensemble, _, _ = fitted
    save_checkpoint(tmp_path / "model", ensemble.to_checkpoint())
    loaded = HEALNetEnsemble.from_checkpoint(load_checkpoint(tmp_path / "model"))
    assert loaded.members[0].model.config.linear_path == ensemble.members[0].model.config.linear_path
    for first, second in zip(ensemble.members, loaded.members, strict=True):
        assert torch.equal(first.model.linear_path.weight, second.model.linear_path.weight)
    ids = list(data.clinical.index)
    np.testing.assert_allclose(loaded.risk(data, ids), ensemble.risk(data, ids), rtol=1e-6)


def test_a_one_modality_config_of_older_checkpoints_reads_as_tuples():
    config = HEALNetConfig.from_dict(
        {
            "modalities": [{"name": CLINICAL, "channels": 1, "num_freq_bands": 6, "max_freq": 3.0}],
            "n_bins": 4,
            "linear_path": CLINICAL,
            "linear_path_inputs": 3,
        }
    )
    assert config.linear_path == (CLINICAL,) and config.linear_path_inputs == (3,)
    assert HEALNet(config).linear_path.in_features == 3


def test_the_ridge_is_strong_for_noise_and_weaker_for_a_signal():
    data = make_data(n=120, covariates=True)
    recipe = replace(WIDE, members=2)
    ids = list(data.clinical.index)
    noise = make_data(n=120, seed=9, covariates=True)
    noise.omics = {name: frame.set_axis(data.clinical.index) for name, frame in noise.omics.items()}
    chosen = {}
    for label, cohort in (("signal", data), ("noise", replace(data, omics=noise.omics))):
        ensemble = fit_wide(cohort, ids, recipe)
        member = ensemble.members[0]
        train_set = member.dataset(cohort, ids)
        chosen[label] = with_omics_ridge(
            member.model, lambda dataset=train_set: dataset, TRAIN, torch.device("cpu")
        ).linear_omics_ridge
        assert path_inputs(member.model, train_set, torch.device("cpu"))[1].any()
    assert chosen["signal"] < chosen["noise"]


def test_a_blend_mixes_the_survival_curves():
    logits, other = torch.randn(5, 4), torch.randn(5, 4)
    mixed = blend_survival(logits, other, 0.3)
    survival = lambda x: torch.cumprod(torch.sigmoid(-x), 1)  # noqa: E731
    torch.testing.assert_close(survival(mixed), 0.7 * survival(logits) + 0.3 * survival(other))
    torch.testing.assert_close(blend_survival(logits, other, 0.0), logits, atol=1e-4, rtol=1e-4)
    with pytest.raises(ModelInputError, match="linear_blend"):
        HEALNetConfig(modalities=[ModalitySpec("mut", 3)], n_bins=4, linear_blend=0.5)


def test_a_blended_ensemble_predicts_the_mix_and_round_trips(tmp_path, data):
    recipe = replace(WIDE, model=replace(MODEL, linear_path=(CLINICAL,), linear_blend=0.5))
    ensemble = fit_wide(data, list(data.clinical.index[:45]), recipe)
    member = ensemble.members[0]
    assert member.model.linear_intercepts.abs().sum() > 0  # the linear path's own intercepts, kept
    ids = list(data.clinical.index)
    blended = ensemble.risk(data, ids)
    member.model.config.linear_blend = 0.0
    for other in ensemble.members[1:]:
        other.model.config.linear_blend = 0.0
    assert not np.allclose(ensemble.risk(data, ids), blended)
    for trained in ensemble.members:
        trained.model.config.linear_blend = 0.5
    save_checkpoint(tmp_path / "model", ensemble.to_checkpoint())
    loaded = HEALNetEnsemble.from_checkpoint(load_checkpoint(tmp_path / "model"))
    np.testing.assert_allclose(loaded.risk(data, ids), blended, rtol=1e-6)


def test_a_blended_prediction_ignores_what_a_sample_lacks():
    specs = [ModalitySpec("mut", 3), CLINICAL_SPEC]
    model = linear_model(specs, {CLINICAL: 2}, [0.7, -0.4], linear_blend=0.25)
    with torch.no_grad():
        model.linear_intercepts.copy_(torch.tensor([-1.0, -0.5, 0.0, 0.5]))
    inputs = {"mut": torch.randn(3, 1, 3), CLINICAL: torch.randn(3, 2, 1)}
    present = {CLINICAL: torch.tensor([True, False, True])}
    logits = model(inputs, present)
    garbage = model({**inputs, CLINICAL: torch.full((3, 2, 1), 1e30)}, present)
    assert torch.equal(garbage[1], logits[1]) and not torch.allclose(garbage[0], logits[0])
    # the sample without covariates: the model's curve mixed with the intercepts' curve alone
    without = model({"mut": inputs["mut"][1:2]})
    torch.testing.assert_close(without[0], logits[1])
    model.train()
    assert not torch.allclose(model(inputs, present), logits)  # the blend is for predictions only


def test_a_clinical_only_path_chooses_no_ridge_and_builds_no_dataset():
    model = linear_model([ModalitySpec("mut", 3), CLINICAL_SPEC], {CLINICAL: 2}, [0.7, -0.4])

    def no_dataset():
        raise AssertionError("the dataset was built for a path without omic inputs")

    assert with_omics_ridge(model, no_dataset, TRAIN, torch.device("cpu")) is TRAIN
