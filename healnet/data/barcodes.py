"""TCGA barcode parsing and validation.

A barcode is `TCGA-<TSS>-<participant>` (the patient), optionally followed by the sample
(`-01A`: sample type + vial), the portion (`-01` or `-11D`: portion + analyte) and either a slide
(`-DX1`) or a plate and centre (`-A10M-08`). Slide file names (`<barcode>.<uuid>.svs`) are accepted:
everything after the first dot is ignored.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from healnet.errors import HEALNetError

PATIENT_ID_REGEX = r"^TCGA-[A-Z0-9]{2}-[A-Z0-9]{4}$"
PRIMARY_TUMOR = "01"
SLIDE_TYPES = ("DX", "TS", "BS", "MS")  # diagnostic, top, bottom, middle section

# The patient part at the start of any TCGA identifier: the whole string, or followed by "-" or ".".
_PATIENT_PREFIX = re.compile(r"(TCGA-[A-Z0-9]{2}-[A-Z0-9]{4})(?:[-.]|$)")

_ALNUM2 = re.compile(r"[A-Z0-9]{2}")
_ALNUM4 = re.compile(r"[A-Z0-9]{4}")
_SAMPLE = re.compile(r"(?P<type>\d{2})(?P<vial>[A-Z])?")
_PORTION = re.compile(r"(?P<portion>\d{2})(?P<analyte>[A-Z])?")
_SLIDE = re.compile(rf"(?P<type>{'|'.join(SLIDE_TYPES)})(?P<number>\d+)")
_CENTER = re.compile(r"\d{2}")


class InvalidBarcodeError(HEALNetError, ValueError):
    """A string that is not a TCGA barcode; the message names the value and what is wrong."""

    def __init__(self, value: object, problem: str) -> None:
        super().__init__(f"invalid TCGA barcode {value!r}: {problem}")
        self.value = value


@dataclass(frozen=True)
class Barcode:
    patient_id: str
    tss: str
    participant: str
    sample_type: str | None = None
    vial: str | None = None
    portion: str | None = None
    analyte: str | None = None
    plate: str | None = None
    center: str | None = None
    slide_type: str | None = None
    slide_number: int | None = None

    @property
    def sample_id(self) -> str | None:
        """`TCGA-XX-XXXX-01`, the sample without its vial, as cBioPortal names samples."""
        return None if self.sample_type is None else f"{self.patient_id}-{self.sample_type}"

    @property
    def is_primary_tumor(self) -> bool:
        return self.sample_type == PRIMARY_TUMOR


def _match(pattern: re.Pattern[str], part: str, value: str, what: str) -> re.Match[str]:
    match = pattern.fullmatch(part)
    if match is None:
        raise InvalidBarcodeError(value, f"{what}, got {part!r}")
    return match


def parse_barcode(value: str) -> Barcode:
    """Split a TCGA barcode into its parts; raises InvalidBarcodeError naming the bad part."""
    if not isinstance(value, str):
        raise InvalidBarcodeError(value, f"expected a string, got {type(value).__name__}")
    parts = value.split(".", 1)[0].split("-")
    if parts[0] != "TCGA":
        raise InvalidBarcodeError(value, "must start with 'TCGA-'")
    if len(parts) < 3:
        raise InvalidBarcodeError(value, "needs at least TCGA-<TSS>-<participant>")
    if len(parts) > 7:
        raise InvalidBarcodeError(value, f"has {len(parts)} dash-separated parts, at most 7 are allowed")
    tss = _match(_ALNUM2, parts[1], value, "the tissue source site must be 2 letters/digits").group()
    participant = _match(_ALNUM4, parts[2], value, "the participant must be 4 letters/digits").group()
    fields: dict[str, Any] = {}  # the optional parts, by Barcode field
    if len(parts) > 3:
        sample = _match(_SAMPLE, parts[3], value, "the sample must be 2 digits and an optional vial letter")
        fields.update(sample_type=sample["type"], vial=sample["vial"])
    if len(parts) > 4:
        portion = _match(
            _PORTION, parts[4], value, "the portion must be 2 digits and an optional analyte letter"
        )
        fields.update(portion=portion["portion"], analyte=portion["analyte"])
    if len(parts) == 6:
        slide = _match(
            _SLIDE, parts[5], value, f"the slide must be one of {'/'.join(SLIDE_TYPES)} and a number"
        )
        fields.update(slide_type=slide["type"], slide_number=int(slide["number"]))
    if len(parts) == 7:
        fields["plate"] = _match(_ALNUM4, parts[5], value, "the plate must be 4 letters/digits").group()
        fields["center"] = _match(_CENTER, parts[6], value, "the centre must be 2 digits").group()
    return Barcode(patient_id=f"TCGA-{tss}-{participant}", tss=tss, participant=participant, **fields)


def patient_id(value: str) -> str:
    """The patient part (`TCGA-XX-XXXX`) of any valid TCGA barcode."""
    return parse_barcode(value).patient_id


def patient_prefix(value: object) -> str | None:
    """The patient part (`TCGA-XX-XXXX`) that `value` starts with, or None for anything else.

    Lenient on purpose, unlike `parse_barcode`: an identifier whose later parts are unusual (a slide file
    `<barcode>-copy.svs`) still names its patient, so it can be checked against the row that lists it.
    """
    match = _PATIENT_PREFIX.match(value) if isinstance(value, str) else None
    return None if match is None else match.group(1)
