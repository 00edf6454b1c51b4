"""Patient-level splits, stratified by event: repeated holdout (70/15/15) and K-fold with a val carve-out.

Inputs are one id per patient; split slide-level tables by patient, never by row.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedKFold

from healnet.errors import HEALNetError

SPLIT_COLUMNS = ["patient_id", "scheme", "repeat", "fold", "role"]
SCHEMES = ("holdout", "kfold")
ROLES = ("train", "val", "test")


class SplitError(HEALNetError, ValueError):
    """Inputs that cannot be split as asked; the message says why."""


def _checked(patient_ids: Sequence[str], events: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    ids = np.asarray(list(patient_ids), dtype=object)
    labels = np.asarray(list(events))
    if len(ids) != len(labels):
        raise SplitError(f"got {len(ids)} patient ids but {len(labels)} events")
    repeated = pd.Index(ids)[pd.Index(ids).duplicated()].unique().tolist()
    if repeated:
        raise SplitError(
            f"patient ids must be unique (split patients, not slides); repeated: {repeated[:5]}"
            + (f" and {len(repeated) - 5} more" if len(repeated) > 5 else "")
        )
    if not np.isin(labels, [0, 1]).all():
        raise SplitError(f"events must be 0 or 1, got {sorted(set(labels.tolist()) - {0, 1})[:5]}")
    return ids, labels.astype(int)


def _random_state(*keys: int) -> int:
    """An independent, reproducible seed per key tuple, e.g. (seed, repeat)."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1)[0])


def _carve(
    positions: np.ndarray, events: np.ndarray, fraction: float, random_state: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split `positions` into (rest, carved): a rounded `fraction` of each event class is carved.

    Unlike sklearn's train_test_split(stratify=...), a class with a single member is no error.
    """
    rng = np.random.default_rng(random_state)
    carved = []
    for label in (0, 1):
        members = rng.permutation(positions[events[positions] == label])
        carved.append(members[: int(np.floor(fraction * len(members) + 0.5))])
    carved_positions = np.sort(np.concatenate(carved))
    return np.setdiff1d(positions, carved_positions), carved_positions


def _frame(
    ids: np.ndarray,
    val: np.ndarray,
    test: np.ndarray,
    shares: dict[str, float],
    scheme: str,
    repeat: int,
    fold: int,
) -> pd.DataFrame:
    """One split's rows; a role with a positive share that ends up empty is an error."""
    roles = np.full(len(ids), "train", dtype=object)
    roles[val] = "val"
    roles[test] = "test"
    for role, share in shares.items():
        if share > 0 and not (roles == role).any():
            raise SplitError(f"{len(ids)} patients are too few for a {role} share of {share:.0%}")
    return pd.DataFrame(
        {"patient_id": ids, "scheme": scheme, "repeat": repeat, "fold": fold, "role": roles},
        columns=SPLIT_COLUMNS,
    )


def holdout_splits(
    patient_ids: Sequence[str],
    events: Sequence[int],
    *,
    repeats: int = 1,
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
    seed: int = 0,
) -> pd.DataFrame:
    """`repeats` independent train/val/test splits (fold 0), each stratified by event."""
    ids, labels = _checked(patient_ids, events)
    train, val, test = fractions
    if min(fractions) < 0 or train <= 0 or test <= 0 or not np.isclose(sum(fractions), 1.0):
        raise SplitError(
            f"fractions (train, val, test) must be non-negative, sum to 1, with train/test > 0: {fractions}"
        )
    if repeats < 1:
        raise SplitError(f"repeats must be at least 1, got {repeats}")
    frames = []
    for repeat in range(repeats):
        state = _random_state(seed, repeat)
        rest, test_positions = _carve(np.arange(len(ids)), labels, test, state)
        _, val_positions = _carve(rest, labels, val / (train + val), state)
        shares = dict(zip(ROLES, fractions, strict=True))
        frames.append(_frame(ids, val_positions, test_positions, shares, "holdout", repeat, 0))
    return pd.concat(frames, ignore_index=True)


def kfold_splits(
    patient_ids: Sequence[str],
    events: Sequence[int],
    *,
    folds: int = 5,
    repeats: int = 1,
    seed: int = 0,
    val_fraction: float = 0.15,
) -> pd.DataFrame:
    """Stratified K-fold: each fold's held-out patients are "test"; `val_fraction` of the others are "val"."""
    ids, labels = _checked(patient_ids, events)
    if folds < 2 or folds > len(ids):
        raise SplitError(f"folds must be between 2 and the number of patients ({len(ids)}), got {folds}")
    if not 0 <= val_fraction < 1:
        raise SplitError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if repeats < 1:
        raise SplitError(f"repeats must be at least 1, got {repeats}")
    per_class = np.bincount(labels, minlength=2)
    fewest = per_class.min()
    if fewest < folds:
        kind = "with" if per_class.argmin() == 1 else "without"
        warnings.warn(
            f"{fewest} patient(s) {kind} an event for {folds} folds: at least {folds - fewest} fold(s) hold "
            f"none of them",
            stacklevel=2,
        )
    frames = []
    for repeat in range(repeats):
        state = _random_state(seed, repeat)
        splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=state)
        try:
            with warnings.catch_warnings():  # said once above, in the patients' terms
                warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
                fold_positions = list(splitter.split(ids, labels))
        except ValueError as error:
            raise SplitError(f"cannot make {folds} folds stratified by event: {error}") from error
        for fold, (rest, test_positions) in enumerate(fold_positions):
            _, val_positions = _carve(rest, labels, val_fraction, _random_state(seed, repeat, fold))
            shares = {"train": 1.0, "val": val_fraction}
            frames.append(_frame(ids, val_positions, test_positions, shares, "kfold", repeat, fold))
    return pd.concat(frames, ignore_index=True)
