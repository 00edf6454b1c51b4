"""WSI preprocessing: patch grid, level choice, tissue mask, encoders, quarantine, shards and the CLI."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
import torch
from conftest import FIXTURES
from PIL import Image

from healnet.cli import main
from healnet.data.synth_slides import synthetic_he_image, write_synthetic_slide
from healnet.files import sha256_file
from healnet.preprocess import wsi
from healnet.preprocess.encoders import (
    STATS_FEATURE_NAMES,
    EncoderError,
    EncoderProvenance,
    StatsEncoder,
    TileError,
    encode_tiles,
    find_encoder,
    make_encoder,
)
from healnet.preprocess.feature_files import (
    SlideInputError,
    feature_file_name,
    is_feature_folder,
    read_feature_metadata,
    read_feature_provenance,
    read_quarantine,
    read_slide_features,
    resolve_feature_dir,
    write_slide_features,
)
from healnet.preprocess.tissue import tissue_mask
from healnet.preprocess.wsi import TilingConfig, choose_level, preprocess_slide, preprocess_slides

CMU = FIXTURES / "CMU-1-Small-Region.svs"
CMU_SIZE = (2220, 2967)
OUTLINE_GREEN = (0, 200, 0)


def write_tiff(path: Path, image: np.ndarray, mpp: float | None, description: str | None = None) -> Path:
    """A one-level tiled JPEG TIFF, with resolution tags only when `mpp` is given."""
    resolution = {"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"} if mpp else {}
    tifffile.imwrite(
        path, image, photometric="rgb", tile=(256, 256), compression="jpeg", metadata=None,
        description=description, **resolution,
    )  # fmt: skip
    return path


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("slides")
    return {
        "good-a": write_synthetic_slide(folder / "good-a.tif", 0.2, seed=1),
        "good-b": write_synthetic_slide(folder / "good-b.tif", 0.8, seed=2),
        "fine": write_synthetic_slide(folder / "fine.tif", 0.5, seed=3, size_px=1792, mpp=0.5),
    }


@pytest.fixture()
def corrupt_slide(tmp_path) -> Path:
    path = tmp_path / "corrupt.svs"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    return path


@pytest.fixture()
def blank_slide(tmp_path) -> Path:
    glass = np.random.default_rng(0).integers(240, 246, (768, 768, 3), dtype=np.uint8)
    return write_tiff(tmp_path / "blank.tif", glass, mpp=1.0)


# ----------------------------------------------------------------------------------------- grid


def test_cmu_grid_at_one_micron(tmp_path):
    read_size = round(224 * 1.0 / 0.499)  # 449 level-0 px per patch, resized to 224
    full = preprocess_slide(CMU, tmp_path / "all", make_encoder(), TilingConfig(min_tissue_fraction=0.0))
    assert (full.level, full.mpp, full.slide_id) == (0, pytest.approx(0.499), CMU.name)
    assert full.n_patches == (CMU_SIZE[0] // read_size) * (CMU_SIZE[1] // read_size) == 24

    tissue = preprocess_slide(CMU, tmp_path / "tissue", make_encoder())
    features, coords = read_slide_features(tissue.features_path)
    assert 0 < tissue.n_patches < full.n_patches
    assert features.shape == (tissue.n_patches, len(STATS_FEATURE_NAMES)) and features.dtype == np.float32
    assert np.all(coords % read_size == 0)
    assert np.all(coords >= 0) and np.all(coords + read_size <= CMU_SIZE)
    assert len({tuple(xy) for xy in coords}) == len(coords)
    metadata = read_feature_metadata(tissue.features_path)
    assert metadata["encoder"] == StatsEncoder.provenance.to_dict() and metadata["patch_size"] == 224
    assert read_feature_provenance(tissue.features_path).encoder == StatsEncoder.provenance
    assert metadata["target_mpp"] == 1.0 and metadata["slide_mpp"] == pytest.approx(0.499)
    assert metadata["feature_names"] == list(STATS_FEATURE_NAMES)


def test_lower_level_is_used_when_it_matches_the_target(slides, tmp_path):
    result = preprocess_slide(slides["fine"], tmp_path, make_encoder(), TilingConfig(target_mpp=1.0))
    _, coords = read_slide_features(result.features_path)
    assert result.level == 1 and result.mpp == pytest.approx(0.5)
    assert np.all(coords % 448 == 0)  # 224 px at level 1 = 448 level-0 px, no resizing
    assert np.all(coords + 448 <= 1792)

    finer = preprocess_slide(
        slides["fine"], tmp_path / "finer", make_encoder(), TilingConfig(target_mpp=0.75)
    )
    assert finer.level == 0
    assert np.all(read_slide_features(finer.features_path)[1] % 336 == 0)  # 224 × 0.75 / 0.5


def test_choose_level_takes_the_closest_finer_level():
    assert choose_level([0.25, 0.5, 1.0, 2.0], 1.0) == 2
    assert choose_level([0.25, 0.5, 1.0, 2.0], 0.9) == 1
    assert choose_level([0.499, 0.998, 3.992], 1.0) == 1
    assert choose_level([0.252, 1.008, 4.03], 1.0) == 1  # within the 2 % tolerance


def test_objective_power_fallback_and_missing_resolution(tmp_path):
    image = synthetic_he_image(1024, 0.5, np.random.default_rng(0))
    aperio = write_tiff(
        tmp_path / "no-mpp.svs", image, mpp=None,
        description="Aperio Image Library v10.0.0\n1024x1024 (256x256) JPEG/RGB Q=80|AppMag = 20",
    )  # fmt: skip
    result = preprocess_slide(aperio, tmp_path / "out", make_encoder(), TilingConfig(min_tissue_fraction=0.0))
    assert result.mpp == pytest.approx(0.5) and result.n_patches == 4  # 448 px patches on 1024 px
    assert read_feature_metadata(result.features_path)["slide_mpp_source"] == "objective-power"

    write_tiff(tmp_path / "no-resolution.tif", image, mpp=None)
    report = preprocess_slides([tmp_path / "no-resolution.tif"], tmp_path / "out", progress=False)
    assert report.quarantined == [("no-resolution.tif", report.quarantined[0][1])]
    assert "no resolution" in report.quarantined[0][1]


def test_coarse_slide_is_quarantined(tmp_path):
    image = synthetic_he_image(512, 0.5, np.random.default_rng(0))
    write_tiff(tmp_path / "coarse.tif", image, mpp=2.0)
    report = preprocess_slides(tmp_path, tmp_path / "out", progress=False)
    assert len(report.quarantined) == 1 and "coarser than the target" in report.quarantined[0][1]


# ---------------------------------------------------------------------------------- µm/px sources


def mpp_of(result) -> tuple[float, str]:
    metadata = read_feature_metadata(result.features_path)
    assert metadata["slide_mpp"] == result.mpp
    return result.mpp, metadata["slide_mpp_source"]


def test_mpp_from_openslide_and_tiff_resolution_tags(tmp_path):
    encoder, config = make_encoder(), TilingConfig(min_tissue_fraction=0.0)
    cmu = preprocess_slide(CMU, tmp_path / "cmu", encoder, config)
    assert mpp_of(cmu) == (pytest.approx(0.499), "openslide")

    image = synthetic_he_image(1024, 0.5, np.random.default_rng(0))
    centimeter = write_tiff(tmp_path / "cm.tif", image, mpp=0.5)
    result = preprocess_slide(centimeter, tmp_path / "out", encoder, config)
    assert mpp_of(result) == (pytest.approx(0.5), "tiff") and result.n_patches == 4
    inch = tmp_path / "inch.tif"
    tifffile.imwrite(
        inch, image, photometric="rgb", tile=(256, 256), compression="jpeg", metadata=None,
        resolution=(25_400 / 0.5, 25_400 / 0.5), resolutionunit="INCH",
    )  # fmt: skip
    assert mpp_of(preprocess_slide(inch, tmp_path / "out", encoder, config)) == (pytest.approx(0.5), "tiff")

    editor = tmp_path / "screenshot.tif"  # 72 dpi: an image editor's default, not a scanner's resolution
    tifffile.imwrite(
        editor, image, photometric="rgb", tile=(256, 256), compression="jpeg", metadata=None,
        resolution=(72, 72), resolutionunit="INCH",
    )  # fmt: skip
    report = preprocess_slides([editor], tmp_path / "out", progress=False)
    ((slide, reason),) = report.quarantined
    assert slide == "screenshot.tif" and "no resolution" in reason and "352.8 µm/px" in reason


def test_mpp_from_the_manifest(slides, tmp_path):
    image = synthetic_he_image(1024, 0.5, np.random.default_rng(0))
    write_tiff(tmp_path / "untagged.tif", image, mpp=None)
    write_tiff(tmp_path / "tagged.tif", image, mpp=0.5)
    write_tiff(tmp_path / "neither.tif", image, mpp=None)
    (tmp_path / "cmu.svs").symlink_to(CMU)
    manifest = tmp_path / "slides.csv"
    pd.DataFrame(
        {
            "slide_id": ["untagged.tif", "tagged.tif", "neither.tif", "cmu.svs"],
            "path": ["untagged.tif", "tagged.tif", "neither.tif", "cmu.svs"],
            "mpp": [0.5, 0.25, None, 0.25],
        }
    ).to_csv(manifest, index=False)
    config = TilingConfig(min_tissue_fraction=0.0)
    report = preprocess_slides(manifest, tmp_path / "out", config=config, progress=False)
    results = {result.slide_id: result for result in report.processed}
    assert mpp_of(results["untagged.tif"]) == (0.5, "manifest") and results["untagged.tif"].n_patches == 4
    assert mpp_of(results["tagged.tif"]) == (0.25, "manifest")  # the manifest wins over the TIFF tags ...
    assert results["tagged.tif"].n_patches == 1  # 896 px patches at 0.25 µm/px
    assert mpp_of(results["cmu.svs"]) == (pytest.approx(0.499), "openslide")  # ... not over the slide's own
    ((slide, reason),) = report.quarantined  # no tags, no objective power, no manifest value
    assert slide == "neither.tif" and "no resolution" in reason and "`mpp` column of a manifest" in reason

    # resuming: a changed manifest µm/px recomputes the slides that used it, and only those
    pd.read_csv(manifest).assign(mpp=[0.5, 0.5, None, 0.5]).to_csv(manifest, index=False)
    rerun = preprocess_slides(manifest, tmp_path / "out", config=config, progress=False)
    assert [result.slide_id for result in rerun.processed] == ["tagged.tif"]
    assert sorted(result.slide_id for result in rerun.skipped) == ["cmu.svs", "untagged.tif"]
    pd.read_csv(manifest).drop(columns="mpp").to_csv(manifest, index=False)
    rerun = preprocess_slides(manifest, tmp_path / "out", config=config, progress=False)
    assert sorted(result.slide_id for result in rerun.processed) == ["tagged.tif"]  # TIFF tags now
    assert mpp_of(rerun.processed[0]) == (0.5, "tiff")
    assert sorted(slide for slide, _ in rerun.quarantined) == ["neither.tif", "untagged.tif"]

    for bad in [-1, "fast"]:
        pd.DataFrame({"slide_id": ["tagged.tif"], "path": ["tagged.tif"], "mpp": [bad]}).to_csv(
            manifest, index=False
        )
        with pytest.raises(SlideInputError, match="not a positive number"):
            preprocess_slides(manifest, tmp_path / "bad", progress=False)


# ----------------------------------------------------------------------------------------- mask


def test_otsu_tissue_mask_finds_the_blob():
    rng = np.random.default_rng(0)
    image = rng.integers(238, 250, (200, 300, 3), dtype=np.uint8)  # glass with noise
    yy, xx = np.mgrid[:200, :300]
    blob = (yy - 100) ** 2 / 70**2 + (xx - 140) ** 2 / 90**2 < 1
    stain = rng.normal([200, 120, 190], 12, (200, 300, 3)).clip(0, 255).astype(np.uint8)
    image[blob] = stain[blob]
    mask = tissue_mask(image)
    assert mask.dtype == bool and mask.shape == (200, 300)
    assert (mask & blob).sum() / (mask | blob).sum() > 0.97
    assert not tissue_mask(rng.integers(238, 250, (64, 64, 3), dtype=np.uint8)).any()
    with pytest.raises(TileError):
        tissue_mask(image[..., 0])


def test_tissue_mask_drops_specks_and_fills_small_holes():
    rng = np.random.default_rng(0)
    image = rng.integers(238, 250, (200, 300, 3), dtype=np.uint8)  # glass with noise
    yy, xx = np.mgrid[:200, :300]
    blob = (yy - 100) ** 2 + (xx - 120) ** 2 < 60**2
    small_hole = (abs(yy - 100) < 3) & (abs(xx - 100) < 3)  # 25 px of glass inside the tissue
    large_hole = (abs(yy - 100) < 12) & (abs(xx - 140) < 12)  # 529 px: a lumen, it stays glass
    strand = (yy == 100) & (xx >= 175) & (xx < 240)  # a 1 px strand attached to the tissue
    specks = np.zeros_like(blob)
    specks[rng.integers(0, 200, 40), rng.integers(250, 300, 40)] = True  # isolated pixels on the glass
    specks[10:14, 10:14] = True  # a 16 px fleck of debris
    tissue = (blob & ~small_hole & ~large_hole) | strand | specks
    stain = rng.normal([200, 120, 190], 12, (200, 300, 3)).clip(0, 255).astype(np.uint8)
    image[tissue] = stain[tissue]

    raw = tissue_mask(image, min_area_px=0)  # Otsu alone keeps the noise and the holes
    assert raw[specks].all() and not raw[small_hole].any()
    mask = tissue_mask(image, min_area_px=100)
    assert not mask[specks].any()  # specks dropped
    assert mask[small_hole].all()  # small hole filled
    assert not mask[large_hole].any()  # larger hole kept
    assert mask[strand].all()  # area filters do not shave thin tissue, unlike an opening
    assert (mask == (blob & ~large_hole | strand)).mean() > 0.999
    # by default the threshold is MIN_AREA_FRACTION of the thumbnail (60 px here)
    np.testing.assert_array_equal(tissue_mask(image), mask)


# ------------------------------------------------------------------------------------- encoders


def test_stats_encoder_shape_dtype_finite_and_named():
    encoder = make_encoder("stats")
    patches = np.random.default_rng(0).integers(0, 256, (5, 224, 224, 3), dtype=np.uint8)
    patches[0] = 255  # white glass
    patches[1] = (60, 20, 110)  # a dark nucleus colour
    features = encoder.encode(patches)
    assert features.shape == (5, encoder.dim) == (5, len(STATS_FEATURE_NAMES)) == (5, 31)
    assert features.dtype == np.float32 and np.isfinite(features).all()
    named = dict(zip(STATS_FEATURE_NAMES, features.T, strict=True))
    assert named["white_fraction"][0] == 1.0 and named["dark_fraction"][1] == 1.0
    assert named["haematoxylin_mean"][1] > named["haematoxylin_mean"][0]
    np.testing.assert_allclose(features[:, STATS_FEATURE_NAMES.index("grey_hist_0") :].sum(1), 1.0, rtol=1e-5)


def test_encode_tiles_resizes_any_size():
    encoder = make_encoder("stats")
    rng = np.random.default_rng(0)
    tiles = [
        rng.integers(0, 256, shape, dtype=np.uint8) for shape in [(100, 150, 3), (224, 224, 3), (500, 300, 3)]
    ]
    features = encode_tiles(tiles, encoder, patch_size=224)
    assert features.shape == (3, encoder.dim) and features.dtype == np.float32
    np.testing.assert_array_equal(features[1], encoder.encode(tiles[1][None])[0])
    flat_small = np.full((37, 91, 3), (180, 90, 160), dtype=np.uint8)
    flat_full = np.full((224, 224, 3), (180, 90, 160), dtype=np.uint8)
    np.testing.assert_allclose(*encode_tiles([flat_small, flat_full], encoder), atol=1e-6)
    assert encode_tiles([], encoder).shape == (0, encoder.dim)
    with pytest.raises(TileError, match="tile 1"):
        encode_tiles([flat_full, flat_full.astype(np.float32)], encoder)


@pytest.mark.parametrize("export_format", ["torchscript", "torch.export"])
def test_weights_encoder_records_its_provenance(tmp_path, slides, export_format, monkeypatch):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 8, stride=8), torch.nn.AdaptiveAvgPool2d(2)).eval()
    if export_format == "torchscript":
        path = tmp_path / "tiny.pt"
        torch.jit.script(model).save(str(path))
        monkeypatch.setenv("HEALNET_TRUSTED_ENCODERS", f"{'0' * 64}, {sha256_file(path)}")  # the operator's
    else:
        path = tmp_path / "tiny.pt2"
        example = torch.zeros(2, 3, 224, 224)
        batch = torch.export.Dim("batch")
        torch.export.save(torch.export.export(model, (example,), dynamic_shapes=({0: batch},)), str(path))

    encoder = make_encoder(str(path), device="cpu")
    assert encoder.dim == 16 and encoder.name == "tiny"
    assert encoder.provenance == EncoderProvenance("tiny", sha256_file(path), 16, 224, "imagenet")
    assert encoder.provenance.key == f"tiny-{sha256_file(path)[:12]}"
    patches = np.random.default_rng(0).integers(0, 256, (3, 224, 224, 3), dtype=np.uint8)
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    expected_input = torch.tensor(((patches / 255 - mean) / std).transpose(0, 3, 1, 2), dtype=torch.float32)
    with torch.no_grad():
        expected = model(expected_input).flatten(1).numpy()
    features = encoder.encode(patches)
    assert features.dtype == np.float32
    np.testing.assert_allclose(features, expected, rtol=1e-4, atol=1e-5)

    result = preprocess_slide(slides["good-a"], tmp_path / "out", encoder)
    assert read_slide_features(result.features_path)[0].shape == (result.n_patches, 16)
    assert read_feature_provenance(result.features_path).encoder == encoder.provenance
    # the service finds the same encoder by its weights' sha256, whatever the file is called
    renamed = tmp_path / "encoders" / f"renamed{path.suffix}"
    renamed.parent.mkdir()
    renamed.write_bytes(path.read_bytes())
    assert find_encoder(encoder.provenance, [renamed.parent], "cpu").provenance.weights_sha256 == sha256_file(
        path
    )
    with pytest.raises(EncoderError, match="not available here"):
        find_encoder(encoder.provenance, [tmp_path / "out"], "cpu")


def test_make_encoder_errors(tmp_path):
    with pytest.raises(EncoderError, match="resnet"):
        make_encoder("resnet")
    with pytest.raises(EncoderError, match="missing.pt"):
        make_encoder(f"torchscript:{tmp_path / 'missing.pt'}")
    (tmp_path / "garbage.pt2").write_bytes(b"not a model")
    with pytest.raises(EncoderError, match="torch.export"):
        make_encoder(str(tmp_path / "garbage.pt2"))


# ------------------------------------------------------------------------------- many slides


def test_bad_slides_are_quarantined_and_good_ones_processed(slides, corrupt_slide, blank_slide, tmp_path):
    duplicate = tmp_path / "good-a.tiff"  # same feature file name as good-a.tif
    duplicate.write_bytes(slides["good-a"].read_bytes())
    inputs = [slides["good-a"], slides["good-b"], corrupt_slide, blank_slide, duplicate]
    out = tmp_path / "out"
    report = preprocess_slides(inputs, out, progress=False)

    assert [result.slide_id for result in report.processed] == ["good-a.tif", "good-b.tif"]
    reasons = dict(report.quarantined)
    assert set(reasons) == {"corrupt.svs", "blank.tif", "good-a.tiff"}
    assert "unreadable slide" in reasons["corrupt.svs"]
    assert "no tissue" in reasons["blank.tif"]
    assert "duplicate" in reasons["good-a.tiff"]
    for result in report.processed:
        assert result.features_path == out / feature_file_name(result.slide_id)
        assert result.n_patches >= 24
    summary = json.loads((out / "report.json").read_text())
    assert summary["n_patches"] == report.n_patches and len(summary["quarantined"]) == 3
    assert set(pd.read_csv(out / "quarantine.csv")["slide"]) == set(reasons)


def test_thumbnail_png_shows_the_mask_outline(slides, tmp_path):
    result = preprocess_slide(slides["good-b"], tmp_path, make_encoder())
    assert result.thumbnail_path == tmp_path / "good-b.thumbnail.png"
    with Image.open(result.thumbnail_path) as image:
        assert image.format == "PNG" and max(image.size) <= 1024
        pixels = np.asarray(image.convert("RGB"))
    assert (pixels == OUTLINE_GREEN).all(axis=2).sum() > 50


def test_shards_partition_the_sorted_slides(slides, corrupt_slide, tmp_path):
    inputs = [*slides.values(), corrupt_slide]
    seen = []
    for index in range(3):
        report = preprocess_slides(inputs, tmp_path, shard=(index, 3), progress=False)
        seen += [result.slide_id for result in report.processed] + [slide for slide, _ in report.quarantined]
        assert (tmp_path / f"report.shard-{index}-of-3.json").exists()
    assert sorted(seen) == sorted(path.name for path in inputs)
    assert len(seen) == len(set(seen))
    for bad in [(3, 3), (-1, 2), (0, 0)]:
        with pytest.raises(ValueError, match="shard"):
            preprocess_slides(inputs, tmp_path, shard=bad, progress=False)


def test_manifest_and_folder_inputs(slides, tmp_path):
    cohort = tmp_path / "cohort"
    (cohort / "slides").mkdir(parents=True)
    (cohort / "slides" / "scan.tif").write_bytes(slides["good-b"].read_bytes())
    manifest = cohort / "slides.parquet"
    ids = ["TCGA-A1-0001-01Z-00-DX1.5F3A.tif", "TCGA-A1-0002-01Z-00-DX1.77B0.tif"]
    pd.DataFrame({"slide_id": ids, "path": ["slides/scan.tif", None]}).to_parquet(manifest)
    report = preprocess_slides(manifest, tmp_path / "m", progress=False)  # path relative to the manifest
    assert [result.slide_id for result in report.processed] == ids[:1]
    assert (tmp_path / "m" / "TCGA-A1-0001-01Z-00-DX1.5F3A.parquet").exists()
    assert report.quarantined == [(ids[1], "no file: the manifest gives no path for this slide")]

    report = preprocess_slides(slides["good-a"].parent, tmp_path / "f", progress=False)
    assert sorted(result.slide_id for result in report.processed) == sorted(p.name for p in slides.values())

    pd.DataFrame({"slide": ["x"], "path": ["slides/scan.tif"]}).to_csv(cohort / "bad.csv", index=False)
    with pytest.raises(SlideInputError, match="lacks column"):
        preprocess_slides(cohort / "bad.csv", tmp_path / "b", progress=False)
    pd.DataFrame({"slide_id": [None], "path": ["slides/scan.tif"]}).to_csv(
        cohort / "unnamed.csv", index=False
    )
    with pytest.raises(SlideInputError, match="empty slide_id"):
        preprocess_slides(cohort / "unnamed.csv", tmp_path / "b", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SlideInputError, match="no slides"):
        preprocess_slides(tmp_path / "empty", tmp_path / "e", progress=False)


class CountingEncoder:
    """The statistics encoder, counting the patches it encodes."""

    def __init__(self) -> None:
        self.inner = make_encoder()
        self.name, self.dim, self.provenance = self.inner.name, self.inner.dim, self.inner.provenance
        self.feature_names = self.inner.feature_names
        self.patches = 0

    def encode(self, patches: np.ndarray) -> np.ndarray:
        self.patches += len(patches)
        return self.inner.encode(patches)


def test_rerun_resumes_an_interrupted_run(slides, tmp_path, monkeypatch):
    folder, out = tmp_path / "in", tmp_path / "out"
    folder.mkdir()
    for path in slides.values():  # fine.tif, good-a.tif, good-b.tif in sorted order
        (folder / path.name).write_bytes(path.read_bytes())

    write = write_slide_features

    def interrupted_on_the_second_slide(path, features, coords, metadata):
        if (out / "fine.parquet").exists():
            path.with_name(path.name + ".partial").write_bytes(b"PAR1 half a file")
            raise KeyboardInterrupt
        write(path, features, coords, metadata)

    monkeypatch.setattr(wsi, "write_slide_features", interrupted_on_the_second_slide)
    with pytest.raises(KeyboardInterrupt):
        preprocess_slides(folder, out, progress=False)
    monkeypatch.undo()
    assert (out / "good-a.parquet.partial").exists() and not (out / "good-a.parquet").exists()
    done = (out / "fine.parquet").stat().st_mtime_ns

    encoder = CountingEncoder()
    report = preprocess_slides(folder, out, encoder, progress=False)
    assert [result.slide_id for result in report.skipped] == ["fine.tif"]
    assert [result.slide_id for result in report.processed] == ["good-a.tif", "good-b.tif"]
    assert encoder.patches == report.n_patches  # the finished slide was not encoded again
    assert (out / "fine.parquet").stat().st_mtime_ns == done
    assert not list(out.glob("*.partial"))
    skipped, n_fine = report.skipped[0], len(read_slide_features(out / "fine.parquet")[0])
    assert (skipped.level, skipped.mpp, skipped.n_patches) == (1, pytest.approx(0.5), n_fine)
    summary = json.loads((out / "report.json").read_text())
    assert summary["n_skipped"] == 1 and summary["skipped"][0]["slide_id"] == "fine.tif"
    assert read_feature_metadata(out / "good-a.parquet")["min_tissue_fraction"] == 0.5

    encoder = CountingEncoder()
    report = preprocess_slides(folder, out, encoder, progress=False)
    assert (len(report.skipped), report.processed, encoder.patches) == (3, [], 0)

    (out / "good-b.parquet").write_bytes((out / "good-b.parquet").read_bytes()[:-100])  # truncated
    (out / "fine.thumbnail.png").unlink()  # outputs of a slide are complete only with the thumbnail
    report = preprocess_slides(folder, out, encoder, progress=False)
    assert [result.slide_id for result in report.processed] == ["fine.tif", "good-b.tif"]

    for changed in [TilingConfig(min_tissue_fraction=0.6), TilingConfig(target_mpp=2.0)]:
        report = preprocess_slides(folder, out, encoder, changed, progress=False)
        assert len(report.processed) == 3 and not report.skipped
    report = preprocess_slides(folder, out, encoder, TilingConfig(target_mpp=2.0), progress=False)
    assert len(report.skipped) == 3
    report = preprocess_slides(
        folder, out, encoder, TilingConfig(target_mpp=2.0), progress=False, overwrite=True
    )
    assert len(report.processed) == 3 and not report.skipped


def test_a_slide_that_fails_its_recompute_keeps_no_stale_features(slides, tmp_path, monkeypatch):
    folder, out = tmp_path / "in", tmp_path / "out"
    folder.mkdir()
    for path in slides.values():
        (folder / path.name).write_bytes(path.read_bytes())
    preprocess_slides(folder, out, progress=False)
    earlier = (out / "good-a.parquet").read_bytes()
    compute = wsi.preprocess_slide

    def fails_for_good_a(path, *args, **kwargs):
        if path.name == "good-a.tif":
            raise wsi.SlideError("unreadable slide: the file changed")
        return compute(path, *args, **kwargs)

    monkeypatch.setattr(wsi, "preprocess_slide", fails_for_good_a)
    report = preprocess_slides(folder, out, config=TilingConfig(min_tissue_fraction=0.6), progress=False)
    [(slide, reason)] = report.quarantined
    assert slide == "good-a.tif" and "kept as good-a.parquet.superseded" in reason
    assert not (out / "good-a.parquet").exists()  # not read as features of the new settings
    assert (out / "good-a.parquet.superseded").read_bytes() == earlier  # nothing lost
    assert sorted(path.name for path in out.glob("*.parquet")) == ["fine.parquet", "good-b.parquet"]


def test_read_slide_features_rejects_foreign_parquet(tmp_path):
    pd.DataFrame({"x": [0], "y": [0], "feature": [1.0]}).to_parquet(tmp_path / "foreign.parquet")
    with pytest.raises(SlideInputError, match="columns"):
        read_slide_features(tmp_path / "foreign.parquet")


def test_a_truncated_or_absent_feature_file_is_a_slide_input_error(slides, tmp_path):
    preprocess_slides([slides["good-a"]], tmp_path, progress=False)
    path = tmp_path / "good-a.parquet"
    path.write_bytes(path.read_bytes()[:-200])
    for read in (read_slide_features, read_feature_metadata, read_feature_provenance):
        with pytest.raises(SlideInputError, match="good-a.parquet: unreadable feature file"):
            read(path)
    with pytest.raises(SlideInputError, match="feature file not found"):
        read_slide_features(tmp_path / "absent.parquet")


def test_the_quarantine_lists_of_every_shard_are_read_together(slides, corrupt_slide, blank_slide, tmp_path):
    inputs = [*slides.values(), corrupt_slide, blank_slide]  # sorted: blank, corrupt, fine, good-a, good-b
    quarantined = {}
    for index in range(2):
        report = preprocess_slides(inputs, tmp_path, shard=(index, 2), progress=False)
        quarantined |= dict(report.quarantined)
        assert (tmp_path / f"quarantine.shard-{index}-of-2.csv").exists()
    assert set(quarantined) == {"corrupt.svs", "blank.tif"}
    assert read_quarantine(tmp_path) == quarantined
    assert is_feature_folder(tmp_path) and read_quarantine(tmp_path / "absent") == {}
    # a run whose every slide was quarantined still names its encoder folder: it holds only the list
    only = tmp_path / "only-bad" / "stats"
    preprocess_slides([corrupt_slide], only, progress=False)
    assert resolve_feature_dir(only.parent) == only and list(read_quarantine(only)) == ["corrupt.svs"]


def test_a_malformed_quarantine_list_is_a_slide_input_error(tmp_path):
    (tmp_path / "quarantine.csv").write_text("slide_id,why\na.tif,unreadable\n")
    with pytest.raises(SlideInputError, match="quarantine.csv: a quarantine list needs the columns"):
        read_quarantine(tmp_path)
    (tmp_path / "quarantine.csv").write_text("slide,reason\n,unreadable\n")
    with pytest.raises(SlideInputError, match="line 2 names no slide"):
        read_quarantine(tmp_path)
    (tmp_path / "quarantine.csv").write_bytes(b"slide,reason\n\xff\xfe,bad bytes\n")
    with pytest.raises(SlideInputError, match="unreadable quarantine list"):
        read_quarantine(tmp_path)


def test_invalid_tiling_settings_are_slide_input_errors(slides, tmp_path):
    with pytest.raises(SlideInputError, match="min_tissue_fraction must lie in"):
        TilingConfig(min_tissue_fraction=1.5)
    with pytest.raises(SlideInputError, match="patch_size >= 8"):
        TilingConfig(patch_size=4)
    with pytest.raises(SlideInputError, match="shard must be"):
        preprocess_slides([slides["good-a"]], tmp_path, shard=(2, 2), progress=False)


# ------------------------------------------------------------------------------------------ CLI


def test_cli_end_to_end(slides, corrupt_slide, tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    for path in [slides["good-a"], corrupt_slide]:
        (folder / path.name).write_bytes(path.read_bytes())
    out = tmp_path / "out"
    code = main(["preprocess-slides", str(folder), "--out", str(out), "--min-tissue", "0.6", "--no-progress"])
    printed = capsys.readouterr().out
    assert code == 0
    assert "processed 1 slide(s)" in printed and "corrupt.svs: unreadable slide" in printed
    keyed = out / "stats"  # feature folders are keyed by encoder
    assert f"-> {keyed}" in printed
    assert read_slide_features(keyed / "good-a.parquet")[0].shape[1] == len(STATS_FEATURE_NAMES)
    assert json.loads((keyed / "report.json").read_text())["config"]["min_tissue_fraction"] == 0.6

    only_bad = tmp_path / "only-bad"
    only_bad.mkdir()
    (only_bad / "corrupt.svs").write_bytes(corrupt_slide.read_bytes())
    assert main(["preprocess-slides", str(only_bad), "--out", str(out), "--no-progress"]) == 1
    assert "every slide was quarantined" in capsys.readouterr().err

    (tmp_path / "empty").mkdir()
    assert main(["preprocess-slides", str(tmp_path / "empty"), "--out", str(out), "--no-progress"]) != 0
    assert "no slides" in capsys.readouterr().err


def test_cli_resume_and_overwrite(slides, tmp_path, capsys):
    folder, out = slides["good-a"].parent, tmp_path / "out"
    command = ["preprocess-slides", str(folder), "--out", str(out), "--no-progress"]
    assert main(command) == 0
    assert "processed 3 slide(s)" in capsys.readouterr().out
    assert main(command) == 0
    printed = capsys.readouterr().out
    assert "processed 0 slide(s)" in printed and "skipped 3 slide(s) already done" in printed
    assert json.loads((out / "stats" / "report.json").read_text())["n_skipped"] == 3
    assert main([*command, "--overwrite"]) == 0
    printed = capsys.readouterr().out
    assert "processed 3 slide(s)" in printed and "skipped" not in printed
    assert main([*command, "--min-tissue", "0.7"]) == 0
    assert "processed 3 slide(s)" in capsys.readouterr().out


def test_cli_shard_option(slides, tmp_path, capsys):
    folder = slides["good-a"].parent
    assert (
        main(["preprocess-slides", str(folder), "--out", str(tmp_path), "--shard", "1/3", "--no-progress"])
        == 0
    )
    assert "processed 1 slide(s)" in capsys.readouterr().out
    assert (tmp_path / "stats" / "report.shard-1-of-3.json").exists()
    for bad in ["1-4", "4/4", "a/b", "1/"]:
        with pytest.raises(SystemExit) as exit_info:
            main(["preprocess-slides", str(folder), "--out", str(tmp_path), "--shard", bad])
        assert exit_info.value.code == 2
        assert "--shard must be i/n" in capsys.readouterr().err


@pytest.mark.parametrize(
    "slide_id, expected",
    [
        (
            "TCGA-2F-A9KO-01Z-00-DX1.195576CF-B739-4BD9-B15B-4A70AE287D3E.svs",
            "TCGA-2F-A9KO-01Z-00-DX1.195576CF-B739-4BD9-B15B-4A70AE287D3E",
        ),
        (
            "TCGA-2F-A9KO-01Z-00-DX1.195576CF-B739-4BD9-B15B-4A70AE287D3E",
            "TCGA-2F-A9KO-01Z-00-DX1.195576CF-B739-4BD9-B15B-4A70AE287D3E",
        ),
        ("slides/case_7.TIFF", "case_7"),
        ("case_7.ome.tif", "case_7.ome"),
    ],
)
def test_feature_file_names_cut_only_slide_extensions(slide_id, expected):
    assert feature_file_name(slide_id) == expected + ".parquet"
