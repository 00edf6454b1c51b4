"""`healnet evaluate`: the survival evaluation report of a trained checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = (
    "Evaluate a checkpoint on a cohort split through the serving path: print Harrell's and Uno's C with "
    "bootstrap intervals, the time-dependent AUC, the Brier score, calibration and the subgroup table, and "
    "write evaluation.json, evaluation.html (with the plots) and each patient's risk (docs/evaluation.md)."
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
    from healnet.evaluation_report import SUMMARY_KEYS, format_text

    checkpoint = args.run / "checkpoint" if (args.run / "checkpoint").is_dir() else args.run
    out = args.out or args.run / "evaluation"
    result = evaluate_checkpoint(checkpoint, args.cohort, out, args.features, args.role, args.split_repeat)
    print(
        format_table(
            {k: v for k, v in result.items() if isinstance(v, int | float | str) and k in SUMMARY_KEYS}
        )
    )
    interval = c_index_summary(
        result["c_index"], result["c_index_ci_low"], result["c_index_ci_high"], result["confidence"]
    )
    print(
        f"{result['role']} patients: {interval}, {result['events']} events among {result['patients']} "
        f"({result['bootstrap_resamples']} bootstrap resamples of the patients, seed {result['bootstrap_seed']})"
    )
    print(format_text(result))
    print(f"each patient's risk: {result['predictions_parquet']}")
    print(f"Kaplan-Meier plot: {result['kaplan_meier_png']}")
    print(f"evaluation.json: {Path(out) / 'evaluation.json'}")
    print(f"evaluation.html: {result['evaluation_html']}")
    return 0
