"""Promotion gate: versioned rules deciding whether a candidate model replaces the champion.

The gate judges what a test set of a few dozen patients can show: Harrell's C of the candidate on its test
patients comes with a patient-bootstrap interval (`healnet.survival_metrics.Bootstrap`: seeded resamples of
the patients, percentile interval), and a champion is scored on the same patients and compared on the same
resamples. The rules, in order (GATE_VERSION 2.0.0):

1. The candidate's test C must be a number in [0, 1]. Never waived, not even in a dry run.
2. The test patients must hold at least `min_test_events` events: fewer, and an interval of C is too wide
   for either of the next rules to mean much.
3. With a comparable champion: the lower bound of the paired-bootstrap interval of (candidate C − champion C)
   must be ≥ −`tolerance` (the candidate is not worse than the champion by more than the tolerance).
4. Without one (no champion yet, or one that is not comparable, which the report names with the reason):
   the lower bound of the candidate's interval of C must be ≥ `min_c_index`.

A champion is comparable when it reads the same inputs the same way, so that the two differ only in how
they were trained: the same model modalities; the same omic tables, each with the same feature names (a
feature selection fitted anew, e.g. another top-k set, makes two models not comparable); the same clinical
covariates (the indicator levels are fitted per training set and may differ); for slides, the same patch
encoder (name, weights sha256, width, input size, normalisation) and patch grid (patch size, µm/px), and
the same feature width. And its checkpoint must load and predict a finite risk for every test patient,
through the serving path (`healnet.scoring`): a champion that cannot be scored on the new patients is not
comparable either.

In `dry_run` the checks are reported but never block (rule 1 excepted): the decision is "promote". Change
`GATE_VERSION` whenever the rules change; the version goes into every gate report and into the registered
model's labels.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from healnet.errors import HEALNetError

if TYPE_CHECKING:  # the gate's rules need numbers only; scoring a champion needs torch
    from healnet.checkpoint import Checkpoint
    from healnet.scoring import CohortPatients, ScoredPatients
    from healnet.survival_metrics import Bootstrap

GATE_VERSION = "2.0.0"
PROMOTE = "promote"
REJECT = "reject"


class GateError(HEALNetError, ValueError):
    """A gate policy or a candidate that cannot be judged (bad threshold, missing metric)."""


@dataclass(frozen=True)
class GatePolicy:
    min_c_index: float = 0.55
    tolerance: float = 0.02
    min_test_events: int = 20
    dry_run: bool = False
    version: str = GATE_VERSION

    def __post_init__(self) -> None:
        # above 1 the no-champion rule can never pass: a deliberate "block every first promotion" setting
        if not (math.isfinite(self.min_c_index) and self.min_c_index >= 0.0):
            raise GateError(f"min_c_index must be a finite number >= 0, got {self.min_c_index}")
        if not 0.0 <= self.tolerance <= 1.0:
            raise GateError(f"tolerance must be in [0, 1], got {self.tolerance}")
        if (
            isinstance(self.min_test_events, bool)
            or not isinstance(self.min_test_events, int)
            or self.min_test_events < 0
        ):
            raise GateError(f"min_test_events must be a whole number >= 0, got {self.min_test_events!r}")


@dataclass(frozen=True, eq=False)
class Champion:
    """The model currently served, as the gate judges it: its risk for each of the candidate's test patients
    (in their order), or why it cannot be compared (then `risk` is None)."""

    tag: str
    recorded_c_index: float | None  # on its own test patients, when it was promoted; shown, not judged
    risk: np.ndarray | None = None
    not_comparable: str | None = None

    @property
    def comparable(self) -> bool:
        return self.risk is not None


@dataclass(frozen=True)
class PairedDifference:
    """Candidate C − champion C on the same patients: on all of them, and its bootstrap mean and interval."""

    observed: float
    mean: float
    low: float
    high: float


@dataclass(frozen=True, eq=False)
class GateResult:
    decision: str  # PROMOTE | REJECT
    passed: bool  # every check passed (in dry run the decision can be PROMOTE without it)
    rule: str  # the text of the rule that decided
    reasons: list[str]
    checks: dict[str, bool]
    c_index: float
    c_index_ci: tuple[float, float]
    test_patients: int
    test_events: int
    champion: Champion | None
    champion_c_index: float | None  # on the candidate's test patients, when comparable
    paired_difference: PairedDifference | None
    policy: GatePolicy
    bootstrap: Bootstrap
    rules: dict[str, str]  # every rule's text, by the name of its check

    def to_dict(self) -> dict[str, Any]:
        """Every number and the rule that decided: the gate.json record (non-finite numbers are null)."""
        champion = None
        if self.champion is not None:
            champion = {
                "tag": self.champion.tag,
                "recorded_c_index": _number(self.champion.recorded_c_index),
                "comparable": self.champion.comparable,
                "not_comparable_reason": self.champion.not_comparable,
                "c_index": _number(self.champion_c_index),
            }
        paired = None
        if self.paired_difference is not None:
            difference = self.paired_difference
            paired = {
                "mean": _number(difference.mean),
                "observed": _number(difference.observed),
                "ci": [_number(difference.low), _number(difference.high)],
            }
        return {
            "gate_version": self.policy.version,
            "decision": self.decision,
            "passed": self.passed,
            "rule": self.rule,
            "reasons": list(self.reasons),
            "checks": dict(self.checks),
            "rules": dict(self.rules),
            "c_index": _number(self.c_index),
            "c_index_ci": [_number(self.c_index_ci[0]), _number(self.c_index_ci[1])],
            "test_patients": self.test_patients,
            "test_events": self.test_events,
            "champion": champion,
            "paired_difference": paired,
            "policy": asdict(self.policy),
            "bootstrap": asdict(self.bootstrap),
        }

    def metrics(self) -> dict[str, float]:
        """The numbers as flat metrics (a KFP Metrics artifact holds no lists): finite ones only."""
        values: dict[str, float | None] = {
            "promote": float(self.decision == PROMOTE),
            "c_index": self.c_index,
            "c_index_ci_low": self.c_index_ci[0],
            "c_index_ci_high": self.c_index_ci[1],
            "test_events": float(self.test_events),
            "test_patients": float(self.test_patients),
            "champion_c_index": self.champion_c_index,
        }
        if self.paired_difference is not None:
            values["paired_difference_mean"] = self.paired_difference.mean
            values["paired_difference_ci_low"] = self.paired_difference.low
            values["paired_difference_ci_high"] = self.paired_difference.high
        return {name: number for name, value in values.items() if (number := _number(value)) is not None}

    def to_markdown(self) -> str:
        confidence = f"{self.bootstrap.confidence * 100:g} %"
        if self.champion is None:
            champion = "none yet"
        elif self.champion.comparable:
            champion = (
                f"{self.champion.tag}, comparable: c-index {_shown(self.champion_c_index)} on these patients"
            )
        else:
            champion = f"{self.champion.tag}, not comparable: {self.champion.not_comparable}"
        lines = [
            f"# Promotion gate v{self.policy.version}: **{self.decision}**",
            "",
            f"Decided by the rule: {self.rule}",
            "",
            f"- candidate test c-index: {_shown(self.c_index)} ({confidence} CI "
            f"{_shown(self.c_index_ci[0])}–{_shown(self.c_index_ci[1])}), "
            f"{self.test_events} events among {self.test_patients} test patients",
            f"- champion: {champion}",
        ]
        if self.paired_difference is not None:
            difference = self.paired_difference
            lines.append(
                f"- paired difference (candidate − champion): {_signed(difference.observed)} on all test "
                f"patients, bootstrap mean {_signed(difference.mean)}, {confidence} CI "
                f"{_signed(difference.low)} to {_signed(difference.high)}"
            )
        lines += [
            f"- policy: min_c_index {self.policy.min_c_index}, tolerance {self.policy.tolerance}, "
            f"min_test_events {self.policy.min_test_events}, dry_run {self.policy.dry_run}",
            f"- bootstrap: {self.bootstrap.resamples} resamples of the test patients, seed {self.bootstrap.seed}",
            "",
            "| check | rule | result |",
            "| --- | --- | --- |",
            *[
                f"| {name} | {self.rules.get(name, '')} | {'pass' if ok else 'FAIL'} |"
                for name, ok in self.checks.items()
            ],
            "",
            "## Reasons",
            *[f"- {reason}" for reason in self.reasons],
        ]
        return "\n".join(lines) + "\n"


def _number(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def _shown(value: float | None) -> str:
    return "n/a" if _number(value) is None else f"{value:.4f}"


def _signed(value: float) -> str:
    return "n/a" if _number(value) is None else f"{value:+.4f}"


VALID = "valid c-index"
ENOUGH_EVENTS = "enough test events"
NOT_WORSE = "not worse than the champion"
MINIMUM = "minimum c-index"


def rule_texts(policy: GatePolicy, confidence: float) -> dict[str, str]:
    """The text of each rule, by the name of its check, with the policy's numbers."""
    level = f"{confidence * 100:g} %"
    return {
        VALID: "the candidate's Harrell C on its test patients must be a number in [0, 1] (never waived)",
        ENOUGH_EVENTS: f"the test patients must hold at least min_test_events = {policy.min_test_events} events",
        NOT_WORSE: f"with a comparable champion: the lower bound of the {level} paired-bootstrap interval of "
        f"candidate C − champion C (same patients, same resamples) must be ≥ −tolerance = −{policy.tolerance:g}",
        MINIMUM: "without a comparable champion (none, or one not comparable, whose reason is reported): the "
        f"lower bound of the {level} bootstrap interval of the candidate's C must be ≥ min_c_index = "
        f"{policy.min_c_index:g}",
    }


DRY_RUN_RULE = "dry run: every check is reported and none blocks promotion, except a c-index that is not one"


def decide(
    candidate: ScoredPatients,
    champion: Champion | None,
    policy: GatePolicy,
    bootstrap: Bootstrap | None = None,
) -> GateResult:
    """Apply the policy to the candidate's risks on its test patients and the champion (None: none yet).

    `bootstrap`: the resampling of the patients (default: `DEFAULT_BOOTSTRAP`, as in evaluation)."""
    from healnet.survival_metrics import DEFAULT_BOOTSTRAP, harrell_c_bootstrap, harrell_c_or_nan

    bootstrap = bootstrap or DEFAULT_BOOTSTRAP
    rules = rule_texts(policy, bootstrap.confidence)
    level = f"{bootstrap.confidence * 100:g} %"
    times, events, risk = candidate.times, candidate.events, candidate.risk
    finite = bool(len(risk)) and bool(np.isfinite(risk).all())
    c_index = harrell_c_or_nan(times, events, risk) if finite else math.nan
    checks = {VALID: math.isfinite(c_index) and 0.0 <= c_index <= 1.0}
    reasons: list[str] = []
    interval = (math.nan, math.nan)
    champion_c_index: float | None = None
    paired: PairedDifference | None = None
    if not checks[VALID]:
        reasons.append(
            f"the candidate's test c-index is not a number in [0, 1] ({c_index!r}; {len(risk)} patients, "
            f"{candidate.event_count} events, risks {'finite' if finite else 'not all finite'})"
        )
    else:
        scored_risks = [risk] if champion is None or champion.risk is None else [risk, champion.risk]
        resampled = harrell_c_bootstrap(times, events, scored_risks, bootstrap)
        interval = bootstrap.interval(resampled[0])
        reasons.append(
            f"candidate test c-index {c_index:.4f}, {level} CI {interval[0]:.4f}–{interval[1]:.4f} "
            f"({bootstrap.resamples} resamples of {len(risk)} patients)"
        )
        checks[ENOUGH_EVENTS] = candidate.event_count >= policy.min_test_events
        relation = ">=" if checks[ENOUGH_EVENTS] else "<"
        reasons.append(
            f"{candidate.event_count} test events {relation} min_test_events {policy.min_test_events}"
            + ("" if checks[ENOUGH_EVENTS] else ": too few test events to judge the candidate")
        )
        if champion is not None and champion.risk is not None:
            champion_c_index = harrell_c_or_nan(times, events, champion.risk)
            paired = _paired_difference(resampled[0] - resampled[1], c_index - champion_c_index, bootstrap)
            checks[NOT_WORSE] = paired.low >= -policy.tolerance
            relation = ">=" if checks[NOT_WORSE] else "<"
            reasons.append(
                f"candidate − champion {champion.tag} (c-index {champion_c_index:.4f} on the same patients): "
                f"{paired.observed:+.4f}, {level} CI {paired.low:+.4f} to {paired.high:+.4f}; lower bound "
                f"{paired.low:+.4f} {relation} −tolerance (−{policy.tolerance:.4f})"
            )
        else:
            reasons.append(
                "no champion yet: the candidate is judged alone"
                if champion is None
                else f"champion {champion.tag} is not comparable ({champion.not_comparable}): the candidate "
                "is judged alone, by the no-champion rule"
            )
            checks[MINIMUM] = interval[0] >= policy.min_c_index
            relation = ">=" if checks[MINIMUM] else "<"
            reasons.append(
                f"lower bound of the candidate's interval {interval[0]:.4f} {relation} min_c_index "
                f"{policy.min_c_index:.4f}"
            )

    failed = [name for name, ok in checks.items() if not ok]
    if not failed:
        decision, rule = PROMOTE, rules[NOT_WORSE if paired is not None else MINIMUM]
    elif policy.dry_run and checks[VALID]:
        decision, rule = PROMOTE, DRY_RUN_RULE
        reasons.append("dry run: the failed checks are reported but do not block promotion")
    else:
        decision, rule = REJECT, rules[failed[0]]
    return GateResult(
        decision=decision,
        passed=not failed,
        rule=rule,
        reasons=reasons,
        checks=checks,
        c_index=c_index,
        c_index_ci=interval,
        test_patients=len(risk),
        test_events=candidate.event_count,
        champion=champion,
        champion_c_index=champion_c_index,
        paired_difference=paired,
        policy=policy,
        bootstrap=bootstrap,
        rules=rules,
    )


def _paired_difference(differences: np.ndarray, observed: float, bootstrap: Bootstrap) -> PairedDifference:
    """Candidate C − champion C per resample (NaN where undefined), summarised."""
    defined = differences[np.isfinite(differences)]
    low, high = bootstrap.interval(differences)
    return PairedDifference(observed, float(defined.mean()) if defined.size else math.nan, low, high)


def model_inputs(checkpoint: Checkpoint) -> dict[str, Any]:
    """What a model reads and how, as far as comparability goes (see the module's docstring)."""
    preprocessor = checkpoint.preprocessor
    omics = preprocessor.omics.state_dict()["modalities"] if preprocessor.omics else {}
    uses_slides = preprocessor.wsi_mean is not None
    return {
        "modalities": sorted(spec.name for spec in checkpoint.model_config.modalities),
        "omic_features": {table: sorted(state["features"]) for table, state in sorted(omics.items())},
        "clinical_covariates": sorted(preprocessor.clinical.covariates) if preprocessor.clinical else [],
        "slide_encoder": preprocessor.wsi_encoder.to_dict() if preprocessor.wsi_encoder else None,
        "patch_grid": dict(preprocessor.tiling),
        "slide_feature_width": preprocessor.wsi_dim if uses_slides else None,
    }


INPUT_NAMES = {
    "modalities": "model modalities",
    "omic_features": "omic tables and feature names",
    "clinical_covariates": "clinical covariates",
    "slide_encoder": "patch encoder",
    "patch_grid": "patch grid",
    "slide_feature_width": "patch feature width",
}


def incomparability(candidate: Mapping[str, Any], champion: Mapping[str, Any]) -> str | None:
    """Why two models' `model_inputs` make them not comparable (None: they are comparable)."""
    differences = []
    for key, name in INPUT_NAMES.items():
        if candidate.get(key) == champion.get(key):
            continue
        if key == "omic_features":
            differences.append(_feature_difference(candidate[key], champion[key]))
        else:
            differences.append(
                f"{name} differ (candidate {candidate.get(key)}, champion {champion.get(key)})"
            )
    return "; ".join(differences) or None


def _feature_difference(candidate: Mapping[str, list[str]], champion: Mapping[str, list[str]]) -> str:
    if sorted(candidate) != sorted(champion):
        return f"omic tables differ (candidate {sorted(candidate)}, champion {sorted(champion)})"
    tables = []
    for table in sorted(candidate):
        only_candidate = sorted(set(candidate[table]) - set(champion[table]))
        only_champion = sorted(set(champion[table]) - set(candidate[table]))
        if only_candidate or only_champion:
            tables.append(
                f"{table}: {len(only_candidate)} only the candidate's (e.g. {only_candidate[:3]}), "
                f"{len(only_champion)} only the champion's (e.g. {only_champion[:3]})"
            )
    return "omic feature names differ (" + "; ".join(tables) + ")"


def assess_champion(
    tag: str | None, candidate_inputs: Mapping[str, Any], load_patients: Callable[[], CohortPatients]
) -> Champion | None:
    """The registered version `tag` as the gate judges it (None: no champion): scored on the candidate's
    test patients (`load_patients`, called only for a comparable champion) through the serving path, or
    with the reason it is not comparable."""
    from healnet.checkpoint import load_checkpoint
    from healnet.inference import Predictor
    from healnet.registry import checkpoint_path, show_version

    if tag is None:
        return None
    recorded = show_version(tag)["metadata"].get("c_index")
    recorded = float(recorded) if isinstance(recorded, int | float) else None
    try:
        checkpoint = load_checkpoint(checkpoint_path(tag))
    except HEALNetError as error:
        return Champion(tag, recorded, not_comparable=f"its checkpoint cannot be loaded: {error}")
    reason = incomparability(candidate_inputs, model_inputs(checkpoint))
    if reason is not None:
        return Champion(tag, recorded, not_comparable=reason)
    try:
        risk = load_patients().score(Predictor(checkpoint)).risk
    # a case its preprocessing refuses, or weights its code cannot run: either way, not scored on these patients
    except (HEALNetError, ValueError, RuntimeError) as error:
        return Champion(
            tag,
            recorded,
            not_comparable=f"it cannot be scored on the test patients: {type(error).__name__}: {error}",
        )
    if not np.isfinite(risk).all():
        unscored = int((~np.isfinite(risk)).sum())
        return Champion(tag, recorded, not_comparable=f"its risk is not finite for {unscored} test patients")
    return Champion(tag, recorded, risk=risk)


def current_champion_tag() -> str | None:
    from healnet.registry import get_champion

    pointer = get_champion()
    return pointer["tag"] if pointer else None


def promote_if_still_better(
    tag: str,
    candidate: ScoredPatients,
    policy: GatePolicy,
    gated: str | None,
    reason: Callable[[GateResult | None], str],
    assess: Callable[[str | None], Champion | None],
    attempts: int = 3,
    on_regate: Callable[[GateResult], None] | None = None,
) -> tuple[GateResult | None, dict | None]:
    """Make `tag` the champion only if the champion is still `gated`, the one the gate judged against.
    `reason(repeated gate result, None when the first comparison held)` is the champion pointer's reason.

    If another promotion or a rollback changed it meanwhile, the gate decision is taken again by the same
    rules: `assess(new champion tag)` scores the new champion on the candidate's test patients, or says why
    it is not comparable (None: no champion). `on_regate(result)` is called with each repeated decision
    before it is acted on, so that what records the decision (the version's model card) is written before
    the candidate can become the champion; if it raises, nothing is promoted. A reject stops here, a promote
    retries the compare-and-swap. Returns the repeated gate result (None when the first comparison still
    held) and the new pointer (None when not promoted).
    """
    from healnet.registry import ChampionChangedError, set_champion

    expected, result = gated, None
    for _ in range(attempts):
        try:
            return result, set_champion(tag, reason(result), expected=expected)
        except ChampionChangedError as changed:
            result = decide(candidate, assess(changed.current), policy)
            if on_regate is not None:
                on_regate(result)
            if result.decision != PROMOTE:
                return result, None
            expected = changed.current
    raise GateError(
        f"the champion changed {attempts} times while {tag} was being promoted; run the gate again"
    )


def regate_record(first: Mapping[str, Any], result: GateResult) -> dict[str, Any]:
    """The gate.json record of the gate taken again at promotion (`promote_if_still_better`): `result`'s
    decision, numbers and champion over the `first` record (which keeps what the gate step added to it, such
    as the candidate's metrics), with "taken_again": the champion the first gate judged against and the rule
    that decided it."""
    first_champion = first.get("champion")
    return {
        **first,
        **result.to_dict(),
        "taken_again": {
            "first_champion": first_champion["tag"] if first_champion else None,
            "first_rule": first["rule"],
        },
    }
