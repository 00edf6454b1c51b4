"""Data steps: the cohort's fingerprint and ingest, its validation (which gates the whole run), and the
slides' patch features (tiled in shards, or imported when computed elsewhere), merged into one folder."""

from kfp.dsl import Artifact, Dataset, Input, Markdown, Output, OutputPath

from components.images import cpu_component


@cpu_component
def fingerprint(source: str, cohort_dir: str, slide_dir: str, split_seed: int) -> str:
    """The data hash of what `ingest` will read: the source's files, the slide folder's file stamps, the
    split seed and the code version (or a canonical cohort folder's data hash). Exactly one of `source`
    and `cohort_dir` is given. Never cached, so that an unchanged source reuses its cached ingest (and
    every step after it) and a changed one never does."""
    from pathlib import Path

    from components.support import PipelineStepError, code_version, cohort_data_hash
    from healnet.data.fingerprint import source_fingerprint

    if bool(source) == bool(cohort_dir):
        raise PipelineStepError(
            "give exactly one of source (a PORPOISE table, cBioPortal study folder or GDC clinical.tsv) and "
            f"cohort_dir (a canonical cohort folder); got source={source!r}, cohort_dir={cohort_dir!r}"
        )
    if cohort_dir:
        if slide_dir:
            raise PipelineStepError(
                "slide_dir applies to a source; a canonical cohort folder already locates its slides "
                "(healnet ingest --slide-dir)"
            )
        return cohort_data_hash(cohort_dir)
    settings = {"split_seed": split_seed}
    return source_fingerprint(Path(source), Path(slide_dir) if slide_dir else None, settings, code_version())


@cpu_component
def ingest(
    source: str,
    cohort_dir: str,
    slide_dir: str,
    split_seed: int,
    source_hash: str,
    cohort: Output[Dataset],
    report: Output[Markdown],
):
    """Ingest `source` (PORPOISE table, cBioPortal study folder or GDC clinical.tsv) into a canonical cohort
    folder with patient-level splits (seed `split_seed`), or take a copy of the canonical `cohort_dir`; the
    copy's slide paths are absolute, so the later steps read the slides where they are. Rows the readers
    reject are quarantined and counted in the report. `source_hash` (from `fingerprint`) keys the cache."""
    from pathlib import Path

    from components.support import cohort_data_hash
    from healnet.cli.ingest import summary
    from healnet.data.cohort import ingest as ingest_cohort
    from healnet.files import markdown_code_block

    out = Path(cohort.path)
    if source:
        ingested = ingest_cohort(
            Path(source), out, seed=split_seed, slide_dir=Path(slide_dir) if slide_dir else None
        )
    else:
        ingested = ingest_cohort(Path(cohort_dir), out)
    text = summary(ingested)
    print(text)
    Path(report.path).write_text("# Ingest\n\n" + markdown_code_block(text), encoding="utf-8")
    cohort.metadata.update(
        {
            "source": source or cohort_dir,
            "source_hash": source_hash,
            "data_hash": cohort_data_hash(out),
            "patients": len(ingested.clinical),
            "events": int(ingested.clinical["event"].sum()),
            "slides_listed": len(ingested.slides),
            "slides_with_file": int(ingested.slides["path"].notna().sum()),
            "rows_quarantined": int(ingested.meta["rows_quarantined"]),
        }
    )


@cpu_component
def validate(
    cohort: Input[Dataset],
    slide_shards: int,
    max_quarantined_fraction: float,
    min_events_per_split: int,
    modalities: str,
    features_dir: str,
    encoder_name: str,
    weights_sha256: str,
    mpp: float,
    patch_size: int,
    report: Output[Markdown],
    validation: Output[Artifact],
    data_hash: OutputPath(str),
    chosen_modalities: OutputPath(str),
    slide_source: OutputPath(str),
) -> list[dict]:
    """Validate the cohort with Great Expectations and check that the chosen modalities are there; a failed
    expectation, a quarantine at ingestion above `max_quarantined_fraction` of the rows or of the patients,
    a split (holdout train/val/test, K-fold test fold) with fewer than `min_events_per_split` events, or a
    modality the cohort lacks raises and stops the run here, once, before anything trains.

    `modalities` (comma-separated omic, clinical, wsi; empty: every one the cohort has) resolves to the
    list the run trains on. The slides' features come from `features_dir` when given ("import"), else from
    tiling the slide files ("tile"); without slides in the run, "none". An import's settings are checked
    here too (`encoder_name`, `weights_sha256`, `mpp`, `patch_size`, feature files in `features_dir`), so the
    retried import step meets no mistake of the user's. The report is validation.md; `validation` holds its
    JSON (validation.json: the expectations, the row accounting and the quarantine reasons).

    Returns the slide loop's items, one per shard (`slide_shards` when tiling, one idle shard otherwise:
    kfp.local cannot gather an empty loop), each with everything its shard needs (`shard_index`,
    `shard_count`, `slide_source`, `data_hash`): kfp.local hands a loop body the loop item in place of any
    other step's output. Writes the data hash (the one `ingest` recorded on the cohort, else computed over
    the cohort's folder), the modalities and the slide source for the later steps.
    """
    import shutil
    import tempfile
    from pathlib import Path

    from components.support import PipelineStepError, check_import, cohort_data_hash
    from healnet.data.cohort import Cohort
    from healnet.data.modalities import cohort_modalities, parse_modalities, resolve_modalities
    from healnet.files import markdown_text
    from healnet.preprocess.state import WSI
    from healnet.validation import validate_cohort
    from healnet.validation.thresholds import with_min_events_per_split, with_quarantine_limit

    if slide_shards < 1:
        raise PipelineStepError(f"slide_shards must be at least 1, got {slide_shards}")
    if features_dir:
        check_import(features_dir, encoder_name, weights_sha256, mpp, patch_size)
    thresholds = with_min_events_per_split(
        min_events_per_split, with_quarantine_limit(max_quarantined_fraction)
    )
    loaded = Cohort.load(Path(cohort.path))
    with tempfile.TemporaryDirectory(prefix="validation-") as scratch:
        result = validate_cohort(loaded, Path(scratch), thresholds, source=cohort.path)
        text = result.markdown_path.read_text(encoding="utf-8")
        shutil.copyfile(result.json_path, validation.path)  # validation.json, for the model card
    report.metadata["success"] = result.success
    if not result.success:
        Path(report.path).write_text(text, encoding="utf-8")
        failures = result.failures()
        raise PipelineStepError(
            f"the cohort failed validation ({len(failures)} check(s)): " + "; ".join(failures)
        )
    available = cohort_modalities(loaded, slide_features=bool(features_dir))
    chosen = resolve_modalities(parse_modalities(modalities), available, len(loaded.slides))
    if features_dir and WSI not in chosen:
        raise PipelineStepError(
            f"features_dir is given but the run's modalities ({', '.join(chosen)}) leave out wsi; add wsi "
            "to modalities or leave features_dir empty"
        )
    source = "none" if WSI not in chosen else ("import" if features_dir else "tile")
    lines = [
        f"- {name}: {markdown_text(what)}{'' if name in chosen else ' (not used)'}"
        for name, what in available.items()
    ]
    text += (
        "\n## Modalities\n\n" + "\n".join(lines) + f"\n\nTrained on: {', '.join(chosen)}; slides: {source}\n"
    )
    Path(report.path).write_text(text, encoding="utf-8")
    report.metadata.update({"modalities": chosen, "slide_source": source})
    # ingest records the hash of the folder it wrote; a cohort artifact from elsewhere carries none
    digest = cohort.metadata.get("data_hash") or cohort_data_hash(cohort.path)
    Path(data_hash).write_text(digest)
    Path(chosen_modalities).write_text(",".join(chosen))
    Path(slide_source).write_text(source)
    count = slide_shards if source == "tile" else 1
    return [
        {"shard_index": index, "shard_count": count, "slide_source": source, "data_hash": digest}
        for index in range(count)
    ]


@cpu_component
def preprocess_slides(
    cohort: Input[Dataset],
    slide_source: str,
    shard_index: int,
    shard_count: int,
    data_hash: str,
    features: Output[Dataset],
    slide_dir: str = "",
):
    """Tile and encode shard `shard_index` of `shard_count` of the cohort's slides (every slide with a
    file); unreadable slides are quarantined and listed in the shard's report.json and quarantine file.
    `slide_dir` (the folder `ingest` found the slides in) confines the slides: a slide file that resolves
    outside it is quarantined, never opened; empty: the cohort's slide paths are trusted as they are.
    Idle (an empty folder) unless `slide_source` is "tile"."""
    import tempfile
    from pathlib import Path

    import pandas as pd

    from healnet.data.cohort import Cohort
    from healnet.preprocess.wsi import preprocess_slides as tile_and_encode

    out_dir = Path(features.path)
    out_dir.mkdir(parents=True, exist_ok=True)
    features.metadata.update({"shard": f"{shard_index + 1} of {shard_count}", "data_hash": data_hash})
    if slide_source != "tile":
        features.metadata["slide_source"] = slide_source
        print(f"slides come from {slide_source!r}: nothing to tile")
        return
    loaded = Cohort.load(Path(cohort.path))
    slides = loaded.slides[loaded.slides["path"].notna()]
    processed, quarantined, patches = 0, [], 0
    if len(slides):
        # a manifest of the slides that have files, with absolute paths, keeps the cohort's slide ids
        paths = [str(loaded.slide_path(slide_id)) for slide_id in slides["slide_id"]]
        with tempfile.TemporaryDirectory(prefix="slides-") as scratch:
            manifest = Path(scratch) / "slides.csv"
            pd.DataFrame({"slide_id": slides["slide_id"], "path": paths}).to_csv(manifest, index=False)
            report = tile_and_encode(
                manifest,
                out_dir,
                shard=(shard_index, shard_count),
                progress=False,
                slide_root=Path(slide_dir) if slide_dir else None,
            )
        processed, quarantined, patches = len(report.processed), report.quarantined, report.n_patches
        for slide, reason in quarantined:
            print(f"quarantined slide {slide}: {reason}")
    features.metadata.update(
        {
            "slides_processed": processed,
            "slides_quarantined": len(quarantined),
            "quarantined_slides": [slide for slide, _ in quarantined],
            "patches": patches,
        }
    )


@cpu_component
def import_features(
    slide_source: str,
    features_dir: str,
    encoder_name: str,
    weights_sha256: str,
    mpp: float,
    patch_size: int,
    data_hash: str,
    features: Output[Dataset],
):
    """Import precomputed patch features (CLAM h5_files/pt_files, a TRIDENT job folder) from `features_dir`
    as `healnet import-features` does; slides that are unreadable, hold NaN or another grid are quarantined
    with the reason. `mpp` and `patch_size` (0: the files' attributes) and `weights_sha256` (empty: unknown,
    the served model then takes patch features only) describe the encoder. Idle (an empty folder) unless
    `slide_source` is "import"."""
    from pathlib import Path

    from components.support import PipelineStepError, import_config
    from healnet.preprocess.feature_import import import_features as import_slide_features

    out_dir = Path(features.path)
    out_dir.mkdir(parents=True, exist_ok=True)
    features.metadata["data_hash"] = data_hash
    if slide_source != "import":
        features.metadata["slide_source"] = slide_source
        print(f"slides come from {slide_source!r}: nothing to import")
        return
    config = import_config(encoder_name, weights_sha256, mpp, patch_size)
    report = import_slide_features(Path(features_dir), out_dir, config, progress=False)
    for slide, reason in report.quarantined:
        print(f"quarantined slide {slide}: {reason}")
    if not report.imported:
        raise PipelineStepError(
            f"every one of the {len(report.quarantined)} slide(s) in {features_dir} was quarantined "
            f"(first: {report.quarantined[0][0] if report.quarantined else 'none'}); see {report.out_dir}"
        )
    features.metadata.update(
        {
            "slides_imported": len(report.imported),
            "slides_quarantined": len(report.quarantined),
            "quarantined_slides": [slide for slide, _ in report.quarantined],
            "patches": report.n_patches,
            "encoder": report.provenance.describe() if report.provenance else None,
        }
    )


@cpu_component
def merge_features(
    slide_features: Input[list[Dataset]],
    imported_features: Input[Dataset],
    features: Output[Dataset],
):
    """The run's patch features as one folder, which train and evaluate read: every tiled shard's feature
    files and the imported ones (only one of the two holds any), with their quarantine lists together
    (`components.support.merge_feature_shards`). Its inputs, the shards and the import, key its cache."""
    from pathlib import Path

    from components.support import feature_folders, merge_feature_shards

    count = merge_feature_shards(feature_folders(slide_features, imported_features), Path(features.path))
    features.metadata["feature_files"] = count
