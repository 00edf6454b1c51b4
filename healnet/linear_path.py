"""The model's linear path, fitted alone before the latent path trains, then frozen.

The latent path then learns what the linear inputs leave unexplained: the path is an offset fitted to
convergence (the discrete-time NLL plus a penalty) on the training patients only, which a few epochs of
Adam at the latent path's learning rate would not reach. The clinical weights take the fixed ridge
`TrainConfig.linear_path_ridge`; omic weights, hundreds per table against a few hundred patients, take a
penalty whose strength is chosen on the training patients by an inner K-fold CV of the held-out NLL
(`TrainConfig.linear_omics_ridges`), unless the configuration fixes one. The omic penalty is a ridge
(fitted by L-BFGS), or with `TrainConfig.linear_omics_l1_ratio` above 0 an elastic net (fitted by
accelerated proximal gradient, FISTA), whose lasso part sets most omic weights to exactly zero.
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
# accelerated proximal gradient of the elastic net: at most this many steps, until no parameter moves by
# more than the tolerance in one step
PROXIMAL_STEPS = 2000
PROXIMAL_TOLERANCE = 1e-5


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
    values: Tensor, labels: Tensor, events: Tensor, ridge: Tensor, n_bins: int, alpha: float
) -> tuple[Tensor, Tensor]:
    """Weights (inputs,) and bin intercepts (n_bins,) minimising the NLL plus sum(ridge * weight**2), one
    ridge per weight."""
    weight = torch.zeros(values.shape[1], device=values.device, requires_grad=True)
    bias = torch.zeros(n_bins, device=values.device, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=LBFGS_STEPS, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        logits = bias + rearrange(values @ weight, "b -> b 1")
        loss = nll_loss(logits, labels, events, alpha) + (ridge * weight.square()).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return weight.detach(), bias.detach()


def fit_sparse_offset(
    values: Tensor,
    labels: Tensor,
    events: Tensor,
    ridge: Tensor,
    lasso: Tensor,
    n_bins: int,
    alpha: float,
    start: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """Weights (inputs,) and bin intercepts (n_bins,) minimising the NLL plus sum(ridge * weight**2) plus
    sum(lasso * |weight|), one ridge and one lasso per weight, by FISTA with backtracking and adaptive
    restart (Beck & Teboulle 2009; O'Donoghue & Candes 2015), from `start` (warm starts along a path of
    penalties) or from zero."""
    if start is None:
        weight = torch.zeros(values.shape[1], device=values.device)
        bias = torch.zeros(n_bins, device=values.device)
    else:
        weight, bias = (part.clone() for part in start)

    def smooth(weight: Tensor, bias: Tensor) -> Tensor:
        logits = bias + rearrange(values @ weight, "b -> b 1")
        return nll_loss(logits, labels, events, alpha) + (ridge * weight.square()).sum()

    step, momentum_weight, momentum_bias, t = 1.0, weight, bias, 1.0
    for _ in range(PROXIMAL_STEPS):
        at_weight = momentum_weight.detach().requires_grad_(True)
        at_bias = momentum_bias.detach().requires_grad_(True)
        loss = smooth(at_weight, at_bias)
        grad_weight, grad_bias = torch.autograd.grad(loss, (at_weight, at_bias))
        with torch.no_grad():
            while True:  # backtrack until the quadratic model bounds the smooth part
                moved = momentum_weight - step * grad_weight
                new_weight = moved.sign() * (moved.abs() - step * lasso).clamp_min(0.0)
                new_bias = momentum_bias - step * grad_bias
                d_weight, d_bias = new_weight - momentum_weight, new_bias - momentum_bias
                bound = (
                    loss
                    + (grad_weight * d_weight).sum()
                    + (grad_bias * d_bias).sum()
                    + (d_weight.square().sum() + d_bias.square().sum()) / (2 * step)
                )
                if smooth(new_weight, new_bias) <= bound + 1e-12:
                    break
                step /= 2
            change = torch.maximum((new_weight - weight).abs().max(), (new_bias - bias).abs().max())
            # restart the momentum when it points against the step just taken
            if (d_weight * (new_weight - weight)).sum() + (d_bias * (new_bias - bias)).sum() < 0:
                t = 1.0
            t_next = (1 + (1 + 4 * t * t) ** 0.5) / 2
            share = (t - 1) / t_next
            momentum_weight = new_weight + share * (new_weight - weight)
            momentum_bias = new_bias + share * (new_bias - bias)
            weight, bias, t = new_weight, new_bias, t_next
        if change < PROXIMAL_TOLERANCE:
            break
    return weight.detach(), bias.detach()


def path_penalties(omic: Tensor, strength: float | None, config: TrainConfig) -> tuple[Tensor, Tensor]:
    """Per weight, the ridge and the lasso penalty: an omic weight's `strength` is split between them by
    `config.linear_omics_l1_ratio` (elastic net; 0 is a ridge alone). A clinical weight takes the same
    where `config.linear_clinical_shares_penalty`, else the fixed `config.linear_path_ridge` and no lasso.
    With no strength (a path without omic inputs) every weight takes `config.linear_path_ridge`."""
    if strength is None:
        return torch.full_like(omic, config.linear_path_ridge, dtype=torch.float32), torch.zeros_like(
            omic, dtype=torch.float32
        )
    ratio = config.linear_omics_l1_ratio
    shared = omic | config.linear_clinical_shares_penalty
    ridge = torch.where(shared, strength * (1.0 - ratio), config.linear_path_ridge)
    lasso = torch.where(shared, strength * ratio, 0.0)
    return ridge, lasso


def fit_penalised(
    values: Tensor,
    labels: Tensor,
    events: Tensor,
    penalties: tuple[Tensor, Tensor],
    n_bins: int,
    alpha: float,
    start: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """`fit_offset` for a ridge alone, `fit_sparse_offset` (from `start`) where any weight has a lasso."""
    ridge, lasso = penalties
    if bool((lasso > 0).any()):
        return fit_sparse_offset(values, labels, events, ridge, lasso, n_bins, alpha, start)
    return fit_offset(values, labels, events, ridge, n_bins, alpha)


def has_omic_inputs(model) -> bool:
    """Whether the model's linear path reads an omic table (its weights then need a chosen penalty)."""
    return model.linear_path is not None and any(name != CLINICAL for name in model.config.linear_path)


def choose_omics_ridge(
    values: Tensor, omic: Tensor, labels: Tensor, events: Tensor, n_bins: int, config: TrainConfig
) -> float:
    """The omic penalty's strength of `config.linear_omics_ridges` with the lowest held-out NLL over an inner
    stratified K-fold of the patients of `values` (`path_inputs`); ties go to the stronger penalty. An
    elastic net's fits run from the strongest penalty to the weakest, each starting where the last ended."""
    device = values.device
    folds = StratifiedKFold(config.linear_ridge_folds, shuffle=True, random_state=config.seed)
    held_out = np.zeros(len(config.linear_omics_ridges))
    strongest_first = np.argsort(config.linear_omics_ridges, kind="stable")[::-1]
    for fit_rows, score_rows in folds.split(np.zeros(len(labels)), events.cpu().numpy()):
        fit_index, score_index = (torch.as_tensor(rows, device=device) for rows in (fit_rows, score_rows))
        start = None
        for k in strongest_first:
            penalties = path_penalties(omic, config.linear_omics_ridges[k], config)
            weight, bias = start = fit_penalised(
                values[fit_index],
                labels[fit_index],
                events[fit_index],
                penalties,
                n_bins,
                config.alpha,
                start,
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
    strength = None  # a clinical-only path: the clinical ridge for all
    if has_omic_inputs(model):
        strength = config.linear_omics_ridge
        if strength is None:
            strength = choose_omics_ridge(values, omic, labels, events, head.out_features, config)
    penalties = path_penalties(omic, strength, config)
    weight, bias = fit_penalised(values, labels, events, penalties, head.out_features, config.alpha)
    with torch.no_grad():
        model.linear_path.weight.copy_(rearrange(weight, "f -> 1 f"))
        head.bias.copy_(bias)
        if model.config.linear_blend:  # kept apart: the head's own bias trains on with the latent path
            model.linear_intercepts.copy_(bias)
    model.linear_path.weight.requires_grad_(False)
