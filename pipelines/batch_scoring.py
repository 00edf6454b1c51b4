"""The HEALNet batch-scoring pipeline: resolve the model version → ingest → validate → slide features (tiled
in shards, or imported) when the model reads slides → the patients in shards → each shard scored by
`Predictor` on the registered version, as the service answers → one parquet and a summary; all inside an
exit handler that notifies how the run ended, as the training pipeline's does.

Compiled beside the training pipeline (`python -m pipelines compile`) and run locally with
`python -m pipelines run-local batch-scoring`; the cluster settings are the training pipeline's
(`pipelines.task_settings`).
"""

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from kfp import dsl
from kfp.dsl.graph_component import GraphComponent

from components.batch_steps import merge_scores, resolve_model, score_shard, shard_patients
from components.release_steps import notify
from healnet.validation.thresholds import DEFAULT_THRESHOLDS
from pipelines.cohort_steps import cohort_steps
from pipelines.options import DEFAULT_OPTIONS, ClusterOptions
from pipelines.task_settings import cpu_step, mount_registry, notify_webhook

BATCH_SCORING_NAME = "healnet-batch-scoring"
DEFAULT_SHARDS = 4
# the splits of an ingested source and their events matter to training, not to scoring
SCORING_SPLIT_SEED = 0
NO_EVENTS_CHECK = 0


def build_batch_scoring_pipeline(options: ClusterOptions = DEFAULT_OPTIONS) -> GraphComponent:
    @dsl.pipeline(
        name=BATCH_SCORING_NAME,
        description="Score every patient of a cohort with a registered HEALNet version (default: the "
        "champion) in parallel shards, through the service's Predictor, into one parquet.",
    )
    def healnet_batch_scoring(
        source: str = "",
        cohort_dir: str = "",
        slide_dir: str = "",
        features_dir: str = "",
        encoder_name: str = "",
        weights_sha256: str = "",
        mpp: float = 0.0,
        patch_size: int = 0,
        model_version: str = "",
        shards: int = DEFAULT_SHARDS,
        registry_dir: str = "",
        slide_shards: int = 2,
        max_quarantined_fraction: float = DEFAULT_THRESHOLDS.max_quarantined_row_fraction,
    ):
        finished = notify_webhook(notify(run_name=dsl.PIPELINE_JOB_NAME_PLACEHOLDER), options)
        finished.set_caching_options(False)
        with dsl.ExitHandler(finished, name="healnet-batch-scoring-run"):
            resolved = mount_registry(
                cpu_step(resolve_model(model_version=model_version, registry_dir=registry_dir), options),
                options,
            )
            resolved.set_caching_options(False)  # the champion moves
            # the model's modalities: a cohort without one of them fails at validate, and slides are tiled only
            # for a model that reads them
            prepared = cohort_steps(
                options,
                source=source,
                cohort_dir=cohort_dir,
                slide_dir=slide_dir,
                split_seed=SCORING_SPLIT_SEED,
                import_settings={
                    "features_dir": features_dir,
                    "encoder_name": encoder_name,
                    "weights_sha256": weights_sha256,
                    "mpp": mpp,
                    "patch_size": patch_size,
                },
                slide_shards=slide_shards,
                max_quarantined_fraction=max_quarantined_fraction,
                min_events_per_split=NO_EVENTS_CHECK,
                modalities=resolved.outputs["model_modalities"],
                slide_loop_name="slide-shards",
            )
            cohort = prepared.cohort
            sharded = cpu_step(
                shard_patients(cohort=cohort, shards=shards, model_version=resolved.outputs["Output"]),
                options,
            )
            with dsl.ParallelFor(
                sharded.outputs["Output"], parallelism=options.shard_parallelism, name="scoring-shards"
            ) as patient_shard:
                scored = score_shard(
                    cohort=cohort,
                    features=prepared.features,
                    assignments=sharded.outputs["assignments"],
                    model_version=patient_shard.model_version,
                    shard_index=patient_shard.shard_index,
                    shard_count=patient_shard.shard_count,
                    registry_dir=registry_dir,
                )
                mount_registry(cpu_step(scored, options, retry=True), options)
            cpu_step(merge_scores(shard_scores=dsl.Collected(scored.outputs["scores"])), options, retry=True)

    return healnet_batch_scoring


@dataclass
class BatchScoringRun:
    """A finished local batch-scoring run: its folder, the merged table and the summary metrics."""

    run_dir: Path
    succeeded: bool
    error: str = ""
    scores: Path | None = None  # the merged parquet, copied into the run folder as scores.parquet
    summary: dict = field(default_factory=dict)  # merge_scores' metrics
    step_log: Path | None = None


def run_local_batch_scoring(
    arguments: dict,
    pipeline_root: Path,
    options: ClusterOptions = DEFAULT_OPTIONS,
    cache: bool = False,
    stream_logs: bool = False,
) -> BatchScoringRun:
    """Run the batch-scoring pipeline with kfp.local (`pipelines.local.run_pipeline_locally`); a failed step
    ends the run, reported in `error`, not raised."""
    from pipelines.local import run_pipeline_locally

    run_dir, error, step_log = run_pipeline_locally(
        build_batch_scoring_pipeline(options), arguments, pipeline_root, cache, stream_logs
    )
    result = BatchScoringRun(run_dir, succeeded=not error, error=error, step_log=step_log)
    merged = run_dir / "merge-scores"
    if (merged / "executor_output.json").is_file():
        outputs = json.loads((merged / "executor_output.json").read_text())["artifacts"]
        result.summary = outputs["metrics"]["artifacts"][0]["metadata"]
        result.scores = Path(shutil.copyfile(merged / "scores", run_dir / "scores.parquet"))
    return result
