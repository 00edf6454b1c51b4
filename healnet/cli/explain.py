"""`healnet explain`: the attention heatmap of one slide, for a pathologist to look at first."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "Draw where a trained model looks in a slide: attention heatmap PNG (per layer and mean) + JSON."

DESCRIPTION = """\
Predict one slide with a run's checkpoint and draw its patch attention over the slide.

The PNG shows the slide thumbnail (OpenSlide) with each patch's attention as a semi-transparent colour
map over the patch grid: one panel per layer and their mean (--layer), a colour bar in units of
"attention x patches" (1 = what every patch would get under uniform attention), and the top-k patches as
tiles read from the slide. Without the slide file (not in the cohort, or not on this machine) the
patches are drawn on a blank canvas and the tiles show positions and scores only.

OUT with .json holds per patch x, y (level-0 px, top-left), attention (mean over layers) and
attention_layers (each layer's attention, softmax over the patches: sums to 1), plus the top-k list.

The slide is a cohort slide id (with --cohort), a slide file or a feature file (.parquet of `healnet
preprocess-slides`). With --cohort the patient's omics and clinical covariates go into the prediction
too; the prediction uses this slide's patches only (a patient's other slides are left out).

Example:
  healnet explain --run build/runs/both --cohort build/demo --slide TCGA-01-2PWV-01Z-00-DX1.BF8893E6.tiff \\
      --out heatmap.png
"""


def layer_choice(text: str) -> str | int:
    from healnet.heatmap import ExplainError, parse_layer

    try:
        return parse_layer(text)
    except ExplainError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = DESCRIPTION
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument(
        "--run", type=Path, required=True, help="run folder of `healnet train` (or a checkpoint folder)"
    )
    parser.add_argument(
        "--slide",
        required=True,
        metavar="SLIDE_ID_OR_PATH",
        help="a slide id of the cohort's slides.parquet, a slide file, or a feature file (.parquet)",
    )
    parser.add_argument(
        "--cohort",
        type=Path,
        default=None,
        help="canonical cohort folder: finds the slide file and the patient's other modalities "
        "(default: none, the slide alone)",
    )
    parser.add_argument(
        "--features",
        type=Path,
        default=None,
        help="patch-feature folder of `healnet preprocess-slides`, plain or keyed by encoder "
        "(default: COHORT/features)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        required=True,
        metavar="OUT.png",
        help="the PNG to write; OUT.json goes next to it",
    )
    parser.add_argument(
        "--top-k",
        type=int,
        default=8,
        help="patches shown as tiles, highest attention first (default: 8; 0: none)",
    )
    parser.add_argument(
        "--layer",
        type=layer_choice,
        default="all",
        metavar="all|mean|N",
        help="'all': a panel per layer and the mean (default); 'mean': the mean only; N: layer N only "
        "(1 = the first), which then also ranks the top-k",
    )
    parser.add_argument(
        "--palette",
        action="store_true",
        help="write a 256-colour PNG, about a quarter of the size (for documents and reports)",
    )


def run(args: argparse.Namespace) -> int:
    from healnet.explain import explain_slide

    result = explain_slide(
        args.run,
        args.slide,
        args.out,
        args.cohort,
        args.features,
        top_k=args.top_k,
        layer=args.layer,
        palette=args.palette,
    )
    prediction, attention = result.prediction, result.attention
    print(
        f"{result.source.slide_id}: risk {prediction.risk:.4f} from {'+'.join(prediction.modalities_used)}, "
        f"{attention.n_patches} patches, {len(attention.layers)} layer(s)"
    )
    values = attention.values(None if args.layer in ("all", "mean") else args.layer)
    for rank, index in enumerate(result.top[:3], start=1):
        x, y = attention.coords[index]
        print(f"  #{rank} patch at ({x}, {y}): {values[index] * attention.n_patches:.2f} x uniform")
    if result.source.slide_path is None:
        print("no slide file found: patches drawn on a blank canvas")
    print(f"heatmap: {result.png}")
    print(f"attention per patch: {result.json}")
    return 0
