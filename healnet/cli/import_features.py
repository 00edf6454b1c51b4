"""`healnet import-features`: precomputed patch features (CLAM, TRIDENT) → per-slide feature files."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from healnet.files import DEFAULT_MAX_SLIDE_BYTES

HELP = (
    "Import patch features computed elsewhere (CLAM h5_files/pt_files, TRIDENT features_<encoder>, or a "
    "folder of .h5/.pt files) as OUT/<encoder>/<slide>.parquet, with the encoder's provenance; bad slides "
    "are quarantined with a reason."
)

DESCRIPTION = """\
Import patch features computed elsewhere (e.g. published TCGA features of UNI, CONCH or ResNet50-trunc)
as the per-slide feature files that `healnet train` and the service read, so that no slide has to be
tiled again.

source layouts (detected from SOURCE):
  CLAM     SOURCE/h5_files/<slide>.h5  datasets features (n, d) and coords (n, 2)
           SOURCE/pt_files/<slide>.pt  a tensor (n, d); its coordinates come from the .h5 of the
                                       same slide (h5_files/ or patches/); without one it is quarantined
  TRIDENT  JOB/<mag>x_<size>px_<overlap>px_overlap/features_<encoder>/<slide>.h5 (features, coords with
           attributes patch_size, target_magnification, ...); .pt features take their coordinates from
           ../patches/<slide>_patches.h5. SOURCE may be the job, magnification or features folder;
           with several features_<encoder> folders, --encoder-name picks features_<encoder-name>.
  flat     SOURCE/<slide>.h5 and/or SOURCE/<slide>.pt, paired by file stem

Coordinates are level-0 pixels (x, y) of each patch's top-left corner; heatmaps need them. The slide id
is the file stem, kept whole (TCGA-XX-YYYY-01Z-00-DX1.<uuid>), and matches the cohort's slides.parquet
slide_id (a slide extension such as .svs there is ignored).

The patch grid comes from --patch-size and --mpp, else from the files' attributes: patch_size, and
target_magnification turned into µm/px as 10 / magnification (20x = 0.5 µm/px, 40x = 0.25). CLAM
files record no magnification: give --mpp. A flag overrides the attributes; a slide whose patch_size
attribute contradicts --patch-size, or whose grid or feature width differs from the import's (the
flags, else the most common one), is quarantined.
"""

EPILOG = """\
output:
  OUT/<encoder key>/<slide>.parquet  x, y, f_0..f_{d-1}; the encoder provenance (name, weights sha256,
                                     dim, input size, normalisation), patch_size and target_mpp
  OUT/<encoder key>/report.json      imported and quarantined slides
  OUT/<encoder key>/quarantine.csv   slide, reason (only when a slide was quarantined); training takes
                                     these slides as missing for their patients
  The encoder key is the encoder name, with the weights' first 12 hex digits when --weights-sha256 is
  given. Without --weights-sha256 a model trained on these features serves patch features only: it
  refuses image tiles, since no encoder file can be matched to its features.

exit status: 0 when at least one slide was imported, 1 when every slide was quarantined, 2 on bad usage.

example:
  healnet import-features /data/tcga_blca/trident_job --out cohorts/blca/features --encoder-name uni_v1
  healnet train --cohort cohorts/blca --features cohorts/blca/features --out runs/blca
"""


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = DESCRIPTION
    parser.epilog = EPILOG
    parser.add_argument(
        "source", metavar="SOURCE", type=Path, help="folder of the features (CLAM, TRIDENT or flat layout)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        required=True,
        metavar="DIR",
        default=argparse.SUPPRESS,
        help="output folder; the files go to DIR/<encoder key>/",
    )
    parser.add_argument(
        "--encoder-name",
        required=True,
        metavar="NAME",
        default=argparse.SUPPRESS,
        help="the patch encoder that computed the features, e.g. uni_v1, conch_v1, resnet50_trunc",
    )
    parser.add_argument(
        "--weights-sha256",
        metavar="HEX",
        default=None,
        help="sha256 of the encoder's weights file (TorchScript or torch.export), when you have it: the "
        "service can then encode image tiles with that file (HEALNET_ENCODER_DIR)",
    )
    parser.add_argument(
        "--normalisation",
        default="imagenet",
        help="the encoder's input normalisation: imagenet, none or custom:<description>",
    )
    parser.add_argument("--input-size", type=int, default=224, help="the encoder's input side in pixels")
    parser.add_argument(
        "--encoder-dim",
        type=int,
        default=None,
        metavar="D",
        help="features per patch; slides of another width are quarantined (default: the files' most "
        "common width)",
    )
    parser.add_argument(
        "--patch-size",
        type=int,
        default=None,
        metavar="PX",
        help="patch side in pixels at --mpp (default: the files' patch_size attribute)",
    )
    parser.add_argument(
        "--mpp",
        type=float,
        default=None,
        metavar="UM_PER_PX",
        help="µm per pixel of the patches (default: 10 / the files' target_magnification; required for "
        "CLAM files)",
    )
    parser.add_argument(
        "--max-slide-gib",
        type=float,
        default=DEFAULT_MAX_SLIDE_BYTES / 2**30,
        metavar="GIB",
        help="per-slide memory budget: a slide whose files declare arrays that would need more memory to "
        "import is quarantined before any data is read (default: %(default)g)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run(args: argparse.Namespace) -> int:
    from healnet.cli.preprocess_slides import QUARANTINE_NOTE
    from healnet.preprocess.feature_import import ImportConfig, import_features

    config = ImportConfig(
        encoder_name=args.encoder_name,
        weights_sha256=args.weights_sha256,
        normalisation=args.normalisation,
        input_size=args.input_size,
        encoder_dim=args.encoder_dim,
        patch_size=args.patch_size,
        mpp=args.mpp,
        max_slide_bytes=round(args.max_slide_gib * 2**30),
    )
    report = import_features(args.source, args.out, config, progress=not args.no_progress)

    print(
        f"imported {len(report.imported)} slide(s), {report.n_patches} patches "
        f"({report.layout} layout, {report.source}) -> {report.out_dir}"
    )
    if report.provenance is not None:
        print(f"features: {report.provenance.describe()}")
        if report.provenance.encoder.weights_sha256 is None:
            print(
                "note: no --weights-sha256, so a model trained on these features takes patch features, "
                "not image tiles"
            )
    if report.quarantined:
        print(f"quarantined {len(report.quarantined)} slide(s):")
        for slide, reason in report.quarantined:
            print(f"  {slide}: {reason}")
        print(QUARANTINE_NOTE)
    print(f"report: {report.out_dir / 'report.json'}")
    if not report.imported:
        print("error: every slide was quarantined", file=sys.stderr)
        return 1
    return 0
