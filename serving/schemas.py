"""Request and response bodies of the HEALNet service (JSON; the OpenAPI schema at /docs.json is built from these)."""

from __future__ import annotations

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    model_serializer,
    model_validator,
)

from healnet.preprocess.clinical import BINARY_RANGE, PLAUSIBLE_RANGES

# Strict: numbers must be JSON numbers (not strings or booleans); unknown fields are refused.
STRICT = ConfigDict(strict=True, extra="forbid")
SLIDE_INPUTS = ("wsi_features", "wsi_features_base64", "wsi_tiles")
JSON_MEDIA_TYPE = "application/json"
MULTIPART_MEDIA_TYPE = "multipart/form-data"
MULTIPART_PATH = "/predict"  # the one route that also takes a multipart form (serving.middleware)
# Text parts of that form, each holding the JSON value of the JSON request's field of the same name.
MULTIPART_JSON_FIELDS = ("omics", "clinical", "wsi_coords", "return_attention")


class PredictRequest(BaseModel):
    """One case with any subset of the modalities; at least one must be given."""

    model_config = STRICT

    omics: dict[str, dict[str, float | None]] = Field(
        default_factory=dict,
        description=(
            "Omic features by table and feature name, e.g. {'mut': {'TP53_mut': 1}, 'rnaseq': {...}}; a model "
            "trained on the combined grouping also accepts them under 'omic'. null marks a missing value "
            "(imputed with the training median), as does a feature left out of a given table; a given table "
            "that lacks most of the model's features of that table is refused (missing_features). Features "
            "the model does not use are ignored and listed in the response's unknown_features."
        ),
    )
    clinical: dict[str, float | str | None] = Field(
        default_factory=dict,
        description=(
            "Clinical covariates by name, e.g. {'age': 61, 'is_female': 1, 'oncotree_code': 'IDC'}: numbers for "
            "age and is_female, text for categorical ones (oncotree_code, stage, grade). null or a left-out "
            "covariate is imputed; a case without any is missing the clinical modality. A value outside its "
            f"plausible range (age {PLAUSIBLE_RANGES['age']} years, binary covariates {BINARY_RANGE}) is "
            "refused (out_of_range)."
        ),
    )
    wsi_features: list[list[float]] | None = Field(
        default=None,
        min_length=1,
        description="Patch features of the slide: one row of wsi_dim numbers per patch.",
    )
    wsi_features_base64: str | None = Field(
        default=None,
        min_length=1,
        description=(
            "The same patch-feature matrix as binary: base64 of little-endian float32 values, row-major, "
            "wsi_dim per patch (numpy: base64.b64encode(features.astype('<f4').tobytes())). For large "
            "bags it is about 3x smaller than JSON numbers and far cheaper to parse."
        ),
    )
    wsi_tiles: list[str] | None = Field(
        default=None,
        min_length=1,
        description="Slide tiles as base64-encoded PNG or JPEG images, encoded by the model's patch encoder.",
    )
    wsi_coords: list[list[int]] | None = Field(
        default=None,
        min_length=1,
        description=(
            "Optional level-0 pixel [x, y] (top-left) of each patch, one per row of the slide input and in "
            "its order (the x, y columns of a `healnet preprocess-slides` feature file). The model does not "
            "use them; with return_attention they come back as attention_coords, to draw the heatmap."
        ),
    )
    return_attention: bool = Field(default=False, description="Add attention per WSI patch and omic token.")

    @model_validator(mode="after")
    def one_slide_input(self) -> PredictRequest:
        slide_inputs = [name for name in SLIDE_INPUTS if getattr(self, name) is not None]
        if len(slide_inputs) > 1:
            raise ValueError(f"give the slide once, as one of {list(SLIDE_INPUTS)}; got {slide_inputs}")
        if self.wsi_coords is not None and not slide_inputs:
            raise ValueError(
                f"wsi_coords locate the patches of a slide: give it as one of {list(SLIDE_INPUTS)}"
            )
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
    unknown_features: list[str] = Field(
        description="Given omic feature and clinical covariate names that the model does not use (ignored)."
    )
    out_of_training_range: list[str] = Field(
        description=(
            "Clinical covariates whose value is plausible but outside the range of the training patients: "
            "the model extrapolates for them."
        )
    )
    model_version: str = Field(description="Tag of the model version that answered (healnet:VERSION).")
    attention: dict[str, list[float]] | None = Field(
        default=None,
        description=(
            "With return_attention: attention per WSI patch and per omic token, averaged over the layers, "
            "heads and latents (each modality's sums to 1)."
        ),
    )
    attention_coords: list[list[int]] | None = Field(
        default=None,
        description=(
            "With return_attention and wsi_coords: the [x, y] of each patch, in the order of "
            "attention['wsi'] (what `healnet.heatmap.SlideAttention.from_response` draws)."
        ),
    )

    @model_serializer(mode="wrap")
    def leave_out_absent(self, serialize: SerializerFunctionWrapHandler) -> dict:
        """Leave attention and attention_coords out unless they hold a value: a client decodes a field that
        is absent, but BentoML's own client cannot decode a null list (serving.openapi)."""
        data = serialize(self)
        for name in ("attention", "attention_coords"):
            if data.get(name) is None:
                data.pop(name, None)
        return data


class ErrorResponse(BaseModel):
    """Body of every rejection (4xx) and of 503 while the model loads."""

    error: str
    reason: str
