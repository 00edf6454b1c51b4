"""The batch-scoring pipeline: its sharding, its compiled package (a ParallelFor over the patient shards),
and a local run whose risks are the answers of a live `bentoml serve` of the same version."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from kfp.components import load_component_from_file
from test_components import synth_validated_cohort
from test_evaluate_serving import request_body

from devtools.live_server import champion_registry
from healnet.batch_scoring import (
    SCORE_COLUMNS,
    BatchScoringError,
    merge_shard_scores,
    shard_patient_ids,
)
from healnet.cli import main as healnet_main
from healnet.data.cohort import Cohort
from healnet.experiment import run_training
from healnet.inference import Predictor
from healnet.recipes import get_recipe
from healnet.scoring import CohortPatients
from pipelines.__main__ import main as pipelines_main

pytest_plugins = ("serving_fixtures",)


def test_shards_are_contiguous_blocks_in_cohort_order_and_never_empty():
    patients = [f"P{index}" for index in range(10)]
    shards = shard_patient_ids(patients, 4)
    assert [len(shard) for shard in shards] == [3, 3, 2, 2]
    assert [patient for shard in shards for patient in shard] == patients
    assert shard_patient_ids(patients[:3], 5) == [["P0"], ["P1"], ["P2"]]
    with pytest.raises(BatchScoringError, match="at least 1"):
        shard_patient_ids(patients, 0)


def shard_table(patients: list[str], version: str) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "patient_id": patients,
            "risk": 0.5,
            "survival": [[0.9, 0.5]] * len(patients),
            "modalities_used": [["omic"]] * len(patients),
            "model_version": version,
        }
    )


def test_merge_refuses_overlapping_shards_and_mixed_versions():
    merged = merge_shard_scores([shard_table(["A", "B"], "healnet:v1"), shard_table(["C"], "healnet:v1")])
    assert merged["patient_id"].tolist() == ["A", "B", "C"] and tuple(merged.columns) == SCORE_COLUMNS
    with pytest.raises(BatchScoringError, match="more than one shard"):
        merge_shard_scores([shard_table(["A", "B"], "healnet:v1"), shard_table(["B"], "healnet:v1")])
    with pytest.raises(BatchScoringError, match="different model versions"):
        merge_shard_scores([shard_table(["A"], "healnet:v1"), shard_table(["B"], "healnet:v2")])


def test_compile_writes_a_batch_scoring_package_with_a_parallel_for_over_the_patient_shards(tmp_path):
    training, batch = tmp_path / "training.yaml", tmp_path / "batch.yaml"
    argv = ["compile", "--output", str(training), "--batch-output", str(batch)]
    argv += ["--param", "registry_pvc=healnet-registry", "--param", "shards=8", "--param", "epochs=3"]
    assert pipelines_main(argv) == 0
    assert load_component_from_file(str(training)).name == "healnet-training"
    assert load_component_from_file(str(batch)).name == "healnet-batch-scoring"
    spec, platform = yaml.safe_load_all(batch.read_text())
    inputs = spec["root"]["inputDefinitions"]["parameters"]
    assert inputs["shards"]["defaultValue"] == 8 and "epochs" not in inputs  # each package its own params
    assert inputs["model_version"]["defaultValue"] == ""
    # every step inside an exit handler that reports how the run ended, as in the training pipeline
    root = spec["root"]["dag"]["tasks"]
    assert set(root) == {"exit-handler-1", "notify"}
    assert root["notify"]["inputs"]["parameters"]["status"] == {
        "taskFinalStatus": {"producerTask": "exit-handler-1"}
    }
    steps = spec["components"]["comp-exit-handler-1"]["dag"]["tasks"]
    loops = {
        name: task
        for name, task in steps.items()
        if "parameterIterator" in task and task["taskInfo"]["name"] == "scoring-shards"
    }
    (loop,) = loops.values()
    assert loop["parameterIterator"]["items"]["inputParameter"] == "pipelinechannel--shard-patients-Output"
    assert loop["iteratorPolicy"]["parallelismLimit"] == 4
    body = spec["components"][loop["componentRef"]["name"]]["dag"]["tasks"]
    assert set(body) == {"score-shard"} and body["score-shard"]["retryPolicy"]["maxRetryCount"] == 2
    assert steps["resolve-model"]["cachingOptions"] == {}
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    for step in ("exec-resolve-model", "exec-score-shard"):
        assert [mount["mountPath"] for mount in executors[step]["pvcMount"]] == ["/registry"]


def test_run_local_refuses_no_shards_before_running(tmp_path, capsys):
    argv = ["run-local", "batch-scoring", "--cohort", str(tmp_path), "--param", "shards=0"]
    assert pipelines_main(argv) == 2
    assert capsys.readouterr().err == "error: shards must be at least 1, got 0\n"


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """A 40-patient synthetic cohort with slides and a demo-recipe omic + wsi model trained on it for two
    epochs (not registered)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("batch-scoring")
    cohort = synth_validated_cohort(root / "cohort", patients=40, seed=5)
    features = root / "features"
    assert healnet_main(["preprocess-slides", str(cohort / "slides.parquet"), "--out", str(features)]) == 0
    recipe = get_recipe("demo")
    recipe = replace(recipe, train=replace(recipe.train, epochs=2, patience=2))
    run_training(cohort, root / "run", recipe, features, ["omic", "wsi"], progress=False)
    torch.set_num_threads(threads)
    return {"cohort": cohort, "checkpoint": root / "run" / "checkpoint", "root": root}


@pytest.mark.slow
def test_run_local_batch_scoring_answers_as_the_live_service(trained, serve, tmp_path, capsys):
    cohort = Cohort.load(trained["cohort"])
    with champion_registry(trained["checkpoint"], tmp_path / "registry", "tests") as registry:
        argv = ["run-local", "batch-scoring", "--cohort", str(trained["cohort"])]
        argv += ["--pipeline-root", str(tmp_path / "root"), "--param", f"registry_dir={registry.home}"]
        assert pipelines_main([*argv, "--param", "shards=3"]) == 0
        printed = capsys.readouterr().out
        scores_path = Path(re.search(r"scores: (\S+) \((\d+) rows\)", printed).group(1))
        assert f"({len(cohort.clinical)} rows)" in printed and f"model version: {registry.tag}" in printed
        assert re.search(r"[\d.]+ patients/s over 3 shards", printed)
        scores = pd.read_parquet(scores_path)
        assert tuple(scores.columns) == SCORE_COLUMNS
        assert scores["patient_id"].tolist() == cohort.clinical.index.tolist()
        assert set(scores["model_version"]) == {registry.tag}
        with_slides = set(cohort.slides.loc[cohort.slides["path"].notna(), "patient_id"])
        used_slides = set(scores.loc[scores["modalities_used"].map(lambda used: "wsi" in used), "patient_id"])
        assert used_slides == with_slides and 0 < len(with_slides) < len(scores)

        # the same patients as a client sends them, with the slide features the run tiled
        features = scores_path.parent / "merge-features" / "features"
        patients = CohortPatients.load(cohort, scores["patient_id"].tolist(), features)
        cases = patients.cases(Predictor.from_dir(trained["checkpoint"]))
        with serve(registry, tmp_path / "serve.log") as url:
            response = httpx.post(f"{url}/predict_batch", json=[request_body(c) for c in cases], timeout=60)
        assert response.status_code == 200, response.text
        answers = response.json()
        served_risk = np.array([answer["risk"] for answer in answers])
        np.testing.assert_allclose(scores["risk"].to_numpy(), served_risk, rtol=0, atol=1e-6)
        served_survival = np.array([answer["survival"] for answer in answers])
        np.testing.assert_allclose(
            np.stack(scores["survival"].to_numpy()), served_survival, rtol=0, atol=1e-6
        )
        assert [list(used) for used in scores["modalities_used"]] == [a["modalities_used"] for a in answers]
        assert {answer["model_version"] for answer in answers} == {registry.tag}

        wrong = pipelines_main([*argv, "--param", "model_version=healnet:notthere"])
        errors = capsys.readouterr().err
        assert wrong == 2 and errors == "error: no model version 'healnet:notthere' in the registry\n"
