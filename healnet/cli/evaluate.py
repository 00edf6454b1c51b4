"""`healnet evaluate`: metrics and a Kaplan-Meier plot for a trained checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = (
    "Evaluate a checkpoint on a cohort split through the serving path: print the metrics (Harrell's C with "
    "its bootstrap interval, the events) and write each patient's risk and a Kaplan-Meier PNG."
)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--run", type=Path, required=True, help="run folder of `healnet train` (or a checkpoint folder)"
    )
    parser.add_argument("--cohort", type=Path, required=True, help="canonical cohort folder")
    parser.add_argument("--out", type=Path, default=None, help="report folder (default: RUN/evaluation)")
    parser.add_argument(
        "--features", type=Path, default=None, help="patch-feature folder (default: COHORT/features)"
    )
    parser.add_argument(
        "--role", choices=["train", "val", "test"], default="test", help="which split to evaluate"
    )
    parser.add_argument(
        "--split-repeat",
        type=int,
        default=0,
        help="which stored holdout split; give the one the run was trained on (`healnet train --split-repeat`)",
    )


def run(args: argparse.Namespace) -> int:
    from healnet.evaluate import c_index_summary, evaluate_checkpoint, format_table

    checkpoint = args.run / "checkpoint" if (args.run / "checkpoint").is_dir() else args.run
    out = args.out or args.run / "evaluation"
    result = evaluate_checkpoint(checkpoint, args.cohort, out, args.features, args.role, args.split_repeat)
    files = ("kaplan_meier_png", "predictions_parquet")
    print(format_table({k: v for k, v in result.items() if k not in files}))
    interval = c_index_summary(
        result["c_index"], result["c_index_ci_low"], result["c_index_ci_high"], result["confidence"]
    )
    print(
        f"{result['role']} patients: {interval}, {result['events']} events among {result['patients']} "
        f"({result['bootstrap_resamples']} bootstrap resamples of the patients, seed {result['bootstrap_seed']})"
    )
    print(f"each patient's risk: {result['predictions_parquet']}")
    print(f"Kaplan-Meier plot: {result['kaplan_meier_png']}")
    return 0
