"""Tiling throughput: `preprocess_slides` (stats encoder) against raw OpenSlide `read_region`.

Both sides read the same patches: the raw side opens each slide and calls `read_region` once per
patch that `preprocess_slides` kept (same level, same level-0 coordinates, same read size) and does
nothing else. The pipeline side includes everything: thumbnail, tissue mask, reading, resizing,
encoding and writing the feature file, thumbnail and report. Timings are medians over repeats.

    python benchmarks/tiling.py [--slides N] [--size-px PX] [--repeats R] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import openslide

from healnet.data.synth_slides import write_synthetic_slide
from healnet.preprocess.wsi import (
    TilingConfig,
    preprocess_slides,
    read_feature_metadata,
    read_slide_features,
)

CMU_SLIDE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "CMU-1-Small-Region.svs"


def raw_read_seconds(features_paths: list[Path], slide_paths: list[Path]) -> float:
    """Seconds to open each slide and `read_region` every kept patch, nothing else."""
    jobs = []
    for features_path, slide_path in zip(features_paths, slide_paths, strict=True):
        metadata = read_feature_metadata(features_path)
        _, coords = read_slide_features(features_path)
        jobs.append((slide_path, metadata, [tuple(map(int, xy)) for xy in coords]))
    start = time.perf_counter()
    for slide_path, metadata, coords in jobs:
        with openslide.OpenSlide(slide_path) as slide:
            level = metadata["level"]
            level_mpp = metadata["slide_mpp"] * slide.level_downsamples[level]
            read_size = max(1, round(metadata["patch_size"] * metadata["target_mpp"] / level_mpp))
            for location in coords:
                slide.read_region(location, level, (read_size, read_size))
    return time.perf_counter() - start


def measure(name: str, slides: list[Path], out_dir: Path, repeats: int) -> dict:
    config = TilingConfig()
    report = preprocess_slides(slides, out_dir, "stats", config, progress=False)  # warm-up
    if report.quarantined:
        raise RuntimeError(f"benchmark slides were quarantined: {report.quarantined}")
    by_id = {path.name: path for path in slides}
    features_paths = [result.features_path for result in report.processed]
    slide_paths = [by_id[result.slide_id] for result in report.processed]
    pipeline, raw = [], []
    for _ in range(repeats):  # interleaved so both see the same cache and machine load
        raw.append(raw_read_seconds(features_paths, slide_paths))
        start = time.perf_counter()
        preprocess_slides(slides, out_dir, "stats", config, progress=False)
        pipeline.append(time.perf_counter() - start)
    patches = report.n_patches
    raw_rate = patches / statistics.median(raw)
    pipeline_rate = patches / statistics.median(pipeline)
    return {
        "slides": name,
        "n_slides": len(slides),
        "patches": patches,
        "raw_read_region_patches_per_s": round(raw_rate, 1),
        "preprocess_slides_patches_per_s": round(pipeline_rate, 1),
        "ratio": round(pipeline_rate / raw_rate, 3),
    }


def markdown(rows: list[dict]) -> str:
    lines = [
        "| slides | patches | raw read_region (patches/s) | preprocess_slides (patches/s) | ratio |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        lines.append(
            f"| {row['slides']} | {row['patches']} | {row['raw_read_region_patches_per_s']:.0f} | "
            f"{row['preprocess_slides_patches_per_s']:.0f} | {row['ratio']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slides", type=int, default=4, help="number of synthetic slides to generate")
    parser.add_argument("--size-px", type=int, default=4096, help="side of each synthetic slide in pixels")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per measurement (median)")
    parser.add_argument("--json", type=Path, help="also write the numbers to this JSON file")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        synthetic = [
            write_synthetic_slide(
                folder / f"synthetic-{i}.tif", i / max(args.slides - 1, 1), seed=i, size_px=args.size_px
            )
            for i in range(args.slides)
        ]
        groups = {f"synthetic {args.size_px} px, 1.0 µm/px (×{args.slides})": synthetic}
        if CMU_SLIDE.exists():
            groups["CMU-1-Small-Region.svs (0.499 µm/px, one level)"] = [CMU_SLIDE]
        rows = [
            measure(name, slides, folder / f"out-{i}", args.repeats)
            for i, (name, slides) in enumerate(groups.items())
        ]
    patches = sum(row["patches"] for row in rows)
    raw_seconds = sum(row["patches"] / row["raw_read_region_patches_per_s"] for row in rows)
    pipeline_seconds = sum(row["patches"] / row["preprocess_slides_patches_per_s"] for row in rows)
    rows.append(
        {
            "slides": "all",
            "n_slides": sum(row["n_slides"] for row in rows),
            "patches": patches,
            "raw_read_region_patches_per_s": round(patches / raw_seconds, 1),
            "preprocess_slides_patches_per_s": round(patches / pipeline_seconds, 1),
            "ratio": round(raw_seconds / pipeline_seconds, 3),
        }
    )
    print(markdown(rows))
    if args.json:
        args.json.write_text(json.dumps({"repeats": args.repeats, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
