"""A quarantined slide is a missing modality for its patient: training, evaluation and prediction go on
without it, and the run says which slides it left out."""

import json
import shutil
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from components.support import merge_feature_shards
from healnet.cli import main
from healnet.data.cohort import Cohort
from healnet.data.dataset import SlideFeaturesError
from healnet.data.synth import SynthConfig, synthesize_cohort
from healnet.evaluate import evaluate_checkpoint
from healnet.experiment import load_trained, run_training
from healnet.explain import patient_case
from healnet.fitting import CohortData
from healnet.inference import Predictor
from healnet.preprocess.feature_files import (
    QUARANTINE_FILE,
    feature_file_name,
    read_quarantine,
    read_slide_features,
    write_quarantine,
)
from healnet.preprocess.wsi import preprocess_slides
from healnet.recipes import DEMO
from healnet.train import TrainConfig

FAST = replace(DEMO, train=TrainConfig(epochs=2, batch_size=8))
SMALL_MODEL = ["--latents", "4", "--latent-dim", "16", "--depth", "1", "--top-k", "20"]


def truncate(path) -> None:
    """Keep the first half of a file: a copy that stopped half-way."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> dict:
    """20 synthetic patients, some with two slides; two slide files truncated: the only slide of one
    patient and one of the two slides of another. `preprocess-slides` has run on the cohort."""
    root = tmp_path_factory.mktemp("quarantine") / "cohort"
    config = SynthConfig(patients=20, seed=5, slide_px=512, second_slide_fraction=0.3)
    synthesize_cohort(root, config, progress=False)
    slides = pd.read_parquet(root / "slides.parquet")
    with_file = slides[slides["path"].notna()]
    per_patient = with_file.groupby("patient_id")["slide_id"].apply(list)
    lone = next(ids[0] for pid, ids in per_patient.items() if len(ids) == 1)
    first, kept = next(ids for pid, ids in per_patient.items() if len(ids) == 2)
    for slide in (lone, first):
        truncate(root / with_file.set_index("slide_id").loc[slide, "path"])
    features = root / "features"
    preprocess = ["preprocess-slides", str(root / "slides.parquet"), "--out", str(features), "--no-progress"]
    assert main(preprocess) == 0
    patient = with_file.set_index("slide_id")["patient_id"]
    return {
        "root": root,
        "features": features,
        "lone": lone,
        "lone_patient": patient[lone],
        "first": first,
        "kept": kept,
        "two_slide_patient": patient[first],
        "unlisted": set(slides.loc[slides["path"].isna(), "slide_id"]),  # quarantined as "no file"
    }


@pytest.fixture(scope="module")
def run(cohort, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("run")
    return {"metrics": run_training(cohort["root"], out, FAST, progress=False), "out": out}


def test_preprocess_quarantines_the_truncated_slides(cohort):
    quarantine = read_quarantine(cohort["features"] / "stats")
    assert {cohort["lone"], cohort["first"]} | cohort["unlisted"] == set(quarantine)
    assert quarantine[cohort["lone"]].startswith("unreadable slide")
    report = json.loads((cohort["features"] / "stats" / "report.json").read_text())
    assert {entry["slide"] for entry in report["quarantined"]} == set(quarantine)


def test_training_goes_on_and_names_the_quarantined_slides(cohort, run):
    expected = sorted({cohort["lone"], cohort["first"]} | cohort["unlisted"])
    assert run["metrics"]["slides_quarantined"] == {"count": len(expected), "slides": expected}
    written = json.loads((run["out"] / "metrics.json").read_text())
    assert written["slides_quarantined"] == run["metrics"]["slides_quarantined"]
    assert "wsi" in written["modalities"]


def test_a_patient_keeps_the_slides_that_were_not_quarantined(cohort):
    data = CohortData.from_cohort(Cohort.load(cohort["root"]), cohort["features"])
    assert cohort["lone_patient"] not in data.wsi_bags
    kept, _ = read_slide_features(cohort["features"] / "stats" / feature_file_name(cohort["kept"]))
    np.testing.assert_array_equal(data.wsi_bags[cohort["two_slide_patient"]], kept)
    assert data.quarantined_slides[cohort["lone"]].startswith("unreadable slide")


def test_the_patient_without_slides_is_predicted_without_them(cohort, run):
    cohort_data = Cohort.load(cohort["root"])
    data = CohortData.from_cohort(cohort_data, cohort["features"])
    ensemble = load_trained(run["out"] / "checkpoint")
    patients = [cohort["lone_patient"], cohort["two_slide_patient"]]
    member = ensemble.members[0]
    dataset = member.dataset(data, patients)
    batch = dataset.collate([dataset[0], dataset[1]])
    assert batch["present"]["wsi"].tolist() == [False, True]
    # the same risk as a case sent without slides through the serving path (Predictor)
    predictor = Predictor.from_dir(run["out"] / "checkpoint")
    [prediction] = predictor.predict([patient_case(cohort_data, cohort["lone_patient"], predictor)])
    assert "wsi" in prediction.modalities_missing
    assert prediction.risk == pytest.approx(float(ensemble.risk(data, [cohort["lone_patient"]])[0]), abs=1e-5)


def test_evaluation_goes_on_without_the_quarantined_slides(cohort, run, tmp_path):
    evaluation = evaluate_checkpoint(run["out"] / "checkpoint", cohort["root"], tmp_path, cohort["features"])
    assert evaluation["patients"] > 0 and np.isfinite(evaluation["integrated_brier_score"])


def test_a_slide_with_a_file_but_no_features_nor_quarantine_entry_is_an_error(cohort, tmp_path, capsys):
    features = tmp_path / "features"
    shutil.copytree(cohort["features"], features)
    (features / "stats" / feature_file_name(cohort["kept"])).unlink()
    with pytest.raises(SlideFeaturesError, match="1 slide\\(s\\) have a file but neither features nor a"):
        CohortData.from_cohort(Cohort.load(cohort["root"]), features)
    train = ["train", "--cohort", str(cohort["root"]), "--features", str(features), "--out", str(tmp_path)]
    assert main([*train, "--epochs", "1", "--no-progress", *SMALL_MODEL]) == 2
    message = capsys.readouterr().err.strip()
    assert message.startswith("healnet train: 1 slide(s) have a file") and cohort["kept"] in message
    # the fix it names writes the encoder folder that training reads
    assert f"--out {features}`" in message and "\n" not in message


def test_every_slide_quarantined_is_refused_unless_slides_are_left_out(cohort, tmp_path):
    """Training a cohort's slides when none is left is not silently training on omics alone."""
    features = tmp_path / "features" / "stats"
    features.mkdir(parents=True)
    slides = Cohort.load(cohort["root"]).slides
    write_quarantine(
        features / QUARANTINE_FILE, [(slide, "unreadable slide") for slide in slides["slide_id"]]
    )
    with pytest.raises(SlideFeaturesError, match=f"{len(slides)} are quarantined"):
        run_training(
            cohort["root"], tmp_path / "run", FAST, features_dir=tmp_path / "features", progress=False
        )


def test_merged_shards_carry_their_quarantine(cohort, tmp_path):
    """The pipeline's shards each write their own folder; the merged folder knows every shard's quarantine."""
    manifest = cohort["root"] / "slides.parquet"
    shards = [tmp_path / f"shard-{index}" for index in range(2)]
    for index, shard in enumerate(shards):
        preprocess_slides(manifest, shard, shard=(index, 2), progress=False)
    assert all(read_quarantine(shard) for shard in shards)  # each shard quarantined some slide
    merged = tmp_path / "merged"
    linked = merge_feature_shards([str(shard) for shard in shards], merged)
    assert linked == len(list(merged.glob("*.parquet"))) > 0
    assert read_quarantine(merged) == read_quarantine(cohort["features"] / "stats")
    data = CohortData.from_cohort(Cohort.load(cohort["root"]), merged)
    assert cohort["lone"] in data.quarantined_slides and cohort["lone_patient"] not in data.wsi_bags
