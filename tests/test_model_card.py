"""Model cards (healnet/model_card.py): built from a run's outputs, checked against the schema kept in the
package, rendered as Markdown, stored with a registered version and printed by `healnet registry card`."""

from __future__ import annotations

import copy
import json
import tomllib
from pathlib import Path

import pytest

from devtools.demo import train_demo_checkpoint
from healnet.cli import main
from healnet.data.cohort import Cohort
from healnet.data.synth import SynthConfig, synthesize_cohort
from healnet.model_card import (
    SCHEMA_VERSION,
    ModelCardError,
    build_card,
    card_files,
    render_markdown,
    schema,
    validate_card,
)
from healnet.registry import CARD_JSON, model_card, model_folder, register_model

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_HASH = "ab" * 32
# evaluate's evaluation.json, as its contract has it
EVALUATION = {
    "c_index": 0.71,
    "c_index_ci_low": 0.62,
    "c_index_ci_high": 0.8,
    "events": 14,
    "patients": 24,
    "c_index_ipcw": 0.69,
    "integrated_brier_score": 0.18,
    "logrank_p": 0.012,
    "c_index_ci": {"estimate": 0.71, "low": 0.62, "high": 0.8, "confidence": 0.95, "resamples": 1000},
    "uno_c_ci": {"estimate": 0.68, "low": 0.58, "high": 0.79, "confidence": 0.95, "resamples": 1000},
    "td_auc": {"12": 0.74, "24": 0.7, "36": 0.66, "60": None},
    "td_auc_excluded": {"60": "no test patient is followed past 60 months"},
    "brier_curve": {"times": [6.0, 12.0], "brier": [0.1, 0.2], "integrated_brier_score": 0.18},
    "calibration": {
        "time": 24.0,
        "groups": [
            {
                "group": 1,
                "n": 12,
                "predicted": 0.8,
                "observed": 0.75,
                "observed_low": 0.5,
                "observed_high": 0.9,
            },
            {
                "group": 2,
                "n": 12,
                "predicted": 0.4,
                "observed": 0.45,
                "observed_low": 0.2,
                "observed_high": 0.7,
            },
        ],
        "ici": 0.043,
        "slope": 0.91,
        "d_calibration": {"bins": 5, "statistic": 3.2, "p_value": 0.52},
    },
    "subgroups": [
        {
            "variable": "is_female",
            "level": "1",
            "n": 10,
            "events": 6,
            "c_index": 0.7,
            "low": 0.5,
            "high": 0.9,
            "flagged": False,
        },
        {
            "variable": "site",
            "level": "AB",
            "n": 3,
            "events": 1,
            "c_index": None,
            "low": None,
            "high": None,
            "flagged": True,
        },
    ],
    "subgroup_min_events": 5,
    "survival_interpolation": "step",
}
VALIDATION = {  # ValidationReport.to_dict(), cut down to what the card reads
    "success": True,
    "thresholds": {"version": "1.3.0"},
    "rows_in": 130,
    "rows_kept": 127,
    "rows_quarantined": 3,
    "quarantine_reasons": {"unparseable survival": 2, "duplicate patient": 1},
    "suites": {
        "clinical": {"success": True, "expectations": [{"success": True}, {"success": True}]},
        "slides": {"success": True, "expectations": [{"success": True}]},
    },
    "notes": ["11 slide(s) are listed without a file; their file checks were skipped"],
}
GATE = {
    "gate_version": "2.0.0",
    "decision": "promote",
    "passed": True,
    "rule": "without a comparable champion: the lower bound of the candidate's interval must be ≥ 0.55",
    "reasons": ["candidate test c-index 0.7100", "no champion yet: the candidate is judged alone"],
    "c_index": 0.71,
    "c_index_ci": [0.62, 0.8],
    "test_patients": 24,
    "test_events": 14,
    "champion": None,
    "policy": {"min_c_index": 0.55, "tolerance": 0.02, "min_test_events": 20, "dry_run": False},
    "bootstrap": {"resamples": 1000, "confidence": 0.95, "seed": 0},
    "candidate_metrics": {"c_index": 0.71, "c_index_ipcw": 0.69, "integrated_brier_score": 0.18},
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return train_demo_checkpoint(tmp_path_factory.mktemp("card") / "checkpoint")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Cohort:
    root = tmp_path_factory.mktemp("card-cohort") / "cohort"
    config = SynthConfig(patients=40, seed=5, missing_slide_fraction=0.85, slide_px=768)
    synthesize_cohort(root, config, progress=False)
    return Cohort.load(root)


def card_of(checkpoint: Path, cohort: Cohort, version: str | None = "healnet:abc123", **parts) -> dict:
    inputs = {"evaluation": EVALUATION, "validation": VALIDATION, "gate": GATE, **parts}
    return build_card(
        checkpoint,
        cohort,
        inputs.pop("gate"),
        version=version,
        data_hash=DATA_HASH,
        git_sha="0123456789abcdef",
        run_id="run-7",
        run_name="healnet-training-7",
        slides_quarantined=2,
        **inputs,
    )


def test_a_built_card_validates_and_holds_every_part(checkpoint, cohort):
    card = card_of(checkpoint, cohort)
    validate_card(card)
    assert card["schema_version"] == SCHEMA_VERSION and card["model"]["version"] == "healnet:abc123"
    assert (
        card["intended_use"]["medical_device"] is False
        and "Not a medical device" in (card["intended_use"]["purpose"])
    )
    clinical = cohort.clinical
    composition = card["cohort"]
    assert composition["data_hash"] == DATA_HASH and composition["patients"] == len(clinical)
    assert composition["events"] == int(clinical["event"].sum()) and composition["tcga_only"] is True
    assert composition["sex"]["female"] == int((clinical["is_female"] == 1).sum())
    assert sum(composition["sites"].values()) == len(clinical) and composition["splits"]["test"] > 0
    assert card["validation"]["rows_quarantined"] == 3 and card["validation"]["expectations_total"] == 3
    assert card["validation"]["slides_quarantined"] == 2
    assert card["modalities"] == ["omic", "wsi"] and card["encoder"]["name"] == "stats"
    metrics = card["metrics"]
    assert metrics["c_index"] == EVALUATION["c_index_ci"] and metrics["uno_c"]["low"] == 0.58
    assert metrics["td_auc"]["60"] is None and "60" in metrics["td_auc_excluded"]
    assert card["calibration"]["ici"] == 0.043 and len(card["calibration"]["groups"]) == 2
    assert [row["flagged"] for row in card["subgroups"]["rows"]] == [False, True]
    assert card["gate"]["decision"] == "promote" and card["gate"]["rule"] == GATE["rule"]
    assert (
        card["provenance"]["git_sha"] == "0123456789abcdef"
        and card["provenance"]["pipeline_run_id"] == "run-7"
    )


def test_the_limitations_are_computed_from_the_cohort(checkpoint, cohort):
    card = card_of(checkpoint, cohort)
    text = "\n".join(card["limitations"])
    patients, events = card["cohort"]["patients"], card["cohort"]["events"]
    assert f"TCGA only: all {patients} patients" in text
    assert "No external validation: every metric comes from 24 held-out test patients (14 events)" in text
    assert f"{patients} patients, {events} events" in text and "A single subtype (SYNTH)" in text
    assert "Few test events (14" in text and "subgroups site=AB." in text
    # another composition, other limitations
    skewed = copy.copy(cohort)
    skewed.clinical = cohort.clinical.assign(is_female=1, oncotree_code="BLCA")
    skewed_text = "\n".join(card_of(checkpoint, skewed)["limitations"])
    assert f"Few male patients (0 of {patients})" in skewed_text and "A single subtype (BLCA)" in skewed_text


def test_without_an_evaluation_the_card_says_not_evaluated(checkpoint, cohort):
    card = card_of(checkpoint, cohort, evaluation=None, validation=None)
    validate_card(card)
    assert card["calibration"] is None and card["subgroups"] is None and card["validation"] is None
    assert card["metrics"]["c_index"] == {  # from the gate, which always has it
        "estimate": 0.71,
        "low": 0.62,
        "high": 0.8,
        "confidence": 0.95,
        "resamples": 1000,
    }
    markdown = render_markdown(card)
    assert "## Calibration\n\nNot evaluated." in markdown and "| Uno's C | not evaluated |" in markdown
    assert "Not evaluated: calibration, subgroup performance, validation report." in card["limitations"]


def test_the_markdown_shows_each_part(checkpoint, cohort):
    markdown = render_markdown(card_of(checkpoint, cohort))
    assert markdown.startswith("# Model card: healnet:abc123\n")
    for heading in ("Intended use", "Cohort", "Validation", "Model", "Metrics", "Calibration", "Subgroups"):
        assert f"\n## {heading}\n" in markdown
    assert "| Harrell's C | 0.710 (95% CI 0.620–0.800, 1000 resamples) |" in markdown
    assert "| time-dependent AUC at 12 months | 0.740 |" in markdown
    assert "AUC at 60 months not computed: no test patient is followed past 60 months" in markdown
    assert "| is_female | 1 | 10 | 6 | 0.700 | 0.500–0.900 |  |" in markdown
    assert "| site | AB | 3 | 1 | – | – | ⚠ |" in markdown
    assert f"Decided by the rule: {GATE['rule']}" in markdown and DATA_HASH in markdown
    assert "unparseable survival 2" in markdown and "Slide encoder: stats" in markdown
    assert "blends in the linear path" not in markdown  # the demo recipe has no linear path


def test_a_rejected_candidate_has_no_version(checkpoint, cohort):
    rejected = {
        **GATE,
        "decision": "reject",
        "passed": False,
        "rule": "the test patients must hold 20 events",
    }
    card = card_of(checkpoint, cohort, version=None, gate=rejected)
    assert card["model"]["status"] == "rejected candidate" and card["model"]["version"] is None
    assert render_markdown(card).startswith("# Model card: rejected candidate")
    broken = copy.deepcopy(card)
    broken["model"]["version"] = "healnet:abc123"  # a rejected candidate is never registered
    with pytest.raises(ModelCardError, match="model/version"):
        validate_card(broken)


BROKEN = {
    "no limitations": lambda card: card.pop("limitations"),
    "a medical device": lambda card: card["intended_use"].update(medical_device=True),
    "registered without a version": lambda card: card["model"].update(version=None),
    "a short data hash": lambda card: card["cohort"].update(data_hash="abc"),
    "an interval bound as text": lambda card: card["metrics"]["c_index"].update(low="0.6"),
    "an unknown decision": lambda card: card["gate"].update(decision="maybe"),
    "an unknown part": lambda card: card.update(comments="x"),
    "a negative count": lambda card: card["cohort"]["sex"].update(female=-1),
}


@pytest.mark.parametrize("breaking", BROKEN.values(), ids=BROKEN.keys())
def test_a_broken_card_fails_validation(checkpoint, cohort, breaking):
    card = card_of(checkpoint, cohort)
    breaking(card)
    with pytest.raises(ModelCardError, match="does not match its schema"):
        validate_card(card)
    with pytest.raises(ModelCardError):
        card_files(card)


def test_the_schema_is_package_data():
    assert schema()["properties"]["schema_version"]["type"] == "string"
    package_data = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"
    ]
    assert "schemas/*.json" in package_data["healnet"]


def test_registry_card_prints_a_registered_versions_card(checkpoint, cohort, registry, capsys):
    stored: dict = {}

    def files(tag: str) -> dict[str, str]:
        stored["card"] = card_of(checkpoint, cohort, version=tag)
        return card_files(stored["card"])

    tag = register_model(checkpoint, files=files)
    assert json.loads((model_folder(tag) / CARD_JSON).read_text()) == stored["card"]
    assert main(["registry", "card", tag]) == 0
    printed = capsys.readouterr().out
    assert printed == render_markdown(stored["card"]) and printed.startswith(f"# Model card: {tag}")
    assert main(["registry", "card", tag.split(":")[1].upper(), "--json"]) == 0
    printed_json = json.loads(capsys.readouterr().out)
    assert printed_json == stored["card"] == model_card(tag)[0]
    validate_card(printed_json)

    older = register_model(checkpoint)  # as versions registered before model cards were
    assert model_card(older) is None
    assert main(["registry", "card", older]) == 2
    assert capsys.readouterr().err.strip() == (
        f"healnet registry: {older} has no model card: it was registered before model cards were written"
    )
    assert main(["registry", "card", "healnet:nosuchversion"]) == 2
    assert "no model version 'healnet:nosuchversion'" in capsys.readouterr().err


def test_a_card_that_fails_its_schema_registers_nothing(checkpoint, cohort, registry):
    from healnet.registry import list_versions

    def broken(tag: str) -> dict[str, str]:
        card = card_of(checkpoint, cohort, version=tag)
        card["limitations"] = []
        return card_files(card)

    with pytest.raises(ModelCardError):
        register_model(checkpoint, files=broken)
    assert list_versions() == []
