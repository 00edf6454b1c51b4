"""Ensemble members trained as one batched model (healnet.ensemble) equal members trained one by one."""

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch

import healnet.ensemble
from healnet.ensemble import HEALNetEnsemble, batching_blocker, fit_members
from healnet.fitting import CohortData, build_training, fit_preprocessor
from healnet.preprocess.clinical import ClinicalConfig
from healnet.preprocess.omics import OmicsConfig
from healnet.recipes import ModelOptions, Recipe
from healnet.survival import SurvivalBins, survival_from_logits
from healnet.train import TrainConfig, fit

MODEL = ModelOptions(depth=1, n_latents=4, latent_dim=16, cross_dim_head=8, latent_dim_head=8)
# several tokens per table: with one token, attention has a single key, and see test_single_token_members
OMICS = OmicsConfig(top_k=12, combine=False, tokens="groups:4", signed_log=("rnaseq",))
# 40 training patients in 3 parts: members train on 26 or 27 patients, batches of 8 end with 2 or 3
TRAIN = TrainConfig(
    epochs=3, patience=3, monitor="loss", batch_size=8, weight_decay=3e-2, l1=1e-4, lr=3e-3, device="cpu"
)
TOLERANCE = {"atol": 1e-5, "rtol": 1e-4}


def make_data(n: int = 52, seed: int = 0, slides: bool = False, covariates: bool = False) -> CohortData:
    """rnaseq carries the log-hazard; mutations are noise; optionally patch bags, age and sex."""
    rng = np.random.default_rng(seed)
    index = pd.Index([f"TCGA-EN-{i:04d}" for i in range(n)], name="patient_id")
    z = rng.normal(size=n)
    event_time = rng.exponential(30 * np.exp(-1.5 * z))
    censor_time = rng.uniform(20, 150, n)
    clinical = pd.DataFrame(
        {
            "survival_months": np.maximum(np.minimum(event_time, censor_time), 0.1),
            "event": (event_time <= censor_time).astype(int),
        },
        index=index,
    )
    if covariates:
        clinical["age"] = rng.integers(40, 80, n).astype(float) + 5 * z
        clinical["is_female"] = rng.integers(0, 2, n)
    rna = rng.normal(size=(n, 16))
    rna[:, :3] += 1.5 * z[:, None]
    omics = {
        "rnaseq": pd.DataFrame(rna, index=index, columns=[f"G{i}_rnaseq" for i in range(16)]),
        "mut": pd.DataFrame(
            (rng.random((n, 14)) < 0.3).astype(float), index=index, columns=[f"M{i}_mut" for i in range(14)]
        ),
    }
    bags = (
        {pid: rng.normal(size=(int(rng.integers(3, 8)), 5)).astype(np.float32) for pid in index}
        if slides
        else {}
    )
    return CohortData(clinical, omics, bags)


@pytest.fixture(scope="module")
def data() -> CohortData:
    torch.set_num_threads(1)
    return make_data()


def member_parts(data: CohortData, members: int = 3) -> tuple[list, SurvivalBins, list[str]]:
    """Parts as HEALNetEnsemble makes them: (train ids, early-stopping ids) per member; test ids."""
    ids = list(data.clinical.index)
    pool, test = ids[:40], ids[40:]
    clinical = data.clinical.loc[pool]
    bins = SurvivalBins.fit(clinical["survival_months"], clinical["event"], 4)
    stops = [pool[i::members] for i in range(members)]
    parts = [([pid for pid in pool if pid not in stop], stop) for stop in stops]
    return parts, bins, test


def build(data, parts, bins, config: TrainConfig, modalities=("omic",), model=MODEL, omics=OMICS):
    pool = sorted({pid for fit_ids, stop_ids in parts for pid in fit_ids + stop_ids})
    preprocessor = fit_preprocessor(data, pool, list(modalities), omics, ClinicalConfig())
    return [
        build_training(data, fit_ids, stop_ids, preprocessor, bins, model, replace(config, seed=i))
        for i, (fit_ids, stop_ids) in enumerate(parts)
    ]


def survival(trained, data, ids) -> np.ndarray:
    return survival_from_logits(torch.from_numpy(trained.predict(data, ids)))[1].numpy()


def train_both(data, config: TrainConfig, monkeypatch, **build_options):
    """The same 3 members trained one by one with `fit`, and batched by `fit_members` (no fallback)."""
    parts, bins, test_ids = member_parts(data)
    configs = [replace(config, seed=i) for i in range(3)]
    loop = build(data, parts, bins, config, **build_options)
    loop_results = [
        fit(t.model, s, v, c, bins=bins, progress=False) for (t, s, v), c in zip(loop, configs, strict=True)
    ]
    batched = build(data, parts, bins, config, **build_options)
    monkeypatch.setattr(healnet.ensemble, "fit", lambda *a, **k: pytest.fail("fell back to fit"))
    batched_results = fit_members(
        [t.model for t, _, _ in batched],
        [s for _, s, _ in batched],
        [v for _, _, v in batched],
        configs,
        bins=bins,
    )
    return loop, batched, loop_results, batched_results, test_ids


def assert_members_equal(data, loop, batched, loop_results, batched_results, test_ids, skip=()) -> None:
    for (one, _, _), (other, _, _), a, b in zip(loop, batched, loop_results, batched_results, strict=True):
        expected = {k: v for k, v in one.model.state_dict().items() if k not in skip}
        actual = {k: v for k, v in other.model.state_dict().items() if k not in skip}
        torch.testing.assert_close(actual, expected, **TOLERANCE)
        assert b.best_epoch == a.best_epoch
        assert len(b.history) == len(a.history)
        for x, y in zip(a.history, b.history, strict=True):
            assert y["epoch"] == x["epoch"]
            np.testing.assert_allclose(
                [y["train_loss"], y["val_loss"], y["val_c_index"]],
                [x["train_loss"], x["val_loss"], x["val_c_index"]],
                rtol=1e-5,
                atol=1e-6,
            )
        np.testing.assert_allclose(survival(other, data, test_ids), survival(one, data, test_ids), atol=1e-5)


@pytest.mark.parametrize(
    "config",
    [TRAIN, replace(TRAIN, epochs=5, patience=1, monitor="c_index"), replace(TRAIN, bin_weights=True)],
    ids=["loss", "c_index-early-stop", "bin-weights"],
)
def test_batched_members_equal_members_fitted_one_by_one(data, config, monkeypatch):
    parts, _, _ = member_parts(data)
    assert {len(fit_ids) % config.batch_size for fit_ids, _ in parts} == {2, 3}  # short, unequal last batches
    loop, batched, loop_results, batched_results, test_ids = train_both(data, config, monkeypatch)
    assert_members_equal(data, loop, batched, loop_results, batched_results, test_ids)
    if config.patience < config.epochs:  # members stop at different epochs, not all at their last one
        assert min(len(r.history) for r in batched_results) < config.epochs
        assert any(r.best_epoch < len(r.history) - 1 for r in batched_results)


def test_single_token_members_equal_but_for_weights_without_a_gradient(data, monkeypatch):
    """The CV recipe's layout, one token per table: a cross-attention over a single key outputs its value
    whatever the query, so the query path has no gradient. The batched einsum attention gives it exactly 0;
    SDPA's backward in `fit` gives rounding noise, which Adam scales up to steps of about lr in the latent
    LayerNorm's bias (its weight decay is 0 at 0). Those weights cannot change any output."""
    omics = replace(OMICS, tokens="single")
    loop, batched, loop_results, batched_results, test_ids = train_both(data, TRAIN, monkeypatch, omics=omics)
    dead = [f"layers.0.cross.{name}.norm_latents.bias" for name in ("rnaseq", "mut")]
    assert_members_equal(data, loop, batched, loop_results, batched_results, test_ids, skip=dead)
    for trained, _, _ in batched:
        assert all(torch.count_nonzero(trained.model.state_dict()[name]) == 0 for name in dead)


def test_frozen_linear_path_stays_frozen_and_equal(monkeypatch):
    data = make_data(covariates=True)
    model = replace(MODEL, linear_path=("clinical",))
    loop, batched, loop_results, batched_results, test_ids = train_both(
        data, TRAIN, monkeypatch, modalities=("omic", "clinical"), model=model
    )
    assert_members_equal(data, loop, batched, loop_results, batched_results, test_ids)
    for trained, _, _ in batched:
        assert trained.model.linear_path.weight.abs().sum() > 0
        assert not trained.model.linear_path.weight.requires_grad


def test_ensemble_fit_trains_its_members_batched(data, monkeypatch):
    recipe = Recipe(
        name="tiny", omics=OMICS, model=MODEL, train=replace(TRAIN, seed=5), clinical=None, members=3
    )
    ids = list(data.clinical.index)
    calls = []
    monkeypatch.setattr(healnet.ensemble, "fit", lambda *a, **k: calls.append(1) or fit(*a, **k))
    ensemble = HEALNetEnsemble.fit(data, ids[:34], ids[34:40], recipe, ["omic"])
    assert not calls and len(ensemble.members) == 3
    for index, (member, (fit_ids, stop_ids)) in enumerate(
        zip(ensemble.members, ensemble.member_splits, strict=True)
    ):
        config = replace(TRAIN, seed=5 + index)
        alone, train_set, val_set = build_training(
            data, fit_ids, stop_ids, ensemble.preprocessor, ensemble.bins, MODEL, config
        )
        alone.result = fit(alone.model, train_set, val_set, config, progress=False)
        torch.testing.assert_close(member.model.state_dict(), alone.model.state_dict(), **TOLERANCE)
        assert member.result.best_epoch == alone.result.best_epoch
        assert member.metadata["train_config"]["seed"] == 5 + index


@pytest.mark.parametrize("case", ["wsi", "modality_dropout"])
def test_fallback_trains_members_one_by_one(case, monkeypatch):
    data = make_data(slides=case == "wsi")
    parts, bins, _ = member_parts(data)
    config = replace(TRAIN, epochs=2, modality_dropout=0.3 if case == "modality_dropout" else 0.0)
    modalities = ("omic", "wsi") if case == "wsi" else ("omic",)
    built = build(data, parts, bins, config, modalities)
    configs = [replace(config, seed=i) for i in range(3)]
    train_sets, val_sets = [s for _, s, _ in built], [v for _, _, v in built]
    assert (
        batching_blocker(train_sets, val_sets, configs)
        == {
            "wsi": "patch bags (wsi) of variable length",
            "modality_dropout": "modality dropout",
        }[case]
    )
    calls = []
    monkeypatch.setattr(healnet.ensemble, "fit", lambda *a, **k: calls.append(1) or fit(*a, **k))
    results = fit_members([t.model for t, _, _ in built], train_sets, val_sets, configs)
    assert len(calls) == 3 and [len(r.history) for r in results] == [2, 2, 2]
