"""`python -m pipelines`: compile, submit to Kubeflow Pipelines, or run locally with kfp.local."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from pipelines.options import OPTION_NAMES, split_params
from pipelines.schedules import CRON_HELP
from pipelines.submit import VERSION_NAMING

DEFAULT_PACKAGE = Path("build/healnet_pipeline.yaml")
DEFAULT_BATCH_PACKAGE = Path("build/healnet_batch_scoring.yaml")
TRAINING, BATCH_SCORING = "training", "batch-scoring"
DEFAULT_LOCAL_ROOT = Path("build/kfp-local")
DEMO_COHORT = Path("build/demo")
SERVE_COMMAND = "bentoml serve serving.service:HEALNetService"

PARAM_HELP = (
    "KEY=VALUE, repeatable: a pipeline parameter (the cohort: source (a PORPOISE table, cBioPortal study "
    "folder or GDC clinical.tsv) or cohort_dir (a canonical cohort folder); the slides: slide_dir, or "
    "features_dir with encoder_name, weights_sha256, mpp, patch_size; modalities (default: all the cohort "
    "has), split_seed, registry_dir, slide_shards, split_repeat, max_quarantined_fraction, "
    "min_events_per_split, recipe, epochs, "
    "batch_size, patience, seed, min_c_index, tolerance, min_test_events, dry_run) or a "
    f"compile-time cluster option ({', '.join(OPTION_NAMES)}); batch-scoring takes the cohort and slide "
    "parameters, registry_dir, slide_shards, max_quarantined_fraction, model_version (default: the "
    "champion) and shards; see docs/pipeline.md"
)
COHORT_INPUTS = ("source", "cohort_dir")


def _add_kfp_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--host", required=True, help="KFP API endpoint, e.g. https://kubeflow.example.com/pipeline"
    )
    parser.add_argument("--namespace", default=None, help="Kubeflow profile namespace (multi-user installs)")
    parser.add_argument(
        "--experiment", default="healnet", help="experiment to file the runs under (default: %(default)s)"
    )
    parser.add_argument(
        "--token", default=os.environ.get("KFP_TOKEN"), help="bearer token (default: $KFP_TOKEN)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines",
        description="The HEALNet Kubeflow pipeline: validate → slide shards → merged features → train (GPU) → "
        "evaluate → gate → promote. Step images come from $HEALNET_IMAGE and $HEALNET_GPU_IMAGE.",
    )
    parser.add_argument(
        "--debug", action="store_true", help="show the traceback of an error instead of its one-line message"
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    compile_ = commands.add_parser(
        "compile",
        help="compile the training and the batch-scoring pipelines to KFP YAML packages",
        description="Compile both pipelines; a --param applies to each pipeline that has it.",
    )
    compile_.add_argument(
        "--output",
        type=Path,
        default=DEFAULT_PACKAGE,
        help="where to write the training pipeline's YAML package (default: %(default)s)",
    )
    compile_.add_argument(
        "--batch-output",
        type=Path,
        default=DEFAULT_BATCH_PACKAGE,
        help="where to write the batch-scoring pipeline's YAML package (default: %(default)s)",
    )
    compile_.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help=PARAM_HELP)
    compile_.set_defaults(handler=run_compile)

    submit = commands.add_parser(
        "submit",
        help="compile, upload and start a run on a Kubeflow Pipelines API",
        description=f"Compile the pipeline, upload it as a version named {VERSION_NAMING} (reused when "
        "it exists), find or create the experiment and start a run of that version. cohort_dir must be a "
        "path the steps can read, e.g. on the PVC mounted with --param cohort_pvc=NAME.",
    )
    _add_kfp_options(submit)
    submit.add_argument("--run-name", default=None, help="run name (default: pipeline name + UTC time)")
    submit.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help=PARAM_HELP)
    submit.add_argument(
        "--wait", action="store_true", help="wait for the run to finish; exit 1 unless it succeeds"
    )
    submit.add_argument(
        "--timeout", type=int, default=6 * 3600, help="seconds to wait with --wait (default: %(default)s)"
    )
    submit.set_defaults(handler=run_submit)

    schedule = commands.add_parser(
        "schedule",
        help="create, list or disable recurring runs pinned to a pipeline version",
        usage="python -m pipelines schedule --host URL --cron EXPR --param KEY=VALUE ... [options]\n"
        "       python -m pipelines schedule list --host URL [--namespace NS] [--token T]\n"
        "       python -m pipelines schedule disable ID --host URL [--namespace NS] [--token T]",
        description=f"Without an action: compile the pipeline, upload it as submit does (a version named "
        f"{VERSION_NAMING}) and create a recurring run of that version in the experiment. The recurring "
        "run keeps that version: to run newer code, create a new schedule (and disable the old one). "
        "list: the pipeline's recurring runs (id, name, cron, status, pinned version). disable ID: stop "
        "one. The cron has 6 fields, seconds first; a 5-field crontab line is refused.",
    )
    schedule.add_argument(
        "action",
        nargs="?",
        choices=("list", "disable"),
        help="list or disable ID; without it, create a recurring run (needs --cron)",
    )
    schedule.add_argument("recurring_run_id", nargs="?", metavar="ID", help="with disable: the recurring run")
    _add_kfp_options(schedule)
    schedule.add_argument("--cron", metavar="EXPR", help=CRON_HELP)
    schedule.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help=PARAM_HELP)
    schedule.add_argument(
        "--name", default=None, help="recurring run name (default: the pipeline name + the version name)"
    )
    schedule.add_argument(
        "--max-concurrency",
        type=int,
        default=1,
        help="runs of this schedule that may be active at once (default: %(default)s)",
    )
    schedule.add_argument(
        "--catchup",
        action="store_true",
        help="after a pause or a backlog, start a run for every missed time (default: only the latest)",
    )
    schedule.set_defaults(handler=run_schedule)

    local = commands.add_parser(
        "run-local",
        help="run the whole pipeline on this machine with kfp.local",
        description="Run the pipeline with kfp.local's SubprocessRunner in this Python environment (cluster "
        "settings are ignored, and no step is retried unless --param retries=N: there is no preemption "
        "here). The cohort is --param source=TABLE (ingested as the first step), --cohort or --param "
        "cohort_dir (a canonical folder); with none of them it uses build/demo, generating the synthetic "
        "demo cohort there first when missing. The model registry is $BENTOML_HOME (or --param "
        "registry_dir).",
    )
    local.add_argument(
        "pipeline",
        nargs="?",
        choices=(TRAINING, BATCH_SCORING),
        default=TRAINING,
        help=f"{TRAINING} (the default) or {BATCH_SCORING}: every patient of the cohort scored by a "
        "registered version (--param model_version=healnet:VERSION, default: the champion) in --param "
        "shards=N parallel shards, into one parquet (patient_id, risk, survival: one float per time bin, "
        "modalities_used, model_version)",
    )
    local.add_argument(
        "--cohort",
        type=Path,
        default=None,
        help=f"canonical cohort folder (default: the demo cohort in {DEMO_COHORT})",
    )
    local.add_argument(
        "--pipeline-root",
        type=Path,
        default=DEFAULT_LOCAL_ROOT,
        help="where task outputs go (default: %(default)s)",
    )
    local.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help=PARAM_HELP)
    local.add_argument(
        "--cache",
        action="store_true",
        help="reuse the outputs of steps whose inputs did not change since an earlier run under the same "
        "--pipeline-root (validation, the gate and the release steps always run); a reused step's reports "
        "stay in the run that produced them",
    )
    local.add_argument(
        "--verbose",
        action="store_true",
        help="stream every step's own output (executor logs, training progress) to the terminal instead "
        "of writing it to steps.log in the run folder",
    )
    local.set_defaults(handler=run_local_command)
    return parser


def _builders(*names: str) -> list:
    from pipelines.batch_scoring import build_batch_scoring_pipeline
    from pipelines.pipeline import build_pipeline

    known = {TRAINING: build_pipeline, BATCH_SCORING: build_batch_scoring_pipeline}
    return [known[name] for name in names or (TRAINING,)]


def _parse(pairs: list[str], *pipelines: str):
    """Cluster options and the typed arguments of the named pipelines (default: training)."""
    from pipelines.options import parse_params
    from pipelines.pipeline import pipeline_inputs

    inputs = {
        name: kind for build in _builders(*pipelines) for name, kind in pipeline_inputs(build()).items()
    }
    return parse_params(pairs, inputs)


def _compile(options, arguments: dict, output: Path, pipeline: str = TRAINING) -> Path:
    """Compile the named pipeline with those of `arguments` it has as its defaults."""
    from kfp import compiler

    from pipelines.pipeline import pipeline_inputs

    built = _builders(pipeline)[0](options)
    own = {name: value for name, value in arguments.items() if name in pipeline_inputs(built)}
    output.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(built, str(output), pipeline_parameters=own or None)
    return output


def run_compile(args: argparse.Namespace) -> int:
    options, arguments = _parse(args.param, TRAINING, BATCH_SCORING)
    print(f"compiled the training pipeline to {_compile(options, arguments, args.output)}")
    batch = _compile(options, arguments, args.batch_output, BATCH_SCORING)
    print(f"compiled the batch-scoring pipeline to {batch}")
    return 0


def _one_cohort_input(arguments: dict) -> bool:
    """Whether exactly one cohort input is given; else says which are wanted on stderr."""
    if sum(bool(arguments.get(name)) for name in COHORT_INPUTS) == 1:
        return True
    print(
        "error: give exactly one of --param source=PATH (a raw table or study folder) and --param "
        "cohort_dir=PATH (a canonical cohort folder), at a path the pipeline steps can read",
        file=sys.stderr,
    )
    return False


def _print_version(version) -> None:
    action = "reused" if version.reused else "uploaded"
    print(f"{action} pipeline {version.pipeline_id} version {version.version_name} (id {version.version_id})")


def run_submit(args: argparse.Namespace) -> int:
    from pipelines.pipeline import PIPELINE_NAME
    from pipelines.submit import SubmitError, submit

    options, arguments = _parse(args.param)
    if not _one_cohort_input(arguments):
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        package = _compile(options, {}, Path(tmp) / "healnet_pipeline.yaml")
        try:
            submission = submit(
                package,
                args.host,
                arguments,
                PIPELINE_NAME,
                args.experiment,
                args.namespace,
                args.run_name,
                args.token,
                args.timeout if args.wait else None,
            )
        except SubmitError as error:  # the run was submitted and failed, or never started: exit 1, not 2
            print(f"error: {error}", file=sys.stderr)
            return 1
    _print_version(submission.version)
    print(
        f"started run {submission.run_id} of version {submission.version.version_name} "
        f"in experiment {submission.experiment_id}"
    )
    if submission.state is not None:
        print(f"run finished: {submission.state}")
        return 0 if submission.state.upper() == "SUCCEEDED" else 1
    return 0


def run_schedule(args: argparse.Namespace) -> int:
    from pipelines.pipeline import PIPELINE_NAME
    from pipelines.schedules import (
        ScheduleError,
        check_cron,
        create_schedule,
        disable_schedule,
        list_schedules,
    )
    from pipelines.submit import SubmitError

    if (args.action == "disable") != bool(args.recurring_run_id):
        raise ScheduleError("give the recurring run to disable as: schedule disable ID (and an ID only then)")
    if args.action and (args.cron or args.param or args.name):
        raise ScheduleError(f"schedule {args.action} takes no --cron, --param or --name")
    try:
        if args.action == "list":
            schedules = list_schedules(args.host, PIPELINE_NAME, args.namespace, args.token)
            for schedule in schedules:
                print(
                    f'{schedule.recurring_run_id}  {schedule.name}  cron "{schedule.cron}"  '
                    f"{schedule.status}  version {schedule.version_name}"
                )
            if not schedules:
                print(f"no recurring runs of pipeline {PIPELINE_NAME}")
            return 0
        if args.action == "disable":
            disable_schedule(args.host, args.recurring_run_id, args.namespace, args.token)
            print(f"disabled recurring run {args.recurring_run_id}")
            return 0
        if not args.cron:
            raise ScheduleError("schedule needs --cron EXPR (or: schedule list, schedule disable ID)")
        cron = check_cron(args.cron)  # before the compile, which takes seconds
        options, arguments = _parse(args.param)
        if not _one_cohort_input(arguments):
            return 2
        with tempfile.TemporaryDirectory() as tmp:
            package = _compile(options, {}, Path(tmp) / "healnet_pipeline.yaml")
            version, schedule = create_schedule(
                package,
                args.host,
                arguments,
                PIPELINE_NAME,
                args.experiment,
                cron,
                args.name,
                args.max_concurrency,
                args.catchup,
                args.namespace,
                args.token,
            )
    except SubmitError as error:  # the API refused or could not be reached: exit 1, as submit
        print(f"error: {error}", file=sys.stderr)
        return 1
    _print_version(version)
    catchup = "every missed time caught up" if args.catchup else "no catch-up"
    print(
        f"created recurring run {schedule.recurring_run_id} ({schedule.name}, {schedule.status}): "
        f'cron "{schedule.cron}", at most {args.max_concurrency} at once, {catchup}'
    )
    print(f"pinned to version {schedule.version_name} (id {version.version_id})")
    return 0


def _demo_cohort() -> Path:
    if not (DEMO_COHORT / "cohort.json").is_file():
        from healnet.data.synth import SynthConfig, synthesize_cohort

        config = SynthConfig(seed=0)
        print(f"no --cohort: writing the demo cohort ({config.patients} patients) to {DEMO_COHORT}")
        synthesize_cohort(DEMO_COHORT, config)
    return DEMO_COHORT


def _local_cohort(args: argparse.Namespace, arguments: dict) -> str:
    """Make the cohort and slide paths of `arguments` absolute, the demo cohort when none is given;
    returns what is wrong with them ("" when nothing)."""
    cohort_inputs = {
        "--cohort": args.cohort,
        **{f"--param {name}": arguments.get(name) for name in COHORT_INPUTS},
    }
    given = [name for name, value in cohort_inputs.items() if value]
    if len(given) > 1:
        return f"give the cohort once, not as {' and '.join(given)}"
    for name in ("source", "slide_dir", "features_dir"):
        if arguments.get(name):
            if not Path(arguments[name]).exists():
                return f"{name} {arguments[name]} does not exist"
            arguments[name] = str(Path(arguments[name]).resolve())
    if not arguments.get("source"):
        cohort = Path(arguments.get("cohort_dir") or args.cohort or _demo_cohort())
        if not cohort.is_dir():
            return f"cohort folder {cohort} does not exist"
        arguments["cohort_dir"] = str(cohort.resolve())
    return ""


def run_local_command(args: argparse.Namespace) -> int:
    from pipelines.local import run_local

    options, arguments = _parse(args.param, args.pipeline)
    if "retries" not in split_params(args.param):
        options = replace(options, retries=0)
    problem = _local_cohort(args, arguments)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    if args.pipeline == BATCH_SCORING:
        return _run_local_batch_scoring(args, options, arguments)
    started = time.monotonic()
    result = run_local(arguments, args.pipeline_root, options, cache=args.cache, stream_logs=args.verbose)
    print(f"\npipeline run folder: {result.run_dir} ({time.monotonic() - started:.0f} s)")
    for name, path in result.reports.items():
        print(f"  {name}: {path}")
    if not result.succeeded:
        where = (
            f" (each step's output: {result.reports['steps.log']})" if "steps.log" in result.reports else ""
        )
        print(f"pipeline FAILED: {result.error}{where}\nnothing was promoted", file=sys.stderr)
        return 1
    print("test metrics: " + result.metrics_line())
    if result.quarantined_slides:
        print(
            f"slides quarantined, their patients predicted without them: {len(result.quarantined_slides)} "
            f"({', '.join(result.quarantined_slides)})"
        )
    print(f"gate decision: {result.decision}" + (f" (rule: {result.rule})" if result.rule else ""))
    if result.model_tag is None:
        print("no model promoted: the champion is unchanged")
        return 0
    registry = Path(arguments["registry_dir"]).resolve() if arguments.get("registry_dir") else None
    prefix = f"BENTOML_HOME={registry} HEALNET_REGISTRY_DIR={registry} " if registry else ""
    print(f"promoted model: {result.model_tag} (now the champion)")
    print(f"next, serve it from the repository root:  {prefix}{SERVE_COMMAND}")
    return 0


def _run_local_batch_scoring(args: argparse.Namespace, options, arguments: dict) -> int:
    from components.support import use_registry
    from pipelines.batch_scoring import run_local_batch_scoring

    if arguments.get("shards", 1) < 1:  # absent: the pipeline's default
        print(f"error: shards must be at least 1, got {arguments['shards']}", file=sys.stderr)
        return 2
    if arguments.get("registry_dir"):
        arguments["registry_dir"] = str(Path(arguments["registry_dir"]).resolve())
    use_registry(arguments.get("registry_dir", ""))
    from healnet.batch_scoring import resolve_version

    # a version that is not there is one line here, not a failed step in steps.log
    tag, _ = resolve_version(arguments.get("model_version", ""))
    print(f"scoring with {tag}")
    started = time.monotonic()
    result = run_local_batch_scoring(
        arguments, args.pipeline_root, options, cache=args.cache, stream_logs=args.verbose
    )
    print(f"\npipeline run folder: {result.run_dir} ({time.monotonic() - started:.0f} s)")
    if not result.succeeded:
        where = f" (each step's output: {result.step_log})" if result.step_log else ""
        print(f"pipeline FAILED: {result.error}{where}", file=sys.stderr)
        return 1
    summary = result.summary
    print(f"scores: {result.scores} ({summary['patients']} rows)")
    print(f"model version: {summary['model_version']}")
    print(
        f"{summary['patients_per_second']:.1f} patients/s over {summary['shards']} shards "
        f"({summary['scoring_seconds']:.1f} s from the first shard's start to the last one's end)"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run a command; a library error (HEALNetError) is one line on stderr and exit code 2."""
    args = build_parser().parse_args(argv)
    from healnet.errors import exit_code_of

    return exit_code_of(lambda: args.handler(args), "error", args.debug)


if __name__ == "__main__":
    sys.exit(main())
