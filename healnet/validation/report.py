"""Validation results: per expectation, per suite and for the whole cohort, as JSON and Markdown (where
every text that comes from the data is escaped: `markdown_text`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from healnet.files import markdown_text
from healnet.validation.thresholds import Thresholds


@dataclass
class ExpectationResult:
    expectation: str  # GE type, e.g. expect_column_values_to_match_regex
    description: str  # what is expected, in words
    column: str | None
    kwargs: dict
    success: bool
    observed: object = None  # aggregate expectations: the observed value
    element_count: int | None = None
    unexpected_count: int | None = None
    examples: list[dict] = field(default_factory=list)  # unexpected rows: id columns and the value
    error: str | None = None  # the expectation could not be evaluated (e.g. a missing column)

    def outcome(self) -> str:
        """What was observed, in a few words."""
        if self.error:
            return f"error: {self.error}"
        if self.unexpected_count is not None:
            return f"{self.unexpected_count} of {self.element_count} rows unexpected"
        if self.observed is None:
            return "passed" if self.success else "failed"
        if isinstance(self.observed, float):
            return f"observed {self.observed:.4g}"
        return f"observed {self.observed!r}"

    def message(self, suite: str) -> str:
        column = f" on column '{self.column}'" if self.column else ""
        text = f"{suite}: '{self.description}' ({self.expectation}){column} failed: {self.outcome()}"
        if self.examples:
            text += "; examples: " + "; ".join(format_example(e) for e in self.examples)
        return text


@dataclass
class SuiteResult:
    name: str
    success: bool
    rows: int
    expectations: list[ExpectationResult]


@dataclass
class ValidationReport:
    success: bool
    suites: dict[str, SuiteResult]
    rows_in: int | None
    rows_kept: int | None
    rows_quarantined: int | None
    json_path: Path
    markdown_path: Path
    quarantine_reasons: dict[str, int] = field(default_factory=dict)
    source: str = ""
    thresholds: Thresholds = field(default_factory=Thresholds)
    notes: list[str] = field(default_factory=list)  # what was not checked, and why

    def failures(self) -> list[str]:
        """One message per failed expectation naming suite, expectation, column and example rows; a failed
        quarantine threshold adds the counts and the reasons of the quarantined rows."""
        failed = [(s.name, e) for s in self.suites.values() for e in s.expectations if not e.success]
        messages = [e.message(name) for name, e in failed]
        if any((e.column or "").startswith("quarantined_") for _, e in failed):
            reasons = sorted(self.quarantine_reasons.items(), key=lambda item: -item[1])
            shown = ", ".join(f"{reason} ({n} rows)" for reason, n in reasons[:5])
            more = f" and {len(reasons) - 5} more reason(s)" if len(reasons) > 5 else ""
            messages.append(
                f"quarantined {_count(self.rows_quarantined)} of {_count(self.rows_in)} rows; reasons: {shown}{more}"
            )
        return messages

    def accounting(self) -> str:
        balanced = _balanced(self.rows_in, self.rows_kept, self.rows_quarantined)
        return (
            f"rows in {_count(self.rows_in)} = rows kept {_count(self.rows_kept)} + rows quarantined "
            f"{_count(self.rows_quarantined)}" + ("" if balanced else "  (DOES NOT ADD UP)")
        )

    def summary(self) -> str:
        lines = [
            f"validation {'PASSED' if self.success else 'FAILED'}: {self.source} (thresholds {self.thresholds.version})"
        ]
        lines.append(self.accounting())
        lines += [f"note: {note}" for note in self.notes]
        for suite in self.suites.values():
            passed = sum(e.success for e in suite.expectations)
            lines.append(
                f"  {suite.name}: {passed}/{len(suite.expectations)} expectations passed ({suite.rows} rows)"
            )
        lines.append(f"report: {self.markdown_path} and {self.json_path}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "success": self.success,
            "source": self.source,
            "thresholds": asdict(self.thresholds),
            "rows_in": self.rows_in,
            "rows_kept": self.rows_kept,
            "rows_quarantined": self.rows_quarantined,
            "quarantine_reasons": self.quarantine_reasons,
            "suites": {
                name: {
                    "success": s.success,
                    "rows": s.rows,
                    "expectations": [asdict(e) for e in s.expectations],
                }
                for name, s in self.suites.items()
            },
            "failures": self.failures(),
            "notes": self.notes,
        }

    def to_markdown(self) -> str:
        lines = [
            f"# Data validation: {'passed ✓' if self.success else 'FAILED ✗'}",
            "",
            f"Source: `{markdown_text(self.source)}`. Thresholds version {markdown_text(self.thresholds.version)}.",
            "",
            "## Row accounting",
            "",
            self.accounting(),
            "",
        ]
        if self.quarantine_reasons:
            lines += ["| quarantine reason | rows |", "| --- | --- |"]
            lines += [f"| {markdown_text(reason)} | {n} |" for reason, n in self.quarantine_reasons.items()]
        else:
            lines.append("No row was quarantined.")
        if self.notes:
            lines += ["", *[f"Note: {markdown_text(note)}" for note in self.notes]]
        for suite in self.suites.values():
            heading = f"## {markdown_text(suite.name)} ({suite.rows} rows): {'✓' if suite.success else '✗'}"
            lines += ["", heading, ""]
            lines += ["| | expectation | column | outcome |", "| --- | --- | --- | --- |"]
            lines += [
                f"| {'✓' if e.success else '✗'} | {markdown_text(e.description)} | {markdown_text(e.column or '')} | {markdown_text(e.outcome())} |"
                for e in suite.expectations
            ]
            for e in suite.expectations:
                if not e.success and e.examples:
                    failed = f"Failed: {markdown_text(e.description)} (`{markdown_text(e.expectation)}`)."
                    lines += ["", f"{failed} Example rows:", ""]
                    lines += [f"- {markdown_text(format_example(example))}" for example in e.examples]
        return "\n".join(lines) + "\n"


def format_example(example: dict) -> str:
    return ", ".join(f"{key}={value!r}" for key, value in example.items())


def _balanced(rows_in: int | None, kept: int | None, quarantined: int | None) -> bool:
    if rows_in is None or kept is None or quarantined is None:
        return False
    return rows_in == kept + quarantined


def _count(value: int | None) -> str:
    return "unknown" if value is None else str(value)
