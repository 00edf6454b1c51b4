import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
from conftest import FIXTURES, REPO_ROOT

from healnet.cli import main
from healnet.data.cohort import Cohort, ingest
from healnet.validation import DEFAULT_THRESHOLDS, validate, validate_cohort
from healnet.validation.summaries import accounting_table
from healnet.validation.thresholds import ThresholdError, with_min_events_per_split, with_quarantine_limit

SLIDE = FIXTURES / "CMU-1-Small-Region.svs"
N_PATIENTS = 40  # with 2 quarantined rows: 4.8 %, inside the 5 % quarantine threshold


def cohort_tables(n: int = N_PATIENTS) -> dict:
    """A small valid cohort in the canonical layout: 40 patients, two omics modalities, two slides."""
    rng = np.random.default_rng(7)
    ids = [f"TCGA-AB-{i:04d}" for i in range(n)]
    clinical = pd.DataFrame(
        {
            "patient_id": ids,
            "survival_months": rng.uniform(1.0, 120.0, n),
            "event": np.arange(n) % 2,
            "age": rng.uniform(35.0, 85.0, n),
            "is_female": pd.array(np.arange(n) % 3 == 0, dtype="Int8"),
        }
    )
    omic_ids = ids[:18]
    mut = pd.DataFrame(
        (np.arange(18)[:, None] // np.arange(1, 5)) % 2, columns=[f"G{i}_mut" for i in range(4)]
    )
    rnaseq = pd.DataFrame(rng.gamma(2.0, 300.0, (18, 4)), columns=[f"G{i}_rnaseq" for i in range(4)])
    omics = {
        name: frame.astype(np.float32).assign(patient_id=omic_ids)
        for name, frame in (("mut", mut), ("rnaseq", rnaseq))
    }
    slides = pd.DataFrame(
        {
            "patient_id": ids[:2],
            "slide_id": ["slide-0", "slide-1"],
            "path": [str(SLIDE), "slides/slide-1.svs"],
        }
    )
    quarantine = pd.DataFrame(
        {
            "source": ["table.csv", "table.csv"],
            "row": [3, 9],
            "id": ["TCGA-X", "TCGA-AB-0001"],
            "reason": ["bad barcode", "duplicate patient"],
        }
    )
    meta = {"format_version": 1, "name": "demo", "source": "table.csv", "omic_modalities": ["mut", "rnaseq"]}
    meta.update(rows_in=n + 2, rows_kept=n, rows_quarantined=2, created="2024-01-01T00:00:00")
    return {"clinical": clinical, "omics": omics, "slides": slides, "quarantine": quarantine, "meta": meta}


def write_cohort(root: Path, tables: dict) -> Path:
    """Write the canonical layout of docs/architecture.md."""
    (root / "omics").mkdir(parents=True)
    (root / "slides").mkdir()
    (root / "slides" / "slide-1.svs").symlink_to(SLIDE)  # a path relative to the cohort folder
    (root / "cohort.json").write_text(json.dumps(tables["meta"]))
    tables["clinical"].to_parquet(root / "clinical.parquet", index=False)
    for name, frame in tables["omics"].items():
        frame.to_parquet(root / "omics" / f"{name}.parquet", index=False)
    tables["slides"].to_parquet(root / "slides.parquet", index=False)
    tables["quarantine"].to_parquet(root / "quarantine.parquet", index=False)
    ids = tables["clinical"]["patient_id"]
    availability = pd.DataFrame({"patient_id": ids})
    for name, frame in tables["omics"].items():
        availability[name] = ids.isin(frame["patient_id"])
    availability["wsi"] = ids.isin(tables["slides"]["patient_id"])
    availability.to_parquet(root / "availability.parquet", index=False)
    default_splits = {"patient_id": ids, "scheme": "holdout", "repeat": 0, "fold": 0, "role": "train"}
    tables.get("splits", pd.DataFrame(default_splits)).to_parquet(root / "splits.parquet", index=False)
    return root


def add_clinical_row(tables: dict, **values) -> None:
    row = tables["clinical"].iloc[[0]].assign(**values)
    tables["clinical"] = pd.concat([tables["clinical"], row], ignore_index=True)


def set_value(tables: dict, table: str, row: int, column: str, value) -> None:
    frame = tables["omics"][table] if table in tables["omics"] else tables[table]
    frame.loc[row, column] = value


def set_slide_path(tables: dict, path: Path) -> None:
    tables["slides"].loc[1, "path"] = str(path)


def write_random_bytes(path: Path) -> Path:
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    return path


def write_tiff_without_resolution(path: Path) -> Path:
    image = np.random.default_rng(0).integers(0, 255, (256, 256, 3), dtype=np.uint8)
    tifffile.imwrite(path, image, tile=(128, 128), photometric="rgb")
    return path


def add_omics_row(tables: dict, patient_id: str) -> None:
    frame = tables["omics"]["mut"]
    tables["omics"]["mut"] = pd.concat(
        [frame, frame.iloc[[0]].assign(patient_id=patient_id)], ignore_index=True
    )


# defect name -> (mutation(tables, tmp_path), expectation description, text of the example row)
DEFECTS = {
    "bad barcode": (
        lambda t, _: add_clinical_row(t, patient_id="TCGA-1-BAD"),
        "patient ids are TCGA patient barcodes",
        "patient_id='TCGA-1-BAD'",
    ),
    "duplicate patient": (
        lambda t, _: add_clinical_row(t),
        "one row per patient",
        "patient_id='TCGA-AB-0000'",
    ),
    "survival <= 0": (
        lambda t, _: set_value(t, "clinical", 2, "survival_months", 0.0),
        "survival_months > 0",
        "patient_id='TCGA-AB-0002'",
    ),
    "event = 2": (
        lambda t, _: set_value(t, "clinical", 3, "event", 2),
        "event is 0 or 1",
        "event=2, patient_id='TCGA-AB-0003'",
    ),
    "event rate too high": (
        lambda t, _: set_value(t, "clinical", slice(None), "event", 1),
        "event rate in [0.02, 0.95]",
        "failed: observed 1",
    ),
    "age out of range": (
        lambda t, _: set_value(t, "clinical", 4, "age", 140.0),
        "age in [0.0, 120.0]",
        "age=140.0, patient_id='TCGA-AB-0004'",
    ),
    "constant omics feature": (
        lambda t, _: set_value(t, "mut", slice(None), "G2_mut", 1.0),
        "no constant feature",
        "modality='mut', feature='G2_mut'",
    ),
    "non-finite omics value": (
        lambda t, _: set_value(t, "rnaseq", 5, "G1_rnaseq", np.inf),
        "all omics values of a patient are finite",
        "patient_id='TCGA-AB-0005', modality='rnaseq'",
    ),
    "omics patient not in clinical": (
        lambda t, _: add_omics_row(t, "TCGA-ZZ-9999"),
        "every omics patient is in the clinical table",
        "patient_id='TCGA-ZZ-9999'",
    ),
    "missing slide file": (
        lambda t, tmp: set_slide_path(t, tmp / "gone.svs"),
        "slide file exists",
        "slide_id='slide-1'",
    ),
    "unreadable slide": (
        lambda t, tmp: set_slide_path(t, write_random_bytes(tmp / "random.svs")),
        "OpenSlide opens the slide",
        "slide_id='slide-1'",
    ),
    "slide without mpp or objective power": (
        lambda t, tmp: set_slide_path(t, write_tiff_without_resolution(tmp / "plain.tif")),
        "slide has mpp or objective power",
        "slide_id='slide-1'",
    ),
    "omics feature mostly missing": (
        lambda t, _: set_value(t, "rnaseq", slice(0, 9), "G3_rnaseq", np.nan),
        "each feature missing for at most 20% of patients",
        "feature='G3_rnaseq'",
    ),
}


def test_import_does_not_load_great_expectations():
    code = "import sys, healnet.validation; assert 'great_expectations' not in sys.modules, 'imported GE'"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO_ROOT, env=env, timeout=60)


def test_good_cohort_passes_and_writes_both_reports(tmp_path):
    root = write_cohort(tmp_path / "cohort", cohort_tables())
    report = validate(root, tmp_path / "out")

    assert report.success, report.failures()
    assert report.failures() == []
    assert set(report.suites) == {
        "clinical",
        "omics_features",
        "omics_samples",
        "slides",
        "accounting",
        "splits",
    }
    assert report.suites["splits"].rows == 1  # the one holdout split of this cohort: every patient trains
    assert report.suites["slides"].rows == 2
    saved = json.loads(report.json_path.read_text())
    assert saved["success"] is True
    assert saved["thresholds"]["version"] == DEFAULT_THRESHOLDS.version
    regex = next(
        e
        for e in saved["suites"]["clinical"]["expectations"]
        if e["expectation"] == "expect_column_values_to_match_regex"
    )
    assert regex == {
        **regex,
        "success": True,
        "column": "patient_id",
        "unexpected_count": 0,
        "element_count": N_PATIENTS,
    }
    event_rate = next(
        e for e in saved["suites"]["clinical"]["expectations"] if e["description"].startswith("event rate")
    )
    assert event_rate["observed"] == pytest.approx(0.5)
    markdown = report.markdown_path.read_text(encoding="utf-8")
    assert "rows in 42 = rows kept 40 + rows quarantined 2" in markdown
    assert "| bad barcode | 1 |" in markdown and "| duplicate patient | 1 |" in markdown
    assert "| ✓ | patient ids are TCGA patient barcodes | patient_id |" in markdown
    assert "✗" not in markdown


@pytest.mark.parametrize("defect", list(DEFECTS))
def test_each_defect_fails_with_a_message_naming_it(tmp_path, defect):
    mutate, description, example = DEFECTS[defect]
    tables = cohort_tables()
    mutate(tables, tmp_path)
    report = validate(write_cohort(tmp_path / "cohort", tables), tmp_path / "out")

    assert not report.success
    messages = [m for m in report.failures() if f"'{description}" in m]
    assert messages, f"no failure names {description!r}: {report.failures()}"
    assert example in messages[0]
    markdown = report.markdown_path.read_text(encoding="utf-8")
    assert f"| ✗ | {description}" in markdown
    saved = json.loads(report.json_path.read_text())
    assert saved["success"] is False and any(description in m for m in saved["failures"])


def test_row_accounting_that_does_not_add_up_fails(tmp_path):
    # Cohort.load already refuses such a folder, so build the in-memory cohort directly
    cohort = Cohort.load(write_cohort(tmp_path / "cohort", cohort_tables()))
    cohort.meta["rows_in"] = 25
    report = validate_cohort(cohort, tmp_path / "out")
    assert not report.success
    assert report.suites["accounting"].success is False
    assert "rows in = rows kept + rows quarantined" in report.failures()[0]
    assert (
        "rows in 25 = rows kept 40 + rows quarantined 2  (DOES NOT ADD UP)"
        in report.markdown_path.read_text()
    )


def test_raw_table_is_ingested_on_the_fly(blca_table, tmp_path):
    report = validate(blca_table, tmp_path / "out")
    assert report.success, report.failures()
    assert report.rows_in == report.rows_kept + report.rows_quarantined == 437
    assert report.suites["omics_features"].rows > 2000
    assert report.notes == ["437 slide(s) are listed without a file; their file checks were skipped"]
    assert "Note: 437 slide(s)" in report.markdown_path.read_text(encoding="utf-8")


def test_a_mostly_quarantined_real_table_fails_naming_the_reasons_and_counts(blca_table, tmp_path):
    """The real BLCA table with negative survival times in 30 % of its rows: validation must stop it."""
    table = pd.read_csv(blca_table)
    bad = np.random.default_rng(0).choice(len(table), int(0.3 * len(table)), replace=False)
    table.loc[table.index[bad], "survival_months"] *= -1
    table.to_csv(tmp_path / "tcga_blca_all_clean.csv.gz", index=False)
    report = validate(tmp_path / "tcga_blca_all_clean.csv.gz", tmp_path / "out")
    assert not report.success and report.rows_quarantined == len(bad) == 131
    failures = report.failures()
    assert any("at most 5% of the rows are quarantined" in message for message in failures)
    assert any("at most 5% of the patients are lost" in message for message in failures)
    assert "quarantined 131 of 437 rows; reasons: survival_months must be positive" in failures[-1]
    # the threshold is a parameter: allowing 35 % lets the same table through
    assert validate(
        tmp_path / "tcga_blca_all_clean.csv.gz", tmp_path / "loose", with_quarantine_limit(0.35)
    ).success
    assert (
        main(["validate", str(tmp_path / "tcga_blca_all_clean.csv.gz"), "--out", str(tmp_path / "cli")]) == 1
    )


def test_thresholds_change_the_verdict(tmp_path):
    root = write_cohort(tmp_path / "cohort", cohort_tables())
    strict = replace(DEFAULT_THRESHOLDS, version="test-strict", event_rate_max=0.4)
    report = validate(root, tmp_path / "out", strict)
    assert [m.split(":")[0] for m in report.failures()] == ["clinical"]
    assert "event rate in [0.02, 0.4]" in report.failures()[0]
    assert json.loads(report.json_path.read_text())["thresholds"]["version"] == "test-strict"


def test_cli_exit_codes(tmp_path, capsys):
    good = write_cohort(tmp_path / "good", cohort_tables())
    assert main(["validate", str(good), "--out", str(tmp_path / "good-report")]) == 0
    assert "validation PASSED" in capsys.readouterr().out
    assert (tmp_path / "good-report" / "validation.md").exists()

    tables = cohort_tables()
    set_value(tables, "clinical", 3, "event", 2)
    bad = write_cohort(tmp_path / "bad", tables)
    assert main(["validate", str(bad), "--out", str(tmp_path / "bad-report")]) == 1
    captured = capsys.readouterr()
    assert "validation FAILED" in captured.out
    assert "'event is 0 or 1'" in captured.err and "patient_id='TCGA-AB-0003'" in captured.err

    assert main(["validate", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r")]) == 2
    assert "no such file or folder" in capsys.readouterr().err


def with_splits(tables: dict) -> dict:
    """Holdout train/val/test and two K-fold test folds; patient 38 (no event) alone in the holdout test."""
    ids = tables["clinical"]["patient_id"].tolist()  # patient i has an event when i is odd
    holdout = ["train" if i < 30 else "test" if i == 38 else "val" for i in range(40)]
    kfold = (
        ["test" if i < 20 else "train" for i in range(40)],
        ["train" if i < 20 else "test" for i in range(40)],
    )
    frames = [pd.DataFrame({"patient_id": ids, "scheme": "holdout", "repeat": 0, "fold": 0, "role": holdout})]
    frames += [
        pd.DataFrame({"patient_id": ids, "scheme": "kfold", "repeat": 0, "fold": fold, "role": roles})
        for fold, roles in enumerate(kfold)
    ]
    tables["splits"] = pd.concat(frames, ignore_index=True)
    return tables


def test_a_split_without_events_fails_naming_the_split_and_its_count(tmp_path):
    root = write_cohort(tmp_path / "cohort", with_splits(cohort_tables()))
    report = validate(root, tmp_path / "out")
    assert not report.success
    assert report.suites["splits"].rows == 5  # holdout train, val, test; K-fold folds 0 and 1 test
    (message,) = report.failures()
    assert message.startswith("splits: 'at least 1 event(s) in every split (holdout train/val/test, K-fold")
    assert "1 of 5 rows unexpected; examples: events=0, split='holdout repeat 0 test', patients=1" in message
    assert "holdout repeat 0 test" in report.markdown_path.read_text(encoding="utf-8")

    assert validate(root, tmp_path / "off", with_min_events_per_split(0)).success
    stricter = validate(root, tmp_path / "strict", with_min_events_per_split(6))  # val: 5 events
    assert "2 of 5 rows unexpected" in stricter.failures()[0]
    assert "events=5, split='holdout repeat 0 val', patients=9" in stricter.failures()[0]
    assert main(["validate", str(root), "--out", str(tmp_path / "cli")]) == 1
    assert main(["validate", str(root), "--out", str(tmp_path / "cli"), "--min-events-per-split", "0"]) == 0
    with pytest.raises(ThresholdError, match="min_events_per_split must be >= 0, got -1"):
        with_min_events_per_split(-1)


def test_a_k_fold_test_fold_without_events_fails(tmp_path):
    tables = with_splits(cohort_tables())
    splits = tables["splits"]
    splits.loc[splits["scheme"] == "holdout", "role"] = ["train"] * 28 + ["val"] * 6 + ["test"] * 6
    fold_0 = (splits["scheme"] == "kfold") & (splits["fold"] == 0)
    number = splits.loc[fold_0, "patient_id"].str[-4:].astype(int)
    splits.loc[fold_0, "role"] = np.where((number < 20) & (number % 2 == 0), "test", "train")  # no events
    report = validate(write_cohort(tmp_path / "cohort", tables), tmp_path / "out")
    (message,) = report.failures()
    assert "examples: events=0, split='kfold repeat 0 fold 0 test', patients=10" in message


def test_split_patients_without_a_clinical_row_fail(tmp_path):
    tables = with_splits(cohort_tables())
    tables["splits"].loc[0, "patient_id"] = "TCGA-ZZ-9999"
    report = validate(
        write_cohort(tmp_path / "cohort", tables), tmp_path / "out", with_min_events_per_split(0)
    )
    (message,) = report.failures()
    assert "'every patient of a split has a clinical row'" in message
    assert "patients_without_clinical=1, split='holdout repeat 0 train', patients=30" in message


def test_quarantined_samples_of_kept_patients_lose_no_patient(tmp_path):
    """cBioPortal: sample rows of patients that are kept, or of one patient, must not count as lost patients."""
    study = tmp_path / "study"
    study.mkdir()
    header = "#Patient\t#Months\t#Status\n#x\t#x\t#x\n#STRING\tNUMBER\tSTRING\n#1\t1\t1\n"
    patients = [f"TCGA-AB-{i:04d}\t{10 + i}\t{i % 2}:{'DECEASED' if i % 2 else 'LIVING'}" for i in range(60)]
    lost = "TCGA-AB-9999\t\t1:DECEASED"  # no survival time: this patient is lost
    (study / "data_clinical_patient.txt").write_text(
        header + "\n".join(["PATIENT_ID\tOS_MONTHS\tOS_STATUS", *patients, lost]) + "\n"
    )
    samples = [f"TCGA-AB-{i:04d}\tTCGA-AB-{i:04d}-01" for i in range(60)]
    samples += [f"TCGA-AB-{i:04d}\tTCGA-AB-{i:04d}-1X" for i in range(3)]  # bad barcodes, kept patients
    samples += [f"TCGA-AB-9999\tTCGA-AB-9999-0{i}" for i in (1, 6)]  # two samples of the lost patient
    (study / "data_clinical_sample.txt").write_text(
        header + "\n".join(["PATIENT_ID\tSAMPLE_ID", *samples]) + "\n"
    )
    cohort = ingest(study, tmp_path / "cohort")
    assert len(cohort.quarantine) == 6 and cohort.meta["rows_in"] == 61 + 65  # 4.8 % of the rows
    accounting = accounting_table(cohort.meta, "study", cohort.quarantine, cohort.clinical.index)
    # one lost patient of 61; counting each quarantined sample id as a patient gave 6 of 66
    assert accounting["quarantined_patient_fraction"].item() == pytest.approx(1 / 61)
    report = validate(tmp_path / "cohort", tmp_path / "out")
    assert report.suites["accounting"].success, report.failures()


def test_markup_from_the_data_never_reaches_the_markdown_report_raw(tmp_path):
    markup = "<img src=x onerror=alert(1)>"
    tables = cohort_tables()
    set_value(tables, "clinical", 4, "patient_id", markup)  # fails the barcode expectation: an example row
    set_value(tables, "quarantine", 0, "reason", markup)
    set_value(tables, "slides", 1, "slide_id", f"slide [x](javascript:alert(1)) {markup}")
    report = validate(write_cohort(tmp_path / "cohort", tables), tmp_path / "out")

    markdown = report.markdown_path.read_text(encoding="utf-8")
    assert not report.success and markup in json.dumps(report.to_dict())
    assert "<img" not in markdown and "](javascript" not in markdown
    assert "&lt;img src=x onerror=alert(1)>" in markdown  # shown, as text
