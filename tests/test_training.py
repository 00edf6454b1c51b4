"""Training, checkpointing and inference on a small in-memory cohort with a known signal."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

from healnet.checkpoint import CheckpointError, load_checkpoint, save_checkpoint, verify_checkpoint
from healnet.data.modalities import ModalityError
from healnet.device import select_device
from healnet.ensemble import HEALNetEnsemble
from healnet.fitting import CohortData, TrainedModel
from healnet.inference import Case, Predictor
from healnet.preprocess.clinical import ClinicalConfig
from healnet.preprocess.omics import OmicsConfig
from healnet.recipes import ModelOptions, Recipe
from healnet.train import TrainConfig, evaluate_loader, make_loader

MODEL = ModelOptions(depth=1, n_latents=8, latent_dim=32, cross_dim_head=16, latent_dim_head=16)


def train_single_model(
    data: CohortData,
    split,
    modalities: list[str] | None = None,
    omics: OmicsConfig = OmicsConfig(combine=True),
    config: TrainConfig = TrainConfig(epochs=1, seed=0),
) -> TrainedModel:
    """One model as `healnet train` trains a single-member recipe: bins and preprocessing fitted on the
    training patients, early stopping on the validation ones."""
    recipe = Recipe(name="test", omics=omics, model=MODEL, train=config, clinical=ClinicalConfig())
    return HEALNetEnsemble.fit(data, split[0], split[1], recipe, modalities).members[0]


def make_data(n: int = 160, seed: int = 0) -> CohortData:
    """Omics carry one risk factor, patch bags another; times follow their sum."""
    rng = np.random.default_rng(seed)
    ids = [f"TCGA-AA-{i:04d}" for i in range(n)]
    z_omic, z_wsi = rng.normal(size=n), rng.normal(size=n)
    event_time = rng.exponential(30 * np.exp(-2 * (z_omic + z_wsi)))
    censor_time = rng.uniform(10, 120, n)
    clinical = pd.DataFrame(
        {
            "survival_months": np.maximum(np.minimum(event_time, censor_time), 0.1),
            "event": (event_time <= censor_time).astype(int),
        },
        index=pd.Index(ids, name="patient_id"),
    )
    rna = rng.normal(size=(n, 30))
    rna[:, :5] += 1.5 * z_omic[:, None]
    mut = (rng.random((n, 10)) < 0.2).astype(float)
    omics = {
        "rnaseq": pd.DataFrame(rna, index=clinical.index, columns=[f"G{i}_rnaseq" for i in range(30)]),
        "mut": pd.DataFrame(mut, index=clinical.index, columns=[f"G{i}_mut" for i in range(10)]),
    }
    bags = {}
    for i, pid in enumerate(ids):
        patches = rng.normal(size=(int(rng.integers(5, 20)), 6)).astype(np.float32)
        patches[:, 0] += 1.5 * z_wsi[i]
        bags[pid] = patches
    return CohortData(clinical, omics, bags)


@pytest.fixture(scope="module")
def data() -> CohortData:
    return make_data()


@pytest.fixture(scope="module")
def split(data):
    ids = list(data.clinical.index)
    return ids[:90], ids[90:120], ids[120:]


@pytest.fixture(scope="module")
def trained(data, split) -> TrainedModel:
    torch.set_num_threads(1)
    config = TrainConfig(epochs=25, batch_size=16, lr=3e-3, patience=25, seed=0)
    return train_single_model(data, split, config=config)


def test_training_learns_the_signal(trained, data, split):
    metrics = trained.evaluate(data, split[2], split[0])
    assert trained.modalities == ["omic", "wsi"]
    assert metrics["c_index"] > 0.75
    assert 0.0 <= metrics["integrated_brier_score"] <= 1.0


def test_early_stopping_restores_the_best_weights(trained, data, split):
    history = trained.result.history
    best = history[trained.result.best_epoch]
    assert trained.result.best_score == pytest.approx(max(row["val_c_index"] for row in history))
    device = select_device("cpu")
    loader = make_loader(trained.dataset(data, split[1]), 16, False, device)
    assert evaluate_loader(trained.model, loader, device, 0.4)["c_index"] == pytest.approx(
        best["val_c_index"]
    )


def test_bins_are_fit_on_training_patients_only(data, split):
    shifted = CohortData(data.clinical.copy(), data.omics, data.wsi_bags)
    shifted.clinical.loc[split[2], "survival_months"] *= 50
    a = train_single_model(data, split, ["omic"])
    b = train_single_model(shifted, split, ["omic"])
    np.testing.assert_array_equal(a.bins.edges, b.bins.edges)


def test_unknown_modality_is_rejected(data, split):
    """A library error (one line at the CLI): e.g. `--modalities wsi` when every slide was quarantined."""
    with pytest.raises(ModalityError, match="not all in this cohort"):
        train_single_model(data, split, ["radiology"])
    without_slides = CohortData(data.clinical, data.omics, {})
    with pytest.raises(ModalityError, match="available: \\['omic'\\]"):
        train_single_model(without_slides, split, ["wsi"])


def test_checkpoint_round_trip_gives_identical_predictions(trained, data, split, tmp_path):
    sha = save_checkpoint(tmp_path / "ckpt", HEALNetEnsemble([trained], []).to_checkpoint({"note": "test"}))
    manifest = json.loads((tmp_path / "ckpt" / "checkpoint.json").read_text())
    assert manifest["sha256"] == sha == verify_checkpoint(tmp_path / "ckpt")
    restored = HEALNetEnsemble.from_checkpoint(load_checkpoint(tmp_path / "ckpt"))
    np.testing.assert_array_equal(
        restored.members[0].predict(data, split[2]), trained.predict(data, split[2])
    )
    np.testing.assert_array_equal(restored.bins.edges, trained.bins.edges)
    assert restored.members[0].metadata["note"] == "test"


def test_corrupted_checkpoint_is_refused(trained, tmp_path):
    directory = tmp_path / "ckpt"
    save_checkpoint(directory, HEALNetEnsemble([trained], []).to_checkpoint())
    weights = directory / "model.pt"
    raw = bytearray(weights.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    weights.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="corrupted: sha256"):
        load_checkpoint(directory)
    for text, message in [
        ("{oops", "not valid JSON"),
        ("[]", "records no sha256"),
        ('{"sha256": 1}', "no sha256"),
    ]:
        (directory / "checkpoint.json").write_text(text)
        with pytest.raises(CheckpointError, match=message):
            load_checkpoint(directory)
    (directory / "checkpoint.json").unlink()
    with pytest.raises(CheckpointError, match="checkpoint.json is missing"):
        load_checkpoint(directory)


def test_predictor_matches_training_path_and_handles_missing_modalities(trained, data, split):
    predictor = Predictor(HEALNetEnsemble([trained], []).to_checkpoint())
    pid = split[2][0]
    case = Case(
        omics={name: frame.loc[pid].to_dict() for name, frame in data.omics.items()},
        wsi_features=data.wsi_bags[pid],
    )
    full, omic_only, wsi_only = predictor.predict(
        [case, Case(omics=case.omics), Case(wsi_features=case.wsi_features)], return_attention=True
    )
    expected_risk = -torch.cumprod(1 - torch.sigmoid(torch.from_numpy(trained.predict(data, [pid]))), 1).sum()
    assert full.risk == pytest.approx(float(expected_risk), abs=1e-5)
    assert full.modalities_missing == [] and omic_only.modalities_missing == ["wsi"]
    assert wsi_only.modalities_used == ["wsi"]
    assert len(full.attention["wsi"]) == len(case.wsi_features)
    assert sum(full.attention["wsi"]) == pytest.approx(1.0, abs=1e-4)
    assert full.survival == sorted(full.survival, reverse=True)
    assert full.bin_edges_months[0] == 0.0 and full.bin_edges_months[-1] is None


def test_predictor_reports_imputed_and_unknown_features(trained, data, split):
    predictor = Predictor(HEALNetEnsemble([trained], []).to_checkpoint())
    pid = split[2][1]
    rnaseq = data.omics["rnaseq"].loc[pid].to_dict()
    del rnaseq["G0_rnaseq"]
    case = Case(
        omics={"rnaseq": {**rnaseq, "NOTAGENE_rnaseq": 1.0}, "mut": data.omics["mut"].loc[pid].to_dict()}
    )
    (prediction,) = predictor.predict([case])
    assert prediction.unknown_features == ["NOTAGENE_rnaseq"]
    assert prediction.imputed_features == 1  # of the present modalities: absent cnv is not imputed
    assert prediction.imputed_fraction == pytest.approx(1 / 40)


def test_per_table_omics_become_separate_modalities(data, split):
    model = train_single_model(data, split, ["omic"], OmicsConfig(combine=False))
    assert sorted(model.modalities) == ["mut", "rnaseq"]


def test_feature_tokens_carry_their_values_and_learn_the_signal(data, split):
    config = TrainConfig(epochs=15, batch_size=16, lr=3e-3, patience=15, seed=0)
    model = train_single_model(data, split, ["omic"], OmicsConfig(combine=True, tokens="features"), config)
    (spec,) = model.model.config.modalities
    assert spec.channels == 1 and spec.num_freq_bands > 0
    shifted = CohortData(data.clinical, {k: v + 1.0 for k, v in data.omics.items()}, {})
    assert not np.allclose(model.predict(data, split[2]), model.predict(shifted, split[2]))
    assert model.evaluate(data, split[2], split[0])["c_index"] > 0.65
    # serving rebuilds the same model from the checkpoint, position features included
    pid = split[2][0]
    case = Case(omics={name: frame.loc[pid].to_dict() for name, frame in data.omics.items()})
    (served,) = Predictor(HEALNetEnsemble([model], []).to_checkpoint()).predict([case])
    expected = -torch.cumprod(1 - torch.sigmoid(torch.from_numpy(model.predict(data, [pid]))), 1).sum()
    assert served.risk == pytest.approx(float(expected), abs=1e-5)
