"""Request and response bodies of the HEALNet service (JSON; the OpenAPI schema at /docs.json is built from these)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

# Strict: numbers must be JSON numbers (not strings or booleans); unknown fields are refused.
STRICT = ConfigDict(strict=True, extra="forbid")


class PredictRequest(BaseModel):
    """One case with any subset of the modalities; at least one must be given."""

    model_config = STRICT

    omics: dict[str, dict[str, float | None]] = Field(
        default_factory=dict,
        description=(
            "Omic features by table and feature name, e.g. {'mut': {'TP53_mut': 1}, 'rnaseq': {...}}; a model "
            "trained on the combined grouping also accepts them under 'omic'. null marks a missing value "
            "(imputed with the training median), as does a feature left out of a given table."
        ),
    )
    wsi_features: list[list[float]] | None = Field(
        default=None,
        min_length=1,
        description="Patch features of the slide: one row of wsi_dim numbers per patch.",
    )
    wsi_tiles: list[str] | None = Field(
        default=None,
        min_length=1,
        description="Slide tiles as base64-encoded PNG or JPEG images, encoded by the model's patch encoder.",
    )
    return_attention: bool = Field(default=False, description="Add attention per WSI patch and omic token.")

    @model_validator(mode="after")
    def one_slide_input(self) -> PredictRequest:
        if self.wsi_features is not None and self.wsi_tiles is not None:
            raise ValueError("give the slide either as wsi_features or as wsi_tiles, not both")
        empty = [table for table, features in self.omics.items() if not features]
        if empty:
            raise ValueError(f"omics tables {empty} have no feature: leave an absent table out")
        return self


class PredictResponse(BaseModel):
    risk: float = Field(description="−Σ survival over the bins: higher means shorter expected survival.")
    survival: list[float] = Field(description="Probability of surviving past the end of each time bin.")
    hazards: list[float] = Field(description="Conditional probability of the event in each time bin.")
    bin_edges_months: list[float | None] = Field(description="Time-bin edges in months; null is +infinity.")
    modalities_used: list[str]
    modalities_missing: list[str]
    imputed_features: int = Field(description="Model omic features that were missing and imputed.")
    imputed_fraction: float = Field(
        description="Share of the omic features of the present omic modalities imputed."
    )
    unknown_features: list[str] = Field(description="Given feature names that the model does not use.")
    model_version: str = Field(description="Tag of the model version that answered (healnet:VERSION).")
    attention: dict[str, list[float]] | None = Field(
        default=None, description="With return_attention: attention per WSI patch and per omic token."
    )


class ErrorResponse(BaseModel):
    """Body of every rejection (4xx) and of 503 while the model loads."""

    error: str
    reason: str
