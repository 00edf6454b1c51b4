"""Evaluation of a trained checkpoint on a cohort split: metrics table and Kaplan-Meier plot."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from healnet.experiment import CohortData, load_trained


def risk_groups(risk: np.ndarray, threshold: float) -> np.ndarray:
    """`True` for the high-risk group: risk above the threshold (the training median)."""
    return np.asarray(risk) > threshold


def plot_kaplan_meier(
    times: np.ndarray, events: np.ndarray, high_risk: np.ndarray, path: Path, title: str
) -> float:
    """Kaplan-Meier curves of the predicted low/high risk groups; returns the log-rank p-value."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sksurv.compare import compare_survival
    from sksurv.nonparametric import kaplan_meier_estimator
    from sksurv.util import Surv

    fig, ax = plt.subplots(figsize=(6, 4.2), dpi=120)
    for flag, label, colour in ((False, "low risk", "tab:blue"), (True, "high risk", "tab:red")):
        selected = high_risk == flag
        if selected.sum() == 0:
            continue
        t, s, (lo, hi) = kaplan_meier_estimator(
            events[selected].astype(bool), times[selected], conf_type="log-log"
        )
        ax.step(t, s, where="post", color=colour, label=f"{label} (n={selected.sum()})")
        ax.fill_between(t, lo, hi, step="post", alpha=0.15, color=colour)
    p_value = float("nan")
    if 0 < high_risk.sum() < len(high_risk):
        _, p_value = compare_survival(Surv.from_arrays(events.astype(bool), times), high_risk.astype(int))
    ax.set(
        xlabel="months",
        ylabel="survival probability",
        ylim=(0, 1.02),
        title=f"{title}\nlog-rank p = {p_value:.3g}",
    )
    ax.legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return float(p_value)


def evaluate_checkpoint(
    checkpoint_dir: Path,
    cohort_dir: Path,
    out_dir: Path,
    features_dir: Path | None = None,
    role: str = "test",
    split_repeat: int = 0,
) -> dict:
    """Metrics on one split role of the cohort, a Kaplan-Meier PNG and `evaluation.json` in `out_dir`."""
    from healnet.data.cohort import Cohort

    cohort = Cohort.load(cohort_dir)
    trained = load_trained(checkpoint_dir)
    if features_dir is None and "wsi" in trained.modalities:
        features_dir = Path(cohort_dir) / "features"
    data = CohortData.from_cohort(cohort, features_dir if "wsi" in trained.modalities else None)
    train_ids = cohort.patients("holdout", split_repeat, 0, "train")
    ids = cohort.patients("holdout", split_repeat, 0, role)
    metrics = trained.evaluate(data, ids, train_ids)
    risk = trained.risk(data, ids)
    train_risk = trained.risk(data, train_ids)
    clinical = data.clinical.loc[ids]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_path = out_dir / f"kaplan_meier_{role}.png"
    p_value = plot_kaplan_meier(
        clinical["survival_months"].to_numpy(),
        clinical["event"].to_numpy(),
        risk_groups(risk, float(np.median(train_risk))),
        plot_path,
        f"HEALNet risk groups, {role} split ({'+'.join(trained.modalities)})",
    )
    result = {
        "role": role,
        "patients": len(ids),
        "events": int(clinical["event"].sum()),
        **metrics,
        "logrank_p": p_value,
        "kaplan_meier_png": str(plot_path),
    }
    (out_dir / "evaluation.json").write_text(json.dumps(result, indent=2))
    return result


def format_table(rows: dict[str, float | int | str]) -> str:
    width = max(len(key) for key in rows)
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  -----"]
    for key, value in rows.items():
        shown = f"{value:.4f}" if isinstance(value, float) else str(value)
        lines.append(f"{key:<{width}}  {shown}")
    return "\n".join(lines)
