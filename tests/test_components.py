"""Each pipeline component, called in-process through `.python_func` on a small synthetic cohort."""

import base64
import json
import os
import re
import shutil
import ssl
import subprocess
import threading
from dataclasses import asdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pandas as pd
import pytest
import torch
from kfp.dsl import HTML, Artifact, Dataset, Markdown, Metrics, Model, PipelineTaskFinalStatus

from components.data_steps import merge_features, preprocess_slides, validate
from components.model_steps import evaluate, train
from components.notification import NOTIFY_WEBHOOK_ENV
from components.release_steps import gate, notify, promote, reject
from components.support import PipelineStepError, cohort_data_hash, merge_feature_shards
from healnet.checkpoint import load_checkpoint, verify_checkpoint
from healnet.data.cohort import Cohort
from healnet.data.synth import SynthConfig, synthesize_cohort
from healnet.gate import ENOUGH_EVENTS, GATE_VERSION, NOT_WORSE, GatePolicy, rule_texts
from healnet.model_card import validate_card
from healnet.preprocess.feature_files import feature_file_name
from healnet.registry import (
    get_champion,
    list_versions,
    model_card,
    register_model,
    set_champion,
    show_version,
)
from healnet.scoring import ScoredPatients
from healnet.survival_metrics import harrell_c
from healnet.train import DistributedTrainingError

SHARDS = 2


def synth_validated_cohort(root: Path, patients: int, seed: int, missing_slides: float = 0.5) -> Path:
    """A small synthetic cohort (small slides, for speed) that passes validation."""
    config = SynthConfig(patients=patients, seed=seed, missing_slide_fraction=missing_slides, slide_px=768)
    synthesize_cohort(root, config, progress=False)
    return root


# validate's import parameters when nothing is imported (the slides are tiled)
NO_IMPORT = {"features_dir": "", "encoder_name": "", "weights_sha256": "", "mpp": 0.0, "patch_size": 0}


def artifact(kind, folder: Path, name: str, metadata: dict | None = None):
    return kind(name=name, uri=str(folder / name), metadata=dict(metadata or {}))


@pytest.fixture(scope="module")
def pipeline_outputs(tmp_path_factory):
    """Run validate → slide shards → merged features → train → evaluate once, as the pipeline would."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("components")
    cohort = str(synth_validated_cohort(root / "cohort", patients=48, seed=3))
    out = root / "outputs"
    out.mkdir()
    cohort_artifact = artifact(Dataset, root, "cohort")  # as the ingest step hands it on: the cohort folder
    imported = artifact(Dataset, out, "imported_features")  # nothing imported: tiled slides
    validation_report = artifact(Markdown, out, "validation.md")
    validation_json = artifact(Artifact, out, "validation.json")
    plan = {name: str(out / name) for name in ("data_hash", "chosen_modalities", "slide_source")}
    shard_list = validate.python_func(
        cohort=cohort_artifact,
        slide_shards=SHARDS,
        max_quarantined_fraction=0.05,
        min_events_per_split=1,
        modalities="",
        **NO_IMPORT,
        report=validation_report,
        validation=validation_json,
        **plan,
    )
    data_hash, modalities = (Path(plan[name]).read_text() for name in ("data_hash", "chosen_modalities"))
    shards = []
    for shard in shard_list:
        shards.append(artifact(Dataset, out, f"features-{shard['shard_index']}"))
        preprocess_slides.python_func(cohort=cohort_artifact, **shard, features=shards[-1])
    features = artifact(Dataset, out, "features")
    merge_features.python_func(slide_features=shards, imported_features=imported, features=features)
    model, train_metrics = artifact(Model, out, "model"), artifact(Metrics, out, "train_metrics")
    train.python_func(
        cohort=cohort_artifact,
        data_hash=data_hash,
        split_repeat=0,
        recipe="demo",
        modalities=modalities,
        epochs=2,
        batch_size=16,
        patience=2,
        seed=0,
        gpu_count=1,
        features=features,
        model=model,
        metrics=train_metrics,
    )
    test_metrics, report = artifact(Metrics, out, "metrics"), artifact(HTML, out, "evaluation.html")
    predictions, test_features = (
        artifact(Dataset, out, "predictions"),
        artifact(Dataset, out, "test_features"),
    )
    evaluation = artifact(Artifact, out, "evaluation.json")
    evaluate.python_func(
        cohort=cohort_artifact,
        data_hash=data_hash,
        split_repeat=0,
        model=model,
        features=features,
        metrics=test_metrics,
        predictions=predictions,
        test_features=test_features,
        report=report,
        evaluation=evaluation,
    )
    torch.set_num_threads(threads)
    return {
        "cohort": cohort,
        "out": out,
        "shard_list": shard_list,
        "validation_report": validation_report,
        "validation": validation_json,
        "data_hash": data_hash,
        "shards": shards,
        "features": features,
        "model": model,
        "train_metrics": train_metrics,
        "metrics": test_metrics,
        "predictions": predictions,
        "test_features": test_features,
        "report": report,
        "evaluation": evaluation,
    }


def test_validate_returns_the_shards_and_the_data_hash(pipeline_outputs):
    shards = pipeline_outputs["shard_list"]
    assert [(shard["shard_index"], shard["shard_count"]) for shard in shards] == [
        (i, SHARDS) for i in range(SHARDS)
    ]
    assert {shard["slide_source"] for shard in shards} == {"tile"}
    assert {shard["data_hash"] for shard in shards} == {pipeline_outputs["data_hash"]}
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


def write_porpoise_table(path: Path, patients: int = 30) -> Path:
    """A minimal PORPOISE table: one slide row per patient, one omics feature."""
    ids = [f"TCGA-AB-{i:04d}" for i in range(patients)]
    pd.DataFrame(
        {
            "case_id": ids,
            "slide_id": [f"{patient}-01Z-00-DX1.svs" for patient in ids],
            "survival_months": [5.0 + i for i in range(patients)],
            "censorship": [i % 2 for i in range(patients)],
            "TP53_rnaseq": [0.1 * i for i in range(patients)],
        }
    ).to_csv(path, index=False)
    return path


def test_the_data_hash_follows_the_split_seed_and_the_code_version(tmp_path, monkeypatch):
    from healnet.data.cohort import ingest

    table = write_porpoise_table(tmp_path / "table.csv")
    monkeypatch.setenv("HEALNET_GIT_SHA", "1" * 40)  # the code version the images carry
    ingest(table, tmp_path / "cohort", seed=0)
    ingest(table, tmp_path / "same", seed=0)
    before = cohort_data_hash(tmp_path / "cohort")
    assert cohort_data_hash(tmp_path / "same") == before  # the same inputs give the same hash

    monkeypatch.setenv("HEALNET_GIT_SHA", "2" * 40)
    assert cohort_data_hash(tmp_path / "cohort") != before  # other code: cached results do not apply
    monkeypatch.setenv("HEALNET_GIT_SHA", "1" * 40)
    ingest(table, tmp_path / "cohort", seed=1)  # the same table with another split seed, same folder
    assert cohort_data_hash(tmp_path / "cohort") != before


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
            cohort=artifact(Dataset, tmp_path, "cohort"),
            slide_shards=2,
            max_quarantined_fraction=0.05,
            min_events_per_split=1,
            modalities="",
            **NO_IMPORT,
            report=report,
            validation=artifact(Artifact, tmp_path, "validation.json"),
            data_hash=str(tmp_path / "h"),
            chosen_modalities=str(tmp_path / "m"),
            slide_source=str(tmp_path / "s"),
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


def test_merge_features_gives_train_and_evaluate_every_shards_files_as_files(pipeline_outputs):
    features = pipeline_outputs["features"]
    merged = sorted(Path(features.path).glob("*.parquet"))
    shard_files = sorted(
        path.name for shard in pipeline_outputs["shards"] for path in Path(shard.path).glob("*.parquet")
    )
    assert [path.name for path in merged] == shard_files
    assert features.metadata["feature_files"] == len(shard_files) > 0
    # an artifact of its own: a link into another artifact would not survive its upload or that artifact
    assert not any(path.is_symlink() for path in merged)


def test_train_fits_the_omics_transform_on_training_patients_only(pipeline_outputs):
    fitted = load_checkpoint(Path(pipeline_outputs["model"].path) / "checkpoint").preprocessor.omics
    assert fitted is not None
    state = fitted.state_dict()
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
        cohort=artifact(Dataset, Path(outputs["cohort"]).parent, "cohort"),
        data_hash=outputs["data_hash"],
        split_repeat=0,
        recipe=recipe,
        modalities="omic,clinical,wsi",
        epochs=2,
        batch_size=16,
        patience=2,
        seed=0,
        gpu_count=gpu_count,
        features=outputs["features"],
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
    assert metrics["c_index_ci_low"] <= metrics["c_index"] <= metrics["c_index_ci_high"]
    cohort = Cohort.load(Path(pipeline_outputs["cohort"]))
    test_ids = cohort.patients("holdout", 0, 0, "test")
    assert metrics["test_patients"] == len(test_ids) and metrics["bootstrap_resamples"] == 1000
    assert metrics["test_events"] == int(cohort.clinical.loc[test_ids, "event"].sum())
    html = Path(pipeline_outputs["report"].path).read_text()
    encoded = re.search(r'src="data:image/png;base64,([^"]+)"', html).group(1)
    assert base64.b64decode(encoded).startswith(b"\x89PNG")
    assert pipeline_outputs["data_hash"] in html and "c_index_ci_low" in html


def test_evaluate_hands_the_gate_each_test_patients_risk_and_slide_features(pipeline_outputs):
    scored = ScoredPatients.read_parquet(Path(pipeline_outputs["predictions"].path))
    cohort = Cohort.load(Path(pipeline_outputs["cohort"]))
    test_ids = cohort.patients("holdout", 0, 0, "test")
    assert scored.patient_ids == test_ids
    c_index = harrell_c(scored.times, scored.events, scored.risk)
    assert c_index == pytest.approx(pipeline_outputs["metrics"].metadata["c_index"], abs=1e-12)
    slides = cohort.slides[cohort.slides["patient_id"].isin(test_ids) & cohort.slides["path"].notna()]
    copied = sorted(path.name for path in Path(pipeline_outputs["test_features"].path).glob("*.parquet"))
    assert copied and copied == sorted(feature_file_name(slide) for slide in slides["slide_id"])


def run_gate(outputs: dict, folder: Path, **policy) -> tuple[str, Markdown, Artifact, Metrics]:
    """The gate step on the evaluated candidate; `policy` overrides the gate's defaults."""
    settings = {**asdict(GatePolicy()), **policy}
    folder.mkdir(parents=True, exist_ok=True)
    report = artifact(Markdown, folder, "gate.md")
    record, numbers = artifact(Artifact, folder, "gate.json"), artifact(Metrics, folder, "gate_metrics")
    decision = gate.python_func(
        cohort=artifact(Dataset, Path(outputs["cohort"]).parent, "cohort"),
        data_hash=outputs["data_hash"],
        model=outputs["model"],
        metrics=outputs["metrics"],
        predictions=outputs["predictions"],
        test_features=outputs["test_features"],
        min_c_index=settings["min_c_index"],
        tolerance=settings["tolerance"],
        min_test_events=settings["min_test_events"],
        dry_run=settings["dry_run"],
        registry_dir="",
        report=report,
        gate_json=record,
        gate_metrics=numbers,
    )
    return decision, report, record, numbers


def test_gate_decides_on_the_interval_and_writes_every_number(pipeline_outputs, registry, tmp_path):
    metrics = pipeline_outputs["metrics"].metadata
    for threshold, expected in ((0.0, "promote"), (1.01, "reject")):
        decision, report, record, numbers = run_gate(
            pipeline_outputs, tmp_path / str(threshold), min_c_index=threshold, min_test_events=1
        )
        assert decision == expected
        assert f"**{expected}**" in Path(report.path).read_text()
        gated = json.loads(Path(record.path).read_text())
        assert gated["decision"] == expected and "min_c_index" in gated["rule"]
        assert gated["c_index"] == pytest.approx(metrics["c_index"], abs=1e-12)
        assert gated["c_index_ci"] == pytest.approx([metrics["c_index_ci_low"], metrics["c_index_ci_high"]])
        assert gated["test_events"] == metrics["test_events"] and gated["champion"] is None
        assert gated["paired_difference"] is None and gated["policy"]["min_c_index"] == threshold
        assert numbers.metadata["promote"] == float(expected == "promote")
        assert numbers.metadata["c_index_ci_low"] == pytest.approx(metrics["c_index_ci_low"])
        assert json.loads(Path(numbers.path).read_text()) == numbers.metadata


def test_gate_rejects_a_test_split_with_too_few_events(pipeline_outputs, registry, tmp_path):
    decision, report, record, _ = run_gate(pipeline_outputs, tmp_path, min_c_index=0.0)
    gated = json.loads(Path(record.path).read_text())
    assert gated["test_events"] < GatePolicy.min_test_events  # 8 test patients in this small cohort
    assert (
        decision == "reject" and gated["rule"] == rule_texts(GatePolicy(min_c_index=0.0), 0.95)[ENOUGH_EVENTS]
    )
    assert "too few test events" in Path(report.path).read_text()


def promote_step(outputs: dict, folder: Path, gate_json: Artifact) -> tuple[str, Markdown]:
    report = artifact(Markdown, folder, "promotion.md")
    card, card_json = (
        artifact(Markdown, folder, "model_card.md"),
        artifact(Artifact, folder, "model_card.json"),
    )
    tag = promote.python_func(
        cohort=artifact(Dataset, Path(outputs["cohort"]).parent, "cohort"),
        data_hash=outputs["data_hash"],
        registry_dir="",
        run_id="run-123",
        run_name="healnet-training-test",
        model=outputs["model"],
        metrics=outputs["metrics"],
        predictions=outputs["predictions"],
        test_features=outputs["test_features"],
        gate_json=gate_json,
        evaluation=outputs["evaluation"],
        validation=outputs["validation"],
        report=report,
        model_card=card,
        model_card_json=card_json,
    )
    return tag, report


def test_promote_registers_with_provenance_and_sets_the_champion(pipeline_outputs, registry, tmp_path):
    _, _, record, _ = run_gate(pipeline_outputs, tmp_path, min_c_index=0.0, min_test_events=1)
    tag, report = promote_step(pipeline_outputs, tmp_path, record)
    assert get_champion()["tag"] == tag
    [row] = list_versions()
    metadata = row["metadata"]
    gated = json.loads(Path(record.path).read_text())
    assert metadata["c_index"] == pytest.approx(pipeline_outputs["metrics"].metadata["c_index"])
    assert metadata["c_index_ci"] == gated["c_index_ci"] and metadata["test_events"] == gated["test_events"]
    assert metadata["gate_rule"] == gated["rule"] and metadata["gate_version"] == GATE_VERSION
    assert metadata["data_hash"] == pipeline_outputs["data_hash"] and metadata["pipeline_run_id"] == "run-123"
    assert metadata["cohort"] == pipeline_outputs["cohort"]
    assert metadata["weights_sha256"] == metadata["sha256"] == pipeline_outputs["model"].metadata["sha256"]
    assert metadata["git_sha"] and metadata["gate_reasons"]
    assert (
        row["labels"]["pipeline_run_id"] == "run-123"
        and row["labels"]["data_hash"] == metadata["data_hash"][:12]
    )
    text = Path(report.path).read_text()
    assert f"# Promoted {tag}" in text and f"## Model card: {tag}" in text
    # the model card, stored with the version and written as the step's artifacts
    card, markdown = model_card(tag)
    validate_card(card)
    assert card == json.loads((tmp_path / "model_card.json").read_text())
    assert markdown == (tmp_path / "model_card.md").read_text() and markdown.startswith(
        f"# Model card: {tag}"
    )
    assert (card["model"]["version"], card["model"]["status"]) == (tag, "registered")
    assert card["model"]["weights_sha256"] == metadata["sha256"]
    assert card["gate"]["decision"] == "promote" and card["gate"]["rule"] == gated["rule"]
    assert card["cohort"]["data_hash"] == pipeline_outputs["data_hash"] and card["cohort"]["patients"] == 48
    assert card["metrics"]["c_index"]["estimate"] == pytest.approx(metadata["c_index"])
    assert card["validation"]["passed"] and card["validation"]["rows_quarantined"] == 0
    assert card["provenance"]["pipeline_run_id"] == "run-123" and card["modalities"] == metadata["modalities"]


def test_gate_scores_a_comparable_champion_on_the_same_test_patients(pipeline_outputs, registry, tmp_path):
    _, _, first, _ = run_gate(pipeline_outputs, tmp_path / "first", min_c_index=0.0, min_test_events=1)
    champion, _ = promote_step(pipeline_outputs, tmp_path / "first", first)
    # the same model again: scored through the serving path, it is the same on every resample
    decision, report, record, numbers = run_gate(
        pipeline_outputs, tmp_path / "second", min_c_index=1.01, tolerance=0.0, min_test_events=1
    )
    gated = json.loads(Path(record.path).read_text())
    assert gated["champion"]["tag"] == champion and gated["champion"]["comparable"] is True
    assert gated["champion"]["c_index"] == pytest.approx(gated["c_index"], abs=1e-6)
    assert gated["paired_difference"]["ci"] == pytest.approx([0.0, 0.0], abs=1e-6)
    assert decision == "promote" and "paired-bootstrap" in gated["rule"]
    assert numbers.metadata["paired_difference_ci_low"] == pytest.approx(0.0, abs=1e-6)
    assert "paired difference (candidate − champion)" in Path(report.path).read_text()


def test_promote_takes_the_gate_again_when_the_champion_changed(pipeline_outputs, registry, tmp_path):
    _, _, record, _ = run_gate(pipeline_outputs, tmp_path, min_c_index=0.0, tolerance=0.0, min_test_events=1)
    # another run promotes the same model meanwhile: a comparable champion, scored again in promote
    meanwhile = register_model(Path(pipeline_outputs["model"].path) / "checkpoint")
    set_champion(meanwhile, "promoted by another run after this run's gate")
    tag, report = promote_step(pipeline_outputs, tmp_path, record)
    pointer = get_champion()
    assert pointer["tag"] == tag and pointer["history"][-1]["tag"] == meanwhile
    gate_version = json.loads(Path(record.path).read_text())["gate_version"]
    assert pointer["reason"].endswith(f"passed gate v{gate_version} taken again against {meanwhile}")
    text = Path(report.path).read_text()
    assert f"gate taken again against {meanwhile}" in text and "paired-bootstrap" in text
    # the card, stored and handed on, shows the gate that promoted: the one taken again against `meanwhile`
    first = json.loads(Path(record.path).read_text())
    retaken_rule = rule_texts(GatePolicy(min_c_index=0.0, tolerance=0.0, min_test_events=1), 0.95)[NOT_WORSE]
    card, markdown = model_card(tag)
    validate_card(card)
    assert card == json.loads((tmp_path / "model_card.json").read_text())
    assert markdown == (tmp_path / "model_card.md").read_text()
    assert first["champion"] is None and first["rule"] != retaken_rule
    assert card["gate"]["champion"] == meanwhile and card["gate"]["rule"] == retaken_rule
    assert card["gate"]["decision"] == "promote" and any(meanwhile in r for r in card["gate"]["reasons"])
    assert card["gate"]["taken_again"] == {"first_champion": None, "first_rule": first["rule"]}
    assert f"the champion changed from none to {meanwhile} after the first gate" in markdown
    assert f"champion judged against: {meanwhile}" in markdown
    # the version's metadata, and the report's table of it, show that same gate, not the first one
    metadata = show_version(tag)["metadata"]
    assert metadata["gate_rule"] == card["gate"]["rule"]
    assert metadata["gate_reasons"] == card["gate"]["reasons"] != first["reasons"]
    assert f"| gate_rule | {retaken_rule} |" in text


def test_reject_reports_the_rule_and_the_kept_champion(pipeline_outputs, registry, tmp_path):
    _, gate_report, record, _ = run_gate(pipeline_outputs, tmp_path, min_c_index=1.01, min_test_events=1)
    report = artifact(Markdown, tmp_path, "rejection.md")
    card, card_json = artifact(Markdown, tmp_path, "card.md"), artifact(Artifact, tmp_path, "card.json")
    reject.python_func(
        cohort=artifact(Dataset, Path(pipeline_outputs["cohort"]).parent, "cohort"),
        data_hash=pipeline_outputs["data_hash"],
        registry_dir="",
        run_id="run-456",
        run_name="healnet-training-rejected",
        model=pipeline_outputs["model"],
        gate_json=record,
        gate_report=gate_report,
        evaluation=pipeline_outputs["evaluation"],
        validation=pipeline_outputs["validation"],
        report=report,
        model_card=card,
        model_card_json=card_json,
    )
    text = Path(report.path).read_text()
    assert "Candidate rejected" in text and "no model is promoted yet" in text and "Promotion gate" in text
    assert "95 % CI" in text and "Decided by the rule" in text and "min_c_index" in text
    assert list_versions() == []
    # the rejected candidate's model card: the gate's decision and rule, no version
    written = json.loads(Path(card_json.path).read_text())
    validate_card(written)
    gated = json.loads(Path(record.path).read_text())
    assert written["model"]["status"] == "rejected candidate" and written["model"]["version"] is None
    assert written["gate"]["decision"] == "reject" and written["gate"]["rule"] == gated["rule"]
    assert written["provenance"]["pipeline_run_name"] == "healnet-training-rejected"
    markdown = Path(card.path).read_text()
    assert markdown.startswith("# Model card: rejected candidate") and "Decision: **reject**" in markdown


FAILED_RUN = PipelineTaskFinalStatus(
    state="FAILED",
    pipeline_job_resource_name="runs/42",
    pipeline_task_name="healnet-run",
    error_code=1,
    error_message="validate failed",
)
WEBHOOK_TOKEN = "T0KEN-that-must-not-be-logged"


@pytest.fixture
def https_webhook(tmp_path, monkeypatch):
    """A local HTTPS webhook with a self-signed certificate that this process trusts; yields its base URL
    and the JSON bodies it received. Paths ending in /fail answer 500."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl not found: cannot make the webhook's certificate")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    for proxy_bypass in ("no_proxy", "NO_PROXY"):
        monkeypatch.setenv(proxy_bypass, "127.0.0.1")
    received = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(500 if self.path.endswith("/fail") else 204)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{server.server_port}", received
    finally:
        server.shutdown()


def test_notify_posts_the_final_status_to_the_https_webhook_and_logs_its_host_only(
    https_webhook, monkeypatch, capsys
):
    url, received = https_webhook
    monkeypatch.setenv(NOTIFY_WEBHOOK_ENV, f"{url}/hooks/{WEBHOOK_TOKEN}")
    notify.python_func(status=FAILED_RUN, run_name="run-42")
    assert received == [
        {
            "pipeline_run": "run-42",
            "pipeline_job": "runs/42",
            "state": "FAILED",
            "error_code": 1,
            "error_message": "validate failed",
        }
    ]
    out = capsys.readouterr().out
    assert "finished FAILED: validate failed" in out
    assert "notified 127.0.0.1: HTTP 204" in out
    assert WEBHOOK_TOKEN not in out


def test_a_failed_notification_fails_the_task_naming_the_host_only(https_webhook, monkeypatch, capsys):
    url, received = https_webhook
    monkeypatch.setenv(NOTIFY_WEBHOOK_ENV, f"{url}/hooks/{WEBHOOK_TOKEN}/fail")
    with pytest.raises(RuntimeError, match=r"notifying 127\.0\.0\.1 failed: HTTP Error 500") as failure:
        notify.python_func(status=FAILED_RUN, run_name="run-42")
    assert len(received) == 1
    assert WEBHOOK_TOKEN not in str(failure.value) + capsys.readouterr().out


@pytest.mark.parametrize(
    "webhook", [f"http://127.0.0.1:9/hooks/{WEBHOOK_TOKEN}", f"hooks.example.com/{WEBHOOK_TOKEN}"]
)
def test_notify_refuses_a_webhook_that_is_not_https_without_failing(webhook, monkeypatch, capsys):
    monkeypatch.setenv(NOTIFY_WEBHOOK_ENV, webhook)
    notify.python_func(status=FAILED_RUN, run_name="run-42")  # returns: the run's state stays its own
    out = capsys.readouterr().out
    assert f"notification refused: {NOTIFY_WEBHOOK_ENV} is not an https:// URL" in out
    assert "nothing was sent" in out and WEBHOOK_TOKEN not in out


def test_notify_without_a_webhook_only_logs(monkeypatch, capsys):
    monkeypatch.delenv(NOTIFY_WEBHOOK_ENV, raising=False)
    notify.python_func(status=FAILED_RUN, run_name="run-42")
    out = capsys.readouterr().out
    assert "finished FAILED: validate failed" in out and f"{NOTIFY_WEBHOOK_ENV} is not set" in out
