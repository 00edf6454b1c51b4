"""The demo workflow through the CLI: synth → preprocess-slides → train → evaluate."""

import hashlib
import json

import pandas as pd
import pytest
from test_readers import CLINICAL

from healnet.cli import main
from healnet.data.cohort import Cohort
from healnet.data.synth import SynthConfig, synthesize_cohort
from healnet.experiment import load_trained
from healnet.survival_metrics import harrell_c


@pytest.fixture(scope="module")
def cohort_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert main(["synth", "--out", str(out), "--patients", "40", "--seed", "3", "--no-progress"]) == 0
    return out


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_synth_writes_a_tcga_shaped_table_and_canonical_cohort(cohort_dir):
    table = pd.read_csv(cohort_dir / "table.csv.gz", index_col=0)
    assert list(table.columns[:9]) == CLINICAL
    assert table["case_id"].str.fullmatch(r"TCGA-[A-Z0-9]{2}-[A-Z0-9]{4}").all()
    assert {c.rsplit("_", 1)[1] for c in table.columns[9:]} == {"mut", "cnv", "rnaseq"}
    cohort = Cohort.load(cohort_dir)
    assert len(cohort.clinical) == 40
    assert cohort.meta["rows_in"] == len(table) == cohort.meta["rows_kept"] + cohort.meta["rows_quarantined"]
    assert sorted(cohort.omic_modalities) == ["cnv", "mut", "rnaseq"]


def test_synth_is_deterministic_for_a_seed(tmp_path):
    config = SynthConfig(patients=20, seed=11, slide_px=512)
    synthesize_cohort(tmp_path / "a", config, progress=False)
    synthesize_cohort(tmp_path / "b", config, progress=False)
    for name in ("truth.csv", "table.csv.gz", "clinical.parquet"):
        assert digest(tmp_path / "a" / name) == digest(tmp_path / "b" / name), name
    slides_a = sorted((tmp_path / "a" / "slides").iterdir())
    assert [digest(p) for p in slides_a] == [digest(tmp_path / "b" / "slides" / p.name) for p in slides_a]


def test_synth_missing_fractions_and_signal(tmp_path):
    config = SynthConfig(
        patients=200, seed=5, missing_slide_fraction=0.3, missing_omics_fraction=0.2, slide_px=512
    )
    cohort = synthesize_cohort(tmp_path / "c", config, progress=False)
    availability = cohort.availability
    omics_present = availability[["mut", "cnv", "rnaseq"]].all(axis=1)
    assert 0.2 < 1 - availability["wsi"].mean() < 0.4
    assert 0.1 < 1 - omics_present.mean() < 0.3
    assert not (~availability["wsi"] & ~omics_present).any(), "every patient keeps at least one modality"
    truth = pd.read_csv(tmp_path / "c" / "truth.csv", index_col="patient_id").loc[cohort.clinical.index]
    clinical = cohort.clinical
    for factor in ("z_omic", "z_wsi"):
        assert harrell_c(clinical["survival_months"], clinical["event"], truth[factor]) > 0.6


def test_synth_rejects_bad_fractions():
    with pytest.raises(ValueError, match="missing_slide_fraction"):
        SynthConfig(missing_slide_fraction=1.5)


def test_cli_preprocess_train_evaluate(cohort_dir, tmp_path, capsys):
    features = cohort_dir / "features"
    assert (
        main(
            ["preprocess-slides", str(cohort_dir / "slides.parquet"), "--out", str(features), "--no-progress"]
        )
        == 0
    )
    run = tmp_path / "run"
    args = ["train", "--cohort", str(cohort_dir), "--out", str(run), "--epochs", "3", "--no-progress"]
    model_args = ["--latents", "4", "--latent-dim", "16", "--depth", "1"]
    omics_args = ["--top-k", "50", "--omics-select", "cox", "--signed-log", "rnaseq"]
    assert main([*args, *model_args, *omics_args]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["modalities"] == ["omic", "wsi"] and metrics["recipe"] == "demo"
    omics = load_trained(run / "checkpoint").preprocessor.omics
    assert (
        omics.config.signed_log == ("rnaseq",) and omics.config.top_k == 50 and omics.config.select == "cox"
    )
    assert len(omics.feature_names["omic"]) == 150  # 50 per table: mut, cnv, rnaseq
    assert set(metrics["test"]) == {"c_index", "c_index_ipcw", "integrated_brier_score"}
    assert (run / "checkpoint" / "model.pt").exists()
    assert main(["evaluate", "--run", str(run), "--cohort", str(cohort_dir)]) == 0
    printed = capsys.readouterr().out
    assert "c_index" in printed and "Kaplan-Meier plot" in printed
    evaluation = json.loads((run / "evaluation" / "evaluation.json").read_text())
    assert evaluation["c_index"] == pytest.approx(metrics["test"]["c_index"])
    png = (run / "evaluation" / "kaplan_meier_test.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_train_without_features_names_the_fix(tmp_path, capsys):
    cohort = tmp_path / "bare"
    assert main(["synth", "--out", str(cohort), "--patients", "20", "--seed", "1", "--no-progress"]) == 0
    capsys.readouterr()
    argv = [
        "train",
        "--cohort",
        str(cohort),
        "--out",
        str(tmp_path / "run"),
        "--features",
        str(tmp_path / "none"),
    ]
    assert main(argv) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1, "one line, no traceback"
    assert "have a file but neither features nor a quarantine entry" in error
    assert "run `healnet preprocess-slides" in error


def test_help_explains_every_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    for command in ("synth", "ingest", "validate", "preprocess-slides", "train", "evaluate", "registry"):
        assert command in printed
