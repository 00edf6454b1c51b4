"""The rejection reasons are the members of `serving.reasons.Reason`: serving names them by member, never
by a literal; the metrics export every one; docs/architecture.md lists exactly them."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from prometheus_client import REGISTRY

from serving import metrics
from serving.reasons import Reason
from serving.validation import RejectedRequest

REPO_ROOT = Path(__file__).resolve().parents[1]
REASON_VALUES = {reason.value for reason in Reason}
DOCUMENTED_REASONS = re.compile(
    r"^\| `healnet_validation_errors_total` \| counter \| `reason`, one of the (\d+) members of "
    r"`serving\.reasons\.Reason`[^:|]*: ([^|]+) \|$",
    re.MULTILINE,
)


def test_serving_names_every_reason_by_its_member_never_by_a_literal():
    literals = []
    for path in sorted((REPO_ROOT / "serving").rglob("*.py")):
        if path.name == "reasons.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str | bytes):
                text = node.value.decode("latin-1") if isinstance(node.value, bytes) else node.value
                if text in REASON_VALUES:
                    literals.append(f"{path.relative_to(REPO_ROOT)}:{node.lineno} {text!r}")
    assert not literals, f"use the Reason member: {literals}"


def test_the_values_and_statuses_are_the_apis():
    assert [reason.value for reason in Reason] == [
        "no_modality",
        "wrong_dimensions",
        "non_finite",
        "missing_features",
        "out_of_range",
        "too_large",
        "invalid_schema",
        "bad_image",
        "no_encoder",
    ]
    assert {reason: reason.http_status for reason in Reason if reason.http_status != 422} == {
        Reason.TOO_LARGE: 413,
        Reason.INVALID_SCHEMA: 400,
    }
    assert RejectedRequest(Reason.TOO_LARGE, "too many tiles").status == 413


def test_every_reason_is_exported_from_start_up_and_counted():
    for reason in Reason:
        assert REGISTRY.get_sample_value("healnet_validation_errors_total", {"reason": reason}) is not None
    before = REGISTRY.get_sample_value("healnet_validation_errors_total", {"reason": "bad_image"})
    metrics.record_rejection(Reason.BAD_IMAGE)
    assert REGISTRY.get_sample_value("healnet_validation_errors_total", {"reason": "bad_image"}) == before + 1


def test_the_architecture_doc_lists_exactly_the_reasons():
    match = DOCUMENTED_REASONS.search((REPO_ROOT / "docs" / "architecture.md").read_text())
    assert match, "docs/architecture.md: the healnet_validation_errors_total row is not in the expected form"
    count, listed = match.groups()
    assert re.findall(r"`(\w+)`", listed) == [reason.value for reason in Reason]
    assert int(count) == len(Reason)
