"""Input drift on a pipeline run (docs/drift.md, "The demo's numbers"): the test patients of the run's
cohort sent to the in-process service of its champion with the drift spool on, then `healnet drift` on
the spool; clean, with one omic table shifted by 1 training SD per feature, and with the patch features
mapped as another encoder's would be. Prints the drifted share per modality and the verdict of each.

    .venv/bin/python -m pipelines run-local --pipeline-root build/kfp-local-drift \\
        --param registry_dir=build/registry-drift
    .venv/bin/python scripts/drift_demo.py --pipeline-root build/kfp-local-drift \\
        --registry build/registry-drift [--table cnv] [--out build/drift-demo]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

WINDOW = 20  # cases per spool file: the least a file may hold
BATCH = 10  # cases per /predict_batch call


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pipeline-root", type=Path, required=True, help="the run-local --pipeline-root")
    parser.add_argument("--registry", type=Path, required=True, help="the run's registry_dir")
    parser.add_argument("--table", default="cnv", help="the omic table to shift by 1 SD")
    parser.add_argument("--out", type=Path, default=Path("build/drift-demo"), help="spool folders")
    args = parser.parse_args()
    runs = sorted(args.pipeline_root.glob("healnet-training-*"))
    if not runs:
        parser.error(f"no pipeline run under {args.pipeline_root}")
    registry = args.registry.resolve()
    os.environ.update(
        BENTOML_HOME=str(registry),
        HEALNET_REGISTRY_DIR=str(registry),
        HEALNET_DRIFT_WINDOW_CASES=str(WINDOW),
        HEALNET_DRIFT_SPOOL_DIR=str(args.out / "start"),
    )
    import torch

    from devtools.live_server import wait_until
    from healnet.data.cohort import Cohort
    from healnet.fitting import CohortData
    from serving.drift_spool import DriftSpool
    from serving.service import HEALNetService

    cohort = Cohort.load(runs[-1] / "ingest" / "cohort")
    data = CohortData.from_cohort(cohort, runs[-1] / "merge-features" / "features")
    test = cohort.patients("holdout", 0, 0, "test")
    train = cohort.patients("holdout", 0, 0, "train")
    torch.set_num_threads(1)
    service = HEALNetService()
    if not wait_until(service.__is_ready__, 120):
        raise SystemExit(service.load_error or "the model did not load in 120 s")
    assert service.serving is not None
    tag = service.serving[0].tag
    dim = service.serving[0].contract.wsi_dim
    other_encoder = encoder_map(dim) if dim else None
    streams = {
        "clean": {},
        f"{args.table}+1sd": {"shift": args.table},
        "other encoder": {"encoder": other_encoder},
    }
    print(f"{tag}: {len(test)} test patients of {runs[-1].name}")
    for name, options in streams.items():
        spool = args.out / name.replace(" ", "_")
        for old in spool.glob("*.drift.json"):
            old.unlink()
        os.environ["HEALNET_DRIFT_SPOOL_DIR"] = str(spool)
        service.drift_spool = DriftSpool.from_env()
        bodies = requests(data, test, train, **options)
        for start in range(0, len(bodies), BATCH):
            answer = asyncio.run(service.predict_batch(bodies[start : start + BATCH]))
            if not isinstance(answer, list):
                raise SystemExit(f"{name}: the service refused a batch: {answer.body!r}")
        service.close_drift_spool()
        command = [sys.executable, "-m", "healnet", "drift", "--tag", tag, "--current", str(spool), "--json"]
        result = subprocess.run(command, capture_output=True, text=True, check=True)
        report = json.loads(result.stdout)
        shares = ", ".join(
            f"{m['modality']} {m['drifted']}/{m['tested']}" for m in report["modalities"] if m["tested"]
        )
        score = report["embedding_drift_score"]
        print(f"{name:>16}: {report['verdict']:<8} {shares}; embedding score {score}")
    return 0


def encoder_map(dim: int):
    """Another encoder's features: a random rotation, a rescale of each dimension (x0.5 to x2) and a shift
    of its mean (N(0, 0.25) of the features' SD)."""
    rng = np.random.default_rng(7)
    rotation, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    scale = rng.uniform(0.5, 2.0, dim)
    offset = rng.normal(0.0, 0.25, dim)
    return lambda bag: (bag @ rotation) * scale + offset * bag.std()


def requests(data, patients, train, shift: str | None = None, encoder=None) -> list:
    """A /predict_batch case per patient: the omic tables it has (missing values null) and its slides'
    patch features."""
    from serving.schemas import PredictRequest

    sds = {table: frame.loc[frame.index.isin(train)].std() for table, frame in data.omics.items()}
    bodies = []
    for pid in patients:
        body: dict = {}
        omics = {}
        for table, frame in data.omics.items():
            if pid in frame.index:
                row = frame.loc[pid] + (sds[table] if table == shift else 0.0)
                omics[table] = {name: None if math.isnan(v) else float(v) for name, v in row.items()}
        if omics:
            body["omics"] = omics
        bag = data.wsi_bags.get(pid)
        if bag is not None and len(bag):
            bag = np.asarray(bag, dtype=np.float64)
            body["wsi_features"] = (encoder(bag) if encoder else bag).astype(np.float32).tolist()
        if body:  # a patient with neither would be refused (no_modality)
            bodies.append(PredictRequest(**body))
    return bodies


if __name__ == "__main__":
    raise SystemExit(main())
