"""`healnet train`: train HEALNet on a cohort's holdout split."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HELP = "Train HEALNet on a canonical cohort; writes RUN_DIR/checkpoint and RUN_DIR/metrics.json."


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cohort", type=Path, required=True, help="canonical cohort folder (healnet ingest/synth)"
    )
    parser.add_argument("--out", type=Path, required=True, help="run folder for the checkpoint and metrics")
    parser.add_argument(
        "--features",
        type=Path,
        default=None,
        help="patch-feature folder (default: COHORT/features when present)",
    )
    parser.add_argument(
        "--modalities",
        default=None,
        help="comma-separated input kinds: omic, wsi (default: all the cohort has)",
    )
    parser.add_argument(
        "--omics-grouping",
        choices=["combined", "per-table"],
        default="combined",
        help="one omic modality, or one per table (mut, cnv, rnaseq)",
    )
    parser.add_argument("--omics-tokens", default="single", help="single | features | groups:N")
    parser.add_argument(
        "--top-k", type=int, default=None, help="highest-variance features kept per omic table (None: all)"
    )
    parser.add_argument(
        "--signed-log",
        default="",
        help="comma-separated omic tables mapped by sign(x)·log1p(|x|) before fitting, e.g. rnaseq "
        "(the `healnet cv` recipe); saved with the model, so serving applies it too",
    )
    parser.add_argument("--split-repeat", type=int, default=0, help="which stored holdout split to use")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate of OneCycleLR")
    parser.add_argument("--weight-decay", type=float, default=1e-4, help="Adam weight decay (L2)")
    parser.add_argument("--patience", type=int, default=8, help="early-stopping patience in epochs")
    parser.add_argument("--depth", type=int, default=2, help="number of fusion layers")
    parser.add_argument("--latents", type=int, default=16, help="number of latent vectors")
    parser.add_argument("--latent-dim", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run(args: argparse.Namespace) -> int:
    from healnet.experiment import run_training
    from healnet.preprocess.omics import OmicsConfig
    from healnet.train import TrainConfig

    train_config = TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        patience=args.patience,
        seed=args.seed,
        device=args.device,
    )
    modalities = args.modalities.split(",") if args.modalities else None
    metrics = run_training(
        args.cohort,
        args.out,
        features_dir=args.features,
        modalities=modalities,
        split_repeat=args.split_repeat,
        train_config=train_config,
        model_options={"depth": args.depth, "n_latents": args.latents, "latent_dim": args.latent_dim},
        omics_config=OmicsConfig(
            top_k=args.top_k,
            combine=args.omics_grouping == "combined",
            tokens=args.omics_tokens,
            signed_log=tuple(name for name in args.signed_log.split(",") if name),
        ),
        progress=not args.no_progress,
    )
    print(json.dumps({k: metrics[k] for k in ("modalities", "best_epoch", "val", "test")}, indent=2))
    print(f"test c-index {metrics['test']['c_index']:.4f}; checkpoint written to {metrics['checkpoint']}")
    return 0
