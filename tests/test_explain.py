"""Attention heatmaps: `healnet explain` on a trained run, the drawing functions, and patch coordinates
through the service (a client draws the same picture from a response)."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from devtools.demo import DemoSpec, demo_payload, demo_tiles
from healnet.checkpoint import load_checkpoint
from healnet.cli import main
from healnet.data.cohort import Cohort
from healnet.data.synth import SynthConfig, synthesize_cohort
from healnet.explain import patch_footprint
from healnet.heatmap import (
    DPI,
    ExplainError,
    SlideAttention,
    coordinate_spacing,
    draw_heatmap,
    figure_size,
    panels,
    rasterise,
)
from healnet.inference import Case, CaseError, Predictor
from healnet.preprocess.feature_files import feature_file_name, read_slide_features
from serving.schemas import PredictRequest

pytest_plugins = ("serving_fixtures",)
PATCH_PX = 128  # 16 patches on a 512 px synthetic slide
MODEL = ["--latents", "4", "--latent-dim", "16", "--depth", "2", "--top-k", "20"]  # two layers


def png_size(path) -> tuple[int, int]:
    with Image.open(path) as image:
        return image.size


def expected_size(n_panels: int, top_k: int) -> tuple[int, int]:
    width, height = figure_size(n_panels, top_k)
    return round(width * DPI), round(height * DPI)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A synthetic cohort with slides, its features (keyed by encoder) and a two-layer model on both."""
    root = tmp_path_factory.mktemp("explain")
    cohort = root / "cohort"
    synthesize_cohort(
        cohort, SynthConfig(patients=24, seed=3, missing_slide_fraction=0.1, slide_px=512), progress=False
    )
    features = cohort / "features"
    slides = str(cohort / "slides.parquet")
    assert main(["preprocess-slides", slides, "--out", str(features), "--patch-size", str(PATCH_PX)]) == 0
    run = root / "run"
    train = ["train", "--cohort", str(cohort), "--out", str(run), "--epochs", "1", "--no-progress", *MODEL]
    assert main(train) == 0
    listed = Cohort.load(cohort).slides
    slide_id = str(listed.loc[listed["path"].notna(), "slide_id"].iloc[0])
    return {"cohort": cohort, "features": features / "stats", "run": run, "slide_id": slide_id}


def test_explain_draws_every_layer_and_writes_the_attention_of_every_patch(trained, tmp_path, capsys):
    out = tmp_path / "heatmap.png"
    args = ["--run", str(trained["run"]), "--cohort", str(trained["cohort"]), "--slide", trained["slide_id"]]
    assert main(["explain", *args, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "heatmap:" in printed and "blank canvas" not in printed

    assert png_size(out) == expected_size(3, 8)  # layer 1, layer 2, their mean; 8 tiles
    report = json.loads(out.with_suffix(".json").read_text())
    _, coords = read_slide_features(trained["features"] / feature_file_name(trained["slide_id"]))
    patches = report["patches"]
    assert len(patches) == report["n_patches"] == len(coords) > 8
    assert [[p["x"], p["y"]] for p in patches] == coords.tolist()
    assert report["n_layers"] == 2 and report["patient_id"] == trained["slide_id"][:12]
    assert report["modalities_used"] == ["omic", "wsi"] and report["slide_path"]
    assert report["patch_footprint_px"] == PATCH_PX and report["footprint_source"] == "feature metadata"
    layers = np.array([p["attention_layers"] for p in patches])  # (patches, layers)
    np.testing.assert_allclose(layers.sum(0), 1.0, atol=1e-4)  # softmax over the patches, per layer
    np.testing.assert_allclose([p["attention"] for p in patches], layers.mean(1), atol=1e-6)

    top = report["top_k"]
    assert [t["rank"] for t in top] == list(range(1, 9)) and report["top_k_ranked_by"] == "mean"
    scores = [t["attention"] for t in top]
    assert scores == sorted(scores, reverse=True)
    assert scores[0] == pytest.approx(max(p["attention"] for p in patches))
    assert all(patches[t["index"]]["attention"] == t["attention"] for t in top)


def test_one_layer_from_a_feature_file_alone_on_a_blank_canvas(trained, tmp_path, capsys):
    """No cohort: the slide alone (slides-only prediction), no slide file: positions and scores only."""
    out = tmp_path / "layer2.png"
    features = trained["features"] / feature_file_name(trained["slide_id"])
    argv = ["explain", "--run", str(trained["run"]), "--slide", str(features), "--out", str(out)]
    assert main([*argv, "--layer", "2", "--top-k", "3"]) == 0
    assert "blank canvas" in capsys.readouterr().out
    assert png_size(out) == expected_size(1, 3)
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["modalities_used"] == ["wsi"] and report["slide_path"] is None
    assert report["top_k_ranked_by"] == "layer 2"
    layer_2 = [p["attention_layers"][1] for p in report["patches"]]
    assert [t["index"] for t in report["top_k"]] == list(np.argsort(layer_2)[::-1][:3])


def test_explain_errors_are_one_line(trained, tmp_path, capsys):
    base = ["explain", "--run", str(trained["run"]), "--cohort", str(trained["cohort"])]
    out = ["--out", str(tmp_path / "x.png")]
    cases = {
        "no-such-slide": "not in the cohort's slide manifest",
        trained["slide_id"]: "layer 3 does not exist: the model has 2 layer(s)",
    }
    for slide, message in cases.items():
        layer = ["--layer", "3"] if slide == trained["slide_id"] else []
        assert main([*base, "--slide", slide, *out, *layer]) == 2
        error = capsys.readouterr().err.strip()
        assert error.startswith("healnet explain: ") and message in error and "\n" not in error
    with pytest.raises(SystemExit):
        main([*base, "--slide", trained["slide_id"], *out, "--layer", "first"])


def test_features_of_another_patch_grid_are_refused(trained, tmp_path, capsys):
    slide = Cohort.load(trained["cohort"]).slide_path(trained["slide_id"])
    other = tmp_path / "features"
    assert main(["preprocess-slides", str(slide), "--out", str(other), "--patch-size", "256"]) == 0
    features = other / "stats" / feature_file_name(trained["slide_id"])
    argv = [
        "explain",
        "--run",
        str(trained["run"]),
        "--slide",
        str(features),
        "--out",
        str(tmp_path / "x.png"),
    ]
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert "another patch grid" in error and not (tmp_path / "x.png").exists()


def test_prediction_attention_per_layer_and_coordinates(trained):
    predictor = Predictor(load_checkpoint(trained["run"] / "checkpoint"))
    features, coords = read_slide_features(trained["features"] / feature_file_name(trained["slide_id"]))
    prediction = predictor.predict([Case(wsi_features=features, wsi_coords=coords)], return_attention=True)[0]
    layers = np.array(prediction.attention_layers["wsi"])
    assert layers.shape == (2, len(features))
    np.testing.assert_allclose(prediction.attention["wsi"], layers.mean(0), atol=1e-6)
    assert prediction.attention_coords == coords.tolist()
    assert predictor.predict([Case(wsi_features=features)])[0].attention_coords is None
    with pytest.raises(CaseError, match="one integer \\[x, y\\] per patch"):
        Case(wsi_features=features, wsi_coords=coords[:-1])


# ---------------------------------------------------------------------------------------------
# Drawing functions


def test_footprint_from_metadata_or_coordinate_spacing():
    coords = np.array([[0, 0], [256, 0], [512, 256], [1024, 256]])
    assert coordinate_spacing(coords) == 256
    assert coordinate_spacing(np.array([[5, 7]])) == 224  # one patch: the default
    metadata = {"patch_size": 224, "target_mpp": 1.0, "slide_mpp": 0.25}
    assert patch_footprint(metadata, coords) == (896.0, "feature metadata")
    assert patch_footprint({"patch_size": 224}, coords) == (256.0, "coordinate spacing")


def test_rasterise_fills_each_patch_square_and_keeps_the_higher_of_overlaps():
    coords = np.array([[0, 0], [100, 0], [50, 0]])
    grid = rasterise(coords, np.array([1.0, 2.0, 3.0]), 100, (0, 0), (200, 200), (20, 20))
    assert np.isnan(grid[10:]).all()  # below the patches
    assert grid[0, 0] == 1.0 and grid[0, 19] == 2.0 and grid[0, 10] == 3.0 and grid[0, 14] == 3.0


def test_panels_per_layer_and_mean():
    attention = SlideAttention(np.array([[0, 0], [1, 0]]), np.array([[0.2, 0.8], [0.6, 0.4]]), 1.0)
    assert [p[1] for p in panels(attention, "all")] == [1, 2, None]
    assert panels(attention, "mean") == [("mean of 2 layers", None)]
    assert panels(attention, 2) == [("layer 2 of 2", 2)]
    with pytest.raises(ExplainError, match="layer 3 does not exist"):
        panels(attention, 3)
    np.testing.assert_allclose(attention.mean, [0.4, 0.6])
    assert list(attention.top_k(5)) == [1, 0] and list(attention.top_k(1, layer=2)) == [0]


# ---------------------------------------------------------------------------------------------
# Coordinates through the service

SPEC = DemoSpec()


@pytest.fixture(scope="module")
def service(demo_registry, ready_service):
    return ready_service()


def grid_coords(patches: int, step: int = 224) -> list[list[int]]:
    return [[step * (i % 4), step * (i // 4)] for i in range(patches)]


def test_the_service_returns_patch_coordinates_with_the_attention(service, tmp_path):
    payload = demo_payload(SPEC, patches=7, seed=2)
    coords = grid_coords(7)
    answer = asyncio.run(service.predict(PredictRequest(**payload, wsi_coords=coords, return_attention=True)))
    assert answer.attention_coords == coords and len(answer.attention["wsi"]) == 7
    without = asyncio.run(service.predict(PredictRequest(**payload, wsi_coords=coords)))
    assert without.attention is None and without.attention_coords is None
    plain = asyncio.run(service.predict(PredictRequest(**payload, return_attention=True)))
    assert plain.attention_coords is None and plain.risk == pytest.approx(answer.risk, abs=1e-6)

    # a client draws the same picture from the response body
    body = json.loads(answer.model_dump_json())
    attention = SlideAttention.from_response(body)
    assert attention.footprint == 224 and attention.n_patches == 7 and not attention.per_layer
    out = draw_heatmap(attention, tmp_path / "client.png", top_k=4)
    assert png_size(out) == expected_size(1, 4)
    with pytest.raises(ExplainError, match="wsi_coords"):
        SlideAttention.from_response(json.loads(plain.model_dump_json()))


MISMATCHED = {
    "too few rows": (demo_payload(SPEC, patches=7) | {"wsi_coords": grid_coords(6)}, "6 rows for 7 patches"),
    "not [x, y]": (
        demo_payload(SPEC, patches=7) | {"wsi_coords": [*grid_coords(6), [1, 2, 3]]},
        "row 6 has 3 values",
    ),
    "one per tile": ({"wsi_tiles": demo_tiles(2, size=16), "wsi_coords": [[0, 0]]}, "1 rows for 2 patches"),
}


@pytest.mark.parametrize("payload, message", MISMATCHED.values(), ids=MISMATCHED.keys())
def test_coordinates_that_do_not_match_the_patches_are_refused(service, payload, message):
    response = asyncio.run(service.predict(PredictRequest(**payload, return_attention=True)))
    body = json.loads(response.body)
    assert response.status_code == 422 and body["reason"] == "wrong_dimensions"
    assert response.headers["x-healnet-rejection"] == "wrong_dimensions" and message in body["error"]


def test_the_schema_wants_integer_coordinates_of_a_slide():
    with pytest.raises(ValidationError, match="int"):
        PredictRequest.model_validate_json('{"wsi_features": [[0.5]], "wsi_coords": [[0.5, 1]]}')
    with pytest.raises(ValidationError, match="wsi_coords locate the patches of a slide"):
        PredictRequest(omics={"mut": {"G": 1.0}}, wsi_coords=[[0, 0]])
