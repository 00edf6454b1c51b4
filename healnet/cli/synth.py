"""`healnet synth`: write the synthetic demo cohort."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "Generate a synthetic TCGA-shaped demo cohort (table, pyramidal TIFF slides, canonical layout)."


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="folder to write the cohort to")
    parser.add_argument("--patients", type=int, default=400, help="number of patients")
    parser.add_argument(
        "--seed", type=int, default=0, help="random seed; the same seed writes the same cohort"
    )
    parser.add_argument(
        "--missing-slide", type=float, default=0.1, help="fraction of patients without a slide"
    )
    parser.add_argument("--missing-omics", type=float, default=0.1, help="fraction of patients without omics")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run(args: argparse.Namespace) -> int:
    from healnet.data.synth import SynthConfig, synthesize_cohort

    config = SynthConfig(
        patients=args.patients,
        seed=args.seed,
        missing_slide_fraction=args.missing_slide,
        missing_omics_fraction=args.missing_omics,
    )
    cohort = synthesize_cohort(args.out, config, progress=not args.no_progress)
    availability = cohort.availability
    print(
        f"wrote {len(cohort.clinical)} patients ({int(cohort.clinical['event'].sum())} events), "
        f"{availability['wsi'].sum()} with slides, {len(cohort.slides)} slide rows, to {args.out}"
    )
    print(f"next: healnet preprocess-slides {args.out}/slides.parquet --out {args.out}/features")
    return 0
