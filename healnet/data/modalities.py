"""The input kinds a cohort can train on, and the check that the requested ones are there.

The pipeline resolves its `modalities` parameter here, in its validation step, so a run that asks for an
input the cohort lacks stops once, before anything is preprocessed or trained.
"""

from __future__ import annotations

from collections.abc import Sequence

from healnet.errors import HEALNetError
from healnet.preprocess.clinical import CLINICAL, ClinicalConfig
from healnet.preprocess.state import OMIC, WSI

MODALITIES = (OMIC, CLINICAL, WSI)  # the order training and the reports use


class ModalityError(HEALNetError, ValueError):
    """Requested modalities that are unknown or that the cohort does not have."""


def parse_modalities(text: str) -> list[str]:
    """`"omic, clinical"` -> `["omic", "clinical"]`; empty text: `[]` (every modality the cohort has)."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in MODALITIES]
    if unknown:
        raise ModalityError(f"unknown modality {', '.join(unknown)}: choose from {', '.join(MODALITIES)}")
    return [name for name in MODALITIES if name in names]


def input_kinds(model_modalities: Sequence[str]) -> list[str]:
    """The input kinds a model's modalities come from, in the order of MODALITIES: each omic table's modality
    (`mut`, `cnv`, `rnaseq`, or `omic` for combined tables) is the kind `omic`."""
    kinds = {name if name in (CLINICAL, WSI) else OMIC for name in model_modalities}
    return [kind for kind in MODALITIES if kind in kinds]


def cohort_modalities(cohort, slide_features: bool) -> dict[str, str]:
    """Each modality the cohort has, with what provides it. `slide_features`: patch features come from
    elsewhere (an import), so the slides count even when the manifest locates no slide file."""
    available = {}
    if cohort.omics:
        tables = ", ".join(f"{name} ({frame.shape[1]} features)" for name, frame in cohort.omics.items())
        available[OMIC] = f"omic tables {tables}"
    covariates = ClinicalConfig().observed_covariates(cohort.clinical)
    if covariates:
        available[CLINICAL] = f"clinical covariates {', '.join(covariates)}"
    located = int(cohort.slides["path"].notna().sum()) if len(cohort.slides) else 0
    if slide_features:
        available[WSI] = "precomputed patch features"
    elif located:
        available[WSI] = f"{located} slide file(s)"
    return available


def resolve_modalities(requested: Sequence[str], available: dict[str, str], slides_listed: int) -> list[str]:
    """The modalities to train on: `requested`, or every available one when none is requested.

    A requested modality the cohort lacks is a `ModalityError` naming it and what would provide it.
    """
    if not requested:
        if not available:
            raise ModalityError("the cohort has no omics table, clinical covariate or slide to train on")
        return [name for name in MODALITIES if name in available]
    missing = [name for name in requested if name not in available]
    if missing:
        hints = {
            OMIC: "no omics table was ingested",
            CLINICAL: f"no clinical covariate ({', '.join(ClinicalConfig().covariates)}) has a value",
            WSI: (
                f"the cohort lists {slides_listed} slide(s) but none has a file: give slide_dir (the folder "
                "of the slide files) or features_dir (precomputed patch features)"
                if slides_listed
                else "the cohort lists no slide and no features_dir was given"
            ),
        }
        have = ", ".join(available) or "none"
        raise ModalityError(
            f"modality {', '.join(missing)} is not in this cohort: "
            + "; ".join(hints[name] for name in missing)
            + f" (available: {have})"
        )
    return list(requested)
