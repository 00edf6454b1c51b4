"""Batch-scoring steps: the model version resolved once, the patients in shards, each shard scored through
the serving path (`Predictor` on the registered checkpoint), and the shards merged into one table."""

from kfp.dsl import Artifact, Dataset, Input, Metrics, Output, OutputPath

from components.images import cpu_component


@cpu_component
def resolve_model(model_version: str, registry_dir: str, model_modalities: OutputPath(str)) -> str:
    """The registered version every shard scores with, resolved once so that a promotion during the run
    cannot split it between two versions. Never cached: the champion moves.

    Args:
        model_version: `healnet:VERSION` or `VERSION`; empty: the registry's champion.
        registry_dir: the BentoML store and champion pointer; empty: $BENTOML_HOME / $HEALNET_REGISTRY_DIR.
        model_modalities: the input kinds the version reads (omic, clinical, wsi), comma-separated, which
            validation checks the cohort has (and which decide whether slides are tiled).

    Returns the concrete tag, `healnet:VERSION`."""
    from pathlib import Path

    from components.support import use_registry

    use_registry(registry_dir)
    from healnet.batch_scoring import resolve_version

    tag, modalities = resolve_version(model_version)
    Path(model_modalities).write_text(",".join(modalities))
    print(f"scoring with {tag} ({', '.join(modalities)})")
    return tag


@cpu_component
def shard_patients(
    cohort: Input[Dataset], shards: int, model_version: str, assignments: Output[Artifact]
) -> list[dict]:
    """The cohort's patients in `shards` contiguous blocks (fewer when there are fewer patients).

    Args:
        cohort: the canonical cohort folder (`ingest`).
        shards: how many shards to score in parallel.
        model_version: the tag `resolve_model` chose, passed on in every loop item.
        assignments: each shard's patient ids, JSON (`{"0": [...], "1": [...]}`).

    Returns the scoring loop's items, each with `shard_index`, `shard_count` and `model_version`
    (kfp.local hands a loop body the loop item in place of any other step's output)."""
    import json
    from pathlib import Path

    from healnet.batch_scoring import shard_patient_ids
    from healnet.data.cohort import Cohort

    blocks = shard_patient_ids(Cohort.load(Path(cohort.path)).clinical.index.tolist(), shards)
    Path(assignments.path).write_text(json.dumps({str(index): ids for index, ids in enumerate(blocks)}))
    assignments.metadata["patients_per_shard"] = [len(ids) for ids in blocks]
    return [
        {"shard_index": index, "shard_count": len(blocks), "model_version": model_version}
        for index in range(len(blocks))
    ]


@cpu_component
def score_shard(
    cohort: Input[Dataset],
    features: Input[Dataset],
    assignments: Input[Artifact],
    model_version: str,
    shard_index: int,
    shard_count: int,
    registry_dir: str,
    scores: Output[Dataset],
):
    """Score one shard's patients with `Predictor` on the registered version, as the service answers them.

    Args:
        cohort: the canonical cohort folder.
        features: the run's patch features (`merge_features`), read when the model reads slides.
        assignments: every shard's patient ids (`shard_patients`).
        model_version: the tag to score with (`resolve_model`).
        shard_index: this shard's place, from 0.
        shard_count: how many shards the patients are in.
        registry_dir: the BentoML store; empty: $BENTOML_HOME.
        scores: the shard's table (parquet: `healnet.batch_scoring.SCORE_COLUMNS`); its metadata holds the
            shard's start and end (Unix seconds) and the model's time-bin edges."""
    import json
    import time
    from pathlib import Path

    from components.support import use_registry

    use_registry(registry_dir)
    from healnet.batch_scoring import score_patients

    started = time.time()
    patient_ids = json.loads(Path(assignments.path).read_text())[str(shard_index)]
    frame, bin_edges = score_patients(Path(cohort.path), patient_ids, model_version, Path(features.path))
    frame.to_parquet(scores.path, index=False)
    scores.metadata.update(
        {
            "shard_index": shard_index,
            "shard_count": shard_count,
            "patients": len(frame),
            "started": started,
            "finished": time.time(),
            "bin_edges_months": bin_edges,
        }
    )
    print(f"shard {shard_index + 1} of {shard_count}: {len(frame)} patients scored with {model_version}")


@cpu_component
def merge_scores(shard_scores: Input[list[Dataset]], scores: Output[Dataset], metrics: Output[Metrics]):
    """The shards' tables as one parquet, and the run's summary.

    Args:
        shard_scores: every shard's table (`score_shard`).
        scores: one row per patient: patient_id, risk, survival (one float per time bin), modalities_used,
            model_version; its metadata holds the bin edges in months.
        metrics: patients, shards, patients_per_second (from the first shard's start to the last one's end),
            scoring_seconds, model_version and the risk quantiles risk_q05 ... risk_q95."""
    import json
    from pathlib import Path

    import pandas as pd

    from healnet.batch_scoring import merge_shard_scores, score_summary

    ordered = sorted(shard_scores, key=lambda shard: int(shard.metadata["shard_index"]))
    merged = merge_shard_scores([pd.read_parquet(shard.path) for shard in ordered])
    merged.to_parquet(scores.path, index=False)
    started = min(shard.metadata["started"] for shard in ordered)
    seconds = max(shard.metadata["finished"] for shard in ordered) - started
    summary = score_summary(merged, len(ordered), seconds)
    scores.metadata.update({**summary, "bin_edges_months": ordered[0].metadata["bin_edges_months"]})
    for name, value in summary.items():
        metrics.log_metric(name, value)
    Path(metrics.path).write_text(json.dumps(metrics.metadata))  # the file too, not only the metadata
