"""The elastic-net linear path's solver: it meets the lasso's optimality conditions, agrees with L-BFGS
where there is no lasso, and zeroes what carries no signal. An ensemble with it (fitted on training patients
only, a checkpoint round trip) is tested beside the ridge path in tests/test_linear_path.py."""

import pytest
import torch

from healnet.linear_path import fit_offset, fit_sparse_offset, path_penalties
from healnet.survival import nll_loss
from healnet.train_config import TrainConfig

ALPHA = 0.4


def survival_problem(n: int = 200, features: int = 30, seed: int = 0):
    """Path inputs where the first two omic features and the one clinical covariate (the last column)
    carry risk and the rest are noise; labels (bins 0-3) and events from a discrete-time model."""
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(n, features + 1, generator=generator)
    risk = 1.0 * values[:, 0] - 0.8 * values[:, 1] + 0.6 * values[:, -1]
    labels = torch.clamp((2.0 - risk + torch.randn(n, generator=generator)).round(), 0, 3).long()
    events = (torch.rand(n, generator=generator) < 0.7).float()
    omic = torch.ones(features + 1, dtype=torch.bool)
    omic[-1] = False
    return values, labels, events, omic


def gradients(values, labels, events, ridge, weight, bias):
    weight, bias = weight.clone().requires_grad_(True), bias.clone().requires_grad_(True)
    logits = bias + (values @ weight)[:, None]
    loss = nll_loss(logits, labels, events, ALPHA) + (ridge * weight.square()).sum()
    return torch.autograd.grad(loss, (weight, bias))


def test_the_solution_meets_the_elastic_nets_optimality_conditions():
    values, labels, events, omic = survival_problem()
    config = TrainConfig(linear_omics_l1_ratio=0.5)
    ridge, lasso = path_penalties(omic, 0.02, config)
    weight, bias = fit_sparse_offset(values, labels, events, ridge, lasso, 4, ALPHA)
    grad_weight, grad_bias = gradients(values, labels, events, ridge, weight, bias)
    kept = weight != 0
    assert 0 < kept.sum() < len(weight)  # some weights set to exactly zero, not all
    # where a weight is kept, the smooth gradient balances the lasso; where it is zero, it stays inside it
    assert (grad_weight[kept] + lasso[kept] * weight[kept].sign()).abs().max() < 1e-3
    assert ((grad_weight[~kept].abs() - lasso[~kept]) <= 1e-4).all()
    assert grad_bias.abs().max() < 1e-3
    assert kept[[0, 1, -1]].all()  # the signal is kept


def test_without_a_lasso_the_solver_agrees_with_lbfgs():
    values, labels, events, omic = survival_problem(seed=1)
    ridge, lasso = path_penalties(omic, 0.05, TrainConfig())
    assert not lasso.any()
    expected = fit_offset(values, labels, events, ridge, 4, ALPHA)
    found = fit_sparse_offset(values, labels, events, ridge, lasso, 4, ALPHA)
    for mine, reference in zip(found, expected, strict=True):
        torch.testing.assert_close(mine, reference, atol=2e-3, rtol=0)


def test_a_strong_lasso_zeroes_the_omics_and_only_a_shared_one_the_clinical_weights():
    values, labels, events, omic = survival_problem(seed=2)
    for shared in (False, True):
        config = TrainConfig(linear_omics_l1_ratio=0.5, linear_clinical_shares_penalty=shared)
        weight, _ = fit_sparse_offset(values, labels, events, *path_penalties(omic, 10.0, config), 4, ALPHA)
        assert not weight[omic].any()
        assert (weight[-1] == 0) == shared


def test_the_l1_ratio_is_a_share():
    for ratio in (-0.1, 1.5):
        with pytest.raises(ValueError, match="linear_omics_l1_ratio"):
            TrainConfig(linear_omics_l1_ratio=ratio)
