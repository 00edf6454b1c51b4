"""Each pipeline component, called in-process through `.python_func` on a small synthetic cohort."""

import base64
import json
import os
import re
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pandas as pd
import pytest
import torch
from kfp.dsl import HTML, Artifact, Dataset, Markdown, Metrics, Model, PipelineTaskFinalStatus

from components.data_steps import preprocess_omics, preprocess_slides, validate
from components.model_steps import evaluate, train
from components.release_steps import gate, notify, promote, reject
from components.support import PipelineStepError, cohort_data_hash, merge_feature_shards
from healnet.checkpoint import verify_checkpoint
from healnet.data.cohort import Cohort
from healnet.data.synth import SynthConfig, synthesize_cohort
from healnet.preprocess.omics import OmicsTransform
from healnet.registry import get_champion, list_versions
from healnet.train import DistributedTrainingError

SHARDS = 2


def synth_validated_cohort(root: Path, patients: int, seed: int, missing_slides: float = 0.5) -> Path:
    """A small synthetic cohort (small slides, for speed) that passes validation."""
    config = SynthConfig(patients=patients, seed=seed, missing_slide_fraction=missing_slides, slide_px=768)
    synthesize_cohort(root, config, progress=False)
    return root


def artifact(kind, folder: Path, name: str, metadata: dict | None = None):
    return kind(name=name, uri=str(folder / name), metadata=dict(metadata or {}))


@pytest.fixture(scope="module")
def pipeline_outputs(tmp_path_factory):
    """Run validate → slide shards → omics → train → evaluate once, as the pipeline would."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("components")
    cohort = str(synth_validated_cohort(root / "cohort", patients=48, seed=3))
    out = root / "outputs"
    out.mkdir()
    validation_report = artifact(Markdown, out, "validation.md")
    shard_list = validate.python_func(
        cohort_dir=cohort,
        slide_shards=SHARDS,
        max_quarantined_fraction=0.05,
        report=validation_report,
        data_hash=str(out / "data_hash"),
    )
    data_hash = (out / "data_hash").read_text()
    shards = []
    for index in shard_list:
        shards.append(artifact(Dataset, out, f"features-{index}"))
        preprocess_slides.python_func(
            cohort_dir=cohort, shard_index=index, shard_count=SHARDS, data_hash=data_hash, features=shards[-1]
        )
    transform = artifact(Artifact, out, "omics_transform.json")
    preprocess_omics.python_func(
        cohort_dir=cohort, split_repeat=0, recipe="demo", data_hash=data_hash, transform=transform
    )
    model, train_metrics = artifact(Model, out, "model"), artifact(Metrics, out, "train_metrics")
    train.python_func(
        cohort_dir=cohort,
        data_hash=data_hash,
        split_repeat=0,
        recipe="demo",
        epochs=2,
        batch_size=16,
        patience=2,
        seed=0,
        gpu_count=1,
        slide_features=shards,
        omics_transform=transform,
        model=model,
        metrics=train_metrics,
    )
    test_metrics, report = artifact(Metrics, out, "metrics"), artifact(HTML, out, "evaluation.html")
    evaluate.python_func(
        cohort_dir=cohort,
        data_hash=data_hash,
        split_repeat=0,
        model=model,
        slide_features=shards,
        metrics=test_metrics,
        report=report,
    )
    torch.set_num_threads(threads)
    return {
        "cohort": cohort,
        "out": out,
        "shard_list": shard_list,
        "validation_report": validation_report,
        "data_hash": data_hash,
        "shards": shards,
        "transform": transform,
        "model": model,
        "train_metrics": train_metrics,
        "metrics": test_metrics,
        "report": report,
    }


def test_validate_returns_the_shards_and_the_data_hash(pipeline_outputs):
    assert pipeline_outputs["shard_list"] == list(range(SHARDS))
    assert pipeline_outputs["data_hash"] == cohort_data_hash(pipeline_outputs["cohort"])
    assert re.fullmatch(r"[0-9a-f]{64}", pipeline_outputs["data_hash"])
    assert "Data validation: passed" in Path(pipeline_outputs["validation_report"].path).read_text()


def test_the_data_hash_follows_the_slide_files(pipeline_outputs, tmp_path):
    copy = tmp_path / "cohort"
    shutil.copytree(pipeline_outputs["cohort"], copy)
    before = cohort_data_hash(copy)
    assert before == cohort_data_hash(copy)  # stable while nothing changes
    cohort = Cohort.load(copy)
    slide = cohort.slide_path(cohort.slides.loc[cohort.slides["path"].notna(), "slide_id"].iloc[0])
    assert slide.is_relative_to(copy)
    stat = slide.stat()
    os.utime(
        slide, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9)
    )  # a re-scanned slide: same name, new file
    assert cohort_data_hash(copy) != before


def test_validate_stops_on_a_failing_expectation(pipeline_outputs, tmp_path):
    cohort = Path(pipeline_outputs["cohort"])
    broken = tmp_path / "cohort"
    broken.mkdir()
    for item in cohort.iterdir():  # everything shared except the clinical table, which gets bad ages
        if item.name != "clinical.parquet":
            (broken / item.name).symlink_to(item)
    clinical = pd.read_parquet(cohort / "clinical.parquet")
    clinical.loc[clinical.index[:2], "age"] = 150.0
    clinical.to_parquet(broken / "clinical.parquet")
    report = artifact(Markdown, tmp_path, "report.md")
    with pytest.raises(PipelineStepError, match="failed validation.*age"):
        validate.python_func(
            cohort_dir=str(broken),
            slide_shards=2,
            max_quarantined_fraction=0.05,
            report=report,
            data_hash=str(tmp_path / "h"),
        )
    assert "FAILED" in Path(report.path).read_text()
    assert report.metadata["success"] is False
    assert not (tmp_path / "h").exists()


def test_slide_shards_split_the_slides_without_overlap(pipeline_outputs, tmp_path):
    cohort = Cohort.load(Path(pipeline_outputs["cohort"]))
    with_files = cohort.slides["path"].notna().sum()
    processed = [shard.metadata["slides_processed"] for shard in pipeline_outputs["shards"]]
    assert sum(processed) == with_files and all(processed)
    assert all(shard.metadata["slides_quarantined"] == 0 for shard in pipeline_outputs["shards"])
    merged = tmp_path / "merged"
    assert merge_feature_shards([s.path for s in pipeline_outputs["shards"]], merged) == with_files
    with pytest.raises(PipelineStepError, match="in two shards"):
        merge_feature_shards([pipeline_outputs["shards"][0].path] * 2, tmp_path / "twice")


def test_omics_transform_is_fitted_on_training_patients_only(pipeline_outputs):
    state = json.loads(Path(pipeline_outputs["transform"].path).read_text())
    fitted = OmicsTransform.from_state_dict(state)
    cohort = Cohort.load(Path(pipeline_outputs["cohort"]))
    train_ids = set(cohort.patients("holdout", 0, 0, "train"))
    rnaseq = cohort.omics["rnaseq"]
    feature = next(name for name in fitted.feature_names["omic"] if name.endswith("_rnaseq"))
    train_mean = rnaseq.loc[rnaseq.index.isin(train_ids), feature].mean()
    assert state["modalities"]["rnaseq"]["mean"][
        state["modalities"]["rnaseq"]["features"].index(feature)
    ] == (pytest.approx(train_mean, rel=1e-5))
    assert rnaseq[feature].mean() != pytest.approx(train_mean, rel=1e-5)


def test_train_writes_a_sealed_checkpoint(pipeline_outputs):
    model = pipeline_outputs["model"]
    checkpoint = Path(model.path) / "checkpoint"
    assert verify_checkpoint(checkpoint) == model.metadata["sha256"]
    assert set(model.metadata["modalities"]) == {"omic", "wsi"}
    assert model.metadata["recipe"] == "demo" and model.metadata["members"] == 1
    metrics = json.loads((Path(model.path) / "metrics.json").read_text())
    assert metrics["epochs_run"] <= 2 and metrics["recipe"] == "demo"
    assert json.loads((checkpoint / "checkpoint.json").read_text())["metadata"]["recipe"] == "demo"
    assert pipeline_outputs["train_metrics"].metadata["epochs_run"] >= 1


def train_with_gpus(outputs: dict, name: str, recipe: str, gpu_count: int) -> tuple[Model, Metrics]:
    model, metrics = (
        artifact(Model, outputs["out"], name),
        artifact(Metrics, outputs["out"], f"{name}_metrics"),
    )
    train.python_func(
        cohort_dir=outputs["cohort"],
        data_hash=outputs["data_hash"],
        split_repeat=0,
        recipe=recipe,
        epochs=2,
        batch_size=16,
        patience=2,
        seed=0,
        gpu_count=gpu_count,
        slide_features=outputs["shards"],
        omics_transform=outputs["transform"],
        model=model,
        metrics=metrics,
    )
    return model, metrics


@pytest.mark.slow
def test_train_uses_every_process_it_is_given(pipeline_outputs):
    """gpu_count 2 on a CPU machine: two data-parallel processes on gloo; the first writes the model."""
    model, metrics = train_with_gpus(pipeline_outputs, "model_two_processes", "demo", 2)
    checkpoint = Path(model.path) / "checkpoint"
    assert verify_checkpoint(checkpoint) == model.metadata["sha256"]
    assert metrics.metadata["epochs_run"] >= 1
    single = json.loads((Path(pipeline_outputs["model"].path) / "metrics.json").read_text())
    # the same global batches as one process: the same model up to float rounding
    two = json.loads((Path(model.path) / "metrics.json").read_text())
    assert two["test"]["c_index"] == pytest.approx(single["test"]["c_index"], abs=1e-3)


def test_an_ensemble_recipe_is_refused_on_several_gpus(pipeline_outputs):
    with pytest.raises(DistributedTrainingError, match="gpu_count=1"):
        train_with_gpus(pipeline_outputs, "model_refused", "tcga", 2)


def test_evaluate_logs_test_metrics_and_embeds_the_kaplan_meier_plot(pipeline_outputs):
    metrics = pipeline_outputs["metrics"].metadata
    assert 0.0 <= metrics["c_index"] <= 1.0 and 0.0 <= metrics["c_index_ipcw"] <= 1.0
    assert 0.0 < metrics["integrated_brier_score"] < 1.0
    cohort = Cohort.load(Path(pipeline_outputs["cohort"]))
    assert metrics["test_patients"] == len(cohort.patients("holdout", 0, 0, "test"))
    html = Path(pipeline_outputs["report"].path).read_text()
    encoded = re.search(r'src="data:image/png;base64,([^"]+)"', html).group(1)
    assert base64.b64decode(encoded).startswith(b"\x89PNG")
    assert pipeline_outputs["data_hash"] in html


def test_gate_promotes_or_rejects_against_the_threshold(pipeline_outputs, registry, tmp_path):
    c_index = pipeline_outputs["metrics"].metadata["c_index"]
    for threshold, expected in ((0.0, "promote"), (1.01, "reject")):
        report = artifact(Markdown, tmp_path, f"gate-{threshold}.md")
        decision = gate.python_func(
            metrics=pipeline_outputs["metrics"],
            min_c_index=threshold,
            tolerance=0.02,
            dry_run=False,
            registry_dir="",
            report=report,
        )
        assert decision == expected
        assert f"**{expected}**" in Path(report.path).read_text()
        assert report.metadata["candidate_c_index"] == pytest.approx(c_index)


def _gate_report(pipeline_outputs, folder: Path) -> Markdown:
    report = artifact(Markdown, folder, "gate.md")
    gate.python_func(
        metrics=pipeline_outputs["metrics"],
        min_c_index=0.0,
        tolerance=0.02,
        dry_run=False,
        registry_dir="",
        report=report,
    )
    return report


def test_promote_registers_with_provenance_and_sets_the_champion(pipeline_outputs, registry, tmp_path):
    report = artifact(Markdown, tmp_path, "promotion.md")
    tag = promote.python_func(
        cohort_dir=pipeline_outputs["cohort"],
        data_hash=pipeline_outputs["data_hash"],
        registry_dir="",
        run_id="run-123",
        run_name="healnet-training-test",
        model=pipeline_outputs["model"],
        metrics=pipeline_outputs["metrics"],
        gate_report=_gate_report(pipeline_outputs, tmp_path),
        report=report,
    )
    assert get_champion()["tag"] == tag
    [row] = list_versions()
    metadata = row["metadata"]
    assert metadata["c_index"] == pytest.approx(pipeline_outputs["metrics"].metadata["c_index"])
    assert metadata["data_hash"] == pipeline_outputs["data_hash"] and metadata["pipeline_run_id"] == "run-123"
    assert metadata["weights_sha256"] == metadata["sha256"] == pipeline_outputs["model"].metadata["sha256"]
    assert metadata["git_sha"] and metadata["gate_reasons"]
    assert (
        row["labels"]["pipeline_run_id"] == "run-123"
        and row["labels"]["data_hash"] == metadata["data_hash"][:12]
    )
    assert f"# Promoted {tag}" in Path(report.path).read_text()


def test_promote_refuses_a_cohort_changed_during_the_run(pipeline_outputs, registry, tmp_path):
    with pytest.raises(PipelineStepError, match="changed during the run"):
        promote.python_func(
            cohort_dir=pipeline_outputs["cohort"],
            data_hash="0" * 64,
            registry_dir="",
            run_id="run-1",
            run_name="",
            model=pipeline_outputs["model"],
            metrics=pipeline_outputs["metrics"],
            gate_report=_gate_report(pipeline_outputs, tmp_path),
            report=artifact(Markdown, tmp_path, "promotion.md"),
        )
    assert list_versions() == [] and get_champion() is None


def test_reject_reports_the_kept_champion(pipeline_outputs, registry, tmp_path):
    report = artifact(Markdown, tmp_path, "rejection.md")
    reject.python_func(
        registry_dir="",
        metrics=pipeline_outputs["metrics"],
        gate_report=_gate_report(pipeline_outputs, tmp_path),
        report=report,
    )
    text = Path(report.path).read_text()
    assert "Candidate rejected" in text and "no model is promoted yet" in text and "Promotion gate" in text
    assert list_versions() == []


def test_notify_posts_the_final_status_to_the_webhook(capsys):
    received = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        status = PipelineTaskFinalStatus(
            state="FAILED",
            pipeline_job_resource_name="runs/42",
            pipeline_task_name="healnet-run",
            error_code=1,
            error_message="validate failed",
        )
        notify.python_func(
            status=status, run_name="run-42", webhook_url=f"http://127.0.0.1:{server.server_port}/"
        )
    finally:
        server.shutdown()
    assert received == [
        {
            "pipeline_run": "run-42",
            "pipeline_job": "runs/42",
            "state": "FAILED",
            "error_code": 1,
            "error_message": "validate failed",
        }
    ]
    assert "finished FAILED: validate failed" in capsys.readouterr().out
