"""The Markdown form of a model card (`healnet.model_card`): one section per part of the card's JSON, in its
order, with the parts that were not produced shown as "not evaluated"."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

SHOWN_LEVELS = 8  # subtypes and sites listed by name in the Markdown and the limitations


def named_levels(counts: Mapping[str, int], shown: int = SHOWN_LEVELS) -> str:
    """ "name (n), …" for the first `shown` levels, and how many more there are."""
    names = [f"{name} ({n})" for name, n in list(counts.items())[:shown]]
    more = f" and {len(counts) - shown} more" if len(counts) > shown else ""
    return ", ".join(names) + more if names else "not recorded"


def _number(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _p_value(value: float | None) -> str:
    return "–" if value is None else ("< 0.0001" if value < 1e-4 else f"{value:.4f}")


def _bounds(low: float | None, high: float | None) -> str:
    return "–" if low is None or high is None else f"{_number(low)}–{_number(high)}"


def _shown_interval(interval: Mapping[str, Any] | None) -> str:
    if interval is None:
        return "not evaluated"
    text = _number(interval["estimate"])
    if interval["low"] is not None and interval["high"] is not None:
        resamples = f", {interval['resamples']} resamples" if interval["resamples"] else ""
        text += (
            f" ({interval['confidence']:.0%} CI {_number(interval['low'])}–{_number(interval['high'])}"
            f"{resamples})"
        )
    return text


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + " --- |" * len(header),
        *("| " + " | ".join(str(cell) for cell in row) + " |" for row in rows),
    ]


def render_markdown(card: Mapping[str, Any]) -> str:
    """The card as Markdown: one section per part of the JSON, in its order."""
    model, cohort, validation = card["model"], card["cohort"], card["validation"]
    metrics, calibration, subgroups, gate = (
        card["metrics"],
        card["calibration"],
        card["subgroups"],
        card["gate"],
    )
    title = model["version"] or "rejected candidate"
    lines = [f"# Model card: {title}", ""]
    lines += [
        f"Status: **{model['status']}**. Weights sha256 `{model['weights_sha256']}`, {model['members']} "
        f"member(s), healnet {model['healnet_version']}; card schema {card['schema_version']}.",
        "",
        "## Intended use",
        "",
        card["intended_use"]["purpose"],
        "",
        "Out of scope: " + "; ".join(card["intended_use"]["out_of_scope"]) + ".",
        "",
        "## Cohort",
        "",
        f"{cohort['name'] or 'unnamed'} from `{cohort['source']}`; data hash `{cohort['data_hash']}`.",
        "",
        *_table(
            ["patients", "events", "median follow-up (months)", "female", "male", "sex unknown", "splits"],
            [
                [
                    cohort["patients"],
                    cohort["events"],
                    _number(cohort["median_follow_up_months"], 1),
                    cohort["sex"]["female"],
                    cohort["sex"]["male"],
                    cohort["sex"]["unknown"],
                    ", ".join(f"{role} {n}" for role, n in cohort["splits"].items()) or "–",
                ]
            ],
        ),
        "",
        f"Subtypes: {named_levels(cohort['subtypes'])}. Tissue source sites ({len(cohort['sites'])}): "
        f"{named_levels(cohort['sites'])}.",
        "",
        "## Validation",
        "",
    ]
    if validation is None:
        lines.append("Not evaluated: no validation report was given.")
    else:
        reasons = ", ".join(f"{reason} {n}" for reason, n in validation["quarantine_reasons"].items())
        lines += [
            f"{'Passed' if validation['passed'] else 'Failed'}: {validation['expectations_passed']} of "
            f"{validation['expectations_total']} expectations (thresholds {validation['thresholds_version']}). "
            f"Rows in {validation['rows_in']}, kept {validation['rows_kept']}, quarantined "
            f"{validation['rows_quarantined']}{f' ({reasons})' if reasons else ''}; slides quarantined when "
            f"their features were made: {validation['slides_quarantined'] if validation['slides_quarantined'] is not None else 'not recorded'}.",
            *(f"- note: {note}" for note in validation["notes"]),
        ]
    encoder = card["encoder"]
    recipe = card["recipe"]
    lines += [
        "",
        "## Model",
        "",
        f"Modalities: {', '.join(card['modalities'])}. Recipe: {recipe['name']} ({recipe['members']} member(s))."
        + linear_blend_sentence(recipe),
        "",
        "Slide encoder: "
        + (
            "none (no slide modality)."
            if encoder is None
            else f"{encoder['name']} (weights sha256 {encoder['weights_sha256'] or 'none or unknown'}, "
            f"{encoder['dim']} features, {encoder['input_size']} px input, normalisation "
            f"{encoder['normalisation']}), "
            f"{encoder['patch_size']} px patches at {encoder['target_mpp']} µm/px."
        ),
        "",
        "## Metrics",
        "",
        f"On {metrics['evaluated_on']}: {metrics['test_patients']} patients, {metrics['test_events']} events.",
        "",
        *_table(
            ["metric", "value"],
            [
                ["Harrell's C", _shown_interval(metrics["c_index"])],
                ["Uno's C", _shown_interval(metrics["uno_c"])],
                ["IPCW C", _number(metrics["c_index_ipcw"])],
                ["integrated Brier score", _number(metrics["integrated_brier_score"])],
                ["log-rank p (risk groups)", _p_value(metrics["logrank_p"])],
                *(
                    [f"time-dependent AUC at {months} months", _number(value)]
                    for months, value in (metrics["td_auc"] or {}).items()
                ),
            ],
        ),
        *(
            f"- AUC at {months} months not computed: {why}"
            for months, why in metrics["td_auc_excluded"].items()
        ),
        "",
        "## Calibration",
        "",
    ]
    if calibration is None:
        lines.append("Not evaluated.")
    else:
        d_cal = calibration["d_calibration"]
        lines += [
            f"At {calibration['time_months']:g} months: ICI {_number(calibration['ici'])}, slope "
            f"{_number(calibration['slope'])}"
            + (
                f"; D-calibration ({d_cal['bins']} bins) statistic {_number(d_cal['statistic'])}, p "
                f"{_p_value(d_cal['p_value'])}"
                if d_cal
                else ""
            )
            + ".",
            "",
            *_table(
                ["group", "patients", "predicted survival", "observed (KM)", "observed interval"],
                [
                    [
                        g["group"],
                        g["n"],
                        _number(g["predicted"]),
                        _number(g["observed"]),
                        _bounds(g.get("observed_low"), g.get("observed_high")),
                    ]
                    for g in calibration["groups"]
                ],
            ),
        ]
    lines += ["", "## Subgroups", ""]
    if subgroups is None:
        lines.append("Not evaluated.")
    else:
        lines += [
            f"C-index per subgroup; ⚠: fewer than {subgroups['min_events']} events, too few to read.",
            "",
            *_table(
                ["variable", "level", "patients", "events", "C", "interval", ""],
                [
                    [
                        row["variable"],
                        row["level"],
                        row["n"],
                        row["events"],
                        _number(row["c_index"]),
                        _bounds(row["low"], row["high"]),
                        "⚠" if row["flagged"] else "",
                    ]
                    for row in subgroups["rows"]
                ],
            ),
        ]
    provenance = card["provenance"]
    lines += [
        "",
        "## Gate",
        "",
        f"Decision: **{gate['decision']}** (gate v{gate['version']}, "
        f"{'checks passed' if gate['passed'] else 'checks failed'}; champion judged against: "
        f"{gate['champion'] or 'none'}).",
        "",
        f"Decided by the rule: {gate['rule']}",
        "",
        *_taken_again(gate),
        *(f"- {reason}" for reason in gate["reasons"]),
        "",
        "## Provenance",
        "",
        f"git {provenance['git_sha']}; pipeline run {provenance['pipeline_run_name'] or '–'} "
        f"(id {provenance['pipeline_run_id'] or '–'}); card written {provenance['card_written']}.",
        "",
        "## Limitations",
        "",
        *(f"- {limitation}" for limitation in card["limitations"]),
    ]
    return "\n".join(lines) + "\n"


def _taken_again(gate: Mapping[str, Any]) -> list[str]:
    """The lines saying that the decision above is the gate's taken again at promotion, and why."""
    again = gate["taken_again"]
    if not again:
        return []
    return [
        f"Taken again at promotion, because the champion changed from {again['first_champion'] or 'none'} "
        f"to {gate['champion'] or 'none'} after the first gate (which had decided by the rule: "
        f"{again['first_rule']}).",
        "",
    ]


def linear_blend_sentence(recipe: dict) -> str:
    """How much each prediction leans on the linear path's own survival curve, and how that was chosen."""
    weight, choice = recipe.get("linear_blend"), recipe.get("linear_blend_choice")
    if choice:
        scores = ", ".join(
            f"{float(w):g}: {c:.3f}" if c is not None else f"{float(w):g}: –"
            for w, c in choice["c_index"].items()
        )
        return (
            f" Each prediction blends in the linear path's own survival curve with weight {choice['chosen']:g},"
            f" chosen on the members' early-stopping patients (Harrell's C by weight: {scores})."
        )
    if weight:
        return f" Each prediction blends in the linear path's own survival curve with weight {weight:g}."
    return ""
