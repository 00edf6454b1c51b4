"""The pipeline's first steps: a raw table ingested as a step, the modalities resolved (and refused) at
validation, and the cache keyed by what the source holds, splits included."""

import gzip
import json
from pathlib import Path

import pandas as pd
import pytest
from kfp.dsl import Artifact, Dataset, Markdown

from components.data_steps import fingerprint, ingest, validate
from components.support import PipelineStepError
from healnet.data.fingerprint import SourceError, source_fingerprint
from healnet.data.modalities import (
    ModalityError,
    cohort_modalities,
    input_kinds,
    parse_modalities,
    resolve_modalities,
)
from healnet.data.synth import SynthConfig, synthesize_cohort
from pipelines.__main__ import main as pipelines_main
from pipelines.local import run_local

QUICK = {"epochs": 2, "patience": 2, "min_c_index": 0.0, "min_test_events": 1}


@pytest.fixture(scope="module")
def table(tmp_path_factory) -> Path:
    """A PORPOISE table of 48 synthetic patients; its slide files are not passed on (table only)."""
    root = tmp_path_factory.mktemp("sources")
    synthesize_cohort(root / "synth", SynthConfig(patients=48, seed=5, slide_px=512), progress=False)
    return root / "synth" / "table.csv.gz"


def run_dirs_tasks(run_dir: Path) -> set[str]:
    """The tasks that ran in this run, failed ones included (one served from the cache has no folder)."""
    return {path.name for path in run_dir.iterdir() if path.is_dir()}


def test_a_models_modalities_are_the_input_kinds_validation_takes():
    """Batch scoring validates a cohort against the model's modalities: each omic table's is the kind omic."""
    separate_tables = ["mut", "cnv", "rnaseq", "clinical"]
    assert input_kinds(separate_tables) == ["omic", "clinical"]
    assert input_kinds(["wsi", "omic"]) == ["omic", "wsi"]
    assert parse_modalities(",".join(input_kinds([*separate_tables, "wsi"]))) == ["omic", "clinical", "wsi"]


def test_modalities_parse_resolve_and_name_what_is_missing():
    assert parse_modalities(" wsi, omic ") == ["omic", "wsi"]
    assert parse_modalities("") == []
    with pytest.raises(ModalityError, match="unknown modality slides"):
        parse_modalities("omic,slides")
    available = {"omic": "omic tables", "clinical": "age"}
    assert resolve_modalities([], available, slides_listed=3) == ["omic", "clinical"]
    with pytest.raises(ModalityError, match=r"modality wsi is not in this cohort: .*lists 3 slide\(s\)"):
        resolve_modalities(["omic", "wsi"], available, slides_listed=3)


def test_fingerprint_follows_contents_slides_and_split_seed(table, tmp_path):
    copy = tmp_path / "table.csv.gz"
    copy.write_bytes(table.read_bytes())
    slides = tmp_path / "slides"
    slides.mkdir()
    (slides / "a.svs").write_bytes(b"slide")
    base = source_fingerprint(copy, slides, {"split_seed": 0}, "v1")
    assert base == source_fingerprint(copy, slides, {"split_seed": 0}, "v1")
    assert base != source_fingerprint(copy, slides, {"split_seed": 1}, "v1")
    assert base != source_fingerprint(copy, slides, {"split_seed": 0}, "v2")
    (slides / "b.svs").write_bytes(b"another slide")
    assert base != source_fingerprint(copy, slides, {"split_seed": 0}, "v1")
    with gzip.open(copy, "at") as handle:
        handle.write("\n")
    assert source_fingerprint(copy, None, {}, "v1") != source_fingerprint(table, None, {}, "v1")
    with pytest.raises(SourceError, match="does not exist"):
        source_fingerprint(tmp_path / "absent.csv", None, {}, "v1")


def test_fingerprint_step_takes_exactly_one_cohort_input(table):
    with pytest.raises(PipelineStepError, match="exactly one of source"):
        fingerprint.python_func(source=str(table), cohort_dir="/somewhere", slide_dir="", split_seed=0)
    with pytest.raises(PipelineStepError, match="exactly one of source"):
        fingerprint.python_func(source="", cohort_dir="", slide_dir="", split_seed=0)


def test_ingest_and_validate_steps_resolve_the_modalities_of_a_table(table, tmp_path):
    cohort = Dataset(name="cohort", uri=str(tmp_path / "cohort"))
    report = Markdown(name="report", uri=str(tmp_path / "ingest.md"))
    ingest.python_func(
        source=str(table),
        cohort_dir="",
        slide_dir="",
        split_seed=0,
        source_hash="h",
        cohort=cohort,
        report=report,
    )
    assert cohort.metadata["patients"] == 48 and cohort.metadata["slides_with_file"] == 0
    assert cohort.metadata["slides_listed"] > 0 and "patients: 48" in Path(report.path).read_text()

    def run_validate(modalities: str, folder: str):
        out = tmp_path / folder
        out.mkdir()
        outputs = {name: str(out / name) for name in ("data_hash", "chosen_modalities", "slide_source")}
        shards = validate.python_func(
            cohort=cohort,
            slide_shards=3,
            max_quarantined_fraction=0.05,
            min_events_per_split=1,
            modalities=modalities,
            features_dir="",
            encoder_name="",
            weights_sha256="",
            mpp=0.0,
            patch_size=0,
            report=Markdown(name="report", uri=str(out / "validation.md")),
            validation=Artifact(name="validation", uri=str(out / "validation.json")),
            **outputs,
        )
        return shards, {name: Path(path).read_text() for name, path in outputs.items()}

    shards, written = run_validate("", "all")
    assert written["chosen_modalities"] == "omic,clinical" and written["slide_source"] == "none"
    assert [shard["slide_source"] for shard in shards] == ["none"]  # one idle shard: nothing to tile
    assert shards[0]["data_hash"] == written["data_hash"] == cohort.metadata["data_hash"]
    # the hash ingest recorded is handed on as it is, not computed again over the folder
    cohort.metadata["data_hash"] = "recorded-by-ingest"
    shards, written = run_validate("", "recorded")
    assert shards[0]["data_hash"] == written["data_hash"] == "recorded-by-ingest"
    with pytest.raises(ModalityError, match="modality wsi is not in this cohort.*give slide_dir"):
        run_validate("omic,clinical,wsi", "with-wsi")


def test_cohort_modalities_count_imported_features_as_slides(table, tmp_path):
    from healnet.data.cohort import ingest as ingest_cohort

    cohort = ingest_cohort(table, tmp_path / "cohort")
    assert "wsi" not in cohort_modalities(cohort, slide_features=False)
    assert cohort_modalities(cohort, slide_features=True)["wsi"] == "precomputed patch features"


@pytest.mark.slow
def test_a_missing_modality_fails_at_validate_once_in_one_line(table, tmp_path, capsys):
    argv = ["run-local", "--pipeline-root", str(tmp_path / "root"), "--param", f"source={table}"]
    argv += ["--param", "modalities=omic,clinical,wsi", "--param", f"registry_dir={tmp_path / 'registry'}"]
    assert pipelines_main(argv) == 1
    captured = capsys.readouterr()
    run_dir = Path(captured.out.split("pipeline run folder: ")[1].split(" (")[0])
    assert "Inner task failed: 'validate'" in captured.err
    assert run_dirs_tasks(run_dir) == {"fingerprint", "ingest", "validate", "notify"}
    log = (run_dir / "steps.log").read_text()
    assert log.count("modality wsi is not in this cohort") == 1, "validate is not retried"
    errors = [line for line in log.splitlines() if "ModalityError:" in line]
    assert len(errors) == 1 and "modality wsi is not in this cohort" in errors[0]


@pytest.mark.slow
def test_cache_never_reuses_outputs_across_split_seeds(table, tmp_path):
    root, registry = tmp_path / "root", tmp_path / "registry"
    arguments = {"source": str(table), "registry_dir": str(registry), **QUICK}
    first = run_local({**arguments, "split_seed": 0}, root, cache=True)
    assert first.succeeded, first.error
    reseeded = run_local({**arguments, "split_seed": 1}, root, cache=True)
    assert reseeded.succeeded, reseeded.error
    downstream = {"ingest", "merge-features", "train", "evaluate"}
    assert downstream <= run_dirs_tasks(reseeded.run_dir), "another split seed reran every step"
    splits = [
        pd.read_parquet(run.run_dir / "ingest" / "cohort" / "splits.parquet") for run in (first, reseeded)
    ]
    assert not splits[0].equals(splits[1])
    again = run_local({**arguments, "split_seed": 1}, root, cache=True)
    assert again.succeeded, again.error
    assert not downstream & run_dirs_tasks(again.run_dir), "the same source and seed reuse the cache"
    assert {"fingerprint", "validate", "gate"} <= run_dirs_tasks(again.run_dir)
    assert again.metrics == reseeded.metrics and again.metrics != first.metrics
    ingested = json.loads((reseeded.run_dir / "ingest" / "executor_output.json").read_text())
    assert ingested["artifacts"]["cohort"]["artifacts"][0]["metadata"]["patients"] == 48


@pytest.mark.slow
def test_precomputed_features_are_imported_as_a_step(table, tmp_path):
    """A table and a CLAM folder of its slides' features: the run imports them (one slide's hold a NaN and
    is quarantined), trains on omics, clinical covariates and slides, and names the quarantined slide."""
    import numpy as np
    from test_import_features import CLAM_ATTRS, bag, write_h5

    from healnet.data.cohort import ingest as ingest_cohort
    from healnet.preprocess.feature_files import slide_stem

    slide_ids = list(ingest_cohort(table).slides["slide_id"])
    clam = tmp_path / "clam"
    for index, slide_id in enumerate(slide_ids):
        features, coords = bag(12, seed=index)
        if index == 0:
            features[2, 3] = np.nan
        write_h5(clam / "h5_files" / f"{slide_stem(slide_id)}.h5", features, coords, **CLAM_ATTRS)
    imported = {"features_dir": str(clam), "encoder_name": "uni_v1", "mpp": 0.5}
    arguments = {"source": str(table), "registry_dir": str(tmp_path / "registry"), **QUICK, **imported}
    result = run_local(arguments, tmp_path / "root", cache=False)
    assert result.succeeded, result.error
    assert result.decision in {"promote", "reject"}
    assert "Trained on: omic, clinical, wsi; slides: import" in result.reports["validation.md"].read_text()
    assert result.quarantined_slides == [slide_ids[0]]
    step = json.loads((result.run_dir / "import-features" / "executor_output.json").read_text())
    metadata = step["artifacts"]["features"]["artifacts"][0]["metadata"]
    assert metadata["slides_imported"] == len(slide_ids) - 1 and metadata["slides_quarantined"] == 1
    model = json.loads((result.run_dir / "train" / "executor_output.json").read_text())
    assert "wsi" in model["artifacts"]["model"]["artifacts"][0]["metadata"]["modalities"]
