"""Training: device choice, seeding, the epoch loop with OneCycleLR, L1 and early stopping; data-parallel
over several processes (DistributedDataParallel) when started by torchrun."""

from __future__ import annotations

import copy
import os
import random
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from healnet.device import select_device
from healnet.errors import HEALNetError
from healnet.linear_path import fit_linear_path
from healnet.survival import nll_loss, nll_per_sample, survival_from_logits
from healnet.survival_metrics import harrell_c_or_nan
from healnet.train_config import TrainConfig


@dataclass
class TrainResult:
    best_epoch: int
    best_score: float
    history: list[dict] = field(default_factory=list)


class DistributedTrainingError(HEALNetError, RuntimeError):
    """A data-parallel run that cannot go ahead as configured; the message says why."""


def process_rank() -> tuple[int, int]:
    """(rank, world size) of this process: (0, 1) outside a data-parallel run."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def join_process_group() -> bool:
    """Under torchrun (WORLD_SIZE > 1) join the process group, NCCL on GPUs and gloo on the CPU, each
    process on the GPU of its LOCAL_RANK; returns whether this process group was joined here."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or (dist.is_available() and dist.is_initialized()):
        return False
    if not dist.is_available():
        raise DistributedTrainingError("WORLD_SIZE > 1, but this torch build has no torch.distributed")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return True


def launch_data_parallel(function, processes: int) -> None:
    """Call `function()` in `processes` new processes that form one data-parallel group on this machine, as
    torchrun would start a command: ranks 0 to processes − 1, one per GPU (LOCAL_RANK), rendezvous on the
    loopback address. Returns when all have finished; a failure in any of them is raised here."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.start_processes(
        _data_parallel_process, args=(function, processes, port), nprocs=processes, start_method="spawn"
    )


def _data_parallel_process(rank: int, function, processes: int, port: int) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(processes),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    function()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def autocast(device: torch.device):
    """bf16 autocast on CUDA; full precision on CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def to_device(batch: dict, device: torch.device) -> dict:
    def move(value):
        if isinstance(value, dict):
            return {key: move(item) for key, item in value.items()}
        return value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value

    return move(batch)


def make_loader(dataset, batch_size: int, shuffle: bool, device: torch.device, seed: int = 0) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        collate_fn=dataset.collate,
        pin_memory=device.type == "cuda",
        generator=generator,
    )


def drop_modalities(present: dict[str, torch.Tensor], p: float, generator: torch.Generator) -> dict:
    """Mark each present modality missing with probability p per sample; a sample that would lose all keeps all."""
    names = list(present)
    stacked = torch.stack([present[name] for name in names])  # (modalities, batch)
    dropped = torch.rand(stacked.shape, generator=generator).to(stacked.device) < p
    kept = stacked & ~dropped
    kept = torch.where(kept.any(0), kept, stacked)
    return dict(zip(names, kept, strict=True))


def forward(model, batch: dict, device: torch.device, return_attention: bool = False):
    with autocast(device):
        out = model(batch["inputs"], batch["present"], batch["token_mask"], return_attention=return_attention)
    if return_attention:
        return out[0].float(), out[1]
    return out.float()


@torch.no_grad()
def predict_logits(model, loader: DataLoader, device: torch.device) -> np.ndarray:
    model.eval()
    chunks = [forward(model, to_device(batch, device), device).cpu() for batch in loader]
    return torch.cat(chunks).numpy()


def evaluate_loader(model, loader: DataLoader, device: torch.device, alpha: float) -> dict:
    dataset = cast(Any, loader.dataset)  # a SurvivalDataset
    return score_logits(predict_logits(model, loader, device), dataset.targets, alpha)


def score_logits(logits: np.ndarray, targets, alpha: float) -> dict:
    """Loss and Harrell's C of logits (patients, n_bins) against those patients' `Targets`."""
    loss = nll_loss(
        torch.from_numpy(logits),
        torch.from_numpy(targets.labels),
        torch.from_numpy(targets.events).float(),
        alpha,
    ).item()
    risk = survival_from_logits(torch.from_numpy(logits))[2].numpy()
    return {"loss": loss, "c_index": harrell_c_or_nan(targets.times, targets.events, risk)}


def rank_batches(train_set, config: TrainConfig, rank: int, world_size: int):
    """This rank's share of every global batch, per epoch: (collated batch, per-sample loss weights).

    The global batches are those a single process's shuffled DataLoader draws (same generator, same
    calls), so that N processes train on the same batches as one. Each rank takes every world_size-th
    sample of a batch; a sample weighs world_size / global batch size, so that the gradient that
    DistributedDataParallel averages is the global batch's mean. A rank left without a sample of a short
    last batch gets one with weight 0, because every rank must take part in each step.
    """
    order: DataLoader = DataLoader(
        cast(Any, range(len(train_set))),  # indices only: the samples are collated below
        batch_size=config.batch_size,
        shuffle=True,
        collate_fn=list,
        generator=torch.Generator().manual_seed(config.seed),
    )

    def epoch():
        for indices in order:
            share = indices[rank::world_size]
            weight = world_size / len(indices)
            weights = torch.full((len(share),), weight) if share else torch.zeros(1)
            yield train_set.collate([train_set[i] for i in share or indices[:1]]), weights

    return order, epoch


def training_bin_weights(config: TrainConfig, bins, train_set, device: torch.device) -> torch.Tensor | None:
    """The NLL's per-bin weights (n_bins,) from the training set's labels when `config.bin_weights`, else
    None."""
    if not config.bin_weights:
        return None
    if bins is None:
        raise ValueError("bin_weights=True needs the fitted SurvivalBins")
    return torch.as_tensor(bins.inverse_frequency_weights(train_set.targets.labels), device=device)


def fit(
    model: torch.nn.Module,
    train_set,
    val_set,
    config: TrainConfig,
    bins=None,
    progress: bool = True,
) -> TrainResult:
    """Train with Adam + OneCycleLR; restore a deep copy of the best weights on the validation set.

    In a data-parallel run (`join_process_group`), every process trains its share of each global batch
    through DistributedDataParallel and ends with the same weights as one process would (tested); each
    scores the whole validation set, so all take the same early-stopping decisions.
    """
    seed_everything(config.seed)
    device = select_device(config.device)
    model.to(device)
    fit_linear_path(model, train_set, config, device)
    trained: torch.nn.Module
    rank, world_size = process_rank()
    if world_size > 1:
        if config.bin_weights:
            raise DistributedTrainingError("bin weights are not supported in a data-parallel run")
        trained = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        train_loader, epoch_batches = rank_batches(train_set, config, rank, world_size)
    else:
        trained = model
        train_loader = make_loader(train_set, config.batch_size, True, device, config.seed)

        def epoch_batches():
            return ((batch, None) for batch in train_loader)

    val_loader = make_loader(val_set, config.batch_size, False, device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.lr, epochs=config.epochs, steps_per_epoch=len(train_loader)
    )
    bin_weights = training_bin_weights(config, bins, train_set, device)

    sign = -1.0 if config.monitor == "c_index" else 1.0
    best_score, best_epoch, best_state, waited = float("inf"), -1, None, 0
    history = []
    dropout_generator = torch.Generator().manual_seed(config.seed)
    bar = tqdm(range(config.epochs), desc="train", disable=not progress, unit="epoch")
    for epoch in bar:
        model.train()
        total, count = 0.0, 0.0
        for batch, weights in epoch_batches():
            batch = to_device(batch, device)
            if config.modality_dropout:
                batch["present"] = drop_modalities(
                    batch["present"], config.modality_dropout, dropout_generator
                )
            logits = forward(trained, batch, device)
            penalty = torch.zeros((), device=device)
            if config.l1:
                penalty = config.l1 * sum(
                    (p.abs().sum() for p in model.parameters() if p.requires_grad),
                    torch.zeros((), device=device),
                )
            if weights is None:
                loss = nll_loss(logits, batch["labels"], batch["events"], config.alpha, bin_weights) + penalty
                total += loss.item() * len(batch["labels"])
                count += len(batch["labels"])
            else:
                weights = weights.to(device)
                per_sample = nll_per_sample(logits, batch["labels"], batch["events"], config.alpha)
                loss = (per_sample * weights).sum() + penalty
                real = weights > 0
                total += float((per_sample.detach() + penalty.detach())[real].sum())
                count += float(real.sum())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
        if world_size > 1:  # the mean training loss over every rank's samples
            sums = torch.tensor([total, count], dtype=torch.float64, device=device)
            dist.all_reduce(sums)
            total, count = sums.tolist()
        val = evaluate_loader(model, val_loader, device, config.alpha)
        history.append(
            {"epoch": epoch, "train_loss": total / count, **{f"val_{k}": v for k, v in val.items()}}
        )
        score = sign * val[config.monitor]
        if np.isfinite(score) and score < best_score:
            best_score, best_epoch, waited = score, epoch, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            waited += 1
        bar.set_postfix(loss=f"{total / count:.3f}", val_c=f"{val['c_index']:.3f}", best=best_epoch)
        if waited >= config.patience:
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    return TrainResult(best_epoch=best_epoch, best_score=sign * best_score, history=history)
