"""Harrell's C by subgroup of the test patients: sex, age band, subtype, stage and grade where the cohort
has them, tissue-source site, and which modalities the model received for each patient. Every level is
listed with its patients, deaths and C with the patient-bootstrap interval; a level with fewer than
`SUBGROUP_MIN_EVENTS` deaths is flagged, since its C rests on too few deaths to read.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from healnet.survival_metrics import DEFAULT_BOOTSTRAP, Bootstrap, harrell_c_or_nan, harrell_c_weighted

SUBGROUP_MIN_EVENTS = 10
MAX_LEVELS = 8  # at most this many levels of a variable are listed on their own ...
MIN_LEVEL_PATIENTS = 5  # ... each with at least this many patients; the rest are pooled as "other"
AGE_BANDS = (50, 60, 70, 80)  # years: <50, 50–59, 60–69, 70–79, ≥80
# clinical column -> the table's variable name (present in the cohort's clinical table or not)
CATEGORICAL = {"oncotree_code": "subtype", "stage": "stage", "grade": "grade", "site": "tissue-source site"}
MISSING = "missing"


def age_band(age: float) -> str:
    if pd.isna(age):
        return MISSING
    lower = [band for band in AGE_BANDS if band <= age]
    if not lower:
        return f"<{AGE_BANDS[0]}"
    if lower[-1] == AGE_BANDS[-1]:
        return f"≥{AGE_BANDS[-1]}"
    return f"{lower[-1]}–{AGE_BANDS[AGE_BANDS.index(lower[-1]) + 1] - 1}"


def subgroup_levels(clinical: pd.DataFrame, modalities_used: Sequence[Sequence[str]]) -> dict[str, pd.Series]:
    """Each subgroup variable the patients' clinical rows (index: patient id, in the evaluated order) have,
    as one text level per patient."""
    variables: dict[str, pd.Series] = {}
    if "is_female" in clinical:
        sex = clinical["is_female"].map({1: "female", 0: "male"})
        variables["sex"] = sex.astype(object).where(sex.notna(), MISSING)
    if "age" in clinical:
        variables["age band"] = clinical["age"].map(age_band)
    for column, name in CATEGORICAL.items():
        if column in clinical and clinical[column].notna().any():
            values = clinical[column].astype(object)
            variables[name] = values.where(values.notna(), MISSING).astype(str)
    variables["modalities received"] = pd.Series(
        ["+".join(used) or "none" for used in modalities_used], index=clinical.index
    )
    return {name: _pool_rare(levels) for name, levels in variables.items()}


def _pool_rare(levels: pd.Series) -> pd.Series:
    """Each level with at least `MIN_LEVEL_PATIENTS` patients, up to the `MAX_LEVELS` − 1 most frequent;
    the others pooled as "other (k levels)" (a single leftover level keeps its name)."""
    counts = levels.value_counts()
    kept = [level for level, count in counts.items() if count >= MIN_LEVEL_PATIENTS][: MAX_LEVELS - 1]
    pooled = len(counts) - len(kept)
    if pooled <= 1:
        return levels
    return levels.where(levels.isin(kept), f"other ({pooled} levels)")


def _level_order(variable: str, level: str, count: int) -> tuple:
    """Age bands in age order, other levels by falling patient count; "other" and "missing" last."""
    last = level.startswith("other (") or level == MISSING
    if variable == "age band" and not last:
        lower = float(level.lstrip("<≥").split("–")[0])
        return (0, 0, lower - 1 if level.startswith("<") else lower, level)
    return (int(last), -count, 0.0, level)


def subgroup_table(
    times: np.ndarray,
    events: np.ndarray,
    risk: np.ndarray,
    variables: dict[str, pd.Series],
    min_events: int = SUBGROUP_MIN_EVENTS,
    bootstrap: Bootstrap = DEFAULT_BOOTSTRAP,
) -> list[dict[str, object]]:
    """One row per level of each variable: n, deaths, Harrell's C and its bootstrap interval (None where
    undefined: no death, or no comparable pair), and `flagged` when it has fewer than `min_events` deaths."""
    times, events, risk = (np.asarray(a) for a in (times, events, risk))
    rows: list[dict[str, object]] = []
    for variable, levels in variables.items():
        values = levels.to_numpy()
        counts = levels.value_counts()
        for level in sorted(
            counts.index, key=lambda value: _level_order(variable, str(value), counts[value])
        ):
            chosen = values == level
            rows.append(
                _row(variable, str(level), times[chosen], events[chosen], risk[chosen], min_events, bootstrap)
            )
    return rows


def _row(variable, level, times, events, risk, min_events, bootstrap) -> dict[str, object]:
    deaths = int(events.sum())
    c_index = harrell_c_or_nan(times, events, risk) if deaths and np.unique(times).size > 1 else float("nan")
    low = high = float("nan")
    if np.isfinite(c_index):
        resampled = harrell_c_weighted(times, events, risk, bootstrap.counts(times.size))
        low, high = bootstrap.interval(resampled)
    return {
        "variable": variable,
        "level": level,
        "n": int(times.size),
        "events": deaths,
        "c_index": _finite_or_none(c_index),
        "low": _finite_or_none(low),
        "high": _finite_or_none(high),
        "flagged": deaths < min_events,
    }


def _finite_or_none(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None
