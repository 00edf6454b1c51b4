import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from healnet.cli import main
from healnet.data.cohort import Cohort, CohortFormatError, data_hash, ingest
from healnet.data.readers import RawCohort, empty_quarantine, empty_slides

N_PATIENTS = 40


def patient(i: int) -> str:
    return f"TCGA-AB-{i:04d}"


def write_table(path: Path) -> Path:
    """PORPOISE table: 40 patients, every fourth with a DX2 slide, patient 3 with a bad survival row."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(N_PATIENTS):
        clinical = {"age": 50 + i, "survival_months": 5.0 + i, "censorship": i % 3 == 0, "is_female": i % 2}
        features = {
            "A_mut": i % 2,
            "A_cnv": -1,
            "A_rnaseq": rng.normal(),
            "B_rnaseq": np.nan if i == 5 else 0.1,
        }
        for slide in ("DX1", "DX2") if i % 4 == 0 else ("DX1",):
            rows.append(
                {
                    "case_id": patient(i),
                    "slide_id": f"{patient(i)}-01Z-00-{slide}.UID.svs",
                    **clinical,
                    **features,
                }
            )
    rows.append({**rows[-1], "slide_id": "extra.svs", "survival_months": -1.0})
    frame = pd.DataFrame(rows).assign(censorship=lambda f: f["censorship"].astype(int))
    frame.to_csv(path)
    return path


def write_slides(folder: Path, skip: set[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(N_PATIENTS):
        for slide in ("DX1", "DX2"):
            if patient(i) not in skip:
                (folder / f"{patient(i)}-01Z-00-{slide}.UID.svs").write_bytes(b"slide")
    return folder


def test_ingest_porpoise_save_load_round_trip(tmp_path):
    slide_dir = write_slides(tmp_path / "slides", skip={patient(8)})
    cohort = ingest(write_table(tmp_path / "table.csv.gz"), tmp_path / "cohort", seed=3, slide_dir=slide_dir)
    assert cohort.root == tmp_path / "cohort"
    loaded = Cohort.load(tmp_path / "cohort")
    pd.testing.assert_frame_equal(loaded.clinical, cohort.clinical)
    pd.testing.assert_frame_equal(loaded.slides, cohort.slides)
    pd.testing.assert_frame_equal(loaded.availability, cohort.availability)
    pd.testing.assert_frame_equal(loaded.splits, cohort.splits)
    pd.testing.assert_frame_equal(loaded.quarantine, cohort.quarantine)
    for modality in ("mut", "cnv", "rnaseq"):
        pd.testing.assert_frame_equal(loaded.omics[modality], cohort.omics[modality])
        assert (loaded.omics[modality].dtypes == "float32").all()
    assert loaded.meta == cohort.meta
    assert loaded.omic_modalities == ["mut", "cnv", "rnaseq"]

    meta = json.loads((tmp_path / "cohort" / "cohort.json").read_text())
    assert meta["format_version"] == 1 and meta["name"] == "table"
    assert (meta["rows_in"], meta["rows_kept"], meta["rows_quarantined"]) == (51, 50, 1)
    assert loaded.quarantine[["row", "id"]].values.tolist() == [[50, patient(39)]]
    assert loaded.clinical.index.tolist() == sorted(patient(i) for i in range(N_PATIENTS))
    assert loaded.clinical["event"].sum() == N_PATIENTS - 14


def test_slides_without_files_are_listed_and_unavailable(tmp_path):
    slide_dir = write_slides(tmp_path / "elsewhere", skip={patient(8)})
    cohort = ingest(write_table(tmp_path / "table.csv"), tmp_path / "cohort", slide_dir=slide_dir)
    assert len(cohort.slides) == 50
    missing = cohort.slides[cohort.slides["patient_id"] == patient(8)]
    assert len(missing) == 2 and missing["path"].isna().all()
    assert not cohort.availability.loc[patient(8), "wsi"]
    assert cohort.availability["wsi"].sum() == N_PATIENTS - 1
    assert (
        cohort.slide_path(f"{patient(1)}-01Z-00-DX1.UID.svs")
        == slide_dir / f"{patient(1)}-01Z-00-DX1.UID.svs"
    )
    with pytest.raises(FileNotFoundError, match="is listed but has no file"):
        cohort.slide_path(f"{patient(8)}-01Z-00-DX1.UID.svs")
    with pytest.raises(KeyError, match="not in this cohort's slide manifest"):
        cohort.slide_path("nowhere.svs")


def test_omic_rows_without_any_value_mean_the_modality_is_absent(tmp_path):
    table = pd.read_csv(write_table(tmp_path / "table.csv"), index_col=0)
    table.loc[table["case_id"] == patient(6), ["A_rnaseq", "B_rnaseq"]] = np.nan
    table.to_csv(tmp_path / "table.csv")
    cohort = ingest(tmp_path / "table.csv")
    assert cohort.root is None
    assert patient(6) not in cohort.omics["rnaseq"].index
    assert not cohort.availability.loc[patient(6), "rnaseq"] and cohort.availability.loc[patient(6), "cnv"]
    assert np.isnan(cohort.omics["rnaseq"].loc[patient(5), "B_rnaseq"])  # partly observed: kept


def test_slide_paths_inside_the_cohort_are_relative_and_move_with_it(tmp_path):
    write_slides(tmp_path / "cohort" / "slides", skip=set())
    ingest(write_table(tmp_path / "table.csv"), tmp_path / "cohort", slide_dir=tmp_path / "cohort" / "slides")
    stored = pd.read_parquet(tmp_path / "cohort" / "slides.parquet")
    assert stored["path"].str.startswith("slides/").all()
    shutil.copytree(tmp_path / "cohort", tmp_path / "moved")
    shutil.rmtree(tmp_path / "cohort")
    moved = Cohort.load(tmp_path / "moved")
    assert moved.slide_path(f"{patient(0)}-01Z-00-DX2.UID.svs").read_bytes() == b"slide"


def test_saving_elsewhere_makes_relative_paths_absolute(tmp_path):
    write_slides(tmp_path / "cohort" / "slides", skip=set())
    ingest(write_table(tmp_path / "table.csv"), tmp_path / "cohort", slide_dir=tmp_path / "cohort" / "slides")
    copy = ingest(tmp_path / "cohort", tmp_path / "copy")
    assert copy.root == tmp_path / "copy"
    stored = pd.read_parquet(tmp_path / "copy" / "slides.parquet")
    assert stored["path"].map(lambda p: Path(p).is_absolute()).all()
    assert Cohort.load(tmp_path / "copy").slide_path(f"{patient(0)}-01Z-00-DX1.UID.svs").is_file()


def test_patients_by_split(tmp_path):
    cohort = ingest(write_table(tmp_path / "table.csv"), folds=4, holdout_repeats=2)
    everyone = set(cohort.clinical.index)
    for repeat in (0, 1):
        roles = [set(cohort.patients("holdout", repeat, 0, role)) for role in ("train", "val", "test")]
        assert set.union(*roles) == everyone and sum(map(len, roles)) == N_PATIENTS
    tests = [p for fold in range(4) for p in cohort.patients("kfold", 0, fold, "test")]
    assert sorted(tests) == sorted(everyone)
    assert cohort.patients() == cohort.patients("holdout", 0, 0, "train")
    with pytest.raises(ValueError, match=r"no kfold split with repeat 0, fold 4; available .* \(0, 3\)"):
        cohort.patients("kfold", 0, 4, "test")
    with pytest.raises(ValueError, match="role one of"):
        cohort.patients(role="training")


def test_load_names_the_missing_file(tmp_path):
    with pytest.raises(CohortFormatError, match="is not a cohort folder: missing cohort.json"):
        Cohort.load(tmp_path)
    ingest(write_table(tmp_path / "table.csv"), tmp_path / "cohort")
    (tmp_path / "cohort" / "omics" / "cnv.parquet").unlink()
    (tmp_path / "cohort" / "splits.parquet").unlink()
    with pytest.raises(CohortFormatError, match=r"missing splits.parquet, omics/cnv.parquet"):
        Cohort.load(tmp_path / "cohort")
    (tmp_path / "cohort" / "cohort.json").write_text('{"format_version": 1}')
    with pytest.raises(CohortFormatError, match=r"missing key\(s\) \['name'"):
        Cohort.load(tmp_path / "cohort")


def test_corrupt_cohort_files_are_a_cohort_format_error_naming_the_file(tmp_path):
    root = tmp_path / "cohort"
    ingest(write_table(tmp_path / "table.csv"), root)
    meta = (root / "cohort.json").read_text()
    clinical = (root / "clinical.parquet").read_bytes()

    (root / "clinical.parquet").write_bytes(clinical[: len(clinical) // 2])  # truncated
    with pytest.raises(CohortFormatError, match=r"clinical.parquet: not a readable parquet table"):
        Cohort.load(root)
    (root / "clinical.parquet").write_bytes(clinical)
    pd.DataFrame({"x": [1]}).to_parquet(root / "omics" / "cnv.parquet")
    with pytest.raises(CohortFormatError, match=r"cnv.parquet: no patient_id column"):
        Cohort.load(root)

    for text, message in [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object, got list"),
        (meta.replace('"format_version": 1', '"format_version": 99'), "format_version 99, expected 1"),
    ]:
        (root / "cohort.json").write_text(text)
        with pytest.raises(CohortFormatError, match=message):
            Cohort.load(root)


def write_gdc(path: Path) -> Path:
    header = [
        "case_id",
        "case_submitter_id",
        "age_at_diagnosis",
        "days_to_death",
        "days_to_last_follow_up",
        "gender",
        "vital_status",
    ]
    rows = [
        [
            f"uuid{i}",
            patient(i),
            str(20000 + i),
            str(100 + i) if i % 3 else "'--",
            "'--" if i % 3 else "900",
            "female",
            "Dead" if i % 3 else "Alive",
        ]
        for i in range(30)
    ]
    rows.append(["uuid-x", patient(99), "'--", "'--", "'--", "'--", "Alive"])
    path.write_text("\n".join("\t".join(row) for row in [header, *rows]) + "\n")
    return path


def write_cbioportal(folder: Path) -> Path:
    folder.mkdir()
    meta = ["#a\t#b\t#c", "#a\t#b\t#c", "#STRING\tNUMBER\tSTRING", "#1\t1\t1"]
    patients = [f"{patient(i)}\t{10 + i}\t{i % 2}:{'DECEASED' if i % 2 else 'LIVING'}" for i in range(30)]
    (folder / "data_clinical_patient.txt").write_text(
        "\n".join([*meta, "PATIENT_ID\tOS_MONTHS\tOS_STATUS", *patients]) + "\n"
    )
    samples = [f"{patient(i)}\t{patient(i)}-01\tBLCA" for i in range(30)]
    (folder / "data_clinical_sample.txt").write_text(
        "\n".join([*meta, "PATIENT_ID\tSAMPLE_ID\tCANCER_TYPE", *samples]) + "\n"
    )
    cna = [
        "Hugo_Symbol\t" + "\t".join(f"{patient(i)}-01" for i in range(20)),
        "TP53\t" + "\t".join(["1"] * 20),
    ]
    (folder / "data_cna.txt").write_text("\n".join(cna) + "\n")
    return folder


def test_ingest_detects_gdc_and_cbioportal(tmp_path):
    gdc = ingest(write_gdc(tmp_path / "clinical.tsv"), tmp_path / "gdc")
    assert len(gdc.clinical) == 30 and gdc.omic_modalities == [] and gdc.slides.empty
    assert gdc.availability.columns.tolist() == ["wsi"] and not gdc.availability["wsi"].any()
    assert gdc.meta["rows_quarantined"] == 1
    cbio = ingest(write_cbioportal(tmp_path / "study"), tmp_path / "cbio", name="study-x")
    assert cbio.meta["name"] == "study-x" and cbio.omic_modalities == ["cnv"]
    assert cbio.availability["cnv"].sum() == 20 and len(cbio.clinical) == 30
    assert Cohort.load(tmp_path / "cbio").omics["cnv"].columns.tolist() == ["TP53_cnv"]


def test_ingest_of_a_cohort_folder_loads_it(tmp_path):
    first = ingest(write_table(tmp_path / "table.csv"), tmp_path / "cohort", name="first")
    again = ingest(tmp_path / "cohort", name="ignored", seed=9)
    assert again.meta == first.meta
    pd.testing.assert_frame_equal(again.splits, first.splits)


def test_unknown_inputs_say_what_was_expected(tmp_path):
    (tmp_path / "other.csv").write_text("a,b\n1,2\n")
    with pytest.raises(CohortFormatError, match=r"unknown table; expected PORPOISE columns \['case_id'"):
        ingest(tmp_path / "other.csv")
    (tmp_path / "data.json").write_text("{}")
    with pytest.raises(CohortFormatError, match=r"expected a .csv/.csv.gz/.tsv table, a cBioPortal folder"):
        ingest(tmp_path / "data.json")
    (tmp_path / "empty").mkdir()
    with pytest.raises(
        CohortFormatError, match=r"expected a cohort folder \(cohort.json\) or a cBioPortal study"
    ):
        ingest(tmp_path / "empty")
    with pytest.raises(CohortFormatError, match="missing.csv: no such file or folder"):
        ingest(tmp_path / "missing.csv")


def test_from_raw_rejects_inconsistent_or_empty_input():
    clinical = pd.DataFrame(
        {"survival_months": [1.0], "event": [1], "age": [50.0], "is_female": pd.array([1], dtype="Int8")},
        index=pd.Index([patient(0)], name="patient_id"),
    )
    stray_omics = {"cnv": pd.DataFrame({"A_cnv": [1.0]}, index=[patient(1)])}
    with pytest.raises(
        CohortFormatError, match=r"cnv lists patients without a clinical row: \['TCGA-AB-0001'\]"
    ):
        Cohort.from_raw(RawCohort(clinical, stray_omics, empty_slides(), empty_quarantine(), rows_in=1))
    quarantine = pd.DataFrame(
        {"source": ["t.csv"], "row": [0], "id": [patient(0)], "reason": ["survival_months is missing"]}
    )
    with pytest.raises(CohortFormatError, match=r"t.csv: no usable patient; 1 of 1 row\(s\) quarantined"):
        Cohort.from_raw(
            RawCohort(clinical.iloc[:0], {}, empty_slides(), quarantine, rows_in=1), source="t.csv"
        )


def test_cli_ingest_writes_folder_and_prints_summary(tmp_path, capsys):
    slide_dir = write_slides(tmp_path / "slides", skip={patient(8)})
    table = write_table(tmp_path / "table.csv.gz")
    argv = [
        "ingest",
        str(table),
        "--out",
        str(tmp_path / "out"),
        "--name",
        "demo",
        "--slide-dir",
        str(slide_dir),
    ]
    assert main([*argv, "--folds", "3", "--seed", "1"]) == 0
    printed = capsys.readouterr().out
    assert f"patients: {N_PATIENTS} (26 events)" in printed
    assert "rnaseq: 2 features, 40 patients" in printed
    assert "slides: 50 listed, 48 with a file, 39 patients with a slide file" in printed
    assert "rows: 51 read, 50 kept, 1 quarantined" in printed
    assert "table.csv.gz row 50 (TCGA-AB-0039): survival_months must be positive" in printed
    cohort = Cohort.load(tmp_path / "out")
    assert cohort.meta["name"] == "demo" and cohort.meta["seed"] == 1
    assert sorted(cohort.splits.loc[cohort.splits["scheme"] == "kfold", "fold"].unique()) == [0, 1, 2]


def test_cli_ingest_reports_bad_input(tmp_path, capsys):
    assert main(["ingest", str(tmp_path / "missing.csv"), "--out", str(tmp_path / "out")]) == 2
    assert "missing.csv: no such file or folder" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_real_blca_cohort_splits_by_patient(blca_table, tmp_path):
    cohort = ingest(blca_table, tmp_path / "blca")
    loaded = Cohort.load(tmp_path / "blca")
    assert len(loaded.clinical) == 373 and len(loaded.slides) == 437 and loaded.clinical["event"].sum() == 169
    assert (loaded.meta["rows_in"], loaded.meta["rows_kept"], loaded.meta["rows_quarantined"]) == (
        437,
        437,
        0,
    )
    assert not loaded.availability["wsi"].any()
    joined = loaded.slides.merge(loaded.splits, on="patient_id")
    assert len(joined) == 437 * 6  # 1 holdout + 5 K-fold splits
    assert (joined.groupby(["scheme", "repeat", "fold", "patient_id"])["role"].nunique() == 1).all()
    test_counts = loaded.splits[loaded.splits["role"] == "test"].groupby(["scheme", "patient_id"]).size()
    assert (test_counts.loc["kfold"] == 1).all() and len(test_counts.loc["kfold"]) == 373
    pd.testing.assert_frame_equal(loaded.omics["rnaseq"], cohort.omics["rnaseq"])


def test_a_byte_order_mark_or_quoted_header_is_still_recognised(tmp_path):
    plain = write_table(tmp_path / "table.csv")
    marked = tmp_path / "marked.csv"
    marked.write_bytes(b"\xef\xbb\xbf" + plain.read_bytes())
    assert len(ingest(marked).clinical) == N_PATIENTS
    gdc = write_gdc(tmp_path / "clinical.tsv")
    (tmp_path / "marked.tsv").write_bytes(b"\xef\xbb\xbf" + gdc.read_bytes())
    assert len(ingest(tmp_path / "marked.tsv").clinical) == 30
    quoted = tmp_path / "quoted.csv"  # R's write.csv quotes every column name
    pd.read_csv(plain, index_col=0).to_csv(quoted, quoting=1)
    assert len(ingest(quoted).clinical) == N_PATIENTS


def test_a_patient_whose_only_slide_is_foreign_keeps_clinical_and_omics(tmp_path):
    table = pd.read_csv(write_table(tmp_path / "table.csv"), index_col=0)
    table.loc[table["case_id"] == patient(1), "slide_id"] = f"{patient(2)}-01Z-00-DX9.UID.svs"
    table.to_csv(tmp_path / "table.csv")
    cohort = ingest(tmp_path / "table.csv", tmp_path / "cohort")
    assert patient(1) in cohort.clinical.index and patient(1) in cohort.omics["rnaseq"].index
    assert patient(1) not in set(cohort.slides["patient_id"])
    foreign = cohort.quarantine[cohort.quarantine["id"] == patient(1)]
    assert foreign["reason"].str.contains(f"is a slide of patient {patient(2)}, not {patient(1)}").all()
    assert (cohort.meta["rows_in"], cohort.meta["rows_kept"], cohort.meta["rows_quarantined"]) == (51, 49, 2)


def test_data_hash_follows_the_splits_and_the_code_not_the_time_of_writing(tmp_path):
    table = write_table(tmp_path / "table.csv")
    ingest(table, tmp_path / "first", seed=0)
    ingest(table, tmp_path / "again", seed=0)  # the same inputs, written later elsewhere
    assert json.loads((tmp_path / "first" / "cohort.json").read_text())["seed"] == 0
    first = data_hash(tmp_path / "first", code_version="1.0 abc")
    assert re.fullmatch(r"[0-9a-f]{64}", first)
    assert data_hash(tmp_path / "again", code_version="1.0 abc") == first
    assert data_hash(tmp_path / "first", code_version="1.0 def") != first

    ingest(table, tmp_path / "first", seed=1)  # re-ingested into the same folder with another split seed
    assert not Cohort.load(tmp_path / "first").splits.equals(Cohort.load(tmp_path / "again").splits)
    assert data_hash(tmp_path / "first", code_version="1.0 abc") != first


def test_data_hash_covers_every_table_a_step_reads_and_the_slide_files(tmp_path):
    root = tmp_path / "cohort"
    slide_dir = write_slides(tmp_path / "slides", skip=set())
    ingest(write_table(tmp_path / "table.csv"), root, slide_dir=slide_dir)
    before = data_hash(root, code_version="")
    for name in ("clinical.parquet", "availability.parquet", "quarantine.parquet", "omics/cnv.parquet"):
        frame = pd.read_parquet(root / name)
        frame[frame.columns[::-1]].to_parquet(root / name, index=False)  # columns reordered: another file
        assert data_hash(root, code_version="") != before, name
        frame.to_parquet(root / name, index=False)
        assert data_hash(root, code_version="") == before, name
    slide = slide_dir / f"{patient(0)}-01Z-00-DX1.UID.svs"
    stat = slide.stat()
    os.utime(slide, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # re-scanned: same name, new file
    assert data_hash(root, code_version="") != before
    (root / "splits.parquet").unlink()
    with pytest.raises(CohortFormatError, match="missing splits.parquet"):
        data_hash(root, code_version="")
