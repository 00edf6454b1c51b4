"""`healnet explain`: the attention heatmap of one slide of a training run.

`explain_slide` finds the slide's feature file (and the slide file and patient, when a cohort is given),
predicts it with the run's checkpoint (with the patient's other modalities), and draws the slide's
attention with `healnet.heatmap.draw_heatmap`, writing the PNG and a JSON of every patch's attention.
Reading the cohort and the slide files takes pandas and OpenSlide (imported lazily).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from healnet.errors import HEALNetError
from healnet.heatmap import (
    ExplainError,
    SlideAttention,
    coordinate_spacing,
    draw_heatmap,
    panels,
    parse_layer,
)
from healnet.inference import Case, Prediction, Predictor
from healnet.preprocess.feature_files import (
    SLIDE_SUFFIXES,
    SlideInputError,
    feature_file_name,
    read_feature_metadata,
    read_slide_features,
    resolve_feature_dir,
    slide_stem,
)
from healnet.preprocess.state import WSI


def patch_footprint(metadata: Mapping[str, Any], coords: np.ndarray) -> tuple[float, str]:
    """Level-0 px side of a patch and where it came from: the feature file's patch_size_level0 (imported
    features) or patch_size × target_mpp / slide_mpp, else the coordinates' spacing."""
    level0 = metadata.get("patch_size_level0")
    if isinstance(level0, int | float) and math.isfinite(level0) and level0 > 0:
        return float(level0), "feature metadata"
    try:
        footprint = (
            float(metadata["patch_size"]) * float(metadata["target_mpp"]) / float(metadata["slide_mpp"])
        )
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return coordinate_spacing(coords), "coordinate spacing"
    if math.isfinite(footprint) and footprint > 0:
        return footprint, "feature metadata"
    return coordinate_spacing(coords), "coordinate spacing"


@dataclass
class SlideSource:
    """Where a slide's parts are: its feature file, the slide file (None: not here) and its patient."""

    slide_id: str
    features_path: Path
    slide_path: Path | None = None
    patient_id: str | None = None


def locate_slide(
    slide: str | Path,
    cohort: Any | None = None,
    features_dir: Path | None = None,
    encoder_key: str | None = None,
) -> SlideSource:
    """The slide given as a cohort slide id, a slide file or a feature file (.parquet). Feature folders
    may be keyed by encoder (`features/<encoder key>/`): the model's encoder's folder is preferred."""
    given = Path(slide)
    features_path = slide_path = None
    if given.is_file() and given.suffix.lower() == ".parquet":
        features_path = given
        try:
            slide_id = str(read_feature_metadata(given).get("slide_id") or given.stem)
        except (OSError, ValueError) as error:  # pyarrow's ArrowInvalid is a ValueError
            raise ExplainError(f"{given} is not a readable feature file: {error}") from None
    elif given.is_file() and given.suffix.lower() in SLIDE_SUFFIXES:
        slide_path, slide_id = given, given.name
    elif given.exists():
        raise ExplainError(f"{given} is neither a slide ({', '.join(sorted(SLIDE_SUFFIXES))}) nor a .parquet")
    else:
        slide_id = str(slide)

    patient_id = None
    if cohort is not None:
        rows = cohort.slides[cohort.slides["slide_id"].map(slide_stem) == slide_stem(slide_id)]
        if rows.empty and slide_path is None and features_path is None:
            raise ExplainError(
                f"slide {slide_id!r} is not in the cohort's slide manifest {cohort.root}/slides.parquet "
                f"(e.g. {', '.join(cohort.slides['slide_id'].head(3))})"
            )
        if not rows.empty:
            slide_id, patient_id = str(rows["slide_id"].iloc[0]), str(rows["patient_id"].iloc[0])
            if slide_path is None:
                try:
                    slide_path = cohort.slide_path(slide_id)
                except (FileNotFoundError, KeyError, HEALNetError):
                    slide_path = None
    elif features_path is None and slide_path is None and features_dir is None:
        raise ExplainError(
            f"{slide} is not a file: give a slide id with --cohort or --features, or a slide or feature file"
        )
    if slide_path is not None and not Path(slide_path).is_file():
        slide_path = None

    if features_path is None:
        if features_dir is None and cohort is not None and cohort.root is not None:
            features_dir = Path(cohort.root) / "features"
        if features_dir is None:
            raise ExplainError(
                f"no patch features for {slide_id}: give --features (the folder of `healnet preprocess-slides`)"
            )
        features_dir = Path(features_dir)
        if encoder_key and (features_dir / encoder_key).is_dir():
            folder = features_dir / encoder_key
        else:
            try:
                folder = resolve_feature_dir(features_dir)
            except SlideInputError as error:
                raise ExplainError(str(error)) from None
        features_path = folder / feature_file_name(slide_id)
        if not features_path.is_file():
            raise ExplainError(
                f"no feature file for slide {slide_id} in {folder} ({features_path.name}); compute it with "
                f"`healnet preprocess-slides SLIDE --out {features_dir}`"
            )
    return SlideSource(slide_id, features_path, None if slide_path is None else Path(slide_path), patient_id)


def patient_case(cohort: Any, patient_id: str, predictor: Predictor) -> Case:
    """The patient's omics (the model's features, by table) and clinical covariates from a cohort, as
    evaluation sends them (`healnet.scoring`); missing is None."""
    from healnet.scoring import CohortPatients

    return CohortPatients.load(cohort, [patient_id]).cases(predictor)[0]


@dataclass
class Explanation:
    png: Path
    json: Path
    attention: SlideAttention
    prediction: Prediction
    source: SlideSource
    top: np.ndarray


def checkpoint_dir(run: Path) -> Path:
    """RUN/checkpoint of a `healnet train` run, or the folder itself when it is a checkpoint."""
    run = Path(run)
    return run / "checkpoint" if (run / "checkpoint").is_dir() else run


def explain_slide(
    run: Path,
    slide: str | Path,
    out: Path,
    cohort_dir: Path | None = None,
    features_dir: Path | None = None,
    top_k: int = 8,
    layer: str | int = "all",
    palette: bool = False,
) -> Explanation:
    """Predict one slide with the run's checkpoint (with the patient's other modalities when the cohort
    is given; this slide's patches only) and write the heatmap PNG `out` and `out` with .json."""
    from healnet.data.cohort import Cohort

    if top_k < 0:
        raise ExplainError(f"top-k must be >= 0, got {top_k}")
    layer = parse_layer(layer)
    predictor = Predictor.from_dir(checkpoint_dir(run))
    if predictor.wsi_dim is None:
        raise ExplainError(f"the model of {run} was trained without slides: it has no slide attention")
    encoder = predictor.preprocessor.wsi_encoder
    cohort = Cohort.load(cohort_dir) if cohort_dir is not None else None
    source = locate_slide(slide, cohort, features_dir, encoder.key if encoder else None)
    try:
        features, coords = read_slide_features(source.features_path)
        metadata = read_feature_metadata(source.features_path)
    except (SlideInputError, OSError, ValueError) as error:
        raise ExplainError(f"cannot read {source.features_path}: {error}") from None
    if len(features) == 0:
        raise ExplainError(f"{source.features_path} holds no patch")
    if features.shape[1] != predictor.wsi_dim:
        raise ExplainError(
            f"{source.features_path} has {features.shape[1]} features per patch, the model expects "
            f"{predictor.wsi_dim}: use the features of the encoder it was trained on"
        )
    recorded = metadata.get("encoder")
    if encoder is not None and isinstance(recorded, dict) and recorded != encoder.to_dict():
        raise ExplainError(
            f"{source.features_path} comes from another encoder than the model's ({encoder.describe()}); "
            "features of different encoders are not comparable"
        )
    grid = {key: metadata.get(key) for key in predictor.preprocessor.tiling}
    if any(
        isinstance(value, int | float) and float(value) != float(predictor.preprocessor.tiling[key])
        for key, value in grid.items()
    ):
        raise ExplainError(
            f"{source.features_path} has another patch grid ({grid}) than the model's training features "
            f"({predictor.preprocessor.tiling})"
        )

    case = patient_case(cohort, source.patient_id, predictor) if cohort and source.patient_id else Case()
    case = Case(omics=case.omics, wsi_features=features, clinical=case.clinical, wsi_coords=coords)
    prediction = predictor.predict([case], return_attention=True)[0]
    footprint, footprint_source = patch_footprint(metadata, coords)
    attention = SlideAttention.from_prediction(prediction, coords, footprint, source.slide_id)
    shown = panels(attention, layer)
    ranked_by = shown[0][1] if len(shown) == 1 else None
    top = attention.top_k(top_k, ranked_by)

    used = "+".join(prediction.modalities_used)
    title = f"{source.slide_id}  ·  risk {prediction.risk:.3f}  ·  {used}" + (
        f"  ·  patient {source.patient_id}" if source.patient_id else ""
    )
    png = draw_heatmap(attention, out, source.slide_path, layer, top_k, title, palette)
    report = attention.to_json(top, ranked_by) | {
        "patient_id": source.patient_id,
        "run": str(run),
        "features_path": str(source.features_path),
        "slide_path": None if source.slide_path is None else str(source.slide_path),
        "footprint_source": footprint_source,
        "risk": prediction.risk,
        "survival": prediction.survival,
        "modalities_used": prediction.modalities_used,
        "attention_other": {
            name: values for name, values in (prediction.attention or {}).items() if name != WSI
        },
        "layer": layer,
        "png": str(png),
    }
    json_path = Path(out).with_suffix(".json")
    json_path.write_text(json.dumps(report, indent=1))
    return Explanation(png, json_path, attention, prediction, source, top)
