"""Data validation with Great Expectations (imported lazily: `import healnet.validation` stays fast)."""

from healnet.validation.report import ExpectationResult, SuiteResult, ValidationReport
from healnet.validation.thresholds import DEFAULT_THRESHOLDS, Thresholds
from healnet.validation.validator import validate, validate_cohort

__all__ = [
    "DEFAULT_THRESHOLDS",
    "ExpectationResult",
    "SuiteResult",
    "Thresholds",
    "ValidationReport",
    "validate",
    "validate_cohort",
]
