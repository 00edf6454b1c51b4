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

DEFAULT_PACKAGE = Path("build/healnet_pipeline.yaml")
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
    f"compile-time cluster option ({', '.join(OPTION_NAMES)}); see docs/pipeline.md"
)
COHORT_INPUTS = ("source", "cohort_dir")


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
    compile_ = commands.add_parser("compile", help="compile the pipeline to a KFP YAML package")
    compile_.add_argument(
        "--output",
        type=Path,
        default=DEFAULT_PACKAGE,
        help="where to write the YAML package (default: %(default)s)",
    )
    compile_.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help=PARAM_HELP)
    compile_.set_defaults(handler=run_compile)

    submit = commands.add_parser(
        "submit",
        help="compile, upload and start a run on a Kubeflow Pipelines API",
        description="Compile the pipeline, upload it (a new version when it exists), find or create the "
        "experiment and start a run. cohort_dir must be a path the steps can read, e.g. on the PVC "
        "mounted with --param cohort_pvc=NAME.",
    )
    submit.add_argument(
        "--host", required=True, help="KFP API endpoint, e.g. https://kubeflow.example.com/pipeline"
    )
    submit.add_argument("--namespace", default=None, help="Kubeflow profile namespace (multi-user installs)")
    submit.add_argument(
        "--experiment", default="healnet", help="experiment to file the run under (default: %(default)s)"
    )
    submit.add_argument("--run-name", default=None, help="run name (default: pipeline name + UTC time)")
    submit.add_argument(
        "--token", default=os.environ.get("KFP_TOKEN"), help="bearer token (default: $KFP_TOKEN)"
    )
    submit.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help=PARAM_HELP)
    submit.add_argument(
        "--wait", action="store_true", help="wait for the run to finish; exit 1 unless it succeeds"
    )
    submit.add_argument(
        "--timeout", type=int, default=6 * 3600, help="seconds to wait with --wait (default: %(default)s)"
    )
    submit.set_defaults(handler=run_submit)

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


def _parse(pairs: list[str]):
    from pipelines.options import parse_params
    from pipelines.pipeline import build_pipeline, pipeline_inputs

    return parse_params(pairs, pipeline_inputs(build_pipeline()))


def _compile(options, arguments: dict, output: Path) -> Path:
    from kfp import compiler

    from pipelines.pipeline import build_pipeline

    output.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(build_pipeline(options), str(output), pipeline_parameters=arguments or None)
    return output


def run_compile(args: argparse.Namespace) -> int:
    options, arguments = _parse(args.param)
    print(f"compiled the pipeline to {_compile(options, arguments, args.output)}")
    return 0


def run_submit(args: argparse.Namespace) -> int:
    from pipelines.pipeline import PIPELINE_NAME
    from pipelines.submit import SubmitError, submit

    options, arguments = _parse(args.param)
    if sum(bool(arguments.get(name)) for name in COHORT_INPUTS) != 1:
        print(
            "error: give exactly one of --param source=PATH (a raw table or study folder) and --param "
            "cohort_dir=PATH (a canonical cohort folder), at a path the pipeline steps can read",
            file=sys.stderr,
        )
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
    print(f"uploaded pipeline {submission.pipeline_id} version {submission.version_id}")
    print(f"started run {submission.run_id} in experiment {submission.experiment_id}")
    if submission.state is not None:
        print(f"run finished: {submission.state}")
        return 0 if submission.state.upper() == "SUCCEEDED" else 1
    return 0


def _demo_cohort() -> Path:
    if not (DEMO_COHORT / "cohort.json").is_file():
        from healnet.data.synth import SynthConfig, synthesize_cohort

        config = SynthConfig(seed=0)
        print(f"no --cohort: writing the demo cohort ({config.patients} patients) to {DEMO_COHORT}")
        synthesize_cohort(DEMO_COHORT, config)
    return DEMO_COHORT


def run_local_command(args: argparse.Namespace) -> int:
    from pipelines.local import run_local

    options, arguments = _parse(args.param)
    if "retries" not in split_params(args.param):
        options = replace(options, retries=0)
    cohort_inputs = {
        "--cohort": args.cohort,
        **{f"--param {name}": arguments.get(name) for name in COHORT_INPUTS},
    }
    given = [name for name, value in cohort_inputs.items() if value]
    if len(given) > 1:
        print(f"error: give the cohort once, not as {' and '.join(given)}", file=sys.stderr)
        return 2
    for name in ("source", "slide_dir", "features_dir"):
        if arguments.get(name):
            if not Path(arguments[name]).exists():
                print(f"error: {name} {arguments[name]} does not exist", file=sys.stderr)
                return 2
            arguments[name] = str(Path(arguments[name]).resolve())
    if not arguments.get("source"):
        cohort = Path(arguments.get("cohort_dir") or args.cohort or _demo_cohort())
        if not cohort.is_dir():
            print(f"error: cohort folder {cohort} does not exist", file=sys.stderr)
            return 2
        arguments["cohort_dir"] = str(cohort.resolve())
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


def main(argv: list[str] | None = None) -> int:
    """Run a command; a library error (HEALNetError) is one line on stderr and exit code 2."""
    args = build_parser().parse_args(argv)
    from healnet.errors import exit_code_of

    return exit_code_of(lambda: args.handler(args), "error", args.debug)


if __name__ == "__main__":
    sys.exit(main())
