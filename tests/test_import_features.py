"""`healnet import-features`: CLAM and TRIDENT patch features in, checked slide by slide, out as our feature
files with the encoder's provenance; and the end-to-end path import → train → serve on them."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from healnet.checkpoint import load_checkpoint
from healnet.cli import main
from healnet.data.cohort import Cohort
from healnet.data.synth import SynthConfig, synthesize_cohort
from healnet.errors import HEALNetError
from healnet.experiment import load_trained
from healnet.fitting import CohortData
from healnet.inference import Case
from healnet.preprocess.encoders import EncoderProvenance, FeatureProvenance
from healnet.preprocess.feature_files import (
    SlideInputError,
    feature_file_name,
    read_feature_metadata,
    read_feature_provenance,
    read_quarantine,
    read_slide_features,
    slide_stem,
)
from healnet.preprocess.feature_import import ImportConfig, check_slide, import_features, magnification_to_mpp
from healnet.preprocess.feature_sources import FeatureFileError, detect_layout

DIM = 32
SMALL_MODEL = ["--latents", "4", "--latent-dim", "16", "--depth", "1", "--top-k", "20"]
TCGA = "TCGA-2F-A9KO-01Z-00-DX1.195576CF-B739-4BD9-B15B-4A70AE287D3E"  # a real slide id's shape


def bag(n: int = 12, dim: int = DIM, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random features and distinct grid coordinates (level-0 px, 512 px apart)."""
    rng = np.random.default_rng(seed)
    cells = rng.choice(400, size=n, replace=False)
    coords = np.stack([cells % 20, cells // 20], axis=1).astype(np.int64) * 512
    return rng.normal(size=(n, dim)).astype(np.float32), coords


def write_h5(path: Path, features: np.ndarray | None, coords: np.ndarray | None, **attrs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as handle:
        if features is not None:
            handle.create_dataset("features", data=features)
        if coords is not None:
            dataset = handle.create_dataset("coords", data=coords)
            for key, value in attrs.items():
                dataset.attrs[key] = value
    return path


def write_pt(path: Path, features: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(torch.from_numpy(features), path)
    return path


CLAM_ATTRS = {"patch_size": 256, "patch_level": 0, "downsample": np.array([2.0, 2.0])}


@pytest.fixture
def clam(tmp_path) -> dict:
    """A CLAM folder: good h5s, a .pt with coordinates in its h5, and one bad file of each kind."""
    root = tmp_path / "clam"
    good = {}
    for index, slide in enumerate([TCGA, "TCGA-AA-0001-01Z-00-DX1.ABCD", "TCGA-AA-0002-01Z-00-DX1.EF01"]):
        good[slide] = bag(10 + index, seed=index)
        write_h5(root / "h5_files" / f"{slide}.h5", *good[slide], **CLAM_ATTRS)
    # features as a .pt (float16), coordinates from the h5 of the same slide
    pt_features, pt_coords = bag(7, seed=9)
    write_pt(root / "pt_files" / "TCGA-AA-0003-01Z-00-DX1.PT.pt", pt_features.astype(np.float16))
    write_h5(root / "h5_files" / "TCGA-AA-0003-01Z-00-DX1.PT.h5", None, pt_coords, **CLAM_ATTRS)
    good["TCGA-AA-0003-01Z-00-DX1.PT"] = (pt_features.astype(np.float16).astype(np.float32), pt_coords)

    bad = {}
    features, coords = bag(5, seed=20)
    features[2, 3] = np.nan
    write_h5(root / "h5_files" / "nan.h5", features, coords, **CLAM_ATTRS)
    bad["nan"] = "non-finite"
    write_h5(root / "h5_files" / "wide.h5", *bag(5, dim=DIM + 1, seed=21), **CLAM_ATTRS)
    bad["wide"] = f"{DIM + 1} features per patch"
    features, coords = bag(5, seed=22)
    write_h5(root / "h5_files" / "short_coords.h5", features, coords[:4], **CLAM_ATTRS)
    bad["short_coords"] = "4 coordinates for 5 patches"
    features, coords = bag(5, seed=23)
    coords[3] = coords[1]
    write_h5(root / "h5_files" / "twice.h5", features, coords, **CLAM_ATTRS)
    bad["twice"] = "duplicate coordinate"
    features, coords = bag(5, seed=24)
    coords[0, 0] = -512
    write_h5(root / "h5_files" / "negative.h5", features, coords, **CLAM_ATTRS)
    bad["negative"] = "negative coordinates"
    write_h5(root / "h5_files" / "integers.h5", np.ones((5, DIM), np.int32), bag(5)[1], **CLAM_ATTRS)
    bad["integers"] = "floating point"
    (root / "h5_files" / "corrupt.h5").write_bytes(b"not an hdf5 file at all")
    bad["corrupt"] = "unreadable file corrupt.h5"
    write_pt(root / "pt_files" / "lonely.pt", bag(5, seed=25)[0])  # no h5, so no coordinates
    bad["lonely"] = "no coordinates"
    return {"root": root, "good": good, "bad": bad}


def resnet(dim: int = DIM) -> EncoderProvenance:
    return EncoderProvenance("resnet50_trunc", None, dim, 224, "imagenet")


def test_clam_features_are_imported_and_bad_files_quarantined_by_name(clam, tmp_path):
    out = tmp_path / "features"
    report = import_features(clam["root"], out, ImportConfig("resnet50_trunc", mpp=0.5), progress=False)
    assert report.layout == "clam" and report.out_dir == out / "resnet50_trunc"
    expected = FeatureProvenance(resnet(), 256, 0.5)
    assert report.provenance == expected
    assert sorted(slide.slide_id for slide in report.imported) == sorted(clam["good"])
    for slide, (features, coords) in clam["good"].items():
        path = out / "resnet50_trunc" / feature_file_name(slide)
        assert path.name == f"{slide}.parquet"  # TCGA ids kept whole, dots and all
        read_features, read_coords = read_slide_features(path)
        np.testing.assert_array_equal(read_features, features)
        np.testing.assert_array_equal(read_coords, coords)
        assert read_feature_provenance(path) == expected
        metadata = read_feature_metadata(path)
        assert metadata["slide_id"] == slide and metadata["slide_mpp"] is None and metadata["level"] == 0
        assert metadata["patch_size_level0"] == 512  # CLAM: patch_size × the patch level's downsample

    reasons = dict(report.quarantined)
    assert set(reasons) == set(clam["bad"])
    for slide, fragment in clam["bad"].items():
        assert fragment in reasons[slide], (slide, reasons[slide])
        assert not (out / "resnet50_trunc" / f"{slide}.parquet").exists()
    with open(out / "resnet50_trunc" / "quarantine.csv") as handle:
        assert {row["slide"]: row["reason"] for row in csv.DictReader(handle)} == reasons
    summary = json.loads((out / "resnet50_trunc" / "report.json").read_text())
    assert summary["encoder"] == resnet().to_dict()
    assert summary["tiling"] == {"patch_size": 256, "target_mpp": 0.5}
    assert {entry["slide"] for entry in summary["quarantined"]} == set(clam["bad"])
    assert summary["n_patches"] == sum(len(f) for f, _ in clam["good"].values())


def trident_job(root: Path, encoder: str = "uni_v1", magnification: int = 20) -> Path:
    """A TRIDENT job folder: h5 features with TRIDENT's coords attributes, and a .pt whose coordinates are
    in patches/<slide>_patches.h5."""
    grid = root / f"{magnification}x_256px_0px_overlap"
    attrs = {
        "patch_size": 256,
        "patch_size_level0": 256 * 40 // magnification,
        "level0_magnification": 40,
        "target_magnification": magnification,
        "overlap": 0,
    }
    for index, slide in enumerate(["slide-a", "slide-b"]):
        write_h5(grid / f"features_{encoder}" / f"{slide}.h5", *bag(6, seed=index), **attrs)
    features, coords = bag(4, seed=5)
    write_pt(grid / f"features_{encoder}" / "slide-c.pt", features)
    write_h5(grid / "patches" / "slide-c_patches.h5", None, coords, **attrs)
    return grid


def test_trident_grid_comes_from_the_attributes(tmp_path):
    job = tmp_path / "job"
    trident_job(job)
    # a slide at another magnification cannot join the import's grid
    odd = write_h5(
        job / "20x_256px_0px_overlap" / "features_uni_v1" / "slide-40x.h5",
        *bag(6, seed=7),
        patch_size=256,
        target_magnification=40,
    )
    report = import_features(job, tmp_path / "out", ImportConfig("uni_v1"), progress=False)
    assert report.layout == "trident"
    assert report.provenance == FeatureProvenance(
        EncoderProvenance("uni_v1", None, DIM, 224, "imagenet"), 256, magnification_to_mpp(20)
    )
    assert magnification_to_mpp(20) == 0.5 and magnification_to_mpp(40) == 0.25
    assert sorted(s.slide_id for s in report.imported) == ["slide-a", "slide-b", "slide-c"]
    assert dict(report.quarantined) == {odd.stem: "target magnification 40× differs from the import's 20×"}
    metadata = read_feature_metadata(tmp_path / "out" / "uni_v1" / "slide-c.parquet")
    assert metadata["patch_size_level0"] == 512 and metadata["imported_from"]["layout"] == "trident"
    # --mpp (the scanner's real resolution) overrides the nominal 10 / magnification
    again = import_features(
        job / "20x_256px_0px_overlap", tmp_path / "out2", ImportConfig("uni_v1", mpp=0.46), progress=False
    )
    assert again.provenance is not None and again.provenance.target_mpp == 0.46


def test_several_trident_encoders_need_a_choice(tmp_path):
    job = tmp_path / "job"
    trident_job(job, "uni_v1")
    trident_job(job, "conch_v1")
    assert detect_layout(job, "conch_v1").root.name == "features_conch_v1"
    with pytest.raises(SlideInputError, match="2 TRIDENT feature folders"):
        detect_layout(job, "resnet50_trunc")


def test_a_flat_folder_pairs_pt_features_with_h5_coordinates(tmp_path):
    features, coords = bag(8)
    write_pt(tmp_path / "flat" / f"{TCGA}.pt", features)
    write_h5(tmp_path / "flat" / f"{TCGA}_patches.h5", None, coords, patch_size=224)
    report = import_features(
        tmp_path / "flat", tmp_path / "out", ImportConfig("conch_v1", mpp=0.5), progress=False
    )
    assert report.layout == "flat" and [s.slide_id for s in report.imported] == [TCGA]
    assert report.provenance is not None and report.provenance.patch_size == 224
    np.testing.assert_array_equal(read_slide_features(report.imported[0].features_path)[1], coords)


def test_check_slide_reasons():
    features, coords = bag(4)
    checked, pixels = check_slide(features.astype(np.float64), coords.astype(np.float32), DIM)
    assert checked.dtype == np.float32 and pixels.dtype == np.int64
    for bad_features, bad_coords, fragment in [
        (features[None], coords, "2-D"),
        (features[:0], coords[:0], "no patches"),
        (features, coords + 0.5, "whole level-0 pixels"),
        (features, coords[:, :1], "(patches, 2)"),
        (np.full_like(features, 1e39, dtype=np.float64), coords, "non-finite"),  # overflows float32
    ]:
        with pytest.raises(FeatureFileError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
            check_slide(bad_features, bad_coords, DIM)


def test_cli_exit_codes_and_one_line_errors(clam, tmp_path, capsys):
    args = ["import-features", str(clam["root"]), "--encoder-name", "resnet50_trunc", "--no-progress"]
    # CLAM files have no magnification: the missing flag is named, in one line
    assert main([*args, "--out", str(tmp_path / "a")]) == 2
    message = capsys.readouterr().err.strip()
    assert message.startswith("healnet import-features: no resolution") and "--mpp" in message
    assert "\n" not in message

    sha = "AB" * 32
    assert main([*args, "--out", str(tmp_path / "a"), "--mpp", "0.5", "--weights-sha256", sha]) == 0
    printed = capsys.readouterr().out
    assert (
        f"imported {len(clam['good'])} slide(s)" in printed
        and f"quarantined {len(clam['bad'])} slide(s)" in printed
    )
    assert "  corrupt: unreadable file corrupt.h5" in printed
    key = f"resnet50_trunc-{'ab' * 6}"
    provenance = read_feature_provenance(tmp_path / "a" / key / f"{TCGA}.parquet")
    assert provenance.encoder.weights_sha256 == "ab" * 32

    # the same encoder with another width cannot join the folder: training would refuse the mix
    assert main([*args, "--out", str(tmp_path / "a"), "--mpp", "0.25", "--weights-sha256", sha]) == 2
    assert "already holds features of resnet50_trunc" in capsys.readouterr().err

    for bad, fragment in [
        (["--weights-sha256", "xyz"], "--weights-sha256 must be 64 hex digits"),
        (["--normalisation", "zscore"], "normalisation must be one of"),
        (["--mpp", "-1"], "--mpp must be positive"),
    ]:
        assert main([*args, "--out", str(tmp_path / "b"), "--mpp", "0.5", *bad]) == 2
        assert fragment in capsys.readouterr().err
    assert (
        main(["import-features", str(tmp_path / "nowhere"), "--out", str(tmp_path), "--encoder-name", "x"])
        == 2
    )
    assert "is not a folder of patch features" in capsys.readouterr().err
    with pytest.raises(SystemExit) as usage:  # argparse: a required flag missing
        main(["import-features", str(clam["root"]), "--out", str(tmp_path / "c")])
    assert usage.value.code == 2 and "--encoder-name" in capsys.readouterr().err

    # every slide quarantined: exit 1, the reasons printed and written
    only_bad = tmp_path / "only_bad"
    write_h5(only_bad / "nan.h5", np.full((3, DIM), np.nan, np.float32), bag(3)[1], patch_size=256)
    only_args = ["import-features", str(only_bad), "--out", str(tmp_path / "d"), "--encoder-name", "x"]
    assert main([*only_args, "--mpp", "0.5", "--no-progress"]) == 1
    captured = capsys.readouterr()
    assert "every slide was quarantined" in captured.err and f"nan: {3 * DIM} non-finite" in captured.out
    assert (tmp_path / "d" / "x" / "quarantine.csv").exists()


def test_the_feature_file_errors_are_library_errors():
    assert issubclass(FeatureFileError, HEALNetError)


# ---------------------------------------------------------------------------------------------
# End to end: a cohort's slides as published CLAM features → train → serve


@pytest.fixture(scope="module")
def imported_cohort(tmp_path_factory) -> dict:
    """A synthetic cohort whose slides come as CLAM h5 features (random, 32 wide), imported; the features
    of the last slide of a one-slide patient hold a NaN, so the import quarantines that slide."""
    root = tmp_path_factory.mktemp("import_e2e")
    cohort = root / "cohort"
    synthesize_cohort(cohort, SynthConfig(patients=40, seed=3, slide_px=512), progress=False)
    slides = pd.read_parquet(cohort / "slides.parquet")
    listed = slides[slides["path"].notna()]
    assert len(listed) >= 30 and listed["slide_id"].str.contains(r"\.").all()
    one_slide = listed.groupby("patient_id")["slide_id"].transform("size") == 1
    nan_slide = listed.loc[one_slide, "slide_id"].iloc[-1]
    clam = root / "clam"
    for index, slide_id in enumerate(listed["slide_id"]):
        features, coords = bag(20, seed=100 + index)
        if slide_id == nan_slide:
            features[3, 5] = np.nan
        # CLAM names files by the slide file's stem: TCGA-...-DX1.<uuid>.h5 for TCGA-...-DX1.<uuid>.tiff
        write_h5(clam / "h5_files" / f"{slide_stem(slide_id)}.h5", features, coords, **CLAM_ATTRS)
    features = cohort / "features"
    args = ["import-features", str(clam), "--out", str(features), "--encoder-name", "uni_v1", "--mpp", "0.5"]
    assert main([*args, "--no-progress"]) == 0
    provenance = FeatureProvenance(EncoderProvenance("uni_v1", None, DIM, 224, "imagenet"), 256, 0.5)
    run = root / "run"
    train = ["train", "--cohort", str(cohort), "--features", str(features), "--out", str(run)]
    assert main([*train, "--epochs", "2", "--no-progress", *SMALL_MODEL]) == 0
    return {
        "cohort": cohort,
        "features": features / "uni_v1",
        "run": run,
        "provenance": provenance,
        "nan_slide": nan_slide,
        "nan_patient": listed.set_index("slide_id").loc[nan_slide, "patient_id"],
    }


def test_import_then_train_records_the_imported_encoder(imported_cohort):
    metrics = json.loads((imported_cohort["run"] / "metrics.json").read_text())
    assert "wsi" in metrics["modalities"]
    preprocessor = load_checkpoint(imported_cohort["run"] / "checkpoint").preprocessor
    provenance = imported_cohort["provenance"]
    assert preprocessor.wsi_encoder == provenance.encoder
    assert preprocessor.tiling == provenance.tiling


def test_an_imported_slide_with_nan_features_is_a_missing_slide_for_its_patient(imported_cohort):
    nan_slide, patient = imported_cohort["nan_slide"], imported_cohort["nan_patient"]
    # the import names the slide by its file stem, the cohort by its file name: the same slide
    assert list(read_quarantine(imported_cohort["features"])) == [slide_stem(nan_slide)]
    assert "non-finite" in read_quarantine(imported_cohort["features"])[slide_stem(nan_slide)]
    metrics = json.loads((imported_cohort["run"] / "metrics.json").read_text())
    assert metrics["slides_quarantined"] == {"count": 1, "slides": [nan_slide]}
    data = CohortData.from_cohort(Cohort.load(imported_cohort["cohort"]), imported_cohort["features"])
    assert patient not in data.wsi_bags and len(data.wsi_bags) >= 29
    member = load_trained(imported_cohort["run"] / "checkpoint").members[0]
    dataset = member.dataset(data, [patient])
    assert dataset.collate([dataset[0]])["present"]["wsi"].tolist() == [False]


def test_import_then_serve_predicts_from_imported_features_and_refuses_tiles(imported_cohort, monkeypatch):
    from devtools.demo import demo_tiles
    from serving.runtime import ServedModel
    from serving.schemas import PredictRequest
    from serving.validation import Limits, RejectedRequest, to_case

    monkeypatch.setenv("HEALNET_DEVICE", "cpu")
    served = ServedModel.load("healnet:imported", imported_cohort["run"] / "checkpoint")
    assert served.contract.wsi_dim == DIM and served.contract.encoder is None
    # no weights file is known for imported features: tile requests are refused with the reason
    assert "no recorded weights file" in served.contract.encoder_unavailable
    with pytest.raises(RejectedRequest) as refusal:
        to_case(PredictRequest(wsi_tiles=demo_tiles(2, size=32)), served.contract, Limits.from_env())
    assert refusal.value.reason == "no_encoder"

    path = sorted(imported_cohort["features"].glob("*.parquet"))[0]
    features, coords = read_slide_features(path)
    [prediction] = served.predictor.predict(
        [Case(wsi_features=features, wsi_coords=coords)], return_attention=True
    )
    assert prediction.modalities_used == ["wsi"] and -len(prediction.survival) <= prediction.risk <= 0
    assert prediction.attention is not None and len(prediction.attention["wsi"]) == len(features)
    assert prediction.attention_coords == coords.tolist()


def test_import_then_serve_then_heatmap(imported_cohort, tmp_path, monkeypatch, capsys):
    """The end of the chain: a served answer (attention with the patch coordinates) drawn by a client, and
    `healnet explain` on the same run and slide."""
    from healnet.heatmap import SlideAttention, draw_heatmap
    from serving.runtime import ServedModel

    monkeypatch.setenv("HEALNET_DEVICE", "cpu")
    served = ServedModel.load("healnet:imported", imported_cohort["run"] / "checkpoint")
    path = sorted(imported_cohort["features"].glob("*.parquet"))[0]
    features, coords = read_slide_features(path)
    assert read_feature_metadata(path)["patch_size_level0"] == 512
    [prediction] = served.predictor.predict(
        [Case(wsi_features=features, wsi_coords=coords)], return_attention=True
    )
    response = {"attention": prediction.attention, "attention_coords": prediction.attention_coords}
    drawn = draw_heatmap(SlideAttention.from_response(response), tmp_path / "client.png")
    assert drawn.stat().st_size > 1000 and drawn.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    out = tmp_path / "explain.png"
    slide_id = str(read_feature_metadata(path)["slide_id"])
    args = [
        "--run",
        str(imported_cohort["run"]),
        "--slide",
        slide_id,
        "--cohort",
        str(imported_cohort["cohort"]),
    ]
    assert main(["explain", *args, "--features", str(imported_cohort["features"]), "--out", str(out)]) == 0
    assert "heatmap:" in capsys.readouterr().out
    report = json.loads(out.with_suffix(".json").read_text())
    assert [[patch["x"], patch["y"]] for patch in report["patches"]] == coords.tolist()
    # the imported files' level-0 patch side, not a guess from the coordinates' spacing
    assert (report["patch_footprint_px"], report["footprint_source"]) == (512, "feature metadata")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
