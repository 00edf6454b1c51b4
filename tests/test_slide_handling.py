"""Honest slide handling: features are found by slide id, and missing slide features are said, not skipped."""

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest

from healnet.checkpoint import load_checkpoint
from healnet.cli import main
from healnet.data.cohort import Cohort, ingest
from healnet.data.dataset import SlideFeaturesError, load_wsi_bags
from healnet.data.synth import TABLE_NAME, SynthConfig, synthesize_cohort
from healnet.experiment import run_training
from healnet.fitting import CohortData
from healnet.preprocess.encoders import EncoderProvenance, StatsEncoder
from healnet.preprocess.feature_files import (
    SlideInputError,
    feature_file_name,
    read_feature_metadata,
    read_slide_features,
    write_slide_features,
)
from healnet.recipes import DEMO
from healnet.train import TrainConfig

SMALL_MODEL = ["--latents", "4", "--latent-dim", "16", "--depth", "1", "--top-k", "20"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """A synthetic cohort (slides listed, no features/ folder inside it) and its slide features elsewhere."""
    root = tmp_path_factory.mktemp("slides")
    cohort_dir = root / "cohort"
    synthesize_cohort(
        cohort_dir,
        SynthConfig(patients=30, seed=4, missing_slide_fraction=0.25, slide_px=512),
        progress=False,
    )
    features = root / "features"
    code = main(
        ["preprocess-slides", str(cohort_dir / "slides.parquet"), "--out", str(features), "--no-progress"]
    )
    assert code == 0
    empty = root / "empty"
    empty.mkdir()
    return {"cohort": cohort_dir, "table": cohort_dir / TABLE_NAME, "features": features, "empty": empty}


@pytest.fixture(scope="module")
def table_cohort(demo, tmp_path_factory):
    """The same cohort ingested from its table alone: every slide is listed, none has a known file."""
    out = tmp_path_factory.mktemp("table-only")
    cohort = ingest(demo["table"], out)
    assert len(cohort.slides) and cohort.slides["path"].isna().all()
    return out


def test_features_are_found_by_slide_id_when_slide_files_are_unknown(demo):
    canonical = CohortData.from_cohort(Cohort.load(demo["cohort"]), demo["features"])
    table_only = ingest(demo["table"])
    assert table_only.slides["path"].isna().all()
    data = CohortData.from_cohort(table_only, demo["features"], require_features=True)
    assert "wsi" in data.available_modalities()
    assert set(data.wsi_bags) == set(canonical.wsi_bags) and len(data.wsi_bags) > 15
    for pid, bag in canonical.wsi_bags.items():
        np.testing.assert_array_equal(data.wsi_bags[pid], bag)
    # patients whose slides have neither a file nor features simply lack the modality
    assert set(table_only.clinical.index) - set(data.wsi_bags)


def test_a_slide_with_a_file_but_no_features_is_still_an_error(demo, tmp_path):
    cohort = Cohort.load(demo["cohort"])
    with_file = cohort.slides[cohort.slides["path"].notna()]
    partial = tmp_path / "partial"
    shutil.copytree(demo["features"], partial)
    (partial / "stats" / feature_file_name(with_file["slide_id"].iloc[0])).unlink()
    with pytest.raises(SlideFeaturesError, match="1 slide\\(s\\) have a file but neither features nor"):
        load_wsi_bags(cohort, partial)


def test_features_asked_for_and_none_found_is_a_clear_error(demo):
    cohort = ingest(demo["table"])
    assert CohortData.from_cohort(cohort, demo["empty"]).wsi_bags == {}  # not asked for: no error
    with pytest.raises(SlideFeaturesError, match=f"looked for the {len(cohort.slides)} slide"):
        CohortData.from_cohort(cohort, demo["empty"], require_features=True)
    with pytest.raises(SlideFeaturesError, match=str(demo["empty"])):
        load_wsi_bags(cohort, demo["empty"], required=True)


def test_cv_uses_the_features_of_a_table_cohort(demo, tmp_path, capsys):
    out = tmp_path / "cv.json"
    common = ["cv", "--table", str(demo["table"]), "--folds", "2", "--repeats", "1", "--models", "healnet"]
    options = ["--members", "1", "--epochs", "1", "--top-k", "20", "--no-progress", "--json", str(out)]
    # HEALNet on slides alone: refused unless the cohort's slide features were loaded
    code = main([*common, *options, "--features", str(demo["features"]), "--modalities", "wsi"])
    assert code == 0
    assert json.loads(out.read_text())["patients"] == 30
    capsys.readouterr()

    assert main([*common, *options, "--features", str(demo["empty"])]) == 2
    captured = capsys.readouterr()
    message = captured.err.strip()
    assert message.startswith("healnet cv: no slide features in") and str(demo["empty"]) in message
    assert "\n" not in message and "Traceback" not in captured.err
    assert not out.exists() or json.loads(out.read_text())["patients"] == 30  # the earlier report


def test_train_refuses_a_cohort_with_slides_but_no_features(demo, tmp_path, capsys):
    train = ["train", "--cohort", str(demo["cohort"]), "--epochs", "1", "--no-progress", *SMALL_MODEL]
    assert main([*train, "--out", str(tmp_path / "refused")]) == 2
    captured = capsys.readouterr()
    message = captured.err.strip()
    assert message.startswith("healnet train: the cohort lists")
    assert "healnet preprocess-slides" in message and "--modalities omic,clinical" in message
    assert "\n" not in message and not (tmp_path / "refused" / "metrics.json").exists()

    assert main([*train, "--out", str(tmp_path / "omic"), "--modalities", "omic"]) == 0
    metrics = json.loads((tmp_path / "omic" / "metrics.json").read_text())
    assert metrics["modalities"] == ["omic"]


def test_run_training_refuses_too(demo, tmp_path):
    """The library check: the pipeline's train step (modalities not given) behaves like the CLI."""
    recipe = replace(DEMO, train=TrainConfig(epochs=1, batch_size=16))
    with pytest.raises(SlideFeaturesError, match="no feature folder"):
        run_training(demo["cohort"], tmp_path / "run", recipe, progress=False)


def test_train_on_a_table_cohort_uses_features_given_and_refuses_an_empty_folder(
    demo, table_cohort, tmp_path, capsys
):
    train = ["train", "--cohort", str(table_cohort), "--epochs", "1", "--no-progress", *SMALL_MODEL]
    assert main([*train, "--out", str(tmp_path / "none"), "--features", str(demo["empty"])]) == 2
    message = capsys.readouterr().err.strip()
    assert message.startswith(f"healnet train: no slide features in {demo['empty']}") and "\n" not in message

    assert main([*train, "--out", str(tmp_path / "run"), "--features", str(demo["features"])]) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert {"omic", "wsi"} <= set(metrics["modalities"])
    # the checkpoint records the encoder and patch grid of the features it was trained on
    preprocessor = load_checkpoint(tmp_path / "run" / "checkpoint").preprocessor
    assert preprocessor.wsi_encoder == StatsEncoder.provenance
    assert preprocessor.tiling == {"patch_size": 224, "target_mpp": 1.0}


def test_training_refuses_features_of_mixed_encoders(demo, tmp_path):
    mixed = tmp_path / "mixed"
    shutil.copytree(demo["features"] / "stats", mixed)
    victim = sorted(mixed.glob("*.parquet"))[0]
    features, coords = read_slide_features(victim)
    metadata = read_feature_metadata(victim)
    other = EncoderProvenance("uni", "ab" * 32, features.shape[1], 224, "imagenet")
    write_slide_features(victim, features, coords, metadata | {"encoder": other.to_dict()})
    with pytest.raises(SlideFeaturesError, match="2 different encoders") as refusal:
        CohortData.from_cohort(Cohort.load(demo["cohort"]), mixed)
    assert "uni (weights sha256 abababababab" in str(refusal.value) and victim.stem in str(refusal.value)
    # two encoders' folders side by side: the caller must choose one
    (demo_two := tmp_path / "two").mkdir()
    shutil.copytree(demo["features"] / "stats", demo_two / "stats")
    shutil.copytree(mixed, demo_two / "uni-abababababab")
    with pytest.raises(SlideInputError, match="holds features of 2 encoders"):
        CohortData.from_cohort(Cohort.load(demo["cohort"]), demo_two)
