"""Train an ensemble's members at once, as one batched model (torch.func), or one by one with `fit`.

`fit_members` gives every member what `healnet.train.fit` would give it: its linear path fitted first, the
same Adam + OneCycleLR steps on the same batches in the same order, the same L1 penalty, early stopping on
its own validation patients and its own best epoch's weights restored. Only floating-point rounding differs
(tests/test_ensemble.py bounds it).

How: members that share a model configuration, input token shapes and steps per epoch are stacked
(`torch.func.stack_module_state`) and run through `torch.func.vmap(functional_call)` over the member
dimension. One Adam over the stacked parameters is elementwise, so it equals an Adam per member, and the
loss is the sum over members of each member's own loss (mean over its real samples, plus its L1), so each
member's gradient is its own. Every member's data are collated once, up front; each step indexes one batch
per member in the order that member's own DataLoader would draw it (same generator, same calls), a member's
shorter last batch padded and its padding weighted zero. A member that early-stops keeps being stepped
(harmlessly: nothing is shared) but its history, best epoch and weights are frozen at the stop.

Members are trained one by one with `fit` where batching does not apply: patch bags (wsi: variable length),
modality dropout, bin weights, training configurations that differ in more than the seed, or a member alone
in its group. Model dropout (attn_dropout, ff_dropout > 0) draws each member's own masks
(randomness="different"), which are not the masks `fit` would draw: equal in distribution only.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, cast

import numpy as np
import torch
from torch import Tensor
from torch.func import functional_call, stack_module_state, vmap
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from healnet.checkpoint import Checkpoint
from healnet.data.splits import kfold_splits
from healnet.device import select_device
from healnet.drift.reference import fit_input_reference
from healnet.fitting import (
    PREDICT_BATCH,
    CohortData,
    TrainedModel,
    build_training,
    fit_preprocessor,
    fitting_patients,
)
from healnet.linear_path import fit_linear_path, with_omics_ridge
from healnet.model import HEALNet
from healnet.preprocess.clinical import CLINICAL
from healnet.preprocess.state import WSI, Preprocessor
from healnet.recipes import Recipe
from healnet.survival import SurvivalBins, nll_per_sample, survival_from_logits
from healnet.survival_metrics import harrell_c_or_nan, survival_metrics
from healnet.train import (
    TrainConfig,
    TrainResult,
    autocast,
    fit,
    make_loader,
    predict_logits,
    score_logits,
    seed_everything,
    training_bin_weights,
)

log = logging.getLogger(__name__)


@dataclass
class HEALNetEnsemble:
    """Members that share one preprocessor and one set of bins; their survival curves are averaged.

    A single model is an ensemble of one. With `recipe.members` > 1, the training patients (train_ids +
    val_ids) are split into `members` stratified parts; member i early-stops on part i and trains on the
    others, and the bins and the preprocessor are fitted on all of them. With one member, it trains on
    train_ids and early-stops on val_ids, and the bins and the preprocessor are fitted on train_ids.
    """

    members: list[TrainedModel]
    member_splits: list[tuple[list[str], list[str]]]  # (train ids, early-stopping ids) per member
    recipe: str = ""
    # the fitting patients' inputs, binned for `healnet drift` (InputReference.to_dict())
    input_reference: dict | None = None

    @classmethod
    def fit(
        cls,
        data: CohortData,
        train_ids: Sequence[str],
        val_ids: Sequence[str],
        recipe: Recipe,
        modalities: Sequence[str] | None = None,
        progress: bool = False,
    ) -> HEALNetEnsemble:
        """Every setting comes from `recipe`; its seed seeds the members' parts, and member i trains with
        seed + i."""
        modalities = list(modalities or data.available_modalities())
        if recipe.clinical is None:
            modalities = [m for m in modalities if m != CLINICAL]
        fitted_on = fitting_patients(train_ids, val_ids, recipe.members)
        seed = recipe.train.seed
        if recipe.members == 1:
            parts = [(list(train_ids), list(val_ids))]
        else:
            events = data.clinical.loc[fitted_on, "event"]
            inner = kfold_splits(fitted_on, events, folds=recipe.members, seed=seed, val_fraction=0.0)
            parts = [
                (
                    split.loc[split["role"] == "train", "patient_id"].tolist(),
                    split.loc[split["role"] == "test", "patient_id"].tolist(),
                )
                for _, split in inner.groupby("fold")
            ]
        clinical = data.clinical.loc[fitted_on]
        bins = SurvivalBins.fit(clinical["survival_months"], clinical["event"], recipe.n_bins)
        preprocessor = fit_preprocessor(data, fitted_on, modalities, recipe.omics, recipe.clinical)
        configs = [replace(recipe.train, seed=seed + index) for index in range(len(parts))]
        built = [
            build_training(data, fit_ids, stop_ids, preprocessor, bins, recipe.model, config)
            for (fit_ids, stop_ids), config in zip(parts, configs, strict=True)
        ]
        members = [trained for trained, _, _ in built]
        # the omic linear weights' ridge is chosen once, on all the ensemble's patients, not per member
        device = select_device(recipe.train.device)
        chosen = with_omics_ridge(
            members[0].model, lambda: members[0].dataset(data, fitted_on), recipe.train, device
        )
        configs = [replace(config, linear_omics_ridge=chosen.linear_omics_ridge) for config in configs]
        for trained, config in zip(members, configs, strict=True):
            trained.metadata["train_config"] = config.to_dict()
        # the members train at once as one batched model where they can, else one by one
        results = fit_members(
            [trained.model for trained in members],
            [train_set for _, train_set, _ in built],
            [val_set for _, _, val_set in built],
            configs,
            bins=bins,
            progress=progress,
        )
        for trained, result in zip(members, results, strict=True):
            trained.result = result
        if recipe.train.linear_blend_choices and members[0].model.linear_path is not None:
            choice = choose_linear_blend(
                [trained.model for trained in members],
                [val_set for _, _, val_set in built],
                recipe.train.linear_blend_choices,
            )
            for trained in members:
                trained.metadata["linear_blend_choice"] = choice
        reference = fit_input_reference(data.omics, data.clinical, data.wsi_bags, fitted_on, preprocessor)
        return cls(members, parts, recipe.name, reference.to_dict())

    @property
    def bins(self) -> SurvivalBins:
        return self.members[0].bins

    @property
    def preprocessor(self) -> Preprocessor:
        return self.members[0].preprocessor

    @property
    def modalities(self) -> list[str]:
        return self.members[0].modalities

    def survival(
        self, data: CohortData, patient_ids: Sequence[str], members: int | None = None
    ) -> np.ndarray:
        """Mean survival per bin (patients, n_bins) over the first `members` members (default: all).

        The members share the preprocessing, so the patients' inputs are prepared once for all of them."""
        first = self.members[0]
        device = next(first.model.parameters()).device
        loader = make_loader(first.dataset(data, patient_ids), PREDICT_BATCH, False, device)
        curves = [
            survival_from_logits(torch.from_numpy(predict_logits(member.model, loader, device)))[1].numpy()
            for member in self.members[:members]
        ]
        return np.mean(curves, axis=0)

    def risk(self, data: CohortData, patient_ids: Sequence[str]) -> np.ndarray:
        """−Σ mean survival over the bins: higher means shorter expected survival."""
        return -self.survival(data, patient_ids).sum(axis=1)

    def evaluate(
        self, data: CohortData, test_ids: Sequence[str], train_ids: Sequence[str], members: int | None = None
    ) -> dict:
        train, test = data.clinical.loc[list(train_ids)], data.clinical.loc[list(test_ids)]
        return survival_metrics(
            train["survival_months"].to_numpy(),
            train["event"].to_numpy(),
            test["survival_months"].to_numpy(),
            test["event"].to_numpy(),
            self.survival(data, test_ids, members),
            self.bins,
        )

    def to_checkpoint(self, metadata: dict | None = None) -> Checkpoint:
        first = self.members[0]
        return Checkpoint(
            first.model.config,
            [member.model.state_dict() for member in self.members],
            self.bins,
            self.preprocessor,
            {**first.metadata, "recipe": self.recipe, "members": len(self.members), **(metadata or {})},
            self.input_reference,
        )

    @classmethod
    def from_checkpoint(cls, checkpoint: Checkpoint) -> HEALNetEnsemble:
        modalities = [spec.name for spec in checkpoint.model_config.modalities]
        members = [
            TrainedModel(
                model, checkpoint.bins, checkpoint.preprocessor, modalities, metadata=checkpoint.metadata
            )
            for model in checkpoint.build_models()
        ]
        return cls(members, [], checkpoint.metadata.get("recipe", ""), checkpoint.input_reference)


def choose_linear_blend(
    models: Sequence[torch.nn.Module], stop_sets: Sequence, choices: Sequence[float]
) -> dict[str, Any]:
    """Set every member's blend with its linear path to the one of `choices` whose predictions rank the
    members' early-stopping patients best: each patient is scored by the member that did not train on it
    (with more than one member, every fitting patient once), and Harrell's C is taken over all of them.
    Ties go to the smaller weight; with no comparable pair the configured weight stays. Returns the chosen
    weight and each choice's C.

    The members keep what they learned; only how much their survival curve leans on the linear path's own
    curve changes. A weight of 0 removes the path's intercepts, which nothing then reads.
    """
    first = cast(HEALNet, models[0])
    if not hasattr(first, "linear_intercepts"):
        raise ValueError("choosing a linear blend needs members built with a linear_blend above 0")
    configured = first.config.linear_blend
    device = next(first.parameters()).device
    times = np.concatenate([dataset.targets.times for dataset in stop_sets])
    events = np.concatenate([dataset.targets.events for dataset in stop_sets]).astype(bool)
    loaders = [make_loader(dataset, PREDICT_BATCH, False, device) for dataset in stop_sets]
    scores: dict[float, float] = {}
    for weight in sorted(choices):
        risks = []
        for model, loader in zip(models, loaders, strict=True):
            cast(HEALNet, model).config.linear_blend = weight
            risks.append(survival_from_logits(torch.from_numpy(predict_logits(model, loader, device)))[2])
        scores[weight] = harrell_c_or_nan(times, events, torch.cat(risks).numpy())
    ranked = [weight for weight in scores if np.isfinite(scores[weight])]  # no comparable pair: none is
    chosen = max(ranked, key=lambda weight: scores[weight]) if ranked else configured
    for model in models:
        cast(HEALNet, model).config.linear_blend = chosen
        if not chosen:
            del model.linear_intercepts
    return {
        "chosen": chosen,
        "c_index": {str(weight): score if np.isfinite(score) else None for weight, score in scores.items()},
    }


def batching_blocker(train_sets: Sequence, val_sets: Sequence, configs: Sequence[TrainConfig]) -> str | None:
    """Why these members cannot be trained as one batched model (None: they can)."""
    if len(configs) < 2:
        return "a single member"
    first = replace(configs[0], seed=0)
    if any(replace(config, seed=0) != first for config in configs):
        return "the members' training configurations differ in more than the seed"
    if first.modality_dropout:
        return "modality dropout"
    if any(WSI in dataset.modalities for dataset in (*train_sets, *val_sets)):
        return "patch bags (wsi) of variable length"
    return None


def fit_members(
    models: Sequence[torch.nn.Module],
    train_sets: Sequence,
    val_sets: Sequence,
    configs: Sequence[TrainConfig],
    bins=None,
    progress: bool = False,
) -> list[TrainResult]:
    """Train each member as `fit(models[i], train_sets[i], val_sets[i], configs[i], bins)` would.

    The models are built as `healnet.fitting.build_training` builds them (seeded); they are trained in
    place, their best weights loaded, and left in eval mode. Returns one `TrainResult` per member.
    """
    if not len(models) == len(train_sets) == len(val_sets) == len(configs):
        raise ValueError("fit_members needs one train set, validation set and config per model")
    reason = batching_blocker(train_sets, val_sets, configs)
    collated: list[dict] = []
    if reason is None:
        collated = [collate_all(dataset) for dataset in train_sets]
        keys = [_group_key(m, c, data) for m, c, data in zip(models, configs, collated, strict=True)]
        groups = [[i for i, key in enumerate(keys) if key == unique] for unique in dict.fromkeys(keys)]
        log.info("training %d members batched, in groups of %s", len(models), [len(g) for g in groups])
    else:
        log.info("training %d members one by one: %s", len(models), reason)
        groups = [[i] for i in range(len(models))]
    results: dict[int, TrainResult] = {}
    for group in groups:
        if len(group) == 1:
            i = group[0]
            results[i] = fit(models[i], train_sets[i], val_sets[i], configs[i], bins=bins, progress=progress)
            continue
        trained = _fit_batched(
            [models[i] for i in group],
            [train_sets[i] for i in group],
            [collated[i] for i in group],
            [val_sets[i] for i in group],
            [configs[i] for i in group],
            bins,
            progress,
        )
        for i, result in zip(group, trained, strict=True):
            results[i] = result
    return [results[i] for i in range(len(models))]


def collate_all(dataset) -> dict:
    """The whole dataset as one batch, by the dataset's own `collate`."""
    return dataset.collate([dataset[i] for i in range(len(dataset))])


def _group_key(model: torch.nn.Module, config: TrainConfig, data: dict) -> tuple:
    """Members with equal keys can be stacked: same architecture, token shapes and steps per epoch."""
    shapes = tuple(
        (part, name, tuple(tensor.shape[1:]), str(tensor.dtype))
        for part in ("inputs", "present", "token_mask")
        for name, tensor in sorted(data[part].items())
    )
    steps = -(-len(data["labels"]) // config.batch_size)
    architecture = json.dumps(cast(HEALNet, model).config.to_dict(), sort_keys=True, default=str)
    parameters = tuple((name, tuple(p.shape)) for name, p in model.named_parameters())
    return architecture, parameters, shapes, steps


def _map(data, function):
    if isinstance(data, dict):
        return {key: _map(value, function) for key, value in data.items()}
    return function(data)


def _stack(collated: list[dict], device: torch.device) -> dict:
    """Collated batches of different lengths -> tensors (members, longest, ...), zero-padded."""
    longest = max(len(data["labels"]) for data in collated)

    def pad(tensor: Tensor) -> Tensor:
        return torch.cat([tensor, tensor.new_zeros((longest - len(tensor), *tensor.shape[1:]))])

    keys = ("inputs", "present", "token_mask", "labels", "events")
    return {key: _map_stack([_map(data[key], pad) for data in collated], device) for key in keys}


def _take(data: dict, rows: Tensor, index: Tensor) -> dict:
    """Rows `index` (members, batch) of each member's stacked data."""
    return _map(data, lambda tensor: tensor[rows, index])


def _map_stack(values: list, device: torch.device):
    if isinstance(values[0], dict):
        return {name: _map_stack([value[name] for value in values], device) for name in values[0]}
    return torch.stack(values).to(device)


def _fit_batched(
    models: list[torch.nn.Module],
    train_sets: list,
    train_data: list[dict],
    val_sets: list,
    configs: list[TrainConfig],
    bins,
    progress: bool,
) -> list[TrainResult]:
    """One group of stackable members; `train_data`: each train set collated whole (`collate_all`)."""
    config = configs[0]
    members = len(models)
    seed_everything(config.seed)
    device = select_device(config.device)
    for model, train_set, member_config in zip(models, train_sets, configs, strict=True):
        model.to(device)
        fit_linear_path(model, train_set, member_config, device)
    train = _stack(train_data, device)
    bin_weights = None  # (members, n_bins): each member weighs the bins of its own training labels, as `fit`
    if config.bin_weights:
        bin_weights = torch.stack(
            [
                cast(Tensor, training_bin_weights(c, bins, s, device))
                for c, s in zip(configs, train_sets, strict=True)
            ]
        ).float()
    val = _stack([collate_all(dataset) for dataset in val_sets], device)
    val_lengths = [len(dataset) for dataset in val_sets]

    params, buffers = stack_module_state(models)
    trainable = {name: p for name, p in params.items() if p.requires_grad}
    frozen = {name: p for name, p in params.items() if not p.requires_grad}
    base = copy.deepcopy(models[0]).to("meta")

    def call(trainable, frozen, buffers, inputs, present, token_mask):
        return functional_call(base, (trainable, frozen, buffers), (inputs, present, token_mask))

    batched = vmap(call, randomness="different")

    def logits_of(data: dict) -> Tensor:  # (members, patients, n_bins)
        with autocast(device):
            out = batched(trainable, frozen, buffers, data["inputs"], data["present"], data["token_mask"])
        return out.float()

    # each member's batches in its own DataLoader's order: the sampler and the loader's iterator draw from
    # a generator seeded like make_loader's, and neither depends on anything but the dataset's length
    orders: list[DataLoader] = [
        DataLoader(
            cast(Any, range(len(data["labels"]))),  # indices only: batches are taken from `data`
            batch_size=config.batch_size,
            shuffle=True,
            collate_fn=torch.tensor,
            generator=torch.Generator().manual_seed(member_config.seed),
        )
        for data, member_config in zip(train_data, configs, strict=True)
    ]
    optimizer = torch.optim.Adam(trainable.values(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.lr, epochs=config.epochs, steps_per_epoch=len(orders[0])
    )

    rows = torch.arange(members, device=device).unsqueeze(1)
    state = {**trainable, **frozen, **buffers}
    kept = {name: tensor.detach().clone() for name, tensor in state.items()}  # the weights to write back

    def keep(member: int) -> None:
        for name, tensor in state.items():
            kept[name][member] = tensor.detach()[member]

    sign = -1.0 if config.monitor == "c_index" else 1.0
    best_score = [float("inf")] * members
    best_epoch, waited = [-1] * members, [0] * members
    has_best, active = [False] * members, [True] * members
    histories: list[list[dict]] = [[] for _ in range(members)]
    bar = tqdm(range(config.epochs), desc=f"train x{members}", disable=not progress, unit="epoch")
    for epoch in bar:
        base.train()
        total = torch.zeros(members, dtype=torch.float64, device=device)
        count = torch.zeros(members, dtype=torch.float64, device=device)
        for indices in zip(*orders, strict=True):
            width = max(len(index) for index in indices)
            index = torch.zeros(members, width, dtype=torch.long)
            weight = torch.zeros(members, width)
            for member, member_index in enumerate(indices):
                index[member, : len(member_index)] = member_index
                weight[member, : len(member_index)] = 1.0
            index, weight = index.to(device), weight.to(device)
            batch = _take(train, rows, index)
            logits = logits_of(batch)
            per_sample = nll_per_sample(
                logits.flatten(0, 1), batch["labels"].flatten(), batch["events"].flatten(), config.alpha
            ).view(members, width)
            sizes = weight.sum(1)
            if bin_weights is not None:
                weight = weight * bin_weights[rows, batch["labels"].long()]
            losses = (per_sample * weight).sum(1) / weight.sum(1)
            if config.l1:
                losses = losses + config.l1 * sum(p.abs().flatten(1).sum(1) for p in trainable.values())
            optimizer.zero_grad(set_to_none=True)
            losses.sum().backward()
            optimizer.step()
            scheduler.step()
            total += losses.detach().double() * sizes
            count += sizes
        train_loss = (total / count).tolist()

        base.eval()
        with torch.no_grad():
            val_logits = logits_of(val).cpu().numpy()
        for member in range(members):
            if not active[member]:
                continue
            scores = score_logits(
                val_logits[member, : val_lengths[member]], val_sets[member].targets, config.alpha
            )
            histories[member].append(
                {
                    "epoch": epoch,
                    "train_loss": train_loss[member],
                    **{f"val_{k}": v for k, v in scores.items()},
                }
            )
            score = sign * scores[config.monitor]
            if np.isfinite(score) and score < best_score[member]:
                best_score[member], best_epoch[member], waited[member] = score, epoch, 0
                has_best[member] = True
                keep(member)
            else:
                waited[member] += 1
            if waited[member] >= config.patience:
                active[member] = False
                if not has_best[member]:  # fit keeps the weights it stopped with
                    keep(member)
        bar.set_postfix(active=sum(active), loss=f"{float(np.mean(train_loss)):.3f}")
        if not any(active):
            break
    for member in range(members):
        if active[member] and not has_best[member]:
            keep(member)

    with torch.no_grad():
        for member, model in enumerate(models):
            for name, tensor in (*model.named_parameters(), *model.named_buffers()):
                tensor.copy_(kept[name][member])
            model.eval()
    return [
        TrainResult(best_epoch=best_epoch[m], best_score=sign * best_score[m], history=histories[m])
        for m in range(members)
    ]
