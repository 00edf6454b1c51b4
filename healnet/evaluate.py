"""Evaluation of a trained checkpoint on a cohort split, through the serving path: Harrell's and Uno's C
with patient-bootstrap intervals, the time-dependent AUC, the Brier curve, calibration, the subgroup table,
each patient's risk, and the report (`evaluation.json`, `evaluation.html` with the plots). docs/evaluation.md
says what each number is."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from healnet.survival import SurvivalBins
from healnet.survival_metrics import DEFAULT_BOOTSTRAP, Bootstrap

TD_AUC_MONTHS = (12, 24, 36, 60)  # 1, 2, 3 and 5 years
REPORT_TITLE = "HEALNet evaluation: {role} patients"


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
    bootstrap: Bootstrap = DEFAULT_BOOTSTRAP,
) -> dict:
    """Metrics of the checkpoint on one split role of the cohort, scored through the serving path: the
    sealed checkpoint folder loaded by `Predictor`, each patient sent as the `Case` a client would send
    (`healnet.scoring`). Harrell's C with its patient-bootstrap interval (`bootstrap`), the number of events,
    Uno's C, the integrated Brier score and the log-rank p of the risk groups (split at the median risk of
    the training patients), and the survival report of `survival_report`.

    Writes to `out_dir` the plots, `predictions_<role>.parquet` (each patient's outcome and risk: what the
    promotion gate re-samples), `evaluation.json` (the returned dict) and `evaluation.html`.
    """
    from healnet.data.cohort import Cohort
    from healnet.evaluation_report import render_html
    from healnet.inference import Predictor
    from healnet.preprocess.state import WSI
    from healnet.scoring import CohortPatients, survival_matrix
    from healnet.subgroups import subgroup_levels
    from healnet.survival_metrics import harrell_c_interval, survival_metrics

    cohort = Cohort.load(cohort_dir)
    predictor = Predictor.from_dir(checkpoint_dir)
    if WSI not in predictor.modalities:
        features_dir = None
    elif features_dir is None:
        features_dir = Path(cohort_dir) / "features"
    ids = cohort.patients("holdout", split_repeat, 0, role)
    train_ids = cohort.patients("holdout", split_repeat, 0, "train")
    patients = CohortPatients.load(cohort, ids, features_dir)
    training = CohortPatients.load(cohort, train_ids, features_dir)
    predictions = patients.predict(predictor)
    survival = survival_matrix(predictions)
    scored = patients.scored(survival)
    train_risk = training.score(predictor).risk
    bins = predictor.checkpoint.bins
    metrics = survival_metrics(training.times, training.events, scored.times, scored.events, survival, bins)
    low, high = harrell_c_interval(scored.times, scored.events, scored.risk, bootstrap)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_path = out_dir / f"kaplan_meier_{role}.png"
    p_value = plot_kaplan_meier(
        scored.times,
        scored.events,
        risk_groups(scored.risk, float(np.median(train_risk))),
        plot_path,
        f"HEALNet risk groups, {role} split ({'+'.join(predictor.modalities)})",
    )
    variables = subgroup_levels(
        cohort.clinical.loc[ids], [prediction.modalities_used for prediction in predictions]
    )
    report = survival_report(
        (training.times, training.events),
        (scored.times, scored.events),
        survival,
        bins,
        variables,
        bootstrap,
    )
    result = {
        "role": role,
        "modalities": predictor.modalities,
        "patients": len(ids),
        "events": scored.event_count,
        "c_index": metrics["c_index"],
        "c_index_ci_low": low,
        "c_index_ci_high": high,
        "c_index_ipcw": metrics["c_index_ipcw"],
        "integrated_brier_score": metrics["integrated_brier_score"],
        "logrank_p": p_value,
        "bootstrap_resamples": bootstrap.resamples,
        "bootstrap_seed": bootstrap.seed,
        "confidence": bootstrap.confidence,
        **report,
        "kaplan_meier_png": str(plot_path),
        **report_plots(report, out_dir, role),
        "predictions_parquet": str(scored.to_parquet(out_dir / f"predictions_{role}.parquet")),
        "evaluation_html": str(out_dir / "evaluation.html"),
    }
    (out_dir / "evaluation.json").write_text(json.dumps(result, indent=2))
    (out_dir / "evaluation.html").write_text(render_html(result, REPORT_TITLE.format(role=role)))
    return result


def survival_report(
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    survival: np.ndarray,
    bins: SurvivalBins,
    variables: dict,
    bootstrap: Bootstrap = DEFAULT_BOOTSTRAP,
) -> dict:
    """The survival report of per-bin predictions (n_test, n_bins) on test patients (times, events), with
    the training patients' outcomes for the censoring weights and the calibration time: the evaluation.json
    keys c_index_ci, uno_c_ci, td_auc (+ td_auc_excluded), brier_curve, calibration, subgroups (by the
    `variables` of `healnet.subgroups.subgroup_levels`) and survival_interpolation."""
    from healnet.calibration import (
        CALIBRATION_RULE,
        calibration_groups,
        calibration_summary,
        calibration_time,
        d_calibration,
    )
    from healnet.subgroups import SUBGROUP_MIN_EVENTS, subgroup_table
    from healnet.survival_interpolation import interpolated_survival, interpolation_note, survival_at_own_time
    from healnet.survival_metrics import brier_curve, concordance_intervals, time_dependent_auc

    (train_times, train_events), (times, events) = train, test
    risk = -np.asarray(survival).sum(axis=1)
    intervals = concordance_intervals(train_times, train_events, times, events, risk, bootstrap)
    auc_times = [float(months) for months in TD_AUC_MONTHS]
    td_auc, excluded = time_dependent_auc(
        train_times, train_events, times, events, interpolated_survival(survival, bins, auc_times), auc_times
    )
    time = calibration_time(train_times, train_events, times)
    at_time = interpolated_survival(survival, bins, [time])[:, 0]
    calibration = {
        "time": time,
        "groups": calibration_groups(times, events, at_time, time),
        **calibration_summary(times, events, at_time, time),
        "d_calibration": d_calibration(events, survival_at_own_time(survival, bins, times)),
    }
    return {
        "c_index_ci": intervals["c_index_ci"].to_dict(),
        "uno_c_ci": intervals["uno_c_ci"].to_dict(),
        "td_auc": td_auc,
        "td_auc_excluded": excluded,
        "brier_curve": brier_curve(
            train_times, train_events, times, events, lambda grid: interpolated_survival(survival, bins, grid)
        ),
        "calibration": calibration,
        "calibration_time_rule": CALIBRATION_RULE,
        "subgroups": subgroup_table(times, events, risk, variables, SUBGROUP_MIN_EVENTS, bootstrap),
        "subgroup_min_events": SUBGROUP_MIN_EVENTS,
        "survival_interpolation": interpolation_note(bins),
    }


def report_plots(report: dict, out_dir: Path, role: str) -> dict[str, str]:
    """The report's calibration, Brier and td-AUC PNGs in `out_dir`; evaluation.json keys to their paths."""
    from healnet.evaluation_plots import plot_brier_curve, plot_calibration, plot_td_auc

    return {
        "calibration_png": str(
            plot_calibration(report["calibration"], out_dir / f"calibration_{role}.png", "Calibration")
        ),
        "brier_png": str(
            plot_brier_curve(report["brier_curve"], out_dir / f"brier_{role}.png", "Brier score over time")
        ),
        "td_auc_png": str(
            plot_td_auc(
                report["td_auc"],
                report["td_auc_excluded"],
                out_dir / f"td_auc_{role}.png",
                "Time-dependent AUC",
            )
        ),
    }


def c_index_summary(c_index: float, low: float, high: float, confidence: float) -> str:
    """The point estimate with its bootstrap interval: "c_index 0.6200 (95 % CI 0.5500–0.7000)"."""
    return f"c_index {c_index:.4f} ({confidence * 100:g} % CI {low:.4f}–{high:.4f})"


def format_table(rows: dict[str, float | int | str]) -> str:
    width = max(len(key) for key in rows)
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  -----"]
    for key, value in rows.items():
        shown = f"{value:.4f}" if isinstance(value, float) else str(value)
        lines.append(f"{key:<{width}}  {shown}")
    return "\n".join(lines)
