"""One process of the data-parallel equivalence test (tests/test_distributed.py): trains a small HEALNet on
the synthetic omics cohort of tests/test_ensemble.py, alone or as one rank under torchrun, and rank 0 saves
the final weights.

    python tests/distributed_worker.py OUT.pt                                   # one process
    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/distributed_worker.py OUT.pt
"""

import sys

import torch
import torch.distributed as dist
from test_ensemble import make_data  # the script's folder, tests/, is first on sys.path

from healnet.fitting import build_training, fit_preprocessor
from healnet.preprocess.omics import OmicsConfig
from healnet.recipes import ModelOptions
from healnet.survival import SurvivalBins
from healnet.train import TrainConfig, fit, join_process_group, process_rank

# several tokens, so that attention has more than one key and every weight gets a real gradient
MODEL = ModelOptions(depth=1, n_latents=4, latent_dim=16, cross_dim_head=8, latent_dim_head=8)
# 25 training patients in global batches of 8: 8, 8, 8, 1, so one rank has no sample of the last batch
CONFIG = TrainConfig(epochs=3, patience=3, batch_size=8, lr=3e-3, weight_decay=1e-2, l1=1e-4, device="cpu")


def main(out: str) -> None:
    torch.set_num_threads(1)
    joined = join_process_group()
    data = make_data(40)
    ids = list(data.clinical.index)
    train_ids, val_ids = ids[:25], ids[25:]
    clinical = data.clinical.loc[train_ids]
    bins = SurvivalBins.fit(clinical["survival_months"], clinical["event"], 4)
    preprocessor = fit_preprocessor(
        data, train_ids, ["omic"], OmicsConfig(combine=True, tokens="groups:4"), None
    )
    trained, train_set, val_set = build_training(data, train_ids, val_ids, preprocessor, bins, MODEL, CONFIG)
    result = fit(trained.model, train_set, val_set, CONFIG, bins=bins, progress=False)
    rank, world_size = process_rank()
    if rank == 0:
        torch.save(
            {"state": trained.model.state_dict(), "history": result.history, "world_size": world_size}, out
        )
    if joined:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
