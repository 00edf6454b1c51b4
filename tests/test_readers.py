import gzip
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from healnet.data.cohort import Cohort
from healnet.data.readers import (
    DAYS_PER_MONTH,
    DAYS_PER_YEAR,
    CohortFormatError,
    read_cbioportal,
    read_gdc_clinical,
    read_porpoise_table,
)

CLINICAL = [
    "case_id",
    "slide_id",
    "age",
    "site",
    "survival_months",
    "censorship",
    "is_female",
    "oncotree_code",
    "train",
]


def porpoise_row(patient: str, slide: str, months=12.0, censorship=0, rna=0.5, **changes) -> dict:
    row = {
        "case_id": patient,
        "slide_id": f"{patient}-01Z-00-{slide}.ABCD1234.svs",
        "age": 60,
        "site": patient[5:7],
        "survival_months": months,
        "censorship": censorship,
        "is_female": 1,
        "oncotree_code": "BLCA",
        "train": 1.0,
        "TP53_rnaseq": rna,
        "EGFR_rnaseq": -0.25,
        "TP53_cnv": 1,
        "TP53_mut": 0,
    }
    row.update(changes)
    return row


def porpoise_rows() -> list[dict]:
    """Row i of the written table is element i; the comments say what the reader must do with it."""
    return [
        porpoise_row("TCGA-AA-0001", "DX1"),  # kept, two slides
        porpoise_row("TCGA-AA-0001", "DX2"),
        porpoise_row("TCGA-AA-0002", "DX1", months=40.0, censorship=1),  # kept, censored
        porpoise_row("TCGA-AA-0003", "DX1", months=np.nan),  # missing survival
        porpoise_row("TCGA-AA-0004", "DX1", months=0.0),  # non-positive survival
        porpoise_row("TCGA-AA-0005", "DX1", censorship=2),  # bad censorship
        porpoise_row("BAD-0006", "DX1"),  # invalid barcode
        porpoise_row("TCGA-AA-0007", "DX1", rna=0.5),  # two slides that disagree
        porpoise_row("TCGA-AA-0007", "DX2", rna=0.9),
        porpoise_row("TCGA-AA-0008", "DX1", EGFR_rnaseq="abc"),  # non-numeric feature
        porpoise_row("TCGA-AA-0002", "DX1", months=40.0, censorship=1),  # repeats row 2's slide
        porpoise_row("TCGA-AA-0009", "DX1", is_female=np.nan, age=np.nan),  # kept, sex and age unknown
    ]


def write_porpoise(path: Path, rows: list[dict]) -> Path:
    """The PORPOISE layout: unnamed index column first, clinical columns, then features."""
    pd.DataFrame(rows).to_csv(path)
    return path


def test_porpoise_table_one_row_per_patient_every_slide_kept(tmp_path):
    raw = read_porpoise_table(write_porpoise(tmp_path / "table.csv.gz", porpoise_rows()))
    assert raw.clinical.index.tolist() == ["TCGA-AA-0001", "TCGA-AA-0002", "TCGA-AA-0009"]
    assert raw.clinical.index.name == "patient_id"
    assert raw.clinical["event"].tolist() == [1, 0, 1]
    assert raw.clinical["survival_months"].tolist() == [12.0, 40.0, 12.0]
    assert raw.clinical["is_female"].dtype == "Int8" and raw.clinical["is_female"].isna().tolist() == [
        False,
        False,
        True,
    ]
    assert np.isnan(raw.clinical.loc["TCGA-AA-0009", "age"])
    assert {"site", "oncotree_code", "porpoise_train"} <= set(raw.clinical.columns)
    assert "censorship" not in raw.clinical.columns
    assert list(raw.omics) == ["mut", "cnv", "rnaseq"]
    assert raw.omics["rnaseq"].columns.tolist() == ["TP53_rnaseq", "EGFR_rnaseq"]
    assert raw.omics["mut"].columns.tolist() == ["TP53_mut"]
    assert raw.omics["cnv"].index.tolist() == raw.clinical.index.tolist()
    assert raw.slides["patient_id"].tolist() == [
        "TCGA-AA-0001",
        "TCGA-AA-0001",
        "TCGA-AA-0002",
        "TCGA-AA-0009",
    ]
    assert raw.slides["slide_id"].str.contains("DX2").sum() == 1
    assert raw.slides["path"].isna().all()


def test_porpoise_table_quarantines_each_bad_row_with_reason(tmp_path):
    raw = read_porpoise_table(write_porpoise(tmp_path / "table.csv", porpoise_rows()))
    reasons = dict(zip(raw.quarantine["row"], raw.quarantine["reason"], strict=True))
    assert sorted(reasons) == [3, 4, 5, 6, 7, 8, 9, 10]
    assert "survival_months is missing" in reasons[3]
    assert "survival_months must be positive" in reasons[4]
    assert "censorship must be 0 or 1, got 2" in reasons[5]
    assert "invalid TCGA barcode 'BAD-0006'" in reasons[6]
    assert reasons[7] == reasons[8] == "rows of patient TCGA-AA-0007 disagree on TP53_rnaseq"
    assert "EGFR_rnaseq is not a number: abc" in reasons[9]
    assert "is listed in an earlier row" in reasons[10]
    assert set(raw.quarantine["source"]) == {"table.csv"}
    assert raw.quarantine.loc[raw.quarantine["row"] == 6, "id"].item() == "BAD-0006"
    assert raw.rows_in == 12 == len(raw.slides) + len(raw.quarantine)


def test_porpoise_table_missing_required_column(tmp_path):
    path = tmp_path / "table.csv"
    pd.DataFrame(porpoise_rows()).drop(columns="censorship").to_csv(path)
    with pytest.raises(CohortFormatError, match=r"table.csv: missing required column\(s\) \['censorship'\]"):
        read_porpoise_table(path)


def test_truncated_plain_csv_is_an_error_not_a_partial_table(tmp_path):
    path = write_porpoise(tmp_path / "table.csv", porpoise_rows())
    data = path.read_bytes()
    path.write_bytes(data[: data.rindex(b"TCGA-AA-0009") + 30])
    assert len(pd.read_csv(path)) == 12  # pandas alone reads the cut row, padded with NaN
    with pytest.raises(
        CohortFormatError, match=r"table.csv: the last row has \d+ fields but the header has 14"
    ):
        read_porpoise_table(path)


def test_truncated_gzip_is_an_error(tmp_path):
    path = write_porpoise(tmp_path / "table.csv.gz", porpoise_rows() * 20)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CohortFormatError, match=r"table.csv.gz: the gzip stream is truncated"):
        read_porpoise_table(path)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(CohortFormatError, match="nowhere.csv: no such file"):
        read_porpoise_table(tmp_path / "nowhere.csv")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(CohortFormatError, match="empty.csv: the file has no header row"):
        read_porpoise_table(tmp_path / "empty.csv")


def test_real_blca_table(blca_table):
    raw = read_porpoise_table(blca_table)
    assert len(raw.slides) == raw.rows_in == 437
    assert len(raw.clinical) == 373
    assert raw.quarantine.empty
    # The README's "169 deaths" counts patients; per slide row there are 201.
    assert raw.clinical["event"].sum() == 169
    assert (pd.read_csv(blca_table, usecols=["censorship"])["censorship"] == 0).sum() == 201
    assert {m: f.shape[1] for m, f in raw.omics.items()} == {"mut": 371, "cnv": 256, "rnaseq": 1554}
    assert raw.slides.groupby("patient_id").size().max() > 1


CBIO_META = ["#Identifier", "#Description", "#STRING", "#1"]


def write_cbio_clinical(path: Path, header: list[str], rows: list[list[str]]) -> None:
    lines = ["\t".join(f"{meta}" for _ in header) for meta in CBIO_META]
    lines += ["\t".join(header)] + ["\t".join(row) for row in rows]
    path.write_text("\n".join(lines) + "\n")


def write_tsv(path: Path, header: list[str], rows: list[list[str]], preamble: str = "") -> None:
    path.write_text(preamble + "\n".join("\t".join(row) for row in [header, *rows]) + "\n")


def write_cbio_study(folder: Path) -> Path:
    folder.mkdir()
    patient_header = ["PATIENT_ID", "OS_MONTHS", "OS_STATUS", "AGE", "SEX"]
    write_cbio_clinical(
        folder / "data_clinical_patient.txt",
        patient_header,
        [
            ["TCGA-AA-0001", "12.5", "1:DECEASED", "61", "Female"],
            ["TCGA-AA-0002", "30.1", "0:LIVING", "55", "Male"],
            ["TCGA-AA-0003", "[Not Available]", "0:LIVING", "50", "Male"],
            ["TCGA-AA-0004", "20", "", "70", "Female"],
            ["BAD", "5", "1:DECEASED", "40", "Male"],
        ],
    )
    write_cbio_clinical(
        folder / "data_clinical_sample.txt",
        ["PATIENT_ID", "SAMPLE_ID", "CANCER_TYPE"],
        [
            ["TCGA-AA-0001", "TCGA-AA-0001-06", "BLCA"],  # metastasis, listed first
            ["TCGA-AA-0001", "TCGA-AA-0001-01", "BLCA"],  # primary tumour: preferred
            ["TCGA-AA-0002", "TCGA-AA-0002-01", "BLCA"],
            ["TCGA-AA-0003", "TCGA-AA-0003-01", "BLCA"],  # its patient is quarantined
            ["TCGA-AA-0002", "TCGA-AA-0005-01", "BLCA"],  # barcode of another patient
        ],
    )
    samples = ["TCGA-AA-0001-06", "TCGA-AA-0001-01", "TCGA-AA-0002-01", "TCGA-AA-0003-01", "TCGA-AA-0005-01"]
    write_tsv(
        folder / "data_mrna_seq_v2_rsem.txt",
        ["Hugo_Symbol", "Entrez_Gene_Id", *samples],
        [
            ["TP53", "7157", "100", "1.5", "2.5", "3.5", "4.5"],
            ["DUP", "1", "100", "10", "20", "30", "40"],
            ["DUP", "2", "100", "11", "NA", "31", "41"],
        ],
    )
    write_tsv(
        folder / "data_cna.txt",
        ["Hugo_Symbol", "TCGA-AA-0001-01", "TCGA-AA-0002-01"],
        [["TP53", "-1", "2"], ["EGFR", "0", "NA"]],
    )
    write_tsv(
        folder / "data_mutations.txt",
        ["Hugo_Symbol", "Entrez_Gene_Id", "Center", "Tumor_Sample_Barcode", "Variant_Classification"],
        [
            ["TP53", "7157", "BI", "TCGA-AA-0001-01", "Missense_Mutation"],
            ["KRAS", "3845", "BI", "TCGA-AA-0001-01", "Silent"],
            ["KRAS", "3845", "BI", "TCGA-AA-0001-06", "Nonsense_Mutation"],
            ["TP53", "7157", "BI", "TCGA-AA-0002-01", "Silent"],
        ],
        preamble="#version 2.4\n",
    )
    return folder


def test_cbioportal_clinical_and_quarantine(tmp_path):
    raw = read_cbioportal(write_cbio_study(tmp_path / "study"))
    clinical = raw.clinical
    assert clinical.index.tolist() == ["TCGA-AA-0001", "TCGA-AA-0002"]
    assert clinical["event"].tolist() == [1, 0]
    assert clinical["survival_months"].tolist() == [12.5, 30.1]
    assert clinical["age"].tolist() == [61.0, 55.0]
    assert clinical["is_female"].tolist() == [1, 0]
    quarantine = raw.quarantine.set_index(["source", "row"])["reason"]
    assert "OS_MONTHS is missing" in quarantine["data_clinical_patient.txt", 2]
    assert "OS_STATUS is missing or unknown" in quarantine["data_clinical_patient.txt", 3]
    assert "invalid TCGA barcode 'BAD'" in quarantine["data_clinical_patient.txt", 4]
    assert "TCGA-AA-0003 has no usable row" in quarantine["data_clinical_sample.txt", 3]
    assert "belongs to patient TCGA-AA-0005, not TCGA-AA-0002" in quarantine["data_clinical_sample.txt", 4]
    assert len(quarantine) == 5
    assert raw.rows_in == 10
    assert raw.slides.empty


def test_cbioportal_omics_one_primary_sample_per_patient(tmp_path):
    omics = read_cbioportal(write_cbio_study(tmp_path / "study")).omics
    assert list(omics) == ["mut", "cnv", "rnaseq"]
    rnaseq = omics["rnaseq"]
    assert rnaseq.columns.tolist() == ["TP53_rnaseq", "DUP|1_rnaseq", "DUP|2_rnaseq"]
    assert rnaseq.index.tolist() == ["TCGA-AA-0001", "TCGA-AA-0002"]
    assert rnaseq.loc["TCGA-AA-0001"].tolist() == [1.5, 10.0, 11.0]  # the 01 sample, not the 06
    assert np.isnan(rnaseq.loc["TCGA-AA-0002", "DUP|2_rnaseq"])
    assert omics["cnv"].loc["TCGA-AA-0001"].tolist() == [-1.0, 0.0]
    mut = omics["mut"]
    assert sorted(mut.columns) == ["KRAS_mut", "TP53_mut"]  # KRAS: nonsense in the 06 sample
    assert mut.loc["TCGA-AA-0001", ["TP53_mut", "KRAS_mut"]].tolist() == [1.0, 0.0]  # silent KRAS excluded
    assert mut.loc["TCGA-AA-0002"].tolist() == [0.0, 0.0]  # profiled, only a silent mutation


def test_cbioportal_optional_and_required_files(tmp_path):
    folder = write_cbio_study(tmp_path / "study")
    for name in ("data_cna.txt", "data_mutations.txt", "data_mrna_seq_v2_rsem.txt"):
        (folder / name).unlink()
    raw = read_cbioportal(folder)
    assert raw.omics == {}
    assert len(raw.clinical) == 2
    (folder / "data_clinical_patient.txt").unlink()
    with pytest.raises(CohortFormatError, match="missing data_clinical_patient.txt"):
        read_cbioportal(folder)


def test_cbioportal_sample_missing_from_sample_file(tmp_path):
    folder = write_cbio_study(tmp_path / "study")
    write_tsv(folder / "data_cna.txt", ["Hugo_Symbol", "TCGA-AA-0009-01"], [["TP53", "1"]])
    with pytest.raises(
        CohortFormatError, match=r"data_cna.txt: 1 sample\(s\) are not in data_clinical_sample.txt"
    ):
        read_cbioportal(folder)


OLD_GDC = [
    "case_id",
    "case_submitter_id",
    "project_id",
    "age_at_diagnosis",
    "days_to_death",
    "days_to_last_follow_up",
    "gender",
    "vital_status",
    "treatment_type",
]
GDC_CASES = [
    # submitter, age (days), death, follow-up, gender, vital status
    ("TCGA-AA-0001", "22000", "300", "'--", "female", "Dead"),
    ("TCGA-AA-0001", "22000", "300", "'--", "female", "Dead"),
    ("TCGA-AA-0002", "25000", "'--", "900", "male", "Alive"),
    ("TCGA-AA-0002", "25000", "'--", "1200", "male", "Alive"),
    ("TCGA-AA-0003", "'--", "'--", "'--", "female", "Alive"),  # no follow-up
    ("TCGA-AA-0004", "20000", "'--", "400", "male", "Dead"),  # dead without days_to_death
    ("TCGA-AA-0005", "20000", "'--", "400", "male", "Not Reported"),
    ("TCGA-AA-0006", "20000", "'--", "0", "male", "Alive"),  # zero follow-up
    ("TCGA-AA-0007", "20000", "100", "'--", "male", "Dead"),  # disagreeing vital status
    ("TCGA-AA-0007", "20000", "'--", "150", "male", "Alive"),
    ("TCGA-AA-0008", "'--", "'--", "500", "'--", "Alive"),  # kept: age and sex unknown
    ("TARGET-20-0001", "1000", "'--", "50", "male", "Alive"),  # not TCGA
]


def check_gdc(raw, source: str) -> None:
    clinical = raw.clinical
    assert clinical.index.tolist() == ["TCGA-AA-0001", "TCGA-AA-0002", "TCGA-AA-0008"]
    assert clinical["event"].tolist() == [1, 0, 0]
    np.testing.assert_allclose(clinical["survival_months"], np.array([300, 1200, 500]) / DAYS_PER_MONTH)
    np.testing.assert_allclose(clinical["age"], np.array([22000, 25000, np.nan]) / DAYS_PER_YEAR)
    assert clinical["is_female"].tolist()[:2] == [1, 0] and clinical["is_female"].isna().tolist()[2]
    assert clinical["project_id"].tolist() == ["TCGA-BLCA"] * 3
    reasons = dict(zip(raw.quarantine["row"], raw.quarantine["reason"], strict=True))
    assert sorted(reasons) == [4, 5, 6, 7, 8, 9, 11]
    assert re.search(r"Alive but (diagnoses\.)?days_to_last_follow_up is missing", reasons[4])
    assert re.search(r"Dead but (demographic\.)?days_to_death is missing", reasons[5])
    assert "vital_status is missing or unknown" in reasons[6]
    assert "days_to_last_follow_up is 0" in reasons[7]
    assert reasons[8] == reasons[9] == "rows of patient TCGA-AA-0007 disagree on event"
    assert "must start with 'TCGA-'" in reasons[11]
    assert set(raw.quarantine["source"]) == {source}
    assert raw.rows_in == len(GDC_CASES)


def test_gdc_clinical_older_column_names(tmp_path):
    rows = [
        [f"uuid-{i}", case, "TCGA-BLCA", age, death, follow, gender, status, "Radiation"]
        for i, (case, age, death, follow, gender, status) in enumerate(GDC_CASES)
    ]
    write_tsv(tmp_path / "clinical.tsv", OLD_GDC, rows)
    check_gdc(read_gdc_clinical(tmp_path / "clinical.tsv"), "clinical.tsv")


def test_gdc_clinical_newer_dotted_column_names(tmp_path):
    header = [
        "project.project_id",
        "cases.case_id",
        "cases.submitter_id",
        "demographic.vital_status",
        "demographic.days_to_death",
        "demographic.gender",
        "diagnoses.age_at_diagnosis",
        "diagnoses.days_to_last_follow_up",
    ]
    rows = [
        ["TCGA-BLCA", f"uuid-{i}", case, status, death, gender, age, follow]
        for i, (case, age, death, follow, gender, status) in enumerate(GDC_CASES)
    ]
    write_tsv(tmp_path / "clinical.2025.tsv", header, rows)
    check_gdc(read_gdc_clinical(tmp_path / "clinical.2025.tsv"), "clinical.2025.tsv")


def test_gdc_clinical_missing_columns(tmp_path):
    write_tsv(tmp_path / "clinical.tsv", ["case_submitter_id", "vital_status"], [["TCGA-AA-0001", "Alive"]])
    with pytest.raises(CohortFormatError, match="demographic.days_to_death or days_to_death"):
        read_gdc_clinical(tmp_path / "clinical.tsv")


def test_gzipped_gdc_clinical(tmp_path):
    rows = [[f"u{i}", *case[:1], "TCGA-BLCA", *case[1:], "x"] for i, case in enumerate(GDC_CASES)]
    text = "\n".join("\t".join(row) for row in [OLD_GDC, *rows]) + "\n"
    (tmp_path / "clinical.tsv.gz").write_bytes(gzip.compress(text.encode()))
    check_gdc(read_gdc_clinical(tmp_path / "clinical.tsv.gz"), "clinical.tsv.gz")


def test_a_slide_of_another_patient_is_quarantined_and_its_patient_keeps_the_rest(tmp_path):
    rows = [
        porpoise_row("TCGA-AA-0001", "DX1"),
        porpoise_row("TCGA-AA-0002", "DX1", slide_id="TCGA-AA-0003-01Z-00-DX1.ABCD1234.svs"),  # swapped
        porpoise_row("TCGA-AA-0003", "DX1", slide_id="TCGA-AA-0002-01Z-00-DX1.ABCD1234.svs"),  # swapped
        porpoise_row("TCGA-AA-0003", "DX2"),
        porpoise_row("TCGA-AA-0004", "DX1", slide_id="scan-0004.svs"),  # no barcode: not checked
        porpoise_row("TCGA-AA-0005", "DX1", slide_id="TCGA-AA-0001-01Z-00-DX1-copy.svs"),  # unusual tail
    ]
    raw = read_porpoise_table(write_porpoise(tmp_path / "table.csv", rows))
    assert raw.clinical.index.tolist() == [f"TCGA-AA-000{i}" for i in range(1, 6)]  # nobody loses data
    assert raw.omics["rnaseq"].index.tolist() == raw.clinical.index.tolist()
    assert raw.slides["slide_id"].tolist() == [
        "TCGA-AA-0001-01Z-00-DX1.ABCD1234.svs",
        "TCGA-AA-0003-01Z-00-DX2.ABCD1234.svs",
        "scan-0004.svs",
    ]
    reasons = dict(zip(raw.quarantine["row"], raw.quarantine["reason"], strict=True))
    assert sorted(reasons) == [1, 2, 5]
    assert reasons[1] == (
        "slide_id TCGA-AA-0003-01Z-00-DX1.ABCD1234.svs is a slide of patient TCGA-AA-0003, not TCGA-AA-0002 "
        "(the slide is left out; the patient's other data is kept)"
    )
    assert "is a slide of patient TCGA-AA-0001, not TCGA-AA-0005" in reasons[5]
    assert raw.rows_in == len(raw.slides) + len(raw.quarantine)


def test_a_row_with_bad_data_and_a_foreign_slide_names_both_reasons(tmp_path):
    rows = [
        porpoise_row("TCGA-AA-0001", "DX1"),
        porpoise_row("TCGA-AA-0002", "DX1", months=-3.0, slide_id="TCGA-AA-0001-01Z-00-DX2.svs"),
    ]
    raw = read_porpoise_table(write_porpoise(tmp_path / "table.csv", rows))
    assert raw.clinical.index.tolist() == ["TCGA-AA-0001"]
    (reason,) = raw.quarantine["reason"]
    assert "survival_months must be positive" in reason and "is a slide of patient TCGA-AA-0001" in reason


@pytest.mark.parametrize(
    ("repeated", "named"),
    [(["survival_months"], "['survival_months']"), (["age", "TP53_rnaseq"], "['age', 'TP53_rnaseq']")],
)
def test_porpoise_header_that_repeats_a_column_is_an_error_naming_it(tmp_path, repeated, named):
    table = pd.DataFrame(porpoise_rows()[:3])
    table = pd.concat([table, table[repeated] + 1], axis=1)  # the copies differ: no copy may win silently
    path = tmp_path / "table.csv"
    table.to_csv(path, index=False)
    assert set(pd.read_csv(path).columns) >= {f"{name}.1" for name in repeated}  # what pandas alone does
    with pytest.raises(
        CohortFormatError, match=re.escape(f"table.csv: the header repeats column name(s) {named}")
    ):
        read_porpoise_table(path)


def test_cbioportal_and_gdc_headers_that_repeat_a_column_are_errors(tmp_path):
    folder = write_cbio_study(tmp_path / "study")
    write_cbio_clinical(
        folder / "data_clinical_patient.txt",
        ["PATIENT_ID", "OS_MONTHS", "OS_STATUS", "OS_MONTHS"],
        [["TCGA-AA-0001", "12.5", "1:DECEASED", "40"]],
    )
    with pytest.raises(
        CohortFormatError, match=r"data_clinical_patient.txt: the header repeats .*\['OS_MONTHS'\]"
    ):
        read_cbioportal(folder)
    write_tsv(
        tmp_path / "clinical.tsv",
        [*OLD_GDC, "vital_status"],
        [["u0", "TCGA-AA-0001", "TCGA-BLCA", "20000", "300", "'--", "female", "Dead", "x", "Alive"]],
    )
    with pytest.raises(CohortFormatError, match=r"clinical.tsv: the header repeats .*\['vital_status'\]"):
        read_gdc_clinical(tmp_path / "clinical.tsv")


def test_a_utf8_byte_order_mark_is_not_part_of_the_first_column_name(tmp_path):
    plain = write_porpoise(tmp_path / "plain.csv", porpoise_rows())
    marked = tmp_path / "marked.csv.gz"
    marked.write_bytes(gzip.compress(b"\xef\xbb\xbf" + plain.read_bytes()))
    pd.testing.assert_frame_equal(read_porpoise_table(marked).clinical, read_porpoise_table(plain).clinical)

    folder = write_cbio_study(tmp_path / "study")
    for name in ("data_clinical_patient.txt", "data_clinical_sample.txt", "data_cna.txt"):
        (folder / name).write_bytes(
            b"\xef\xbb\xbf" + (folder / name).read_bytes()
        )  # before '#' or the header
    raw = read_cbioportal(folder)
    assert raw.clinical.index.tolist() == ["TCGA-AA-0001", "TCGA-AA-0002"]
    assert raw.omics["cnv"].loc["TCGA-AA-0001"].tolist() == [-1.0, 0.0]


def test_a_value_missing_on_some_rows_of_a_patient_is_taken_from_its_other_rows(tmp_path):
    rows = [
        porpoise_row("TCGA-AA-0001", "DX1", oncotree_code="BLCAB"),
        porpoise_row("TCGA-AA-0001", "DX2", oncotree_code=np.nan),  # no subtype on the second slide
        porpoise_row("TCGA-AA-0001", "DX3", oncotree_code="BLCAB"),
        porpoise_row("TCGA-AA-0002", "DX1", age=np.nan),  # the first row, the one kept, misses the age
        porpoise_row("TCGA-AA-0002", "DX2", age=61),
        porpoise_row("TCGA-AA-0003", "DX1"),
    ]
    raw = read_porpoise_table(write_porpoise(tmp_path / "table.csv", rows))
    assert raw.clinical.index.tolist() == ["TCGA-AA-0001", "TCGA-AA-0002", "TCGA-AA-0003"]
    assert raw.clinical["oncotree_code"].tolist() == ["BLCAB", "BLCA", "BLCA"]
    assert raw.clinical["age"].tolist() == [60.0, 61.0, 60.0]
    assert raw.quarantine.empty
    assert raw.rows_in == len(raw.slides) == len(rows)  # no row lost to a gap
    assert raw.filled == (
        "table.csv: patient TCGA-AA-0001: oncotree_code missing on 1 of 3 rows, taken from the others",
        "table.csv: patient TCGA-AA-0002: age missing on 1 of 2 rows, taken from the others",
    )


def test_a_fill_note_names_five_columns_of_a_patient_then_counts_the_rest(tmp_path):
    genes = {f"G{index}_rnaseq": 0.1 * index for index in range(7)}
    rows = [
        porpoise_row("TCGA-AA-0001", "DX1", **genes),
        porpoise_row("TCGA-AA-0001", "DX2", **dict.fromkeys(genes, np.nan)),
    ]
    raw = read_porpoise_table(write_porpoise(tmp_path / "table.csv", rows))
    assert raw.omics["rnaseq"].loc["TCGA-AA-0001", list(genes)].tolist() == pytest.approx(
        list(genes.values())
    )
    (note,) = raw.filled
    assert note == (
        "table.csv: patient TCGA-AA-0001: G0_rnaseq missing on 1 of 2 rows, G1_rnaseq missing on 1 of 2 rows, "
        "G2_rnaseq missing on 1 of 2 rows, G3_rnaseq missing on 1 of 2 rows, G4_rnaseq missing on 1 of 2 "
        "rows and 2 more column(s), taken from the others"
    )


def test_rows_of_a_patient_with_different_values_are_quarantined_beside_a_missing_one(tmp_path):
    rows = [
        porpoise_row("TCGA-AA-0001", "DX1"),
        porpoise_row("TCGA-AA-0002", "DX1", oncotree_code="BLCA"),
        porpoise_row("TCGA-AA-0002", "DX2", oncotree_code=np.nan),
        porpoise_row("TCGA-AA-0002", "DX3", oncotree_code="BLCAB"),  # two subtypes: not a gap
        porpoise_row("TCGA-AA-0003", "DX1", age=60),
        porpoise_row("TCGA-AA-0003", "DX2", age=60.0001),  # ages are compared exactly, as read
    ]
    raw = read_porpoise_table(write_porpoise(tmp_path / "table.csv", rows))
    assert raw.filled == ()  # a disagreement is quarantined, not filled
    assert raw.clinical.index.tolist() == ["TCGA-AA-0001"]
    reasons = dict(zip(raw.quarantine["row"], raw.quarantine["reason"], strict=True))
    assert reasons == {
        1: "rows of patient TCGA-AA-0002 disagree on oncotree_code",
        2: "rows of patient TCGA-AA-0002 disagree on oncotree_code",
        3: "rows of patient TCGA-AA-0002 disagree on oncotree_code",
        4: "rows of patient TCGA-AA-0003 disagree on age",
        5: "rows of patient TCGA-AA-0003 disagree on age",
    }
    assert raw.rows_in == len(raw.slides) + len(raw.quarantine) == len(rows)


def test_a_value_missing_on_every_row_of_a_patient_stays_missing(tmp_path):
    rows = [
        porpoise_row("TCGA-AA-0001", "DX1", age=np.nan, oncotree_code=np.nan),
        porpoise_row("TCGA-AA-0001", "DX2", age=np.nan, oncotree_code=np.nan),
        porpoise_row("TCGA-AA-0002", "DX1"),
    ]
    raw = read_porpoise_table(write_porpoise(tmp_path / "table.csv", rows))
    assert raw.filled == ()  # nothing to take a value from
    assert raw.clinical.index.tolist() == ["TCGA-AA-0001", "TCGA-AA-0002"]
    assert np.isnan(raw.clinical.loc["TCGA-AA-0001", "age"])
    assert pd.isna(raw.clinical.loc["TCGA-AA-0001", "oncotree_code"])
    assert raw.quarantine.empty
    assert raw.rows_in == len(raw.slides) == len(rows)


def test_gdc_rows_of_a_patient_take_the_sex_one_of_them_lacks_from_the_other(tmp_path):
    cases = [
        ("TCGA-AA-0001", "22000", "300", "'--", "female", "Dead"),
        ("TCGA-AA-0001", "22000", "300", "'--", "'--", "Dead"),  # gender not reported on this row
    ]
    rows = [
        [f"uuid-{i}", case, "TCGA-BLCA", age, death, follow, gender, status, "Radiation"]
        for i, (case, age, death, follow, gender, status) in enumerate(cases)
    ]
    write_tsv(tmp_path / "clinical.tsv", OLD_GDC, rows)
    raw = read_gdc_clinical(tmp_path / "clinical.tsv")
    assert raw.clinical["is_female"].tolist() == [1]
    assert raw.quarantine.empty
    assert raw.filled == (
        "clinical.tsv: patient TCGA-AA-0001: is_female missing on 1 of 2 rows, taken from the others",
    )


def test_ingest_says_and_records_which_values_were_taken_from_other_rows(tmp_path):
    rows = [
        porpoise_row("TCGA-AA-0001", "DX1", oncotree_code="BLCAB"),
        porpoise_row("TCGA-AA-0001", "DX2", oncotree_code=np.nan),
        # enough patients with and without an event for ingest's splits
        *(porpoise_row(f"TCGA-AB-{i:04d}", "DX1", censorship=i % 2, months=5.0 + i) for i in range(30)),
    ]
    table = write_porpoise(tmp_path / "table.csv", rows)
    out = tmp_path / "cohort"
    result = subprocess.run(
        [sys.executable, "-m", "healnet", "ingest", str(table), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    note = "table.csv: patient TCGA-AA-0001: oncotree_code missing on 1 of 2 rows, taken from the others"
    lines = result.stdout.splitlines()
    assert lines[lines.index("values taken from a patient's other rows: 1 patient(s)") + 1] == f"  {note}"
    cohort = Cohort.load(out)
    assert cohort.meta["filled"] == [note]
    assert cohort.clinical.loc["TCGA-AA-0001", "oncotree_code"] == "BLCAB"


def test_a_warning_in_a_command_is_one_line_that_names_it(tmp_path):
    # 3 patients with an event cannot fill 5 test folds: kfold_splits warns, and ingest goes on
    rows = [
        porpoise_row(f"TCGA-AB-{i:04d}", "DX1", censorship=int(i >= 3), months=5.0 + i) for i in range(30)
    ]
    table = write_porpoise(tmp_path / "table.csv", rows)
    command = ["-m", "healnet", "ingest", str(table), "--out", str(tmp_path / "cohort"), "--folds", "5"]
    result = subprocess.run([sys.executable, *command], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    assert result.stderr.splitlines() == [
        "healnet ingest: warning: 3 patient(s) with an event for 5 folds: at least 2 fold(s) hold none of them"
    ]
