"""`healnet cv`: repeated K-fold cross-validation of HEALNet against CoxNet and a random survival forest."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from healnet.cli.ingest import filled_lines, quarantine_lines
from healnet.cli.recipe_options import add_recipe_options, recipe_from_args
from healnet.recipes import CV_FOLDS, CV_MODELS, CV_PROTOCOLS, CV_REPEATS, CV_SEED, TCGA

HELP = (
    "Cross-validate HEALNet against age alone, CoxNet and a random survival forest on the same patient-level "
    "folds (everything fitted on training folds only); print mean ± std c-index, the best baseline and "
    "HEALNet's paired difference to it, and write a JSON report."
)
QUARANTINE_SHOWN = 5  # rows listed on stderr; the JSON report keeps them all
# the options that override a setting of the HEALNet recipe (healnet.cli.recipe_options)
RECIPE_FLAGS = (
    "--members",
    "--epochs",
    "--patience",
    "--batch-size",
    "--weight-decay",
    "--top-k",
    "--omics-select",
    "--linear-l1-ratio",
)


def configure(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--table",
        type=Path,
        action="append",
        help="PORPOISE table (tcga_<cohort>_all_clean.csv.gz) to ingest in memory; give it once per cohort "
        "to cross-validate several cohorts and pool HEALNet's paired difference over them",
    )
    source.add_argument("--cohort", type=Path, help="canonical cohort folder (healnet ingest/synth)")
    source.add_argument(
        "--pool",
        type=Path,
        nargs="+",
        metavar="REPORT",
        help="fit nothing: pool the JSON reports of earlier runs (one cohort each) and print the pooled "
        "paired difference",
    )
    parser.add_argument(
        "--protocol",
        choices=sorted(CV_PROTOCOLS),
        default=None,
        help="a predeclared protocol, which fixes --folds, --repeats and --seed: "
        + "; ".join(f"{name}: {f} folds x {r} repeats, seed {s}" for name, (f, r, s) in CV_PROTOCOLS.items()),
    )
    parser.add_argument(
        "--features",
        type=Path,
        default=None,
        help="patch-feature folder; COHORT/features when present and not given",
    )
    parser.add_argument(
        "--modalities",
        default=None,
        help="HEALNet input kinds, comma-separated: omic, clinical, wsi; all the cohort has when not given",
    )
    parser.add_argument(
        "--recipe",
        default=TCGA.name,
        help="named HEALNet recipe (healnet/recipes.py): tcga (omics + clinical, 20-member ensemble) or demo",
    )
    parser.add_argument("--folds", type=int, default=None, help=f"K of the stratified K-fold ({CV_FOLDS})")
    parser.add_argument(
        "--repeats", type=int, default=None, help=f"independent K-fold partitions ({CV_REPEATS})"
    )
    parser.add_argument(
        "--seed", type=int, default=None, help=f"seed of the folds and of every model ({CV_SEED})"
    )
    parser.add_argument(
        "--models",
        default=",".join(CV_MODELS),
        help="comma-separated subset of healnet, age (age alone), coxnet (clinical + all omics), "
        "coxnet_topk (clinical + top-k omics), coxnet_mid (clinical + all omics, the middle penalty of "
        "its path), rsf (forest on clinical + top-k omics)",
    )
    add_recipe_options(parser, RECIPE_FLAGS)
    parser.add_argument("--threads", type=int, default=1, help="torch threads and forest jobs")
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="folds run in this many worker processes (one thread each); the results do not depend on it",
    )
    parser.add_argument(
        "--json",
        type=Path,
        default=None,
        help="write the full report (per fold and summary) here; with several cohorts, one report holding "
        "each cohort's and the pooled difference",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def protocol_settings(args: argparse.Namespace) -> tuple[int, int, int]:
    """(folds, repeats, seed): the protocol's, or the flags' over the defaults. A protocol is predeclared,
    so a flag that would change it is refused."""
    from healnet.cv import CVError

    given = {
        flag: getattr(args, flag) for flag in ("folds", "repeats", "seed") if getattr(args, flag) is not None
    }
    if args.protocol is not None:
        if given:
            flags = " ".join(f"--{flag} {value}" for flag, value in given.items())
            raise CVError(f"--protocol {args.protocol} fixes the folds, repeats and seed; leave out {flags}")
        return CV_PROTOCOLS[args.protocol]
    return given.get("folds", CV_FOLDS), given.get("repeats", CV_REPEATS), given.get("seed", CV_SEED)


def run(args: argparse.Namespace) -> int:
    from healnet.cv import format_pooled, pool_cohorts, write_report

    if args.pool:
        reports = {}
        for path in args.pool:
            report = read_report(path)
            reports[report.get("cohort") or path.stem] = report
        pooled = pool_cohorts(reports)
        print(format_pooled(pooled))
        if args.json is not None:
            write_report({"pooled": pooled, "reports": [str(path) for path in args.pool]}, args.json)
            print(f"report written to {args.json}")
        return 0
    folds, repeats, seed = protocol_settings(args)
    sources = args.table or [None]
    reports = {}
    for table in sources:
        report = cross_validate_source(args, table, folds, repeats, seed)
        reports[report["cohort"]] = report
    if len(reports) == 1:
        result = next(iter(reports.values()))
    else:
        pooled = pool_cohorts(reports)
        print(format_pooled(pooled))
        result = {"protocol": args.protocol, "cohorts": reports, "pooled": pooled}
    if args.json is not None:
        write_report(result, args.json)
        print(f"report written to {args.json}")
    return 0


def read_report(path: Path) -> dict:
    import json

    from healnet.cv import CVError

    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise CVError(f"cannot read the report {path}: {error}") from None
    if not isinstance(report, dict) or "summary" not in report:
        raise CVError(f"{path} is not a one-cohort report of healnet cv (it has no summary)")
    return report


def cross_validate_source(
    args: argparse.Namespace, table: Path | None, folds: int, repeats: int, seed: int
) -> dict:
    """One cohort's cross-validation, printed as a table; its JSON-ready report."""
    from dataclasses import replace

    import torch

    from healnet.cv import CVConfig, cross_validate, format_table
    from healnet.data.cohort import Cohort, ingest
    from healnet.fitting import CohortData

    torch.set_num_threads(args.threads)
    if table is not None:
        cohort = ingest(table)
        features = args.features
    else:
        cohort = Cohort.load(args.cohort)
        default_features = args.cohort / "features"
        features = args.features or (default_features if default_features.is_dir() else None)
    data = CohortData.from_cohort(cohort, features, require_features=args.features is not None)

    recipe = recipe_from_args(args, RECIPE_FLAGS)
    defaults = CVConfig()
    config = replace(
        defaults,
        folds=folds,
        repeats=repeats,
        seed=seed,
        models=tuple(args.models.split(",")),
        modalities=tuple(args.modalities.split(",")) if args.modalities else None,
        healnet=recipe,
        forest=replace(defaults.forest, n_jobs=args.threads),
    )

    def kept_in(field: str) -> str:  # where the rows not listed on stderr are
        return f"in the report's {field} ({args.json})" if args.json else "(give --json to keep them all)"

    if len(cohort.quarantine):
        # rows the reader could not use are left out of every model: say so before the hours of fitting
        print("\n".join(quarantine_lines(cohort, kept_in("quarantine"), QUARANTINE_SHOWN)), file=sys.stderr)
    if filled := filled_lines(cohort, kept_in("filled"), QUARANTINE_SHOWN):
        print("\n".join(filled), file=sys.stderr)
    report = cross_validate(data, config, progress=not args.no_progress, jobs=args.jobs)
    name = cohort.meta.get("name") or Path(str(table or args.cohort)).name
    report["cohort"] = name
    report["protocol"] = args.protocol
    report["source"] = str(table or args.cohort)
    report["quarantine"] = cohort.quarantine.to_dict(orient="records")
    report["filled"] = cohort.meta.get("filled", [])
    print(format_table(report, title=f"{name}:"))
    return report
