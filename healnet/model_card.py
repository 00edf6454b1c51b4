"""Model cards: what a registered version (or a rejected candidate) is for, what it was trained and judged on,
how well it did and where it must not be trusted, as JSON checked against a schema kept with the package
(`healnet/schemas/model_card.schema.json`) and as Markdown.

`build_card` gathers the card from what the pipeline already wrote: the checkpoint (modalities, recipe,
encoder provenance), the cohort (its composition and data hash), the validation report (quarantine counts),
evaluate's evaluation.json (metrics with intervals, calibration, subgroups) and the gate's gate.json (the
decision and the rule). A part that was not produced is null in the JSON and "not evaluated" in the Markdown;
the limitations are computed from the cohort and the numbers, never written by hand.

Promotion stores the card in the registered version's folder (`healnet.registry`: `healnet registry card
TAG`, and the service's `GET /model_card`); the reject step writes the rejected candidate's card into its run.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from contextlib import suppress
from datetime import UTC, datetime
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING, Any

from healnet.errors import HEALNetError
from healnet.model_card_markdown import named_levels, render_markdown
from healnet.registry import CARD_JSON, CARD_MARKDOWN, MODEL_NAME

if TYPE_CHECKING:
    from healnet.data.cohort import Cohort

SCHEMA_VERSION = "1.1.0"
SCHEMA_FILE = "model_card.schema.json"
REGISTERED, REJECTED = "registered", "rejected candidate"
PURPOSE = (
    "Research on multimodal survival prediction (omics, clinical covariates, whole-slide images): "
    "comparing modalities and models, and studying what the model attends to. Not a medical device: not for "
    "diagnosis, prognosis or treatment decisions about any patient."
)
OUT_OF_SCOPE = (
    "clinical decisions about an individual patient",
    "patients, institutions, scanners or stainings unlike the training cohort",
    "cancer types the cohort does not hold",
)
FEW_TEST_EVENTS = 20  # below this, an interval of C is wide (the gate's default min_test_events)
WIDE_INTERVAL = 0.2


class ModelCardError(HEALNetError, ValueError):
    """A model card that does not match its schema; the message names the field."""


def schema() -> dict:
    """The card's JSON Schema (draft 2020-12), shipped as package data."""
    return json.loads(files("healnet").joinpath("schemas", SCHEMA_FILE).read_text(encoding="utf-8"))


def validate_card(card: Mapping[str, Any]) -> None:
    """Raise ModelCardError naming the first field (by its path) that breaks the schema."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(schema(), format_checker=jsonschema.FormatChecker())
    errors = sorted(validator.iter_errors(card), key=lambda error: list(error.absolute_path))
    if errors:
        where = "/".join(str(part) for part in errors[0].absolute_path) or "(the card)"
        raise ModelCardError(
            f"the model card does not match its schema at {where}: {errors[0].message}"
            + (f" (and {len(errors) - 1} more)" if len(errors) > 1 else "")
        )


def _finite(value: Any) -> float | None:
    """A JSON number: None for a missing, non-numeric or non-finite value."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _whole(value: Any) -> int | None:
    number = _finite(value)
    return None if number is None else int(number)


def _counts(values: Sequence[Any]) -> dict[str, int]:
    """Counts of each value, largest first (missing values as "unknown")."""
    counted: dict[str, int] = {}
    for value in values:
        missing = value is None or (isinstance(value, float) and math.isnan(value)) or str(value) == ""
        key = "unknown" if missing else str(value)
        counted[key] = counted.get(key, 0) + 1
    return dict(sorted(counted.items(), key=lambda item: (-item[1], item[0])))


def cohort_composition(cohort: Cohort, data_hash: str, split_repeat: int = 0) -> dict:
    """Who the cohort holds: patients, events, follow-up, sex, subtypes (oncotree_code), tissue source sites
    (the `site` column, else the barcode's), whether every patient is a TCGA case, and the holdout split."""
    from healnet.data.barcodes import patient_prefix

    clinical = cohort.clinical
    ids = [str(pid) for pid in clinical.index]
    sex = clinical.get("is_female")
    female = int((sex == 1).sum()) if sex is not None else 0
    male = int((sex == 0).sum()) if sex is not None else 0
    if "site" in clinical:
        sites = list(clinical["site"])
    else:
        sites = [pid.split("-")[1] if patient_prefix(pid) else None for pid in ids]
    splits = {}
    with suppress(ValueError):  # a cohort without that holdout repeat
        for role in ("train", "val", "test"):
            splits[role] = len(cohort.patients("holdout", split_repeat, 0, role))
    follow_up = clinical["survival_months"].median() if len(clinical) else None
    return {
        "name": cohort.meta.get("name"),
        "source": None if cohort.meta.get("source") is None else str(cohort.meta.get("source")),
        "data_hash": data_hash,
        "patients": len(clinical),
        "events": int(clinical["event"].sum()),
        "median_follow_up_months": _finite(follow_up),
        "sex": {"female": female, "male": male, "unknown": len(clinical) - female - male},
        "subtypes": _counts(list(clinical["oncotree_code"])) if "oncotree_code" in clinical else {},
        "sites": _counts(sites),
        "tcga_only": bool(ids) and all(patient_prefix(pid) == pid for pid in ids),
        "splits": splits,
    }


def validation_summary(report: Mapping[str, Any] | None, slides_quarantined: int | None) -> dict | None:
    """The card's part of a validation report (`ValidationReport.to_dict()`, validation.json): the outcome,
    the expectations passed, the row accounting with the quarantine reasons; and the slides quarantined when
    their features were made (which training went without)."""
    if report is None:
        return None
    expectations = [e for suite in report.get("suites", {}).values() for e in suite.get("expectations", [])]
    thresholds = report.get("thresholds") or {}
    return {
        "passed": bool(report.get("success")),
        "thresholds_version": thresholds.get("version"),
        "expectations_passed": sum(bool(e.get("success")) for e in expectations),
        "expectations_total": len(expectations),
        "rows_in": _whole(report.get("rows_in")),
        "rows_kept": _whole(report.get("rows_kept")),
        "rows_quarantined": _whole(report.get("rows_quarantined")),
        "quarantine_reasons": {str(k): int(v) for k, v in (report.get("quarantine_reasons") or {}).items()},
        "slides_quarantined": _whole(slides_quarantined),  # KFP metadata hands counts on as floats
        "notes": [str(note) for note in report.get("notes", [])],
    }


def checkpoint_facts(checkpoint_dir: Path) -> dict:
    """The card's parts from a sealed checkpoint: weights sha256, members, modalities, recipe and the patch
    encoder with its grid (None without slides)."""
    from healnet.checkpoint import load_checkpoint, read_manifest

    manifest = read_manifest(checkpoint_dir)
    checkpoint = load_checkpoint(checkpoint_dir)
    metadata = checkpoint.metadata
    provenance = checkpoint.preprocessor.wsi_encoder
    tiling = checkpoint.preprocessor.tiling
    encoder = None
    if provenance is not None:
        encoder = {
            **provenance.to_dict(),
            "patch_size": _whole(tiling.get("patch_size")),
            "target_mpp": _finite(tiling.get("target_mpp")),
        }
    return {
        "weights_sha256": manifest["sha256"],
        "members": len(checkpoint.state_dicts),
        "created": manifest.get("created"),
        "modalities": [spec.name for spec in checkpoint.model_config.modalities],
        "recipe": {
            "name": metadata.get("recipe"),
            "members": len(checkpoint.state_dicts),
            "settings": metadata.get("recipe_settings"),
            # the weight the served members blend with their linear path's own curve, and how it was
            # chosen (healnet.ensemble.choose_linear_blend); the settings hold only the training weight
            "linear_blend": float(checkpoint.model_config.linear_blend),
            "linear_blend_choice": metadata.get("linear_blend_choice"),
        },
        "split_repeat": int(metadata.get("split_repeat", 0)),
        "encoder": encoder,
    }


def _interval(value: Any) -> dict | None:
    if not isinstance(value, Mapping):
        return None
    return {
        "estimate": _finite(value.get("estimate")),
        "low": _finite(value.get("low")),
        "high": _finite(value.get("high")),
        "confidence": _finite(value.get("confidence")) or 0.95,
        "resamples": _whole(value.get("resamples")),
    }


def _metrics(evaluation: Mapping[str, Any], gate: Mapping[str, Any]) -> dict:
    """The test metrics; the c-index with its interval, the IPCW C and the integrated Brier score from the
    gate when evaluation.json lacks them (the gate records what evaluate logged)."""
    logged = gate.get("candidate_metrics") or {}
    c_index = _interval(evaluation.get("c_index_ci"))
    if c_index is None and gate.get("c_index") is not None:
        low, high = (list(gate.get("c_index_ci") or []) + [None, None])[:2]
        bootstrap = gate.get("bootstrap") or {}
        c_index = _interval(
            {
                "estimate": gate["c_index"],
                "low": low,
                "high": high,
                "confidence": bootstrap.get("confidence", 0.95),
                "resamples": bootstrap.get("resamples"),
            }
        )
    td_auc = evaluation.get("td_auc")
    patients = evaluation.get("patients", gate.get("test_patients"))
    return {
        "evaluated_on": "held-out test patients of the same cohort (holdout split)",
        "test_patients": _whole(patients),
        "test_events": _whole(evaluation.get("events", gate.get("test_events"))),
        "c_index": c_index,
        "uno_c": _interval(evaluation.get("uno_c_ci")),
        "c_index_ipcw": _finite(evaluation.get("c_index_ipcw", logged.get("c_index_ipcw"))),
        "integrated_brier_score": _finite(
            evaluation.get("integrated_brier_score", logged.get("integrated_brier_score"))
        ),
        "td_auc": {str(k): _finite(v) for k, v in td_auc.items()} if isinstance(td_auc, Mapping) else None,
        "td_auc_excluded": {str(k): str(v) for k, v in (evaluation.get("td_auc_excluded") or {}).items()},
        "logrank_p": _finite(evaluation.get("logrank_p")),
    }


def _calibration(value: Any) -> dict | None:
    if not isinstance(value, Mapping):
        return None
    groups = [
        {
            "group": int(group["group"]),
            "n": int(group["n"]),
            **{
                key: _finite(group.get(key))
                for key in ("predicted", "observed", "observed_low", "observed_high")
            },
        }
        for group in value.get("groups", [])
    ]
    d_cal = value.get("d_calibration")
    return {
        "time_months": float(value["time"]),
        "groups": groups,
        "ici": _finite(value.get("ici")),
        "slope": _finite(value.get("slope")),
        "d_calibration": None
        if not isinstance(d_cal, Mapping)
        else {
            "bins": int(d_cal["bins"]),
            "statistic": _finite(d_cal.get("statistic")),
            "p_value": _finite(d_cal.get("p_value")),
        },
    }


def _subgroups(evaluation: Mapping[str, Any]) -> dict | None:
    rows = evaluation.get("subgroups")
    if not isinstance(rows, list):
        return None
    return {
        "min_events": _whole(evaluation.get("subgroup_min_events")),
        "rows": [
            {
                "variable": str(row["variable"]),
                "level": str(row["level"]),
                "n": int(row["n"]),
                "events": int(row["events"]),
                "c_index": _finite(row.get("c_index")),
                "low": _finite(row.get("low")),
                "high": _finite(row.get("high")),
                "flagged": bool(row.get("flagged")),
            }
            for row in rows
        ],
    }


def _gate(gate: Mapping[str, Any]) -> dict:
    champion = gate.get("champion")
    return {
        "decision": str(gate["decision"]),
        "passed": bool(gate.get("passed")),
        "rule": str(gate["rule"]),
        "reasons": [str(reason) for reason in gate.get("reasons", [])],
        "version": str(gate.get("gate_version", "")),
        "policy": dict(gate.get("policy") or {}),
        "champion": champion.get("tag") if isinstance(champion, Mapping) else None,
        "taken_again": dict(gate["taken_again"]) if gate.get("taken_again") else None,
    }


def limitations(card: Mapping[str, Any]) -> list[str]:
    """What the card's numbers do not show, computed from the cohort and the numbers."""
    cohort, metrics = card["cohort"], card["metrics"]
    patients = cohort["patients"]
    found = []
    sites = cohort["sites"]
    if cohort["tcga_only"]:
        found.append(
            f"TCGA only: all {patients} patients are TCGA cases from {len(sites)} tissue source site(s); "
            "performance on patients of other institutions, scanners, stainings or eras is unknown."
        )
    else:
        found.append(
            f"Trained on {cohort['name'] or 'one cohort'}, not only TCGA cases: its provenance is that of the "
            "source; performance elsewhere is unknown."
        )
    test = metrics["test_patients"]
    found.append(
        "No external validation: every metric comes from "
        + (f"{test} held-out test patients" if test is not None else "held-out test patients")
        + (f" ({metrics['test_events']} events)" if metrics["test_events"] is not None else "")
        + " of the same cohort; no independent cohort was evaluated."
    )
    sex = cohort["sex"]
    rate = cohort["events"] / patients if patients else 0.0
    found.append(
        f"Cohort composition: {patients} patients, {cohort['events']} events ({rate:.0%}); sex: "
        f"{sex['female']} female, {sex['male']} male, {sex['unknown']} unknown; subtypes: "
        f"{named_levels(cohort['subtypes'])}; sites: {named_levels(sites)}."
    )
    subtypes = [name for name in cohort["subtypes"] if name != "unknown"]
    if len(subtypes) == 1:
        found.append(f"A single subtype ({subtypes[0]}): the model is not shown to hold for any other.")
    for name, count in (("female", sex["female"]), ("male", sex["male"])):
        if patients and count / patients < 0.1:
            found.append(f"Few {name} patients ({count} of {patients}): results for them are not supported.")
    if sites and patients:
        largest, count = next(iter(sites.items()))
        if count / patients > 0.3:
            found.append(f"One site dominates: {largest} holds {count} of {patients} patients.")
    c_index = metrics["c_index"]
    if metrics["test_events"] is not None and metrics["test_events"] < FEW_TEST_EVENTS:
        found.append(
            f"Few test events ({metrics['test_events']}, fewer than {FEW_TEST_EVENTS}): the c-index is "
            "imprecise."
        )
    if c_index and c_index["low"] is not None and c_index["high"] is not None:
        width = c_index["high"] - c_index["low"]
        if width > WIDE_INTERVAL:
            found.append(
                f"Wide interval: the c-index's {c_index['confidence']:.0%} interval spans "
                f"{c_index['low']:.3f}–{c_index['high']:.3f}."
            )
    subgroups = card["subgroups"]
    if subgroups is not None:
        flagged = [f"{row['variable']}={row['level']}" for row in subgroups["rows"] if row["flagged"]]
        if flagged:
            found.append(
                f"Too few events (under {subgroups['min_events']}) to read the c-index of the subgroups "
                + ", ".join(flagged)
                + "."
            )
    missing = [
        name
        for name, part in (
            ("calibration", card["calibration"]),
            ("subgroup performance", subgroups),
            ("validation report", card["validation"]),
        )
        if part is None
    ]
    if missing:
        found.append("Not evaluated: " + ", ".join(missing) + ".")
    validation = card["validation"]
    if validation and validation["slides_quarantined"]:
        found.append(
            f"{validation['slides_quarantined']} slide(s) were quarantined: their patients were trained and "
            "evaluated without them."
        )
    gate = card["gate"]
    if gate["decision"] == "promote" and not gate["passed"]:
        found.append("Promoted in a dry run of the gate although its checks failed.")
    return found


def build_card(
    checkpoint_dir: Path,
    cohort: Cohort,
    gate: Mapping[str, Any],
    *,
    version: str | None,
    data_hash: str,
    git_sha: str,
    run_id: str = "",
    run_name: str = "",
    evaluation: Mapping[str, Any] | None = None,
    validation: Mapping[str, Any] | None = None,
    slides_quarantined: int | None = None,
) -> dict:
    """The model card of the checkpoint registered as `version` (healnet:VERSION), or of a rejected
    candidate (`version` None), from the run's outputs: `gate` is gate.json, `evaluation` evaluate's
    evaluation.json, `validation` the validation report (validation.json). Checked against the schema."""
    from healnet import __version__

    facts = checkpoint_facts(checkpoint_dir)
    evaluation = evaluation or {}
    card: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "model": {
            "name": MODEL_NAME,
            "version": version,
            "status": REGISTERED if version is not None else REJECTED,
            "weights_sha256": facts["weights_sha256"],
            "members": facts["members"],
            "checkpoint_created": facts["created"],
            "healnet_version": __version__,
        },
        "intended_use": {"purpose": PURPOSE, "medical_device": False, "out_of_scope": list(OUT_OF_SCOPE)},
        "cohort": cohort_composition(cohort, data_hash, facts["split_repeat"]),
        "validation": validation_summary(validation, slides_quarantined),
        "modalities": facts["modalities"],
        "encoder": facts["encoder"],
        "recipe": facts["recipe"],
        "metrics": _metrics(evaluation, gate),
        "calibration": _calibration(evaluation.get("calibration")),
        "subgroups": _subgroups(evaluation),
        "gate": _gate(gate),
        "provenance": {
            "git_sha": git_sha,
            "pipeline_run_id": run_id,
            "pipeline_run_name": run_name,
            "card_written": datetime.now(UTC).isoformat(timespec="seconds"),
        },
    }
    card["limitations"] = limitations(card)
    validate_card(card)
    return card


def card_files(card: Mapping[str, Any]) -> dict[str, str]:
    """The card's files by name (model_card.json, model_card.md), once it validates."""
    validate_card(card)
    return {
        CARD_JSON: json.dumps(card, indent=2, allow_nan=False) + "\n",
        CARD_MARKDOWN: render_markdown(card),
    }


def write_card(card: Mapping[str, Any], folder: Path) -> dict[str, Path]:
    """Write model_card.json and model_card.md into `folder`; returns their paths by name."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, text in card_files(card).items():
        (folder / name).write_text(text, encoding="utf-8")
        written[name] = folder / name
    return written


def json_artifact(path: str | Path, name: str) -> dict | None:
    """The JSON a pipeline step handed on as an artifact: the file itself, or `name` in its folder; None
    when the step wrote none (a run from before the output existed)."""
    path = Path(path)
    if path.is_dir():
        path = path / name
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def pipeline_card(
    checkpoint_dir: Path,
    cohort_dir: str | Path,
    gate: Mapping[str, Any],
    version: str | None,
    *,
    evaluation_file: str | Path,
    validation_file: str | Path,
    **provenance: Any,
) -> dict:
    """`build_card` from the outputs of a pipeline run: the cohort folder, the gate's record (gate.json, or
    `healnet.gate.regate_record` of the gate taken again at promotion), evaluation.json and validation.json;
    `provenance`: data_hash, git_sha, run_id, run_name, slides_quarantined."""
    from healnet.data.cohort import Cohort

    return build_card(
        checkpoint_dir,
        Cohort.load(Path(cohort_dir)),
        gate,
        version=version,
        evaluation=json_artifact(evaluation_file, "evaluation.json"),
        validation=json_artifact(validation_file, "validation.json"),
        **provenance,
    )
