"""`healnet drift`: compare the service's spooled input summaries with a version's training reference."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HELP = (
    "Compare the inputs the service received (its drift spool, $HEALNET_DRIFT_SPOOL_DIR) with the training "
    "inputs of a model version: per modality (each omic table, clinical, wsi, the modality pattern) the "
    "share of features whose distribution drifted, the embedding drift score and a verdict (docs/drift.md)."
)
DRIFT_EXIT_CODE = 3  # with --fail-on-drift; 2 is an error (a HEALNetError)


def alpha(text: str) -> float:
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must lie in (0, 1), got {text}")
    return value


def configure(parser: argparse.ArgumentParser) -> None:
    from healnet.drift.compare import ALPHA

    parser.epilog = (
        "Exit codes: 0 compared (whatever the verdict), 2 an error (no reference in the version, an empty or "
        f"unreadable spool, an unreachable Pushgateway), {DRIFT_EXIT_CODE} drift found with --fail-on-drift."
    )
    parser.add_argument(
        "--tag", default="champion", help="model version, healnet:VERSION or VERSION, or champion"
    )
    parser.add_argument(
        "--current", type=Path, required=True, metavar="SPOOL_DIR", help="the service's drift spool folder"
    )
    parser.add_argument(
        "--alpha",
        type=alpha,
        default=ALPHA,
        help="false discovery rate within each modality (Benjamini-Hochberg)",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    parser.add_argument(
        "--metrics-file",
        type=Path,
        default=None,
        metavar="PATH",
        help="write healnet_input_drift_share{modality} and healnet_embedding_drift_score there "
        "(Prometheus text format, as node-exporter's textfile collector reads it)",
    )
    parser.add_argument(
        "--pushgateway",
        default=None,
        metavar="URL",
        help="push the same metrics to this Pushgateway, replacing the group of job healnet-drift",
    )
    parser.add_argument(
        "--namespace",
        default=None,
        metavar="NAME",
        help="the Kubernetes namespace of the service whose spool this is: the pushed group's namespace "
        "label, which the alerts and the dashboard select (the CronJob passes its own namespace)",
    )
    parser.add_argument(
        "--fail-on-drift", action="store_true", help=f"exit with {DRIFT_EXIT_CODE} when the verdict is drift"
    )


def run(args: argparse.Namespace) -> int:
    from healnet.drift.report import export_metrics, format_run, run_drift

    result = run_drift(None if args.tag == "champion" else args.tag, args.current, args.alpha)
    print(json.dumps(result.to_dict(), indent=2) if args.json else format_run(result))
    export_metrics(result.report, args.metrics_file, args.pushgateway, args.namespace)
    return DRIFT_EXIT_CODE if args.fail_on_drift and result.report.drifted else 0
