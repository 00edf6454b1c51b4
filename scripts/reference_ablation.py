"""Ablate the model's two attention deviations from the reference HEALNet on inner splits of training folds.

The reference divides the attention scores by a temperature of 0.5 and passes each attention update through
a LeakyReLU(0.01); ours does neither (docs/model.md). This puts each back, alone and together, into the
`tcga` recipe as it ran then (before round 4's blend) and scores the ensembles on the inner test sets of
`scripts/inner_selection.py` (outer training folds only; no outer test fold is read). Nothing is chosen
from it: the library keeps its model.

    python scripts/reference_ablation.py --table ../shared/data/tcga/tcga_blca_all_clean.csv.gz \\
        --set 900 --jobs 2 --json build/inner/blca_reference_900.json
"""

from __future__ import annotations

import json
import time
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F
from inner_selection import ROUND_4_BASE, inner_set_parser, load_inner_sets  # scripts/ is on sys.path
from joblib import Parallel, delayed

import healnet.model
from healnet.cv import CVConfig, run_fold
from healnet.fitting import CohortData

REFERENCE_TEMPERATURE = 0.5
REFERENCE_LEAKY_SLOPE = 0.01
VARIANTS = {
    "ours": (False, False),
    "temperature_0.5": (True, False),
    "leaky_relu": (False, True),
    "reference_both": (True, True),
}
OWN_ATTEND = healnet.model.Attention.attend


def use_variant(name: str) -> None:
    """Make `Attention.attend` this process's variant: the scores divided by the reference's temperature
    (keys scaled, the same in the fused and the einsum path), the update through its LeakyReLU."""
    temperature, leaky = VARIANTS[name]

    def attend(self, x, k, v, key_mask=None, return_weights=False):
        out, weights = OWN_ATTEND(
            self, x, k / REFERENCE_TEMPERATURE if temperature else k, v, key_mask, return_weights
        )
        return (F.leaky_relu(out, REFERENCE_LEAKY_SLOPE) if leaky else out), weights

    healnet.model.Attention.attend = attend  # type: ignore[method-assign]


def score(data: CohortData, variant: str, train: list[str], test: list[str], seed: int) -> dict:
    torch.set_num_threads(1)
    use_variant(variant)
    started = time.perf_counter()
    config = replace(CVConfig(), models=("healnet",), healnet=ROUND_4_BASE)  # the recipe when it ran
    record = run_fold(data, train, [], test, config, seed=seed).record["models"]["healnet"]
    return {"variant": variant, "seconds": time.perf_counter() - started, "c_index": record["c_index"]}


def main() -> None:
    args = inner_set_parser(__doc__, default_set=900).parse_args()
    data, sets = load_inner_sets(args)
    results = Parallel(n_jobs=args.jobs)(
        delayed(score)(data, variant, train, test, args.seed * 1000 + index)
        for variant in VARIANTS
        for index, (train, test) in enumerate(sets)
    )
    per_variant = {v: [r["c_index"] for r in results if r["variant"] == v] for v in VARIANTS}
    ours = np.asarray(per_variant["ours"])
    summary = {}
    for variant, values in per_variant.items():
        difference = np.asarray(values) - ours
        summary[variant] = {
            "mean": float(np.mean(values)),
            "per_set": values,
            "minus_ours": float(difference.mean()),
            "standard_error": float(difference.std(ddof=1) / np.sqrt(len(difference))),
        }
        print(
            f"{variant:<18} {np.mean(values):.4f}  {difference.mean():+.4f} ± "
            f"{summary[variant]['standard_error']:.4f}  " + " ".join(f"{c:.3f}" for c in values)
        )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"set": args.set, "summary": summary, "results": results}, indent=1))


if __name__ == "__main__":
    main()
