"""Tiling throughput: `preprocess_slides` (stats encoder) against raw OpenSlide `read_region`.

Both sides read the same patches: the raw side opens each slide and calls `read_region` once per
patch that `preprocess_slides` kept (same level, same level-0 coordinates, same read size) and does
nothing else. The pipeline side includes everything: thumbnail, tissue mask, reading, resizing,
encoding and writing the feature file, thumbnail and report. Both run single-threaded; each side
keeps its fastest repeat, by wall clock and by process CPU time (steadier on a shared machine).

    python benchmarks/tiling.py [--slides N] [--size-px PX] [--repeats R] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import openslide

from healnet.data.synth_slides import write_synthetic_slide
from healnet.preprocess.feature_files import read_feature_metadata, read_slide_features
from healnet.preprocess.wsi import TilingConfig, preprocess_slides

CMU_SLIDE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "CMU-1-Small-Region.svs"
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def timed(action: Callable[[], object]) -> dict[str, float]:
    """Seconds `action` takes on each clock."""
    start = {name: clock() for name, clock in CLOCKS.items()}
    action()
    return {name: clock() - start[name] for name, clock in CLOCKS.items()}


def raw_reader(features_paths: list[Path], slide_paths: list[Path]) -> Callable[[], None]:
    """A function that opens each slide and calls `read_region` on every kept patch, nothing else."""
    jobs = []
    for features_path, slide_path in zip(features_paths, slide_paths, strict=True):
        metadata = read_feature_metadata(features_path)
        _, coords = read_slide_features(features_path)
        jobs.append((slide_path, metadata, [(int(x), int(y)) for x, y in coords]))

    def read_all() -> None:
        for slide_path, metadata, coords in jobs:
            with openslide.OpenSlide(slide_path) as slide:
                level = metadata["level"]
                level_mpp = metadata["slide_mpp"] * slide.level_downsamples[level]
                read_size = max(1, round(metadata["patch_size"] * metadata["target_mpp"] / level_mpp))
                for location in coords:
                    slide.read_region(location, level, (read_size, read_size))

    return read_all


def measure(name: str, slides: list[Path], out_dir: Path, repeats: int) -> dict:
    """Fastest raw and pipeline seconds per clock for one group of slides."""
    config = TilingConfig()
    report = preprocess_slides(slides, out_dir, "stats", config, progress=False, overwrite=True)  # warm-up
    if report.quarantined:
        raise RuntimeError(f"benchmark slides were quarantined: {report.quarantined}")
    by_id = {path.name: path for path in slides}
    read_all = raw_reader(
        [result.features_path for result in report.processed],
        [by_id[result.slide_id] for result in report.processed],
    )
    raw, pipeline = [], []
    for _ in range(repeats):  # interleaved so both see the same cache state and machine load
        raw.append(timed(read_all))
        pipeline.append(
            timed(lambda: preprocess_slides(slides, out_dir, "stats", config, progress=False, overwrite=True))
        )  # overwrite: a resumed run would skip every slide
    return {
        "slides": name,
        "n_slides": len(slides),
        "patches": report.n_patches,
        **{f"raw_{clock}_s": min(run[clock] for run in raw) for clock in CLOCKS},
        **{f"pipeline_{clock}_s": min(run[clock] for run in pipeline) for clock in CLOCKS},
    }


def with_rates(row: dict) -> dict:
    for clock in CLOCKS:
        row[f"raw_{clock}_patches_per_s"] = round(row["patches"] / row[f"raw_{clock}_s"], 1)
        row[f"pipeline_{clock}_patches_per_s"] = round(row["patches"] / row[f"pipeline_{clock}_s"], 1)
        row[f"{clock}_ratio"] = round(row[f"raw_{clock}_s"] / row[f"pipeline_{clock}_s"], 3)
    return row


def markdown(rows: list[dict]) -> str:
    lines = [
        "| slides | patches | raw read_region (patches/s) | preprocess_slides (patches/s) | ratio "
        "| raw, CPU time (patches/s) | preprocess_slides, CPU time (patches/s) | CPU ratio |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        lines.append(
            f"| {row['slides']} | {row['patches']} | {row['raw_wall_patches_per_s']:.0f} "
            f"| {row['pipeline_wall_patches_per_s']:.0f} | {row['wall_ratio']:.2f} "
            f"| {row['raw_cpu_patches_per_s']:.0f} | {row['pipeline_cpu_patches_per_s']:.0f} "
            f"| {row['cpu_ratio']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slides", type=int, default=4, help="number of synthetic slides to generate")
    parser.add_argument("--size-px", type=int, default=4096, help="side of each synthetic slide in pixels")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per side (the fastest counts)")
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
        groups = {f"synthetic {args.size_px} px pyramid, 1.0 µm/px (×{args.slides})": synthetic}
        if CMU_SLIDE.exists():
            groups["CMU-1-Small-Region.svs (0.499 µm/px, one level)"] = [CMU_SLIDE]
        rows = [
            measure(name, slides, folder / f"out-{i}", args.repeats)
            for i, (name, slides) in enumerate(groups.items())
        ]
    total = {"slides": "all", **{key: sum(row[key] for row in rows) for key in rows[0] if key != "slides"}}
    rows = [with_rates(row) for row in [*rows, total]]
    print(markdown(rows))
    if args.json:
        args.json.write_text(json.dumps({"repeats": args.repeats, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
