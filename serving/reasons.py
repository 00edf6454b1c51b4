"""Why the service refuses a request: the `reason` of every 4xx body and x-healnet-rejection header, and the
label of healnet_validation_errors_total (docs/architecture.md, "Serving metrics").

The values are part of the API and of the alert rules and dashboards (k8s/components/monitoring): a member's
value never changes, and a new member is a new label value there. `unique` refuses, at import, two members
with one value.
"""

from __future__ import annotations

from enum import StrEnum, unique


@unique
class Reason(StrEnum):
    NO_MODALITY = "no_modality"
    WRONG_DIMENSIONS = "wrong_dimensions"
    NON_FINITE = "non_finite"
    MISSING_FEATURES = "missing_features"
    OUT_OF_RANGE = "out_of_range"
    TOO_LARGE = "too_large"
    INVALID_SCHEMA = "invalid_schema"
    BAD_IMAGE = "bad_image"
    NO_ENCODER = "no_encoder"

    @property
    def http_status(self) -> int:
        """413 for a request too large, 400 for one that is not a valid request, else 422 (Unprocessable
        Content: well formed, but the model cannot answer it)."""
        return _HTTP_STATUS.get(self, 422)


_HTTP_STATUS = {Reason.TOO_LARGE: 413, Reason.INVALID_SCHEMA: 400}
