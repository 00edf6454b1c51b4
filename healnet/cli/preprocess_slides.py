"""`healnet preprocess-slides`: whole-slide images → per-slide patch feature files."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

HELP = (
    "Tile whole-slide images into tissue patches at a fixed µm/px, encode each patch and write "
    "OUT/<encoder>/<slide>.parquet (x, y, f_0..f_{d-1}, with the encoder's provenance), a thumbnail "
    "with the tissue mask and report.json. Feature folders are keyed by encoder (name and weights "
    "sha256), so that features of different encoders never mix. A rerun resumes: slides whose feature "
    "file is complete for the same encoder and settings are skipped (--overwrite recomputes them)."
)

# what a quarantined slide means downstream, said where the quarantine is listed
QUARANTINE_NOTE = "training and evaluation go on without them: each is a missing slide for its patient"


def parse_shard(text: str) -> tuple[int, int]:
    """'i/n' with 0 <= i < n, e.g. '1/4'."""
    match = re.fullmatch(r"(\d+)/(\d+)", text.strip())
    if not match or not int(match[1]) < int(match[2]):
        raise argparse.ArgumentTypeError(f"--shard must be i/n with 0 <= i < n (e.g. 1/4), got {text!r}")
    return int(match[1]), int(match[2])


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "inputs",
        metavar="SLIDE_DIR_OR_MANIFEST",
        help="a folder of slides (.svs, .tif, .tiff, .ndpi, .mrxs, ...), a manifest (.csv or .parquet "
        "with columns slide_id, path and optionally mpp, the µm/px of slides that record none; relative "
        "paths are resolved against its folder) or one slide file",
    )
    parser.add_argument(
        "--out",
        type=Path,
        required=True,
        metavar="DIR",
        default=argparse.SUPPRESS,
        help="output folder for the feature files, thumbnails and report",
    )
    parser.add_argument(
        "--encoder",
        default="stats",
        metavar="SPEC",
        help="'stats' (colour and texture statistics, no weights) or the path of a patch encoder exported "
        "with torch.export (.pt2) or TorchScript (.pt), such as ResNet50-trunc, UNI or CONCH (see "
        "scripts/export_encoders.py); runs on CUDA when available. A .pt2 loads only when it holds raw "
        "tensors and an aten graph (no pickle); a TorchScript file only when its sha256 is trusted "
        "(--trust-encoder or $HEALNET_TRUSTED_ENCODERS)",
    )
    parser.add_argument(
        "--trust-encoder",
        action="append",
        default=[],
        metavar="SHA256",
        help="the sha256 of a TorchScript encoder file you trust to run (its loader can run code the file "
        "carries); repeatable (default: only those in $HEALNET_TRUSTED_ENCODERS, comma-separated)",
    )
    parser.add_argument(
        "--slide-root",
        type=Path,
        default=None,
        metavar="DIR",
        help="open only slide files inside DIR: a slide whose path resolves (symlinks followed) outside it "
        "is quarantined as 'outside the slide root' and never opened (use it for manifests you did not "
        "write)",
    )
    parser.add_argument("--target-mpp", type=float, default=1.0, help="patch resolution in µm per pixel")
    parser.add_argument("--patch-size", type=int, default=224, help="patch side in pixels at --target-mpp")
    parser.add_argument(
        "--min-tissue",
        type=float,
        default=0.5,
        help="keep patches whose tissue fraction (from the thumbnail's tissue mask) is at least this",
    )
    parser.add_argument(
        "--shard",
        type=parse_shard,
        default="0/1",
        metavar="i/n",
        help="process only shard i of n: the sorted slide list [i::n] (for parallel workers)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="recompute every slide; by default slides whose feature file an earlier run completed with "
        "the same encoder, --target-mpp, --patch-size and --min-tissue are skipped",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run(args: argparse.Namespace) -> int:
    from healnet.preprocess.encoders import make_encoder
    from healnet.preprocess.feature_files import shard_file_name
    from healnet.preprocess.wsi import TilingConfig, preprocess_slides

    config = TilingConfig(
        target_mpp=args.target_mpp, patch_size=args.patch_size, min_tissue_fraction=args.min_tissue
    )
    encoder = make_encoder(args.encoder, trusted=args.trust_encoder)
    out = args.out / encoder.provenance.key
    report = preprocess_slides(
        args.inputs,
        out,
        encoder,
        config,
        args.shard,
        progress=not args.no_progress,
        overwrite=args.overwrite,
        slide_root=args.slide_root,
    )

    print(f"processed {len(report.processed)} slide(s), {report.n_patches} patches -> {out}")
    if report.skipped:
        print(f"skipped {len(report.skipped)} slide(s) already done (--overwrite recomputes them)")
    if report.quarantined:
        print(f"quarantined {len(report.quarantined)} slide(s):")
        for slide, reason in report.quarantined:
            print(f"  {slide}: {reason}")
        print(QUARANTINE_NOTE)
    print(f"report: {out / shard_file_name('report.json', args.shard)}")
    if report.quarantined and not report.processed and not report.skipped:
        print("error: every slide was quarantined", file=sys.stderr)
        return 1
    if not (report.processed or report.skipped or report.quarantined):
        print(f"shard {args.shard[0]}/{args.shard[1]} holds no slides")
    return 0
