"""The model's linear path, fitted alone before the latent path trains, then frozen.

The latent path then learns what the linear inputs leave unexplained: the path is an offset fitted to
convergence (L-BFGS on the discrete-time NLL plus a ridge penalty) on the training patients only, which a
few epochs of Adam at the latent path's learning rate would not reach. The clinical weights take the fixed
`TrainConfig.linear_path_ridge`; omic weights, hundreds per table against a few hundred patients, take a
ridge chosen on the training patients by an inner K-fold CV of the held-out NLL
(`TrainConfig.linear_omics_ridges`), unless the configuration fixes one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from einops import rearrange
from sklearn.model_selection import StratifiedKFold
from torch import Tensor

from healnet.preprocess.clinical import CLINICAL
from healnet.survival import nll_loss
from healnet.train_config import TrainConfig

LBFGS_STEPS = 200


def path_inputs(model, dataset, device: torch.device) -> tuple[Tensor, Tensor]:
    """(patients, inputs) values of the model's linear path, zero where a patient lacks the modality, and
    (inputs,) True where an input is an omic feature (not a clinical covariate)."""
    columns, omic = [], []
    for name in model.config.linear_path:
        tokens = dataset.omics[name]
        values = rearrange(torch.from_numpy(tokens.values), "b ... -> b (...)").to(device)
        present = rearrange(torch.from_numpy(tokens.present), "b -> b 1").to(device)
        columns.append(torch.where(present, values, 0.0))
        omic.append(torch.full((values.shape[1],), name != CLINICAL, device=device))
    return torch.cat(columns, dim=1), torch.cat(omic)


def _targets(dataset, device: torch.device) -> tuple[Tensor, Tensor]:
    labels = torch.as_tensor(dataset.targets.labels, dtype=torch.long, device=device)
    events = torch.as_tensor(dataset.targets.events, dtype=torch.float32, device=device)
    return labels, events


def fit_offset(
    values: Tensor, labels: Tensor, events: Tensor, ridge: Tensor | float, n_bins: int, alpha: float
) -> tuple[Tensor, Tensor]:
    """Weights (inputs,) and bin intercepts (n_bins,) minimising the NLL plus sum(ridge * weight**2); ridge
    is one number for every weight, or one per weight."""
    weight = torch.zeros(values.shape[1], device=values.device, requires_grad=True)
    bias = torch.zeros(n_bins, device=values.device, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=LBFGS_STEPS, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        logits = bias + rearrange(values @ weight, "b -> b 1")
        penalty = (
            (ridge * weight.square()).sum() if isinstance(ridge, Tensor) else ridge * weight.square().sum()
        )
        loss = nll_loss(logits, labels, events, alpha) + penalty
        loss.backward()
        return loss

    optimizer.step(closure)
    return weight.detach(), bias.detach()


def has_omic_inputs(model) -> bool:
    """Whether the model's linear path reads an omic table (its weights then need a chosen ridge)."""
    return model.linear_path is not None and any(name != CLINICAL for name in model.config.linear_path)


def choose_omics_ridge(
    values: Tensor, omic: Tensor, labels: Tensor, events: Tensor, n_bins: int, config: TrainConfig
) -> float:
    """The omic weights' ridge of `config.linear_omics_ridges` with the lowest held-out NLL over an inner
    stratified K-fold of the patients of `values` (`path_inputs`); ties go to the stronger ridge."""
    device = values.device
    folds = StratifiedKFold(config.linear_ridge_folds, shuffle=True, random_state=config.seed)
    held_out = np.zeros(len(config.linear_omics_ridges))
    for fit_rows, score_rows in folds.split(np.zeros(len(labels)), events.cpu().numpy()):
        fit_index, score_index = (torch.as_tensor(rows, device=device) for rows in (fit_rows, score_rows))
        for k, ridge in enumerate(config.linear_omics_ridges):
            penalty = torch.where(omic, ridge, config.linear_path_ridge)
            weight, bias = fit_offset(
                values[fit_index], labels[fit_index], events[fit_index], penalty, n_bins, config.alpha
            )
            with torch.no_grad():
                logits = bias + rearrange(values[score_index] @ weight, "b -> b 1")
                loss = nll_loss(logits, labels[score_index], events[score_index], config.alpha)
            held_out[k] += loss.item() * len(score_rows)
    ridges = np.asarray(config.linear_omics_ridges)
    return float(ridges[held_out == held_out.min()].max())


def with_omics_ridge(
    model, build_dataset: Callable[[], Any], config: TrainConfig, device: torch.device
) -> TrainConfig:
    """`config` with its omic linear ridge chosen on the dataset `build_dataset` gives (built only when
    needed) where the model's linear path has omic inputs and the configuration leaves it open; else
    `config` itself."""
    if not has_omic_inputs(model) or config.linear_omics_ridge is not None:
        return config
    patients = build_dataset()
    values, omic = path_inputs(model, patients, device)
    ridge = choose_omics_ridge(
        values, omic, *_targets(patients, device), model.to_logits[-1].out_features, config
    )
    return replace(config, linear_omics_ridge=ridge)


def fit_linear_path(model, train_set, config: TrainConfig, device: torch.device) -> None:
    """Fit the model's linear path and the bins' intercepts alone on `train_set`, then freeze the path."""
    if model.linear_path is None:
        return
    values, omic = path_inputs(model, train_set, device)
    labels, events = _targets(train_set, device)
    head = model.to_logits[-1]
    penalty: Tensor | float = config.linear_path_ridge  # a clinical-only path: one ridge for all
    if has_omic_inputs(model):
        ridge = config.linear_omics_ridge
        if ridge is None:
            ridge = choose_omics_ridge(values, omic, labels, events, head.out_features, config)
        penalty = torch.where(omic, ridge, config.linear_path_ridge)
    weight, bias = fit_offset(values, labels, events, penalty, head.out_features, config.alpha)
    with torch.no_grad():
        model.linear_path.weight.copy_(rearrange(weight, "f -> 1 f"))
        head.bias.copy_(bias)
        if model.config.linear_blend:  # kept apart: the head's own bias trains on with the latent path
            model.linear_intercepts.copy_(bias)
    model.linear_path.weight.requires_grad_(False)
