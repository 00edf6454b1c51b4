"""Classical survival baselines for cross-validation: age alone, CoxNet and a random survival forest.

CoxNet and the forest see the clinical covariates through the same `ClinicalTransform` as HEALNet's
clinical modality, and the omics through the same `OmicsTransform` (signed log of the rnaseq z-scores,
impute with the training median, z-score, variance filter, top-k by variance), fitted on the training fold
only and flattened into one feature matrix. CoxNet's penalty is chosen by an inner K-fold CV on the
training fold; the forest uses fixed, modest defaults. Age alone fits nothing.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace

import numpy as np
import pandas as pd
from einops import rearrange
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import StratifiedKFold
from sksurv.ensemble import RandomSurvivalForest
from sksurv.linear_model import CoxnetSurvivalAnalysis
from sksurv.util import Surv

from healnet.errors import HEALNetError
from healnet.preprocess.clinical import ClinicalConfig, ClinicalTransform
from healnet.preprocess.omics import RNASEQ, OmicsConfig, OmicsTransform
from healnet.survival_metrics import harrell_c_or_nan


class BaselineError(HEALNetError, ValueError):
    """A baseline that cannot be fitted on the given fold; the message says why."""


PENALTY_CHOICES = ("inner_cv", "path_middle")


@dataclass(frozen=True)
class CoxNetConfig:
    # features: the 200 highest-variance ones per table, after a signed log of the rnaseq z-scores
    omics: OmicsConfig = OmicsConfig(top_k=200, signed_log=RNASEQ)
    l1_ratio: float = 0.5  # elastic net: half lasso, half ridge
    n_alphas: int = 30  # penalties on the path, from the smallest one that zeroes every weight
    alpha_min_ratio: float = 0.02  # the smallest penalty relative to the largest one
    inner_folds: int = 5
    max_iter: int = 100_000
    # how the penalty is chosen: "inner_cv" (the highest inner-CV Harrell C) or "path_middle" (the middle
    # penalty of the path, nothing tuned: a common fixed choice)
    penalty: str = "inner_cv"

    def __post_init__(self) -> None:
        if self.penalty not in PENALTY_CHOICES:
            raise BaselineError(f"penalty must be one of {PENALTY_CHOICES}, got {self.penalty!r}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ForestConfig:
    omics: OmicsConfig = OmicsConfig(top_k=500, signed_log=RNASEQ)
    n_estimators: int = 100
    min_samples_leaf: int = 15
    max_features: str | float = "sqrt"
    n_jobs: int = 1

    def to_dict(self) -> dict:
        return asdict(self)


class OmicsMatrix:
    """The omics of a set of patients as one (patients, features) matrix, transform fitted on training ids."""

    def __init__(self, transform: OmicsTransform):
        self.transform = transform

    @classmethod
    def fit(
        cls, omics: Mapping[str, pd.DataFrame], train_ids: Sequence[str], config: OmicsConfig
    ) -> OmicsMatrix:
        train = set(train_ids)
        frames = {name: frame[frame.index.isin(train)] for name, frame in omics.items()}
        return cls(OmicsTransform.fit(frames, replace(config, combine=True, tokens="single")))

    @property
    def feature_names(self) -> list[str]:
        return self.transform.feature_names["omic"]

    def __call__(self, omics: Mapping[str, pd.DataFrame], patient_ids: Sequence[str]) -> np.ndarray:
        tokens = self.transform.transform(omics, patient_ids)["omic"].values
        return rearrange(tokens, "n 1 c -> n c").astype(np.float64)


class BaselineFeatures:
    """Clinical covariates and omics of a set of patients as one (patients, features) matrix."""

    def __init__(self, clinical: ClinicalTransform | None, omics: OmicsMatrix | None):
        if clinical is None and omics is None:
            raise BaselineError(
                "the baselines need clinical covariates or omics, and this cohort has neither"
            )
        self.clinical = clinical
        self.omics = omics

    @classmethod
    def fit(
        cls, data, train_ids: Sequence[str], omics_config: OmicsConfig, clinical_config: ClinicalConfig
    ) -> BaselineFeatures:
        """Fit on `train_ids` of `data` (a CohortData: .clinical, .omics)."""
        train = data.clinical.loc[list(train_ids)]
        clinical = (
            ClinicalTransform.fit(train, clinical_config)
            if clinical_config.observed_covariates(train)
            else None
        )
        omics = OmicsMatrix.fit(data.omics, train_ids, omics_config) if data.omics else None
        return cls(clinical, omics)

    @property
    def feature_names(self) -> list[str]:
        return (self.clinical.feature_names if self.clinical else []) + (
            self.omics.feature_names if self.omics else []
        )

    def __call__(self, data, patient_ids: Sequence[str]) -> np.ndarray:
        parts = []
        if self.clinical:
            parts.append(
                rearrange(self.clinical.transform(data.clinical, patient_ids).values, "n f 1 -> n f")
            )
        if self.omics:
            parts.append(self.omics(data.omics, patient_ids))
        return np.concatenate(parts, axis=1).astype(np.float64)


def age_risk(train: pd.DataFrame, test: pd.DataFrame) -> np.ndarray:
    """Age at diagnosis as the risk score, nothing fitted (a missing age gets the training median)."""
    if train["age"].notna().sum() == 0:
        raise BaselineError("age alone needs ages, and no training patient has one")
    return test["age"].fillna(train["age"].median()).to_numpy(dtype=np.float64)


def _surv(times: np.ndarray, events: np.ndarray) -> np.ndarray:
    return Surv.from_arrays(np.asarray(events).astype(bool), np.asarray(times, dtype=np.float64))


@dataclass
class CoxNetFit:
    model: CoxnetSurvivalAnalysis
    alpha: float
    inner_c_index: np.ndarray  # mean inner-CV Harrell C per alpha of `alphas`
    alphas: np.ndarray

    def risk(self, x: np.ndarray) -> np.ndarray:
        return self.model.predict(x, alpha=self.alpha)

    @property
    def n_nonzero(self) -> int:
        column = int(np.flatnonzero(np.isclose(self.alphas, self.alpha))[0])
        return int(np.count_nonzero(self.model.coef_[:, column]))


def _coxnet(config: CoxNetConfig, alphas: np.ndarray | None = None) -> CoxnetSurvivalAnalysis:
    return CoxnetSurvivalAnalysis(
        l1_ratio=config.l1_ratio,
        n_alphas=config.n_alphas,
        alpha_min_ratio=config.alpha_min_ratio,
        alphas=alphas,
        max_iter=config.max_iter,
        normalize=False,
    )


def _fit_quietly(model, x: np.ndarray, y: np.ndarray):
    """Fit, turning sksurv's numerical failures into a BaselineError."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        try:
            return model.fit(x, y)
        except ArithmeticError as error:
            raise BaselineError(f"{type(model).__name__} failed on {x.shape} features: {error}") from error


def fit_coxnet(
    x: np.ndarray, times: np.ndarray, events: np.ndarray, config: CoxNetConfig | None = None, seed: int = 0
) -> CoxNetFit:
    """Elastic-net Cox model; the penalty alpha maximises Harrell's C in an inner stratified K-fold CV
    (`penalty="path_middle"`: the middle alpha of the path, no inner CV).

    The alpha path comes from a first fit on all of `x`; each inner fold then fits that same path once
    (warm-started along it, the same optimum as one fit per alpha) and scores every alpha on its held-out part.
    Only the training fold is ever seen here.
    """
    config = config or CoxNetConfig()
    times, events = np.asarray(times, dtype=np.float64), np.asarray(events).astype(int)
    y = _surv(times, events)
    if config.penalty == "path_middle":
        path = _fit_quietly(_coxnet(config), x, y)
        alphas = np.asarray(path.alphas_)
        return CoxNetFit(path, float(alphas[(len(alphas) - 1) // 2]), np.full(len(alphas), np.nan), alphas)
    if events.sum() < config.inner_folds:
        raise BaselineError(f"CoxNet inner CV needs at least {config.inner_folds} events, got {events.sum()}")
    alphas = _fit_quietly(_coxnet(config), x, y).alphas_
    scores = np.zeros((config.inner_folds, len(alphas)))
    inner = StratifiedKFold(config.inner_folds, shuffle=True, random_state=seed)
    for k, (fit_rows, score_rows) in enumerate(inner.split(x, events)):
        path = _fit_quietly(_coxnet(config, alphas), x[fit_rows], y[fit_rows])
        for j, alpha in enumerate(alphas):
            risk = path.predict(x[score_rows], alpha=alpha)
            scores[k, j] = harrell_c_or_nan(times[score_rows], events[score_rows], risk)
    if np.isnan(scores).all():
        raise BaselineError("no inner CoxNet fold has a comparable pair to score the penalties on")
    mean = np.nanmean(scores, axis=0)  # an inner fold without a comparable pair does not vote
    best = float(alphas[int(np.argmax(mean))])
    return CoxNetFit(_fit_quietly(_coxnet(config, alphas), x, y), best, mean, np.asarray(alphas))


def fit_forest(
    x: np.ndarray, times: np.ndarray, events: np.ndarray, config: ForestConfig | None = None, seed: int = 0
) -> RandomSurvivalForest:
    """Random survival forest with fixed defaults; `predict` gives the risk (expected deaths)."""
    config = config or ForestConfig()
    forest = RandomSurvivalForest(
        n_estimators=config.n_estimators,
        min_samples_leaf=config.min_samples_leaf,
        max_features=config.max_features,
        n_jobs=config.n_jobs,
        random_state=seed,
        low_memory=True,
    )
    return forest.fit(x, _surv(times, events))
