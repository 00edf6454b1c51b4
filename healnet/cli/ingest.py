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
    return "\n".join(lines)


def quarantine_lines(cohort, rest_where: str, shown: int = QUARANTINE_SHOWN) -> list[str]:
    """The row counts, then the first `shown` quarantined rows with their reasons; `rest_where` says where
    the others are."""
    meta, quarantine = cohort.meta, cohort.quarantine
    lines = [
        f"rows: {meta['rows_in']} read, {meta['rows_kept']} kept, {meta['rows_quarantined']} quarantined"
    ]
    for row in quarantine.head(shown).itertuples(index=False):
        lines.append(f"  {row.source} row {row.row} ({row.id}): {row.reason}")
    if len(quarantine) > shown:
        lines.append(f"  ... {len(quarantine) - shown} more {rest_where}")
    return lines


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
