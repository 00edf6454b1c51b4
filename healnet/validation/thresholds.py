"""Data-validation thresholds, versioned in one place: bump `version` whenever a value changes."""

from __future__ import annotations

from dataclasses import dataclass, replace

from healnet.errors import HEALNetError


class ThresholdError(HEALNetError, ValueError):
    """A validation threshold out of its range; the message names it."""


@dataclass(frozen=True)
class Thresholds:
    version: str = "1.1.0"
    min_patients: int = 1
    event_rate_min: float = 0.02
    event_rate_max: float = 0.95
    age_min: float = 0.0
    age_max: float = 110.0
    age_max_missing_fraction: float = 0.2
    omics_max_missing_fraction: float = 0.2  # per feature, over the patients that have the modality
    omics_min_std: float = 0.0  # a feature's std must be strictly above this
    max_examples: int = 5  # unexpected example rows kept per failed expectation
    # mostly-bad input stops the run: nobody decided to train on what survives a large quarantine
    max_quarantined_row_fraction: float = 0.05
    max_quarantined_patient_fraction: float = 0.05

    def __post_init__(self) -> None:
        for name in ("age_max_missing_fraction", "omics_max_missing_fraction"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ThresholdError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        for name in ("max_quarantined_row_fraction", "max_quarantined_patient_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ThresholdError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if not 0.0 <= self.event_rate_min < self.event_rate_max <= 1.0:
            raise ThresholdError(
                f"need 0 <= event_rate_min < event_rate_max <= 1, got {self.event_rate_min}, {self.event_rate_max}"
            )
        if self.age_min >= self.age_max:
            raise ThresholdError(f"age_min must be below age_max, got {self.age_min}, {self.age_max}")
        if self.max_examples < 1 or self.min_patients < 0:
            raise ThresholdError("max_examples must be >= 1 and min_patients >= 0")


DEFAULT_THRESHOLDS = Thresholds()


def with_quarantine_limit(fraction: float) -> Thresholds:
    """The default thresholds with one limit on the quarantined share of rows and of patients."""
    return replace(
        DEFAULT_THRESHOLDS, max_quarantined_row_fraction=fraction, max_quarantined_patient_fraction=fraction
    )
