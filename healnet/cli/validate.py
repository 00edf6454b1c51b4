"""`healnet validate`: Great Expectations checks of a cohort, with a JSON and a Markdown report."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HELP = (
    "Validate a cohort (clinical table, omics, slide files, quarantine accounting, events per split) with "
    "Great Expectations; writes validation.json and validation.md and exits 1 when an expectation fails."
)


def configure(parser: argparse.ArgumentParser) -> None:
    from healnet.validation.thresholds import DEFAULT_THRESHOLDS

    parser.add_argument(
        "input",
        type=Path,
        help="canonical cohort folder, or a raw input ingested on the fly "
        "(PORPOISE table file, cBioPortal folder, GDC clinical.tsv)",
    )
    parser.add_argument(
        "--out", type=Path, default=Path("validation"), help="folder for validation.json and validation.md"
    )
    parser.add_argument(
        "--max-quarantined-fraction",
        type=float,
        default=None,
        help="largest share of rows, and of patients, that ingestion may quarantine (default: the versioned "
        f"threshold in healnet/validation/thresholds.py, {DEFAULT_THRESHOLDS.max_quarantined_row_fraction})",
    )
    parser.add_argument(
        "--min-events-per-split",
        type=int,
        default=None,
        help="least number of events in every holdout train/val/test split and K-fold test fold; 0 turns the "
        "check off (default: the versioned threshold in healnet/validation/thresholds.py, "
        f"{DEFAULT_THRESHOLDS.min_events_per_split})",
    )


def run(args: argparse.Namespace) -> int:
    from healnet.validation import validate
    from healnet.validation.thresholds import (
        DEFAULT_THRESHOLDS,
        with_min_events_per_split,
        with_quarantine_limit,
    )

    thresholds = DEFAULT_THRESHOLDS
    if args.max_quarantined_fraction is not None:
        thresholds = with_quarantine_limit(args.max_quarantined_fraction, thresholds)
    if args.min_events_per_split is not None:
        thresholds = with_min_events_per_split(args.min_events_per_split, thresholds)
    report = validate(args.input, args.out, thresholds)
    print(report.summary())
    if report.success:
        return 0
    print(f"healnet validate: {len(report.failures())} expectation(s) failed:", file=sys.stderr)
    for message in report.failures():
        print(f"  - {message}", file=sys.stderr)
    return 1
