"""The service's OpenAPI document (`/docs.json`): BentoML's, made to tell the truth.

BentoML documents 200, 400, 404 and 500 with its own error bodies and derives the request schema from the
pydantic models alone. `contract_document` rewrites it into the contract the service keeps:

- every status the prediction routes answer (200, 400, 413, 415, 422, 503, 504), each error with the
  `{error, reason}` body and `reason` as an enum; no 404 or 500, which they never answer;
- the request states what it can: at least one modality, the shapes of the patch arrays, the plausible
  range of each numeric clinical covariate, the batch size limit, and the multipart form's parts;
- the answer's optional fields are left out when absent, never null (BentoML's own client cannot decode a
  null array), so the schema has no null for them;
- GET /model_card, which BentoML does not document (a mounted route): the answering version's model card,
  or 404 for a version registered before model cards were written.

What JSON Schema cannot state depends on the served model (which omic tables and features it reads, its
patch-feature width, whether it encodes tiles); such a request is well formed and answered 422 with the
reason. The checked-in docs/openapi.json is this document for the default limits
(`python -m devtools.openapi_document > docs/openapi.json`; tests/test_openapi.py compares them).
"""

from __future__ import annotations

import copy

from healnet import __version__
from healnet.preprocess.clinical import BINARY_RANGE, PLAUSIBLE_RANGES, ClinicalConfig
from serving.config import Limits
from serving.reasons import Reason
from serving.schemas import (
    JSON_MEDIA_TYPE,
    MULTIPART_JSON_FIELDS,
    MULTIPART_MEDIA_TYPE,
    MULTIPART_PATH,
    SLIDE_INPUTS,
)

NOT_READY = "not_ready"  # the 503 while the model loads: not a rejection of the request
TIMED_OUT = "timed_out"  # the 504 of a request that found no answer within the service's timeout
NO_MODEL_CARD = "no_model_card"  # the 404 of GET /model_card for a version registered without a card
MODEL_CARD_PATH = "/model_card"
PREDICTION_PATHS = ("/predict", "/predict_batch")
# standard base64, padded: what the service decodes (`base64.b64decode(validate=True)`)
BASE64_PATTERN = "^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$"
DEFAULT_CLINICAL = ClinicalConfig()  # the covariates a model can read, with their kinds
# float32's largest finite value: patch features beyond it are refused (non_finite)
FLOAT32_MAX = 3.4028234663852886e38

ERROR_STATUSES: dict[str, tuple[str, list[str]]] = {
    "400": ("Not a valid request: the body does not match the schema.", [Reason.INVALID_SCHEMA]),
    "413": (
        "Too large: the body, the batch, the patches or the tile pixels exceed a limit.",
        [Reason.TOO_LARGE],
    ),
    "415": ("Neither JSON nor (on /predict) a multipart form.", [Reason.INVALID_SCHEMA]),
    "422": (
        "Well formed, but the served model cannot answer it: the reason says why (a modality or features "
        "it does not read, a shape or value it cannot take).",
        # invalid_schema too: BentoML's own 4xx answers keep their status and are relabelled invalid_schema
        # (serving.middleware.guarded_send)
        sorted(reason for reason in Reason if reason.http_status == 422 or reason is Reason.INVALID_SCHEMA),
    ),
    "503": ("The model is still loading (or failed to load): retry later.", [NOT_READY]),
    "504": ("No answer within the service's timeout.", [TIMED_OUT]),
}
ERROR_SCHEMA = {
    "type": "object",
    "title": "ErrorResponse",
    "description": "Body of every answer that is not 200.",
    "required": ["error", "reason"],
    "additionalProperties": False,
    "properties": {
        "error": {"type": "string", "description": "What is wrong, naming the field or the limit."},
        "reason": {
            "type": "string",
            "enum": [*(reason.value for reason in Reason), NOT_READY, TIMED_OUT, NO_MODEL_CARD],
            "description": "Machine-readable cause; also the x-healnet-rejection header of a rejection.",
        },
    },
}
OPTIONAL_ANSWER_FIELDS = ("attention", "attention_coords")  # left out of an answer unless asked for
# the model card's top-level parts; healnet/schemas/model_card.schema.json is its whole schema (JSON Schema
# 2020-12, which OpenAPI 3.0 cannot hold)
MODEL_CARD_SCHEMA = {
    "type": "object",
    "title": "ModelCard",
    "description": "The model card of the version that answers (docs/model_card.md); its whole schema is "
    "healnet/schemas/model_card.schema.json.",
    "required": [
        "schema_version",
        "model",
        "intended_use",
        "cohort",
        "metrics",
        "gate",
        "provenance",
        "limitations",
    ],
    "properties": {
        "schema_version": {"type": "string"},
        "model": {
            "type": "object",
            "required": ["version"],
            "properties": {"version": {"type": "string", "description": "healnet:VERSION"}},
        },
        "limitations": {"type": "array", "items": {"type": "string"}},
    },
}


def _multipart_form(request: dict) -> dict:
    """The form of /predict, which BentoML never sees (serving.middleware turns it into the JSON request):
    tile files, and parts that each hold the JSON value of the JSON request's field
    of the same name (`request`: the rewritten PredictRequest schema)."""
    properties = request["properties"]
    schema = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "wsi_tiles": {
                "type": "array",
                "items": {"type": "string", "format": "binary"},
                "description": "Slide tiles as PNG or JPEG files, one part each.",
            },
            "omics": properties["omics"],
            "clinical": properties["clinical"],
            "wsi_coords": _split_null(properties["wsi_coords"])[0]
            | {"description": "[x, y] of each tile, in upload order: the wsi_coords field."},
            "return_attention": {"type": "boolean"},
        },
        "allOf": [
            {"anyOf": [{"required": ["wsi_tiles"]}, *_non_empty_objects()]},
            _needs_a_slide("wsi_coords", ["wsi_tiles"]),
        ],
    }
    return {
        "schema": schema,
        "encoding": {part: {"contentType": JSON_MEDIA_TYPE} for part in MULTIPART_JSON_FIELDS},
    }


def _non_empty_objects() -> list[dict]:
    return [
        {"required": [name], "properties": {name: {"type": "object", "minProperties": 1}}}
        for name in ("omics", "clinical")
    ]


def _given(name: str) -> dict:
    """The field is there and not null."""
    return {"required": [name], "properties": {name: {"not": {"type": "null"}}}}


def _needs_a_slide(field: str, slide_fields: list[str]) -> dict:
    """`field`, when given, comes with one of `slide_fields`."""
    return {"anyOf": [{"not": _given(field)}, *(_given(name) for name in slide_fields)]}


def _request_rules() -> list[dict]:
    """What the fields say together: at least one modality (a non-empty omics or clinical object, or a
    slide), the slide given at most once, and wsi_coords only with a slide."""
    slides = list(SLIDE_INPUTS)
    one_modality = {"anyOf": [*_non_empty_objects(), *(_given(name) for name in slides)]}
    at_most_one_slide = [
        {"not": {"allOf": [_given(first), _given(second)]}}
        for index, first in enumerate(slides)
        for second in slides[index + 1 :]
    ]
    return [one_modality, *at_most_one_slide, _needs_a_slide("wsi_coords", slides)]


def _nullable(schema: dict) -> dict:
    return {"anyOf": [schema, {"type": "null"}]}


def _split_null(field: dict) -> tuple[dict, dict]:
    """(the field's schema without its null branch, its annotations: default, description, title). BentoML
    writes an optional field as anyOf [schema, null] in the components and as the schema alone inline."""
    field = copy.deepcopy(field)
    meta = {key: field.pop(key) for key in ("default", "description", "title") if key in field}
    branches = [branch for branch in field.pop("anyOf", []) if branch.get("type") != "null"]
    return (branches[0] if branches else field), meta


def _request_schema(schema: dict, limits: Limits) -> dict:
    schema = copy.deepcopy(schema)
    properties = schema["properties"]
    properties["omics"]["additionalProperties"]["minProperties"] = 1
    clinical = properties["clinical"]
    clinical["properties"] = {
        name: _nullable({"type": "number", "minimum": bounds.low, "maximum": bounds.high})
        for name, bounds in PLAUSIBLE_RANGES.items()
    }
    clinical["properties"] |= {
        name: _nullable({"type": "integer", "enum": [int(BINARY_RANGE.low), int(BINARY_RANGE.high)]})
        for name in DEFAULT_CLINICAL.binary
    } | {name: _nullable({"type": "string"}) for name in DEFAULT_CLINICAL.categorical}
    slide = {name: _split_null(properties[name]) for name in (*SLIDE_INPUTS, "wsi_coords")}
    rows = slide["wsi_features"][0]
    rows["maxItems"] = limits.max_patches
    rows["items"] |= {"minItems": 1}
    rows["items"]["items"] |= {"minimum": -FLOAT32_MAX, "maximum": FLOAT32_MAX}
    slide["wsi_tiles"][0]["maxItems"] = limits.max_tiles
    slide["wsi_tiles"][0]["items"] |= {"pattern": BASE64_PATTERN}
    slide["wsi_features_base64"][0]["pattern"] = BASE64_PATTERN
    coords = slide["wsi_coords"][0]
    coords["items"] |= {"minItems": 2, "maxItems": 2}
    coords["items"]["items"] |= {"minimum": -(2**63), "maximum": 2**63 - 1}
    for name, (core, meta) in slide.items():  # null, the default, is the same as leaving the field out
        properties[name] = {**_nullable(core), **meta}
    schema["allOf"] = _request_rules()
    return schema


def _answer_schema(schema: dict) -> dict:
    schema = copy.deepcopy(schema)
    for name in OPTIONAL_ANSWER_FIELDS:
        core, meta = _split_null(schema["properties"][name])
        meta.pop("default", None)  # left out when absent: no default value is ever sent
        schema["properties"][name] = {**core, **meta}
    return schema


def _error_responses() -> dict:
    return {
        status: {
            "description": description + f" Reasons: {', '.join(str(reason) for reason in reasons)}.",
            "content": {JSON_MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}},
        }
        for status, (description, reasons) in ERROR_STATUSES.items()
    }


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _error(description: str) -> dict:
    return {
        "description": description,
        "content": {JSON_MEDIA_TYPE: {"schema": _ref("ErrorResponse")}},
    }


def _model_card_operation() -> dict:
    return {
        "get": {
            "summary": "The model card of the answering version",
            "operationId": "model_card",
            "responses": {
                "200": {
                    "description": "The card's JSON, as `healnet registry card TAG --json` prints it.",
                    "content": {JSON_MEDIA_TYPE: {"schema": _ref("ModelCard")}},
                },
                "404": _error(
                    f"The answering version was registered before model cards were written. Reasons: "
                    f"{NO_MODEL_CARD}."
                ),
                "503": _error(
                    f"The model is still loading (or failed to load): retry later. Reasons: {NOT_READY}."
                ),
            },
        }
    }


def contract_document(spec: dict, limits: Limits | None = None) -> dict:
    """BentoML's OpenAPI document `spec` rewritten into the service's contract (see the module docstring).

    Both prediction routes refer to one request and one answer component (BentoML inlines a variant of
    them for /predict that differs between processes), so the document is the same wherever it is built."""
    limits = limits or Limits()
    spec = copy.deepcopy(spec)
    spec["info"] = {
        "title": "HEALNet survival prediction",
        "version": __version__,
        "description": (
            "Survival risk and curves from any subset of a case's modalities (omics, clinical covariates, a "
            "slide). Every answer that is not 200 has the body {error, reason}. docs/serving.md has examples."
        ),
    }
    schemas = spec["components"]["schemas"]
    for name in (
        "InvalidArgument",
        "NotFound",
        "InternalServerError",
        "TaskStatusResponse",
        "PredictRequestIODescriptor",
        "PredictResponseIODescriptor",
    ):
        schemas.pop(name, None)
    schemas["ErrorResponse"] = ERROR_SCHEMA
    schemas["ModelCard"] = MODEL_CARD_SCHEMA
    spec["paths"][MODEL_CARD_PATH] = _model_card_operation()
    schemas["PredictRequest"] = _request_schema(schemas["PredictRequest"], limits)
    schemas["PredictResponse"] = _answer_schema(schemas["PredictResponse"])
    for path in PREDICTION_PATHS:
        operation = spec["paths"][path]["post"]
        batch = path == "/predict_batch"
        request: dict = (
            {
                "type": "array",
                "items": _ref("PredictRequest"),
                "minItems": 1,
                "maxItems": limits.max_batch_cases,
            }
            if batch
            else _ref("PredictRequest")
        )
        answer = {"type": "array", "items": _ref("PredictResponse")} if batch else _ref("PredictResponse")
        content = {JSON_MEDIA_TYPE: {"schema": request}}
        if path == MULTIPART_PATH:
            content[MULTIPART_MEDIA_TYPE] = _multipart_form(schemas["PredictRequest"])
        operation["requestBody"] = {"required": True, "content": content}
        operation["responses"] = {
            "200": {"description": "The prediction.", "content": {JSON_MEDIA_TYPE: {"schema": answer}}},
            **_error_responses(),
        }
    return spec
