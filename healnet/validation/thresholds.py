"""Data-validation thresholds, versioned in one place: bump `version` whenever a value changes."""

from __future__ import annotations

from dataclasses import dataclass, replace

from healnet.errors import HEALNetError
from healnet.preprocess.clinical import PLAUSIBLE_RANGES


class ThresholdError(HEALNetError, ValueError):
    """A validation threshold out of its range; the message names it."""


@dataclass(frozen=True)
class Thresholds:
    version: str = "1.4.0"
    min_patients: int = 1
    event_rate_min: float = 0.02
    event_rate_max: float = 0.95
    # a training cohort takes the ages a served request may carry
    age_min: float = PLAUSIBLE_RANGES["age"].low
    age_max: float = PLAUSIBLE_RANGES["age"].high
    age_max_missing_fraction: float = 0.2
    omics_max_missing_fraction: float = 0.2  # per feature, over the patients that have the modality
    omics_min_std: float = 0.0  # a feature's std must be strictly above this
    max_examples: int = 5  # unexpected example rows kept per failed expectation
    # mostly-bad input stops the run: nobody decided to train on what survives a large quarantine
    max_quarantined_row_fraction: float = 0.05
    max_quarantined_patient_fraction: float = 0.05
    # a split without events has no c-index: fail before training rather than at the evaluation (0: off)
    min_events_per_split: int = 1
    # a slide OpenSlide cannot open (or without a resolution) is quarantined when tiled and its patient goes
    # on without it; past this share of the slides with files, the transfer itself is broken
    max_unreadable_slide_fraction: float = 0.1

    def __post_init__(self) -> None:
        for name in ("age_max_missing_fraction", "omics_max_missing_fraction"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ThresholdError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        for name in (
            "max_quarantined_row_fraction",
            "max_quarantined_patient_fraction",
            "max_unreadable_slide_fraction",
        ):
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
        if self.min_events_per_split < 0:
            raise ThresholdError(f"min_events_per_split must be >= 0, got {self.min_events_per_split}")


DEFAULT_THRESHOLDS = Thresholds()


def with_quarantine_limit(fraction: float, base: Thresholds = DEFAULT_THRESHOLDS) -> Thresholds:
    """`base` with one limit on the quarantined share of rows and of patients."""
    return replace(base, max_quarantined_row_fraction=fraction, max_quarantined_patient_fraction=fraction)


def with_min_events_per_split(events: int, base: Thresholds = DEFAULT_THRESHOLDS) -> Thresholds:
    """`base` with another least number of events in every split (0 turns the check off)."""
    return replace(base, min_events_per_split=events)
