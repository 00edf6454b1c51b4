"""Promotion gate: versioned rules deciding whether a candidate model replaces the champion.

The gate passes when the candidate's test c-index reaches `min_c_index` and is not worse than the
champion's by more than `tolerance`. In `dry_run` the checks are reported but never block: the
decision is always "promote". Change `GATE_VERSION` whenever the rules change; the version goes into
every gate report and into the registered model's labels.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from healnet.errors import HEALNetError

GATE_VERSION = "1.0.0"
PROMOTE = "promote"
REJECT = "reject"


class GateError(HEALNetError, ValueError):
    """A gate policy or a candidate that cannot be judged (bad threshold, missing metric)."""


@dataclass(frozen=True)
class GatePolicy:
    min_c_index: float = 0.55
    tolerance: float = 0.02
    dry_run: bool = False
    version: str = GATE_VERSION

    def __post_init__(self) -> None:
        # above 1 the gate can never pass: a deliberate "block every promotion" setting
        if not (math.isfinite(self.min_c_index) and self.min_c_index >= 0.0):
            raise GateError(f"min_c_index must be a finite number >= 0, got {self.min_c_index}")
        if not 0.0 <= self.tolerance <= 1.0:
            raise GateError(f"tolerance must be in [0, 1], got {self.tolerance}")


@dataclass(frozen=True)
class Champion:
    """The model currently served, as far as the gate needs it."""

    tag: str
    c_index: float | None


@dataclass(frozen=True)
class GateResult:
    decision: str  # PROMOTE | REJECT
    passed: bool  # every check passed (in dry run the decision can be PROMOTE without it)
    reasons: list[str]
    candidate_c_index: float
    champion: Champion | None
    policy: GatePolicy
    checks: dict[str, bool] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "decision": self.decision,
            "passed": self.passed,
            "reasons": list(self.reasons),
            "checks": dict(self.checks),
            "candidate_c_index": self.candidate_c_index,
            "champion": asdict(self.champion) if self.champion else None,
            "policy": asdict(self.policy),
        }

    def to_markdown(self) -> str:
        champion = (
            f"{self.champion.tag} (c-index {_shown(self.champion.c_index)})" if self.champion else "none yet"
        )
        lines = [
            f"# Promotion gate v{self.policy.version}: **{self.decision}**",
            "",
            f"- candidate test c-index: {_shown(self.candidate_c_index)}",
            f"- champion: {champion}",
            f"- policy: min_c_index {self.policy.min_c_index}, tolerance {self.policy.tolerance}, "
            f"dry_run {self.policy.dry_run}",
            "",
            "| check | result |",
            "| --- | --- |",
            *[f"| {name} | {'pass' if ok else 'FAIL'} |" for name, ok in self.checks.items()],
            "",
            "## Reasons",
            *[f"- {reason}" for reason in self.reasons],
        ]
        return "\n".join(lines) + "\n"


def _shown(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def decide(candidate_c_index: float, champion: Champion | None, policy: GatePolicy) -> GateResult:
    """Apply the policy to a candidate's test c-index and the current champion (None: no champion)."""
    candidate = float(candidate_c_index)
    checks: dict[str, bool] = {}
    reasons: list[str] = []
    if not (math.isfinite(candidate) and 0.0 <= candidate <= 1.0):
        # no policy, dry run included, promotes a model whose score is not a c-index
        checks["valid c-index"] = False
        reasons.append(f"the candidate's test c-index {candidate_c_index!r} is not a number in [0, 1]")
        return GateResult(REJECT, False, reasons, candidate, champion, policy, checks)

    checks["minimum c-index"] = candidate >= policy.min_c_index
    relation = ">=" if checks["minimum c-index"] else "<"
    reasons.append(f"test c-index {candidate:.4f} {relation} minimum {policy.min_c_index:.4f}")

    if champion is None:
        reasons.append("no champion yet: nothing to compare against")
    elif champion.c_index is None or not math.isfinite(champion.c_index):
        checks["not worse than champion"] = False
        reasons.append(
            f"champion {champion.tag} has no recorded c-index, so the candidate cannot be compared"
        )
    else:
        floor = champion.c_index - policy.tolerance
        checks["not worse than champion"] = candidate >= floor
        relation = ">=" if checks["not worse than champion"] else "<"
        reasons.append(
            f"test c-index {candidate:.4f} {relation} champion {champion.tag} {champion.c_index:.4f} "
            f"- tolerance {policy.tolerance} = {floor:.4f}"
        )

    passed = all(checks.values())
    if policy.dry_run and not passed:
        reasons.append("dry run: the failed checks are reported but do not block promotion")
    decision = PROMOTE if passed or policy.dry_run else REJECT
    return GateResult(decision, passed, reasons, candidate, champion, policy, checks)


def current_champion() -> Champion | None:
    """The registry's champion and its recorded test c-index (metadata `c_index`), or None."""
    from healnet.registry import get_champion

    pointer = get_champion()
    return champion_of(pointer["tag"] if pointer else None)


def champion_of(tag: str | None) -> Champion | None:
    """A registered version as the gate sees it: its tag and recorded test c-index (None: no champion)."""
    from healnet.registry import show_version

    if tag is None:
        return None
    c_index = show_version(tag)["metadata"].get("c_index")
    return Champion(tag, float(c_index) if isinstance(c_index, int | float) else None)


def promote_if_still_better(
    tag: str,
    candidate_c_index: float,
    policy: GatePolicy,
    gated: Champion | None,
    reason: str,
    attempts: int = 3,
) -> tuple[GateResult | None, dict | None]:
    """Make `tag` the champion only if the champion is still `gated`, the one the gate compared against.

    If another promotion or a rollback changed it meanwhile, the gate decision is taken again against the
    new champion: a reject stops here, a promote retries the compare-and-swap. Returns the repeated gate
    result (None when the first comparison still held) and the new pointer (None when not promoted).
    """
    from healnet.registry import ChampionChangedError, set_champion

    expected, result = (gated.tag if gated else None), None
    for _ in range(attempts):
        try:
            return result, set_champion(tag, reason, expected=expected)
        except ChampionChangedError as changed:
            result = decide(candidate_c_index, champion_of(changed.current), policy)
            if result.decision != PROMOTE:
                return result, None
            expected = changed.current
    raise GateError(
        f"the champion changed {attempts} times while {tag} was being promoted; run the gate again"
    )
