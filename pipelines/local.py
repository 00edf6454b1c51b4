"""Run the pipeline on this machine with `kfp.local` (SubprocessRunner in the current interpreter) and
collect what a person wants to see afterwards: metrics, the gate decision, the model tag, reports."""

from __future__ import annotations

import builtins
import functools
import json
import logging
import re
import shutil
import warnings
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from pipelines.options import DEFAULT_OPTIONS, ClusterOptions

if TYPE_CHECKING:
    from kfp.dsl.graph_component import GraphComponent

ANSI_COLOUR = re.compile(r"\x1b\[[0-9;]*m")  # kfp.local colours task names in its messages
# Report artifacts, copied next to the run with a file extension so they open in a browser/editor.
REPORTS = {
    "validation.md": ("validate", "report"),
    "evaluation.html": ("evaluate", "report"),
    "gate.md": ("gate", "report"),
    "gate.json": ("gate", "gate_json"),
    "evaluation.json": ("evaluate", "evaluation"),
    "promotion.md": ("promote", "report"),
    "rejection.md": ("reject", "report"),
}
# the model card, written by whichever release step ran: promote (the registered version's) or reject
MODEL_CARDS = {"model_card.md": "model_card", "model_card.json": "model_card_json"}
STEP_LOG = "steps.log"  # the steps' own output (executor logs, progress bars), unless streamed


class _NoStreamedLogsNotice(logging.Filter):
    """Drops kfp.local's "Streamed logs:" line when the logs go to a file instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Streamed logs" not in record.getMessage()


# evaluate's metrics that `LocalRun.metrics_line` folds into the c-index's entry or leaves out
INTERVAL_METRICS = ("c_index_ci_low", "c_index_ci_high", "bootstrap_resamples")
# counts, shown as whole numbers (a cached evaluation's metrics come back as floats)
COUNT_METRICS = ("test_patients", "test_events", "slides_quarantined")


@dataclass
class LocalRun:
    run_dir: Path
    succeeded: bool
    error: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    decision: str | None = None
    model_tag: str | None = None
    reports: dict[str, Path] = field(default_factory=dict)
    gate: dict = field(default_factory=dict)  # the gate's gate.json: every number and the rule that decided
    quarantined_slides: list[str] = field(default_factory=list)  # named by train when it ran in this run

    @property
    def rule(self) -> str | None:
        """The text of the gate rule that decided."""
        return self.gate.get("rule")

    def metrics_line(self) -> str:
        """The test metrics in one line, the c-index first with its bootstrap interval when it has one:
        "c_index 0.6200 (95 % CI 0.5500–0.7000), c_index_ipcw 0.6000, ..., test_events 24"."""
        from healnet.evaluate import c_index_summary
        from healnet.survival_metrics import DEFAULT_BOOTSTRAP

        with_interval = {"c_index", *INTERVAL_METRICS[:2]} <= set(self.metrics)
        shown = []
        if with_interval:
            low, high = (self.metrics[bound] for bound in INTERVAL_METRICS[:2])
            shown.append(c_index_summary(self.metrics["c_index"], low, high, DEFAULT_BOOTSTRAP.confidence))
        for name, value in self.metrics.items():
            if name in INTERVAL_METRICS or (name == "c_index" and with_interval):
                continue
            if name in COUNT_METRICS:
                shown.append(f"{name} {int(value)}")
            else:
                shown.append(f"{name} {value:.4f}" if isinstance(value, float) else f"{name} {value}")
        return ", ".join(shown)


def run_local(
    arguments: dict,
    pipeline_root: Path,
    options: ClusterOptions = DEFAULT_OPTIONS,
    cache: bool = False,
    stream_logs: bool = False,
    runner: object | None = None,
) -> LocalRun:
    """Run the pipeline with `arguments` under `pipeline_root`; a failed step ends the run (reported,
    not raised) after the exit handler has run. With `cache`, steps whose inputs are unchanged reuse
    the outputs of an earlier run under the same root (validation and the release steps always run).
    The steps' own output goes to the terminal with `stream_logs`, else to `steps.log` in the run folder
    (kfp.local's one-line progress per task is printed either way). `runner` is a kfp.local runner; the
    default, SubprocessRunner(use_venv=False), runs every step in this interpreter (a DockerRunner runs
    them in the step images: scripts/pipeline_in_images.py)."""
    from components.trainjob import POD_BACKEND
    from pipelines.options import ParamError
    from pipelines.pipeline import build_pipeline

    if options.train_backend != POD_BACKEND:  # kfp.local has no cluster to run a TrainJob on
        raise ParamError(
            f"run-local trains in one process: train_backend={options.train_backend} needs a cluster"
        )
    run_dir, error, step_log = run_pipeline_locally(
        build_pipeline(options), arguments, pipeline_root, cache, stream_logs, runner
    )
    result = collect(run_dir, error)
    if step_log:
        result.reports[STEP_LOG] = step_log
    return result


def run_pipeline_locally(
    pipeline: GraphComponent,
    arguments: dict,
    pipeline_root: Path,
    cache: bool = False,
    stream_logs: bool = False,
    runner: object | None = None,
) -> tuple[Path, str, Path | None]:
    """Run `pipeline` with kfp.local as `run_local` describes;
    returns its run folder, the error that ended it ("" when it succeeded) and its steps.log (None when the
    steps' output was streamed)."""
    from kfp import local

    pipeline_root = Path(pipeline_root).resolve()
    pipeline_root.mkdir(parents=True, exist_ok=True)
    before = set(pipeline_root.glob(f"{pipeline.name}-*"))
    local.init(
        runner=runner or local.SubprocessRunner(use_venv=False),
        pipeline_root=str(pipeline_root),
        enable_caching=cache,
    )
    error = ""
    original_print = builtins.print
    pending_log = pipeline_root / f".{STEP_LOG}"
    with ExitStack() as stack, warnings.catch_warnings():
        if not stream_logs:
            log_file = stack.enter_context(open(pending_log, "w", encoding="utf-8"))
            builtins.print = functools.partial(original_print, file=log_file)
            quiet, root = _NoStreamedLogsNotice(), logging.getLogger()  # kfp.local logs through root
            root.addFilter(quiet)
            stack.callback(root.removeFilter, quiet)
        # kfp.local warns that the cluster images and the Kubernetes/resource settings are ignored here
        warnings.filterwarnings("ignore", message=".*non-Python base image.*")
        warnings.filterwarnings("ignore", message=".*no effect in the current local runner.*")
        try:
            pipeline(**arguments)
        except RuntimeError as failure:  # kfp.local raises when a task fails
            error = ANSI_COLOUR.sub("", str(failure))
        finally:
            # kfp.local indents print() around each task by swapping builtins.print; parallel loop
            # iterations can interleave the swaps and leave it indented
            builtins.print = original_print
    new_runs = sorted(set(pipeline_root.glob(f"{pipeline.name}-*")) - before)
    if len(new_runs) != 1:
        raise RuntimeError(
            f"expected one new run folder in {pipeline_root}, found {[p.name for p in new_runs]}"
        )
    step_log = None if stream_logs else Path(shutil.move(pending_log, new_runs[0] / STEP_LOG))
    return new_runs[0], error, step_log


def _executor_output(run_dir: Path, task: str) -> dict | None:
    path = run_dir / task / "executor_output.json"
    return json.loads(path.read_text()) if path.is_file() else None


def collect(run_dir: Path, error: str = "") -> LocalRun:
    """Read a finished local run folder (one subfolder per task)."""
    result = LocalRun(run_dir, succeeded=not error, error=error)
    evaluation = _executor_output(run_dir, "evaluate")
    if evaluation:
        result.metrics = evaluation["artifacts"]["metrics"]["artifacts"][0]["metadata"]
    trained = _executor_output(run_dir, "train")
    if trained:
        model = trained["artifacts"]["model"]["artifacts"][0]["metadata"]
        result.quarantined_slides = list(model.get("quarantined_slide_ids", []))
    decided = _executor_output(run_dir, "gate")
    if decided:
        result.decision = decided["parameterValues"]["Output"]
        record = run_dir / "gate" / "gate_json"
        result.gate = json.loads(record.read_text()) if record.is_file() else {}
        # a cached evaluation has no folder in this run; the gate recorded the metrics it judged
        result.metrics = (
            result.metrics or decided["artifacts"]["report"]["artifacts"][0]["metadata"]["candidate_metrics"]
        )
    promoted = _executor_output(run_dir, "promote")
    if promoted:
        result.model_tag = promoted["parameterValues"]["Output"]
    cards = [(name, (task, part)) for task in ("promote", "reject") for name, part in MODEL_CARDS.items()]
    for name, (task, artifact) in [*REPORTS.items(), *cards]:
        source = run_dir / task / artifact
        if source.is_file():
            result.reports[name] = Path(shutil.copyfile(source, run_dir / name))
    return result
