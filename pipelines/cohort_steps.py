"""The steps both pipelines start with: fingerprint → ingest → validate → slide features (tiled in parallel
shards, or imported) → merged features. The training and batch-scoring pipelines build them here, so a
cohort reaches a model the same way in both."""

from dataclasses import dataclass
from typing import Any

from kfp import dsl
from kfp.dsl import PipelineTask

from components.data_steps import (
    fingerprint,
    import_features,
    ingest,
    merge_features,
    preprocess_slides,
    validate,
)
from pipelines.options import ClusterOptions
from pipelines.task_settings import cpu_step


@dataclass(frozen=True)
class CohortSteps:
    cohort: Any  # ingest's cohort artifact
    checked: PipelineTask  # validate: data_hash, slide_source, chosen_modalities, the report
    features: Any  # merge_features' patch-feature folder (empty for a cohort without slides)


def cohort_steps(
    options: ClusterOptions,
    *,
    source: Any,
    cohort_dir: Any,
    slide_dir: Any,
    split_seed: Any,
    import_settings: dict[str, Any],
    slide_shards: Any,
    max_quarantined_fraction: Any,
    min_events_per_split: Any,
    modalities: Any,
    slide_loop_name: str | None = None,
) -> CohortSteps:
    """Add the cohort's steps to the pipeline being defined; the arguments are its parameters (or
    constants). `import_settings`: features_dir, encoder_name, weights_sha256, mpp and patch_size."""
    # never cached: it reads the source, so an unchanged one reuses the cached ingest below
    fingerprinted = cpu_step(
        fingerprint(source=source, cohort_dir=cohort_dir, slide_dir=slide_dir, split_seed=split_seed), options
    )
    fingerprinted.set_caching_options(False)
    ingested = cpu_step(
        ingest(
            source=source,
            cohort_dir=cohort_dir,
            slide_dir=slide_dir,
            split_seed=split_seed,
            source_hash=fingerprinted.output,
        ),
        options,
    )
    cohort = ingested.outputs["cohort"]
    # validate checks what import_features will use, so a mistake in it fails before any retried step
    checked = cpu_step(
        validate(
            cohort=cohort,
            slide_shards=slide_shards,
            max_quarantined_fraction=max_quarantined_fraction,
            min_events_per_split=min_events_per_split,
            modalities=modalities,
            **import_settings,
        ),
        options,
    )
    checked.set_caching_options(False)  # cheap, and its report belongs in every run
    imported = cpu_step(
        import_features(
            slide_source=checked.outputs["slide_source"],
            data_hash=checked.outputs["data_hash"],
            **import_settings,
        ),
        options,
        retry=True,
    )
    with dsl.ParallelFor(
        checked.outputs["Output"], parallelism=options.shard_parallelism, name=slide_loop_name
    ) as shard:
        slides = preprocess_slides(
            cohort=cohort,
            slide_source=shard.slide_source,
            shard_index=shard.shard_index,
            shard_count=shard.shard_count,
            data_hash=shard.data_hash,
            slide_dir=slide_dir,
        )
        cpu_step(slides, options, retry=True)
    merged = cpu_step(
        merge_features(
            slide_features=dsl.Collected(slides.outputs["features"]),
            imported_features=imported.outputs["features"],
        ),
        options,
        retry=True,
    )
    return CohortSteps(cohort, checked, merged.outputs["features"])
