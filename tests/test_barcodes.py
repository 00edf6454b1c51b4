import re
import string

import pytest
from hypothesis import given
from hypothesis import strategies as st

from healnet.data.barcodes import (
    PATIENT_ID_REGEX,
    Barcode,
    InvalidBarcodeError,
    parse_barcode,
    patient_id,
    patient_prefix,
)

ALNUM = string.ascii_uppercase + string.digits


def test_patient_barcode_has_no_sample_part():
    assert parse_barcode("TCGA-2F-A9KO") == Barcode(patient_id="TCGA-2F-A9KO", tss="2F", participant="A9KO")


def test_slide_file_name_parses_slide_part_and_ignores_uuid():
    barcode = parse_barcode("TCGA-2F-A9KO-01Z-00-DX2.195576CF-B739-4BD9-B15B-4A70AE287D3E.svs")
    assert barcode.patient_id == "TCGA-2F-A9KO"
    assert (barcode.sample_type, barcode.vial, barcode.portion, barcode.analyte) == ("01", "Z", "00", None)
    assert (barcode.slide_type, barcode.slide_number) == ("DX", 2)
    assert barcode.plate is None and barcode.is_primary_tumor


def test_tissue_slide_and_aliquot_barcodes():
    tissue = parse_barcode("TCGA-BL-A0C8-11A-01-TS1")
    assert (tissue.sample_type, tissue.slide_type, tissue.slide_number) == ("11", "TS", 1)
    assert not tissue.is_primary_tumor
    aliquot = parse_barcode("TCGA-02-0001-01C-01D-0182-01")
    assert (aliquot.portion, aliquot.analyte, aliquot.plate, aliquot.center) == ("01", "D", "0182", "01")
    assert aliquot.slide_type is None


def test_cbioportal_sample_id_has_no_vial():
    barcode = parse_barcode("TCGA-2F-A9KO-06")
    assert (barcode.sample_type, barcode.vial, barcode.sample_id) == ("06", None, "TCGA-2F-A9KO-06")


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("XYZ-2F-A9KO", "must start with 'TCGA-'"),
        ("TCGA-2F", "at least TCGA-<TSS>-<participant>"),
        ("TCGA-2FX-A9KO", "tissue source site"),
        ("TCGA-2F-A9K", "participant"),
        ("tcga-2f-a9ko", "must start with 'TCGA-'"),
        ("TCGA-2F-a9ko", "participant"),
        ("TCGA-2F-A9KO-1A", "sample must be 2 digits"),
        ("TCGA-2F-A9KO-01A-X1", "portion"),
        ("TCGA-2F-A9KO-01Z-00-XX1", "slide must be one of DX/TS/BS/MS"),
        ("TCGA-2F-A9KO-01Z-00-DX", "slide must be one of"),
        ("TCGA-02-0001-01C-01D-018-01", "plate"),
        ("TCGA-02-0001-01C-01D-0182-1", "centre"),
        ("TCGA-02-0001-01C-01D-0182-01-9", "at most 7"),
        ("", "must start with 'TCGA-'"),
    ],
)
def test_invalid_barcodes_name_value_and_problem(value, problem):
    with pytest.raises(InvalidBarcodeError, match=re.escape(problem)) as caught:
        parse_barcode(value)
    assert repr(value) in str(caught.value)
    assert isinstance(caught.value, ValueError)


def test_non_string_is_invalid():
    with pytest.raises(InvalidBarcodeError, match="expected a string, got float"):
        parse_barcode(float("nan"))


def test_patient_id_takes_first_twelve_characters():
    assert patient_id("TCGA-BL-A0C8-01Z-00-DX1.ABC.svs") == "TCGA-BL-A0C8"


def test_regex_accepts_patients_only():
    assert re.fullmatch(PATIENT_ID_REGEX, "TCGA-BL-A0C8")
    for value in ("TCGA-BL-A0C8-01", "TCGA-bl-A0C8", "TCGA-BL-A0C", " TCGA-BL-A0C8"):
        assert not re.search(PATIENT_ID_REGEX, value)


@given(
    tss=st.text(ALNUM, min_size=2, max_size=2),
    participant=st.text(ALNUM, min_size=4, max_size=4),
    sample=st.integers(1, 29),
    slide=st.integers(1, 99),
)
def test_generated_slide_barcodes_round_trip(tss, participant, sample, slide):
    patient = f"TCGA-{tss}-{participant}"
    barcode = parse_barcode(f"{patient}-{sample:02d}Z-00-DX{slide}")
    assert barcode.patient_id == patient
    assert re.fullmatch(PATIENT_ID_REGEX, barcode.patient_id)
    assert (int(barcode.sample_type), barcode.slide_number) == (sample, slide)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("TCGA-2F-A9KO", "TCGA-2F-A9KO"),
        ("TCGA-2F-A9KO-01Z-00-DX1.195576CF-B739-4BD9-B15B-4A70AE287D3E.svs", "TCGA-2F-A9KO"),
        ("TCGA-2F-A9KO.svs", "TCGA-2F-A9KO"),
        ("TCGA-2F-A9KO-01Z-00-DX1-rescan.svs", "TCGA-2F-A9KO"),  # later parts need not parse
        ("TCGA-2F-A9KO5-01", None),  # a five-character participant is no patient barcode
        ("tcga-2f-a9ko", None),
        ("scan-0004.svs", None),
        ("", None),
        (None, None),
        (12, None),
    ],
)
def test_patient_prefix_of_any_identifier(value, expected):
    assert patient_prefix(value) == expected
