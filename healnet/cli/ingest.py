"""`healnet ingest`: turn a raw TCGA input into the canonical cohort folder."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = (
    "Ingest a PORPOISE table (.csv/.csv.gz), a GDC clinical.tsv or a cBioPortal study folder into a "
    "canonical cohort folder with patient-level holdout and K-fold splits; rejected rows are quarantined."
)
QUARANTINE_SHOWN = 20


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "input", type=Path, help="table file, cBioPortal folder, or an existing cohort folder"
    )
    parser.add_argument("--out", type=Path, required=True, help="cohort folder to write")
    parser.add_argument(
        "--name", default=None, help="cohort name stored in cohort.json; None: the input's file name"
    )
    parser.add_argument(
        "--slide-dir", type=Path, default=None, help="folder holding the slide files named by slide_id"
    )
    parser.add_argument("--folds", type=int, default=5, help="number of K-fold cross-validation folds")
    parser.add_argument("--holdout-repeats", type=int, default=1, help="number of repeated 70/15/15 splits")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the splits")


def summary(cohort) -> str:
    """Patients, events, modalities, slides and quarantined rows, one fact per line."""
    clinical, slides = cohort.clinical, cohort.slides
    lines = [
        f"cohort {cohort.meta['name']} written to {cohort.root}",
        f"patients: {len(clinical)} ({int(clinical['event'].sum())} events)",
    ]
    for modality, frame in cohort.omics.items():
        lines.append(f"  {modality}: {frame.shape[1]} features, {len(frame)} patients")
    located = int(slides["path"].notna().sum())
    lines.append(
        f"slides: {len(slides)} listed, {located} with a file, "
        f"{int(cohort.availability['wsi'].sum())} patients with a slide file"
    )
    lines.extend(quarantine_lines(cohort, "in quarantine.parquet"))
    lines.extend(filled_lines(cohort, "in cohort.json"))
    return "\n".join(lines)


def first_listed(header: str, items: list[str], rest_where: str, shown: int) -> list[str]:
    """`header`, then the first `shown` items indented; `rest_where` says where the others are."""
    lines = [header, *(f"  {item}" for item in items[:shown])]
    if len(items) > shown:
        lines.append(f"  ... {len(items) - shown} more {rest_where}")
    return lines


def filled_lines(cohort, rest_where: str, shown: int = QUARANTINE_SHOWN) -> list[str]:
    """How many patients had values taken from their other rows, then the first `shown` notes; `rest_where`
    says where the others are. A cohort written before the readers filled gaps says nothing."""
    filled = cohort.meta.get("filled", [])
    if not filled:
        return []
    header = f"values taken from a patient's other rows: {len(filled)} patient(s)"
    return first_listed(header, filled, rest_where, shown)


def quarantine_lines(cohort, rest_where: str, shown: int = QUARANTINE_SHOWN) -> list[str]:
    """The row counts, then the first `shown` quarantined rows with their reasons; `rest_where` says where
    the others are."""
    meta, quarantine = cohort.meta, cohort.quarantine
    header = f"rows: {meta['rows_in']} read, {meta['rows_kept']} kept, {meta['rows_quarantined']} quarantined"
    rows = [
        f"{row.source} row {row.row} ({row.id}): {row.reason}" for row in quarantine.itertuples(index=False)
    ]
    return first_listed(header, rows, rest_where, shown)


def run(args: argparse.Namespace) -> int:
    from healnet.data.cohort import ingest

    cohort = ingest(
        args.input,
        args.out,
        name=args.name,
        seed=args.seed,
        folds=args.folds,
        holdout_repeats=args.holdout_repeats,
        slide_dir=args.slide_dir,
    )
    print(summary(cohort))
    return 0
