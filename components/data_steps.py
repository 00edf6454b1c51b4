"""Data steps: validation (which gates the whole run), omics preprocessing and one slide shard."""

from kfp.dsl import Artifact, Dataset, Markdown, Output, OutputPath

from components.images import cpu_component


@cpu_component
def validate(
    cohort_dir: str,
    slide_shards: int,
    max_quarantined_fraction: float,
    report: Output[Markdown],
    data_hash: OutputPath(str),
) -> list[int]:
    """Validate the cohort with Great Expectations; a failed expectation raises and stops the run, so
    does a quarantine at ingestion above `max_quarantined_fraction` of the rows or of the patients.

    Returns the slide-shard indices `[0, slide_shards)` the ParallelFor fans out over, and writes the
    cohort's data hash (sha256 of its clinical and omics tables) for the later steps.
    """
    import tempfile
    from pathlib import Path

    from components.support import PipelineStepError, cohort_data_hash
    from healnet.validation import validate as validate_cohort
    from healnet.validation.thresholds import with_quarantine_limit

    if slide_shards < 1:
        raise PipelineStepError(f"slide_shards must be at least 1, got {slide_shards}")
    thresholds = with_quarantine_limit(max_quarantined_fraction)
    with tempfile.TemporaryDirectory(prefix="validation-") as scratch:
        result = validate_cohort(Path(cohort_dir), Path(scratch), thresholds)
        Path(report.path).write_text(result.markdown_path.read_text(encoding="utf-8"), encoding="utf-8")
    report.metadata["success"] = result.success
    if not result.success:
        failures = result.failures()
        raise PipelineStepError(
            f"cohort {cohort_dir} failed validation ({len(failures)} expectation(s)): " + "; ".join(failures)
        )
    Path(data_hash).write_text(cohort_data_hash(cohort_dir))
    return list(range(slide_shards))


@cpu_component
def preprocess_omics(
    cohort_dir: str, split_repeat: int, recipe: str, data_hash: str, transform: Output[Artifact]
):
    """Fit the recipe's omics transform on the patients the recipe trains on (never the test patients).

    Writes its JSON state; `null` when the cohort has no omics table. `data_hash` keys the cache.
    """
    import json
    from pathlib import Path

    from healnet.data.cohort import Cohort
    from healnet.experiment import fitting_patients
    from healnet.preprocess.omics import OmicsTransform
    from healnet.recipes import get_recipe

    chosen = get_recipe(recipe)
    cohort = Cohort.load(Path(cohort_dir))
    train_ids = set(
        fitting_patients(
            cohort.patients("holdout", split_repeat, 0, "train"),
            cohort.patients("holdout", split_repeat, 0, "val"),
            chosen.members,
        )
    )
    state = None
    if cohort.omics:
        frames = {name: frame[frame.index.isin(train_ids)] for name, frame in cohort.omics.items()}
        fitted = OmicsTransform.fit(frames, chosen.omics)
        state = fitted.state_dict()
        transform.metadata["features"] = {name: len(names) for name, names in fitted.feature_names.items()}
    transform.metadata["data_hash"] = data_hash
    Path(transform.path).write_text(json.dumps(state))


@cpu_component
def preprocess_slides(
    cohort_dir: str, shard_index: int, shard_count: int, data_hash: str, features: Output[Dataset]
):
    """Tile and encode shard `shard_index` of `shard_count` of the cohort's slides (every slide with a
    file); unreadable slides are quarantined and listed in the shard's report.json."""
    import tempfile
    from pathlib import Path

    import pandas as pd

    from healnet.data.cohort import Cohort
    from healnet.preprocess.wsi import preprocess_slides as tile_and_encode

    cohort = Cohort.load(Path(cohort_dir))
    slides = cohort.slides[cohort.slides["path"].notna()]
    out_dir = Path(features.path)
    out_dir.mkdir(parents=True, exist_ok=True)
    processed = quarantined = patches = 0
    if len(slides):
        # a manifest of the slides that have files, with absolute paths, keeps the cohort's slide ids
        paths = [str(Path(cohort_dir, path).resolve()) for path in slides["path"]]
        with tempfile.TemporaryDirectory(prefix="slides-") as scratch:
            manifest = Path(scratch) / "slides.csv"
            pd.DataFrame({"slide_id": slides["slide_id"], "path": paths}).to_csv(manifest, index=False)
            report = tile_and_encode(manifest, out_dir, shard=(shard_index, shard_count), progress=False)
        processed, quarantined, patches = len(report.processed), len(report.quarantined), report.n_patches
        for slide, reason in report.quarantined:
            print(f"quarantined slide {slide}: {reason}")
    features.metadata.update(
        {
            "shard": f"{shard_index + 1} of {shard_count}",
            "slides_processed": processed,
            "slides_quarantined": quarantined,
            "patches": patches,
            "data_hash": data_hash,
        }
    )
