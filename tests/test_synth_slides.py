"""Synthetic pyramidal slides: OpenSlide reads them, they are deterministic and carry the tumour signal."""

from pathlib import Path

import numpy as np
import openslide
import pytest
from scipy.stats import spearmanr

from healnet.data.synth_slides import SyntheticSlideError, write_synthetic_slide
from healnet.preprocess.encoders import STATS_FEATURE_NAMES
from healnet.preprocess.feature_files import read_slide_features
from healnet.preprocess.wsi import TilingConfig, preprocess_slides


@pytest.fixture(scope="module")
def slide(tmp_path_factory) -> Path:
    return write_synthetic_slide(tmp_path_factory.mktemp("synth") / "slide.tif", 0.4, seed=1)


def test_openslide_reads_a_generic_tiff_pyramid_with_mpp(slide):
    with openslide.OpenSlide(slide) as handle:
        assert handle.properties[openslide.PROPERTY_NAME_VENDOR] == "generic-tiff"
        assert handle.level_count >= 3
        assert handle.level_downsamples == pytest.approx([2.0**i for i in range(handle.level_count)])
        width, height = handle.dimensions
        for level, (level_width, level_height) in enumerate(handle.level_dimensions):
            assert (level_width, level_height) == (width >> level, height >> level)
        assert float(handle.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(1.0)
        assert float(handle.properties[openslide.PROPERTY_NAME_MPP_Y]) == pytest.approx(1.0)
        assert handle.properties["openslide.level[0].tile-width"] == "256"


def test_custom_size_and_mpp_are_reported(tmp_path):
    path = write_synthetic_slide(tmp_path / "fine.tif", 0.5, seed=3, size_px=1024, mpp=0.25)
    with openslide.OpenSlide(path) as handle:
        assert handle.dimensions == (1024, 1024)
        assert float(handle.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(0.25)
        assert handle.level_dimensions[1] == (512, 512)


def test_same_seed_gives_identical_bytes_and_another_seed_differs(tmp_path, slide):
    again = write_synthetic_slide(tmp_path / "again.tif", 0.4, seed=1)
    other = write_synthetic_slide(tmp_path / "other.tif", 0.4, seed=2)
    assert again.read_bytes() == slide.read_bytes()
    assert other.read_bytes() != slide.read_bytes()


def test_budget_file_size_and_tissue_patches(tmp_path):
    path = write_synthetic_slide(tmp_path / "budget.tif", 0.5, seed=0)
    assert path.stat().st_size <= 2 * 1024 * 1024
    report = preprocess_slides(tmp_path, tmp_path / "features", progress=False)
    assert not report.quarantined
    assert min(result.n_patches for result in report.processed) >= 24


def test_rejects_tumour_fraction_outside_unit_interval(tmp_path):
    with pytest.raises(SyntheticSlideError, match="tumour_fraction"):
        write_synthetic_slide(tmp_path / "bad.tif", 1.5, seed=0)


def test_tumour_fraction_is_visible_in_mean_stats_features(tmp_path):
    fractions = np.linspace(0.0, 1.0, 8)
    slides = [
        write_synthetic_slide(tmp_path / f"slide-{i}.tif", fraction, seed=10 + i)
        for i, fraction in enumerate(fractions)
    ]
    out = tmp_path / "features"
    report = preprocess_slides(slides, out, "stats", TilingConfig(), progress=False)
    assert [result.slide_id for result in report.processed] == [path.name for path in slides]
    slide_means = np.stack(
        [read_slide_features(result.features_path)[0].mean(0) for result in report.processed]
    )
    for name in ("haematoxylin_mean", "dark_fraction", "od_mean_r"):
        rho = spearmanr(fractions, slide_means[:, STATS_FEATURE_NAMES.index(name)]).statistic
        assert rho > 0.9, name
    eosin = slide_means[:, STATS_FEATURE_NAMES.index("eosin_mean")]
    assert spearmanr(fractions, eosin).statistic < -0.9
