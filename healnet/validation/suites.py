"""Expectation suites as code. Every expectation carries a unique description, used in the reports.

Each suite is (name, id columns identifying unexpected rows, expectations built from `Thresholds`).
"""

from __future__ import annotations

from healnet.data.barcodes import PATIENT_ID_REGEX
from healnet.validation.engine import import_great_expectations
from healnet.validation.thresholds import Thresholds

CLINICAL_REQUIRED = ("patient_id", "survival_months", "event", "age", "is_female")
CLINICAL_NOT_NULL = ("patient_id", "survival_months", "event")
ACCOUNTING_COUNTS = ("rows_in", "rows_kept", "rows_quarantined")


def clinical_suite(t: Thresholds) -> list:
    e = import_great_expectations().expectations
    return [
        e.ExpectTableRowCountToBeBetween(
            min_value=t.min_patients, description=f"at least {t.min_patients} patient(s)"
        ),
        *[e.ExpectColumnToExist(column=c, description=f"column {c} exists") for c in CLINICAL_REQUIRED],
        *[
            e.ExpectColumnValuesToNotBeNull(column=c, description=f"{c} is never null")
            for c in CLINICAL_NOT_NULL
        ],
        e.ExpectColumnValuesToMatchRegex(
            column="patient_id", regex=PATIENT_ID_REGEX, description="patient ids are TCGA patient barcodes"
        ),
        e.ExpectColumnValuesToBeUnique(column="patient_id", description="one row per patient"),
        e.ExpectColumnValuesToBeBetween(
            column="survival_months", min_value=0, strict_min=True, description="survival_months > 0"
        ),
        e.ExpectColumnValuesToBeInSet(column="event", value_set=[0, 1], description="event is 0 or 1"),
        e.ExpectColumnMeanToBeBetween(
            column="event",
            min_value=t.event_rate_min,
            max_value=t.event_rate_max,
            description=f"event rate in [{t.event_rate_min}, {t.event_rate_max}]",
        ),
        e.ExpectColumnValuesToBeBetween(
            column="age",
            min_value=t.age_min,
            max_value=t.age_max,
            description=f"age in [{t.age_min}, {t.age_max}]",
        ),
        e.ExpectColumnValuesToNotBeNull(
            column="age",
            mostly=1.0 - t.age_max_missing_fraction,
            description=f"age missing for at most {t.age_max_missing_fraction:.0%} of patients",
        ),
        e.ExpectColumnValuesToBeInSet(
            column="is_female", value_set=[0, 1], description="is_female is 0 or 1 (or null)"
        ),
    ]


def omics_feature_suite(t: Thresholds) -> list:
    e = import_great_expectations().expectations
    return [
        e.ExpectColumnValuesToBeInSet(
            column="numeric", value_set=[True], description="feature columns are numeric"
        ),
        e.ExpectColumnValuesToBeUnique(
            column="feature", description="feature names are unique across modalities"
        ),
        e.ExpectColumnValuesToBeBetween(
            column="fraction_missing",
            max_value=t.omics_max_missing_fraction,
            description=f"each feature missing for at most {t.omics_max_missing_fraction:.0%} of patients",
        ),
        e.ExpectColumnValuesToBeBetween(
            column="std",
            min_value=t.omics_min_std,
            strict_min=True,
            description=f"no constant feature (std > {t.omics_min_std})",
        ),
        e.ExpectColumnValuesToBeBetween(
            column="n_non_finite", max_value=0, description="no infinite value in any feature"
        ),
    ]


def omics_sample_suite(t: Thresholds) -> list:
    e = import_great_expectations().expectations
    return [
        e.ExpectCompoundColumnsToBeUnique(
            column_list=["patient_id", "modality"], description="one row per patient per modality"
        ),
        e.ExpectColumnValuesToBeBetween(
            column="n_non_finite", max_value=0, description="all omics values of a patient are finite"
        ),
        e.ExpectColumnValuesToBeInSet(
            column="in_clinical", value_set=[True], description="every omics patient is in the clinical table"
        ),
    ]


def slide_suite(t: Thresholds) -> list:
    e = import_great_expectations().expectations
    return [
        e.ExpectColumnValuesToBeUnique(column="slide_id", description="slide ids are unique"),
        e.ExpectColumnValuesToBeInSet(column="exists", value_set=[True], description="slide file exists"),
        e.ExpectColumnValuesToBeInSet(
            column="opens",
            value_set=[True],
            mostly=1.0 - t.max_unreadable_slide_fraction,
            description="OpenSlide opens the slide (the others are quarantined when tiled)",
        ),
        e.ExpectColumnValuesToBeInSet(
            column="has_resolution",
            value_set=[True],
            mostly=1.0 - t.max_unreadable_slide_fraction,
            description="slide has mpp or objective power (the others are quarantined when tiled)",
        ),
        e.ExpectColumnValuesToBeInSet(
            column="in_clinical", value_set=[True], description="every slide patient is in the clinical table"
        ),
    ]


def accounting_suite(t: Thresholds) -> list:
    e = import_great_expectations().expectations
    return [
        *[
            e.ExpectColumnValuesToNotBeNull(column=c, description=f"{c} is recorded")
            for c in ACCOUNTING_COUNTS
        ],
        e.ExpectColumnPairValuesToBeEqual(
            column_A="rows_in",
            column_B="rows_accounted",
            description="rows in = rows kept + rows quarantined",
        ),
        e.ExpectColumnValuesToBeBetween(
            column="quarantined_row_fraction",
            min_value=0.0,
            max_value=t.max_quarantined_row_fraction,
            description=f"at most {t.max_quarantined_row_fraction:.0%} of the rows are quarantined",
        ),
        e.ExpectColumnValuesToBeBetween(
            column="quarantined_patient_fraction",
            min_value=0.0,
            max_value=t.max_quarantined_patient_fraction,
            description=f"at most {t.max_quarantined_patient_fraction:.0%} of the patients are lost to quarantine",
        ),
    ]


def splits_suite(t: Thresholds) -> list:
    e = import_great_expectations().expectations
    return [
        e.ExpectColumnValuesToBeBetween(
            column="events",
            min_value=t.min_events_per_split,
            description=f"at least {t.min_events_per_split} event(s) in every split "
            "(holdout train/val/test, K-fold test folds)",
        ),
        e.ExpectColumnValuesToBeBetween(
            column="patients_without_clinical",
            max_value=0,
            description="every patient of a split has a clinical row",
        ),
    ]


# name -> (id columns of unexpected rows, expectations)
SUITES = {
    "clinical": (["patient_id"], clinical_suite),
    "omics_features": (["modality", "feature"], omics_feature_suite),
    "omics_samples": (["patient_id", "modality"], omics_sample_suite),
    "slides": (["slide_id", "patient_id", "path", "error"], slide_suite),
    "accounting": (["cohort"], accounting_suite),
    "splits": (["split", "patients"], splits_suite),
}
