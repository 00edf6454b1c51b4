"""The evaluation report of `healnet.evaluate` as one self-contained HTML page (jinja2, autoescaped; the
plots embedded as base64 PNG) and as text for `healnet evaluate`. It only shows `evaluation.json`."""

from __future__ import annotations

import base64
from pathlib import Path

# the report's plots: evaluation.json key of the PNG, the <img> id, its alt text and heading
PLOTS = (
    ("kaplan_meier_png", "kaplan-meier", "Kaplan-Meier curves of the predicted risk groups"),
    ("calibration_png", "calibration", "Calibration: predicted against Kaplan-Meier observed survival"),
    ("brier_png", "brier-curve", "Brier score over time"),
    ("td_auc_png", "td-auc", "Time-dependent AUC"),
)
SUMMARY_KEYS = (
    "role",
    "modalities",
    "patients",
    "events",
    "c_index",
    "c_index_ci_low",
    "c_index_ci_high",
    "c_index_ipcw",
    "integrated_brier_score",
    "logrank_p",
    "bootstrap_resamples",
    "bootstrap_seed",
)

TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{{ title }}</title>
<style>body{font-family:sans-serif;margin:2em;max-width:70em}table{border-collapse:collapse;margin-bottom:1em}
th,td{border:1px solid #ccc;padding:4px 10px;text-align:left}tr.flagged td{background:#fff3cd;color:#6b5200}
.note{color:#555}img{display:block;margin:0.5em 0 1.5em}</style></head>
<body><h1>{{ title }}</h1>
<p class="note" id="interpolation">{{ e.survival_interpolation }}</p>
<h2>Discrimination</h2>
<table id="concordance"><tr><th>metric</th><th>estimate</th><th>{{ percent }} % interval</th></tr>
{% for name, ci in intervals %}<tr><th>{{ name }}</th><td>{{ "%.4f"|format(ci.estimate) }}</td>
<td>{{ "%.4f"|format(ci.low) }}–{{ "%.4f"|format(ci.high) }}</td></tr>
{% endfor %}</table>
<p class="note">Patient bootstrap: {{ e.c_index_ci.resamples }} resamples of the {{ e.patients }} test patients
({{ e.events }} deaths), percentile intervals; Uno's C uses the training censoring distribution.</p>
<h3>Time-dependent AUC</h3>
<table id="td-auc-table"><tr><th>months</th><th>AUC</th><th>note</th></tr>
{% for time, value in e.td_auc.items() %}<tr><th>{{ time }}</th>
<td>{{ "%.4f"|format(value) if value is not none else "–" }}</td>
<td>{{ e.td_auc_excluded.get(time, "") }}</td></tr>
{% endfor %}</table>
<h2>Summary</h2>
<table id="summary">{% for key, value in summary %}<tr><th>{{ key }}</th><td>{{ value }}</td></tr>
{% endfor %}</table>
<p class="note">integrated_brier_score reads the survival as a step function between bin edges, as training and
cross-validation do, so that it compares with them; the Brier curve below integrates the interpolated survival
to {{ "%.4f"|format(e.brier_curve.integrated_brier_score) }}.</p>
<h2>Calibration at {{ "%.1f"|format(e.calibration.time) }} months</h2>
<p>{{ e.calibration_time_rule }}</p>
<table id="calibration-table"><tr><th>risk group (1: highest risk)</th><th>n</th><th>predicted survival</th>
<th>observed (Kaplan-Meier)</th><th>95 % interval</th></tr>
{% for g in e.calibration.groups %}<tr><th>{{ g.group }}</th><td>{{ g.n }}</td><td>{{ "%.3f"|format(g.predicted) }}</td>
<td>{{ "%.3f"|format(g.observed) }}</td><td>{{ "%.3f"|format(g.observed_low) }}–{{ "%.3f"|format(g.observed_high) }}</td></tr>
{% endfor %}</table>
<p>Integrated calibration index {{ "%.4f"|format(e.calibration.ici) }}; calibration slope
{{ "%.3f"|format(e.calibration.slope) if e.calibration.slope is not none else "not estimable" }};
D-calibration ({{ e.calibration.d_calibration.bins }} bins) chi-square
{{ "%.2f"|format(e.calibration.d_calibration.statistic) }}, p = {{ "%.3g"|format(e.calibration.d_calibration.p_value) }}.</p>
<h2>Subgroups</h2>
<p class="note">Harrell's C with its {{ percent }} % bootstrap interval per subgroup of the test patients. Rows marked ⚑
have fewer than {{ e.subgroup_min_events }} deaths: their C rests on too few deaths to read.</p>
<table id="subgroups"><tr><th>variable</th><th>level</th><th>n</th><th>deaths</th><th>C</th><th>interval</th><th></th></tr>
{% for row in e.subgroups %}<tr{% if row.flagged %} class="flagged"{% endif %}><td>{{ row.variable }}</td>
<td>{{ row.level }}</td><td>{{ row.n }}</td><td>{{ row.events }}</td>
<td>{{ "%.3f"|format(row.c_index) if row.c_index is not none else "–" }}</td>
<td>{{ ("%.3f–%.3f"|format(row.low, row.high)) if row.low is not none else "–" }}</td>
<td>{{ "⚑ few deaths" if row.flagged else "" }}</td></tr>
{% endfor %}</table>
<h2>Plots</h2>
{% for id, heading, uri in images %}<h3>{{ heading }}</h3>
<img id="{{ id }}" alt="{{ heading }}" src="{{ uri }}">
{% endfor %}
</body></html>
"""


def render_html(evaluation: dict, title: str, extra: dict[str, str] | None = None) -> str:
    """The report page of an `evaluation.json` dict, its PNGs read from the paths it names; `extra` rows
    (e.g. the pipeline's data hash) join the summary table."""
    from jinja2 import Environment

    images = [
        (image_id, heading, _data_uri(Path(evaluation[key])))
        for key, image_id, heading in PLOTS
        if evaluation.get(key)
    ]
    summary = [(key, _shown(evaluation[key])) for key in SUMMARY_KEYS if key in evaluation]
    summary += [(key, value) for key, value in (extra or {}).items()]
    intervals = [("Harrell's C", evaluation["c_index_ci"]), ("Uno's C", evaluation["uno_c_ci"])]
    template = Environment(autoescape=True).from_string(TEMPLATE)
    return template.render(
        title=title,
        e=evaluation,
        intervals=intervals,
        percent=f"{evaluation['c_index_ci']['confidence'] * 100:g}",
        summary=summary,
        images=images,
    )


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _shown(value: object) -> str:
    if isinstance(value, list):
        return "+".join(str(item) for item in value)
    if isinstance(value, float):
        return f"{value:.4f}" if value == 0 or abs(value) >= 1e-3 else f"{value:.3g}"
    return str(value)


def format_text(evaluation: dict) -> str:
    """What `healnet evaluate` prints: the intervals, the td-AUC with the times outside the follow-up, the
    calibration summary and the subgroup table (flagged rows marked)."""
    lines = [f"{evaluation['role']} patients: {evaluation['patients']}, deaths: {evaluation['events']}"]
    for label, key in (("Harrell's C", "c_index_ci"), ("Uno's C", "uno_c_ci")):
        ci = evaluation[key]
        lines.append(
            f"{label:<12} {ci['estimate']:.4f} ({ci['confidence'] * 100:g} % CI {ci['low']:.4f}–{ci['high']:.4f},"
            f" {ci['resamples']} bootstrap resamples)"
        )
    brier = evaluation["brier_curve"]
    lines.append(f"{'IBS':<12} {brier['integrated_brier_score']:.4f} (interpolated survival)")
    lines.append("time-dependent AUC:")
    for time, value in evaluation["td_auc"].items():
        shown = f"{value:.4f}" if value is not None else f"– ({evaluation['td_auc_excluded'][time]})"
        lines.append(f"  {time:>4} months  {shown}")
    calibration = evaluation["calibration"]
    slope = calibration["slope"]
    d_cal = calibration["d_calibration"]
    lines.append(
        f"calibration at {calibration['time']:.1f} months: ICI {calibration['ici']:.4f}, slope "
        f"{'n/a' if slope is None else f'{slope:.3f}'}, D-calibration chi2 {d_cal['statistic']:.2f} "
        f"(p {d_cal['p_value']:.3g}, {d_cal['bins']} bins)"
    )
    for group in calibration["groups"]:
        lines.append(
            f"  group {group['group']} (n={group['n']}): predicted {group['predicted']:.3f}, observed "
            f"{group['observed']:.3f} ({group['observed_low']:.3f}–{group['observed_high']:.3f})"
        )
    lines.append(f"subgroups (! = fewer than {evaluation['subgroup_min_events']} deaths):")
    width = max((len(row["variable"]) + len(row["level"]) for row in evaluation["subgroups"]), default=10) + 3
    for row in evaluation["subgroups"]:
        name = f"{row['variable']}: {row['level']}"
        c_index = "–" if row["c_index"] is None else f"{row['c_index']:.3f}"
        interval = "" if row["low"] is None else f" ({row['low']:.3f}–{row['high']:.3f})"
        mark = "!" if row["flagged"] else " "
        lines.append(
            f" {mark}{name:<{width}} n={row['n']:<4} deaths={row['events']:<4} C {c_index}{interval}"
        )
    lines.append(evaluation["survival_interpolation"])
    return "\n".join(lines)
