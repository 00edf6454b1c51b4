"""The evaluation report's figures as PNG files (matplotlib, Agg): the calibration plot, the Brier score
over time and the time-dependent AUC. The Kaplan-Meier plot of the risk groups is `healnet.evaluate`'s."""

from __future__ import annotations

from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_calibration(calibration: dict, path: Path, title: str) -> Path:
    """Predicted survival at the calibration time against Kaplan-Meier observed survival, one point per
    risk group with its 95 % interval, and the diagonal of perfect calibration."""
    plt = _pyplot()
    groups = calibration["groups"]
    predicted = [group["predicted"] for group in groups]
    observed = [group["observed"] for group in groups]
    below = [group["observed"] - group["observed_low"] for group in groups]
    above = [group["observed_high"] - group["observed"] for group in groups]
    fig, ax = plt.subplots(figsize=(5, 5), dpi=120)
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", label="perfect calibration")
    ax.errorbar(
        predicted, observed, yerr=[below, above], fmt="o-", color="tab:purple", capsize=4, label="risk group"
    )
    for group, x, y in zip(groups, predicted, observed, strict=True):
        ax.annotate(f"{group['group']} (n={group['n']})", (x, y), textcoords="offset points", xytext=(6, -12))
    slope = calibration["slope"]
    shown_slope = "n/a" if slope is None else f"{slope:.2f}"
    ax.set(
        xlim=(0, 1.02),
        ylim=(0, 1.02),
        xlabel=f"predicted survival at {calibration['time']:.1f} months",
        ylabel="observed survival (Kaplan-Meier)",
        title=f"{title}\nICI {calibration['ici']:.3f}, slope {shown_slope}, "
        f"D-calibration p {calibration['d_calibration']['p_value']:.3g}",
    )
    ax.legend(loc="upper left")
    return _save(fig, path)


def plot_brier_curve(brier: dict, path: Path, title: str) -> Path:
    """The IPCW Brier score at each time of the grid, with the integrated Brier score in the title."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ax.plot(brier["times"], brier["brier"], color="tab:green", linewidth=2, label="model")
    ax.axhline(0.25, color="grey", linestyle=":", label="0.25: a constant 50 % prediction")
    ax.set(
        xlabel="months",
        ylabel="Brier score",
        ylim=(0, max(0.3, max(brier["brier"]) * 1.1)),
        title=f"{title}\nintegrated Brier score {brier['integrated_brier_score']:.3f}",
    )
    ax.legend(loc="upper left")
    return _save(fig, path)


def plot_td_auc(td_auc: dict, excluded: dict, path: Path, title: str) -> Path:
    """The cumulative/dynamic AUC at each time inside the follow-up; the times outside it are named."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    shown = {float(time): value for time, value in td_auc.items() if value is not None}
    ax.axhline(0.5, color="grey", linestyle=":", label="0.5: chance")
    if shown:
        ax.plot(list(shown), list(shown.values()), "o-", color="tab:orange", markersize=8, label="AUC(t)")
        for time, value in shown.items():
            ax.annotate(f"{value:.2f}", (time, value), textcoords="offset points", xytext=(0, 8), ha="center")
    note = "; ".join(f"{time} months: {reason}" for time, reason in excluded.items())
    ax.set(
        xlabel="months",
        ylabel="time-dependent AUC",
        ylim=(0, 1.05),
        xticks=[float(time) for time in td_auc],
        title=title if not note else f"{title}\nnot estimated: {note}",
    )
    ax.title.set_fontsize(9 if note else 11)
    ax.legend(loc="lower left")
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
