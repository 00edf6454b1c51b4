"""`validate`: run every suite on a cohort and write validation.json and validation.md."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from healnet.validation import summaries
from healnet.validation.report import ValidationReport
from healnet.validation.thresholds import DEFAULT_THRESHOLDS, Thresholds

if TYPE_CHECKING:
    from healnet.data.cohort import Cohort

JSON_NAME = "validation.json"
MARKDOWN_NAME = "validation.md"


def validate(source: Path, out_dir: Path, thresholds: Thresholds = DEFAULT_THRESHOLDS) -> ValidationReport:
    """Validate a canonical cohort folder (loaded as written) or a raw input (ingested in memory);
    writes out_dir/validation.json and out_dir/validation.md. Unreadable input raises CohortFormatError."""
    from healnet.data.cohort import ingest

    return validate_cohort(ingest(Path(source)), out_dir, thresholds, source=str(source))


def validate_cohort(
    cohort: Cohort, out_dir: Path, thresholds: Thresholds = DEFAULT_THRESHOLDS, source: str = ""
) -> ValidationReport:
    """Validate a loaded `Cohort` (clinical, omics, slides, splits, quarantine, meta, root)."""
    from healnet.validation.engine import run_suite
    from healnet.validation.suites import SUITES

    clinical = summaries.clinical_table(cohort.clinical)
    clinical_ids = pd.Index(clinical["patient_id"])
    name = str(cohort.meta.get("name") or source or "cohort")
    tables = {
        "clinical": clinical,
        "omics_features": summaries.omics_feature_summary(cohort.omics),
        "omics_samples": summaries.omics_sample_summary(cohort.omics, clinical_ids),
        "slides": summaries.slide_summary(cohort.slides, cohort.root, clinical_ids),
        "accounting": summaries.accounting_table(cohort.meta, name, cohort.quarantine, cohort.clinical.index),
        "splits": summaries.split_events(cohort.splits, cohort.clinical),
    }
    results = {}
    for suite_name, (id_columns, build) in SUITES.items():
        results[suite_name] = run_suite(
            suite_name, tables[suite_name], build(thresholds), id_columns, thresholds.max_examples
        )

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    reasons = cohort.quarantine["reason"].astype(str).value_counts()
    report = ValidationReport(
        success=all(r.success for r in results.values()),
        suites=results,
        rows_in=_count(cohort.meta.get("rows_in")),
        rows_kept=_count(cohort.meta.get("rows_kept")),
        rows_quarantined=_count(cohort.meta.get("rows_quarantined")),
        json_path=out_dir / JSON_NAME,
        markdown_path=out_dir / MARKDOWN_NAME,
        quarantine_reasons={str(k): int(v) for k, v in reasons.items()},
        source=source or name,
        thresholds=thresholds,
        notes=_notes(tables),
    )
    report.json_path.write_text(json.dumps(report.to_dict(), indent=2, allow_nan=False, default=str))
    report.markdown_path.write_text(report.to_markdown(), encoding="utf-8")
    return report


def _notes(tables: dict[str, pd.DataFrame]) -> list[str]:
    slides = tables["slides"]
    notes = []
    unchecked = int(slides["path"].isna().sum())
    if unchecked:
        notes.append(f"{unchecked} slide(s) are listed without a file; their file checks were skipped")
    unreadable = slides[(slides["opens"] == False) | (slides["has_resolution"] == False)]  # noqa: E712 (None: unchecked)
    if len(unreadable):
        named = ", ".join(
            f"{row.slide_id} ({row.error or 'no resolution'})" for row in unreadable.itertuples()
        )
        notes.append(
            f"{len(unreadable)} slide(s) will be quarantined when tiled and their patients trained without "
            f"them: {named}"
        )
    return notes


def _count(value) -> int | None:
    return None if value is None else int(value)
