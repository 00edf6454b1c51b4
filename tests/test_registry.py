"""Model registry (healnet/registry.py): versions in a BentoML store, champion pointer, rollback."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

from healnet.checkpoint import WEIGHTS_FILE, Checkpoint, CheckpointError, save_checkpoint
from healnet.cli import main as healnet_main
from healnet.experiment import model_config_for
from healnet.model import HEALNet
from healnet.preprocess.omics import OmicsConfig
from healnet.preprocess.state import Preprocessor
from healnet.registry import (
    RegistryError,
    get_champion,
    list_versions,
    register_model,
    resolve,
    rollback,
    set_champion,
    show_version,
)
from healnet.survival import SurvivalBins


def small_checkpoint(directory, seed: int = 0) -> str:
    """A real (untrained) omics-only HEALNet checkpoint; returns its weights' sha256."""
    rng = np.random.default_rng(seed)
    ids = [f"TCGA-AA-{i:04d}" for i in range(12)]
    frame = pd.DataFrame(rng.normal(size=(12, 6)), index=ids, columns=[f"g{j}_rnaseq" for j in range(6)])
    preprocessor = Preprocessor.fit({"rnaseq": frame}, {}, ids, OmicsConfig(combine=True))
    bins = SurvivalBins.fit(rng.uniform(1, 60, 12), rng.integers(0, 2, 12), 4)
    torch.manual_seed(seed)
    model = HEALNet(
        model_config_for(preprocessor, preprocessor.modalities, bins.n_bins, depth=1, n_latents=4)
    )
    return save_checkpoint(directory, Checkpoint(model.config, [model.state_dict()], bins, preprocessor, {}))


@pytest.fixture
def checkpoints(tmp_path):
    paths = []
    for seed in range(3):
        path = tmp_path / f"checkpoint-{seed}"
        small_checkpoint(path, seed)
        paths.append(path)
    return paths


def test_register_records_labels_metadata_and_the_weights_sha256(registry, checkpoints):
    sha = small_checkpoint(checkpoints[0])  # rewritten: same seed, same weights
    tag = register_model(checkpoints[0], {"git_sha": "abc123"}, {"c_index": 0.66, "data_hash": "d" * 64})
    [row] = list_versions()
    assert row["tag"] == tag and tag.startswith("healnet:")
    assert row["labels"] == {"framework": "pytorch", "git_sha": "abc123"}
    assert row["metadata"]["sha256"] == sha
    assert row["metadata"]["c_index"] == 0.66 and row["metadata"]["modalities"] == ["omic"]
    assert show_version(tag.split(":")[1])["tag"] == tag
    assert not row["champion"]


def test_champion_pointer_and_resolve(registry, checkpoints):
    first = register_model(checkpoints[0])
    second = register_model(checkpoints[1])
    assert get_champion() is None
    with pytest.raises(RegistryError, match="no champion"):
        resolve()
    set_champion(first, "first")
    pointer = set_champion(second, "better")
    assert pointer["tag"] == second and [entry["tag"] for entry in pointer["history"]] == [first]
    assert json.loads((registry / "champion.json").read_text())["tag"] == second
    assert not list(registry.glob(".champion-*")), "the temporary pointer file must be renamed away"
    tag, path = resolve()
    assert tag == second and (path / WEIGHTS_FILE).is_file()
    assert [row["tag"] for row in list_versions() if row["champion"]] == [second]


def test_rollback_to_the_previous_and_to_a_named_version(registry, checkpoints):
    tags = [register_model(path) for path in checkpoints]
    for tag in tags:
        set_champion(tag, "promoted")
    assert rollback()["tag"] == tags[1]
    assert get_champion()["reason"] == f"rollback from {tags[2]}"
    assert rollback(tags[0])["tag"] == tags[0]
    with pytest.raises(RegistryError, match="already the champion"):
        rollback(tags[0])
    with pytest.raises(RegistryError, match="no model version"):
        rollback("healnet:doesnotexist")


def test_rollback_needs_a_champion_with_history(registry, checkpoints):
    with pytest.raises(RegistryError, match="no champion"):
        rollback()
    set_champion(register_model(checkpoints[0]), "first")
    with pytest.raises(RegistryError, match="no earlier version"):
        rollback()


def test_corrupted_weights_are_refused(registry, checkpoints):
    tag = register_model(checkpoints[0])
    weights = checkpoints[1] / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupted"):
        register_model(checkpoints[1])
    stored = registry / "models" / "healnet" / tag.split(":")[1] / WEIGHTS_FILE
    stored.write_bytes(b"tampered")
    with pytest.raises(CheckpointError, match="corrupted"):
        set_champion(tag, "should not happen")
    assert get_champion() is None


def test_registry_cli_lists_and_rolls_back(registry, checkpoints, capsys):
    tags = [
        register_model(path, metadata={"c_index": 0.6 + i / 100}) for i, path in enumerate(checkpoints[:2])
    ]
    for tag in tags:
        set_champion(tag, "promoted")
    assert healnet_main(["registry", "list"]) == 0
    listed = capsys.readouterr().out
    assert f"* {tags[1]}" in listed and "c-index 0.6100" in listed and tags[0] in listed
    assert healnet_main(["registry", "rollback"]) == 0
    assert f"champion is now {tags[0]}" in capsys.readouterr().out
    assert healnet_main(["registry", "show", "healnet:missing"]) == 2


def test_an_empty_registry_lists_nothing(registry, capsys):
    assert list_versions() == []
    assert healnet_main(["registry", "list"]) == 0
    assert "no model versions registered" in capsys.readouterr().out
