"""Compare spooled counts with the training reference: per feature a chi-square test, Benjamini-Hochberg
within each modality, the drifted share per modality, an embedding drift score and a verdict.

Why these tests and not Evidently: the spool holds binned counts, not values (docs/drift.md), and a test of
two histograms over the same bins is the chi-square test of homogeneity; it treats the reference as the
sample it is (a few hundred patients), where a goodness-of-fit test against fixed decile shares would
call the reference's own sampling noise drift. Evidently's column tests want raw values.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from healnet.drift.reference import WSI, InputCounts, InputReference

ALPHA = 0.05  # false discovery rate within a modality
# A modality has drifted when more than this share of its tested features differ from training. The alert
# HealnetInputDrift compares with the same number (tests/test_drift.py checks that they agree).
DRIFT_SHARE_THRESHOLD = 0.25
# A feature is tested once the spool holds this many observed values of it; fewer say too little.
MIN_FEATURE_CASES = 20
PATTERN = "pattern"  # the label of the modality-pattern test among the modalities


@dataclass(frozen=True)
class ModalityDrift:
    modality: str
    features: int  # features of the modality in the reference
    tested: int  # those with at least MIN_FEATURE_CASES observed values in the spool
    drifted: int  # tested features with q < alpha
    cases: int  # the most observed values of one of its features in the spool

    @property
    def share(self) -> float:
        """drifted / tested; NaN when nothing was tested."""
        return self.drifted / self.tested if self.tested else math.nan

    @property
    def has_drifted(self) -> bool:
        return self.tested > 0 and self.share > DRIFT_SHARE_THRESHOLD


@dataclass(frozen=True)
class DriftReport:
    modalities: list[ModalityDrift]
    embedding_score: float | None  # None: the model reads no slides, or the spool holds too few
    alpha: float
    cases: int

    @property
    def drifted(self) -> list[str]:
        return [m.modality for m in self.modalities if m.has_drifted]

    @property
    def verdict(self) -> str:
        return "drift" if self.drifted else "no drift"

    def to_dict(self) -> dict:
        return {
            "verdict": self.verdict,
            "drifted_modalities": self.drifted,
            "threshold": DRIFT_SHARE_THRESHOLD,
            "alpha": self.alpha,
            "cases": self.cases,
            "embedding_drift_score": self.embedding_score,
            "modalities": [
                {**asdict(m), "share": None if math.isnan(m.share) else m.share} for m in self.modalities
            ],
        }


def homogeneity_p(reference: np.ndarray, current: np.ndarray) -> float:
    """p-value of the chi-square test that two histograms over the same bins come from one distribution
    (bins empty in both are left out; 1.0 when fewer than two bins remain)."""
    from scipy.stats import chi2_contingency  # imported here: `healnet --help` reads this module's constants

    table = np.stack([reference, current]).astype(np.float64)
    table = table[:, table.sum(axis=0) > 0]
    if table.shape[1] < 2 or (table.sum(axis=1) == 0).any():
        return 1.0
    return float(chi2_contingency(table, correction=False).pvalue)


def drifted_features(reference: np.ndarray, current: np.ndarray, alpha: float) -> tuple[int, int, int]:
    """(tested, drifted, most observed values) of one modality's (features, bins) counts."""
    observed = current.sum(axis=1)
    tested = np.flatnonzero(observed >= MIN_FEATURE_CASES)
    if not len(tested):
        return 0, 0, int(observed.max(initial=0))
    from scipy.stats import false_discovery_control

    p = np.array([homogeneity_p(reference[i], current[i]) for i in tested])
    q = false_discovery_control(p, method="bh")
    return len(tested), int((q < alpha).sum()), int(observed.max())


def embedding_drift_score(reference: np.ndarray, current: np.ndarray) -> float | None:
    """Mean population stability index over the embedding's dimensions, less its expected value without
    drift, floored at 0: an effect size that, unlike the drifted share, does not grow with the number of
    requests. Per dimension PSI = Σ (c − r) ln(c / r) over the bins' shares (counts + 0.5); without drift
    it is about (bins − 1)(1/n + 1/m) for n current and m reference slides, over the bins either sample
    filled, which is subtracted per dimension. Rules of thumb for PSI: < 0.1 stable, 0.1-0.25 moderate,
    > 0.25 a large shift. None below MIN_FEATURE_CASES slides."""
    n, m = int(current.sum(axis=1).max(initial=0)), int(reference.sum(axis=1).max(initial=0))
    if n < MIN_FEATURE_CASES or m == 0:
        return None
    used = (reference + current) > 0  # per dimension, the bins either sample filled
    r = np.where(used, reference + 0.5, 0.0)
    c = np.where(used, current + 0.5, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        r, c = r / r.sum(axis=1, keepdims=True), c / c.sum(axis=1, keepdims=True)
        terms = np.where(used, (c - r) * np.log(c / r), 0.0)
    psi = terms.sum(axis=1) - (used.sum(axis=1) - 1) * (1 / n + 1 / m)
    return float(max(psi.mean(), 0.0))


def compare(reference: InputReference, current: InputCounts, alpha: float = ALPHA) -> DriftReport:
    """The drift of the spooled counts per modality, the pattern test and the embedding score."""
    results = []
    for name, bins in reference.modalities.items():
        tested, drifted, cases = drifted_features(bins.reference, current.modalities[name], alpha)
        results.append(ModalityDrift(name, len(bins.features), tested, drifted, cases))
    patterns = sorted(set(reference.patterns) | set(current.patterns))
    expected = np.array([reference.patterns.get(p, 0) for p in patterns])
    seen = np.array([current.patterns.get(p, 0) for p in patterns])
    tested = int(current.cases >= MIN_FEATURE_CASES)
    drifted = int(bool(tested) and homogeneity_p(expected, seen) < alpha)
    results.append(ModalityDrift(PATTERN, 1, tested, drifted, current.cases))
    score = None
    if reference.wsi is not None:
        score = embedding_drift_score(reference.wsi.reference, current.modalities[WSI])
    return DriftReport(results, score, alpha, current.cases)
