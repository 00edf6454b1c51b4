"""The promotion gate's rules (healnet/gate.py)."""

import math

import pytest

from healnet.gate import GATE_VERSION, PROMOTE, REJECT, Champion, GateError, GatePolicy, decide


def test_first_model_passes_on_the_minimum_alone():
    result = decide(0.62, None, GatePolicy(min_c_index=0.6))
    assert result.decision == PROMOTE and result.passed
    assert result.checks == {"minimum c-index": True}
    assert any("no champion" in reason for reason in result.reasons)


def test_below_minimum_is_rejected_with_the_reason():
    result = decide(0.58, None, GatePolicy(min_c_index=0.6))
    assert result.decision == REJECT and not result.passed
    assert "0.5800 < minimum 0.6000" in result.reasons[0]


def test_champion_comparison_uses_the_tolerance():
    champion = Champion("healnet:abc", 0.70)
    policy = GatePolicy(min_c_index=0.5, tolerance=0.02)
    assert decide(0.685, champion, policy).decision == PROMOTE  # within 0.02 of the champion
    worse = decide(0.67, champion, policy)
    assert worse.decision == REJECT
    assert worse.checks == {"minimum c-index": True, "not worse than champion": False}
    assert "healnet:abc" in worse.reasons[1] and "0.6800" in worse.reasons[1]


def test_champion_without_a_recorded_c_index_cannot_be_beaten():
    result = decide(0.9, Champion("healnet:old", None), GatePolicy(min_c_index=0.5))
    assert result.decision == REJECT
    assert "no recorded c-index" in result.reasons[1]


def test_dry_run_reports_failures_but_never_blocks():
    result = decide(0.4, Champion("healnet:abc", 0.7), GatePolicy(min_c_index=0.6, dry_run=True))
    assert result.decision == PROMOTE and not result.passed
    assert not any(result.checks.values())
    assert "dry run" in result.reasons[-1]


def test_threshold_above_one_blocks_every_promotion():
    assert decide(1.0, None, GatePolicy(min_c_index=1.01)).decision == REJECT


def test_report_names_version_decision_and_reasons():
    result = decide(0.61, Champion("healnet:abc", 0.6), GatePolicy(min_c_index=0.55))
    markdown = result.to_markdown()
    assert f"v{GATE_VERSION}" in markdown and "**promote**" in markdown and "healnet:abc" in markdown
    as_dict = result.to_dict()
    assert as_dict["policy"]["version"] == GATE_VERSION
    assert as_dict["champion"] == {"tag": "healnet:abc", "c_index": 0.6}


@pytest.mark.parametrize("bad", [math.nan, math.inf, -0.01, 1.01])
@pytest.mark.parametrize("dry_run", [False, True])
def test_a_candidate_score_that_is_not_a_c_index_is_rejected_with_the_reason(bad, dry_run):
    result = decide(bad, None, GatePolicy(dry_run=dry_run))
    assert result.decision == REJECT and not result.passed
    assert result.checks == {"valid c-index": False} and "not a number in [0, 1]" in result.reasons[0]


def test_boundaries_pass_exactly_at_the_minimum_and_at_the_tolerance():
    policy = GatePolicy(min_c_index=0.5, tolerance=0.25)
    assert decide(0.5, None, policy).decision == PROMOTE  # exactly the minimum
    assert decide(0.0, None, GatePolicy(min_c_index=0.0)).decision == PROMOTE
    assert decide(1.0, Champion("healnet:a", 1.0), GatePolicy(tolerance=0.0)).decision == PROMOTE
    assert (
        decide(0.5, Champion("healnet:a", 0.75), policy).decision == PROMOTE
    )  # exactly champion − tolerance
    assert decide(0.4999, Champion("healnet:a", 0.75), policy).decision == REJECT


@pytest.mark.parametrize("recorded", [None, math.nan])
def test_a_champion_without_a_usable_c_index_is_named_in_the_reasons(recorded):
    result = decide(0.9, Champion("healnet:old", recorded), GatePolicy())
    assert result.decision == REJECT and result.checks["not worse than champion"] is False
    assert any("healnet:old has no recorded c-index" in reason for reason in result.reasons)


@pytest.mark.parametrize(
    ("field", "value"), [("min_c_index", -0.1), ("min_c_index", math.nan), ("tolerance", 2.0)]
)
def test_invalid_policies_are_refused(field, value):
    with pytest.raises(GateError, match=field):
        GatePolicy(**{field: value})


def test_policy_is_frozen():
    with pytest.raises(AttributeError):
        GatePolicy().min_c_index = 0.1
