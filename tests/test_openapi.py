"""The service's OpenAPI document (serving/openapi.py): checked in, every answer documented, and the
request schema refusing what the service refuses wherever JSON Schema can say it."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
from referencing import Registry, Resource

from devtools.demo import demo_payload
from devtools.openapi_document import document
from serving.openapi import MODEL_CARD_PATH, NO_MODEL_CARD, NOT_READY, TIMED_OUT
from serving.reasons import Reason

REPO_ROOT = Path(__file__).resolve().parents[1]
CHECKED_IN = REPO_ROOT / "docs" / "openapi.json"
DOCUMENT = json.loads(CHECKED_IN.read_text())
PREDICTION = ("/predict", "/predict_batch")


def test_the_checked_in_document_is_the_services():
    """Regenerate with `python -m devtools.openapi_document > docs/openapi.json` after changing the API."""
    assert document() == DOCUMENT


@pytest.mark.parametrize("path", PREDICTION)
def test_every_answer_is_documented_with_the_error_body(path):
    responses = DOCUMENT["paths"][path]["post"]["responses"]
    assert sorted(responses) == ["200", "400", "413", "415", "422", "503", "504"]
    for status, response in responses.items():
        if status != "200":
            schema = response["content"]["application/json"]["schema"]
            assert schema == {"$ref": "#/components/schemas/ErrorResponse"}
    reasons = DOCUMENT["components"]["schemas"]["ErrorResponse"]["properties"]["reason"]["enum"]
    assert set(reasons) == {*(reason.value for reason in Reason), NOT_READY, TIMED_OUT, NO_MODEL_CARD}


def test_the_model_card_route_is_documented():
    responses = DOCUMENT["paths"][MODEL_CARD_PATH]["get"]["responses"]
    assert sorted(responses) == ["200", "404", "503"]
    assert responses["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ModelCard"
    }
    assert NO_MODEL_CARD in responses["404"]["description"] and NOT_READY in responses["503"]["description"]


def validator(path: str, media_type: str = "application/json") -> jsonschema.Draft4Validator:
    """A validator of the request body of `path` (OpenAPI 3.0 schemas are JSON Schema draft 4 plus
    `nullable`, which the document does not use)."""
    registry = Registry().with_resource("urn:openapi", Resource.opaque(DOCUMENT))
    schema = DOCUMENT["paths"][path]["post"]["requestBody"]["content"][media_type]["schema"]
    rooted = json.loads(json.dumps(schema).replace('"#/components', '"urn:openapi#/components'))
    return jsonschema.Draft4Validator(rooted, registry=registry)


REFUSED = {
    "no modality": {},
    "empty omics and clinical": {"omics": {}, "clinical": {}},
    "only null slides": {"wsi_features": None, "wsi_tiles": None},
    "an empty omic table": {"omics": {"mut": {}}},
    "two slide inputs": {"wsi_features": [[0.1]], "wsi_tiles": ["AAAA"]},
    "coordinates without a slide": {"clinical": {"age": 60}, "wsi_coords": [[0, 0]]},
    "a coordinate of three numbers": {"wsi_features": [[0.1]], "wsi_coords": [[0, 0, 0]]},
    "an implausible age": {"clinical": {"age": 300}},
    "a binary covariate of 2": {"clinical": {"is_female": 2}},
    "a number for a subtype": {"clinical": {"oncotree_code": 5}},
    "a patch value beyond float32": {"wsi_features": [[1e39]]},
    "base64 that is not": {"wsi_features_base64": "not base64!"},
    "an unknown field": {"clinical": {"age": 60}, "patient": "x"},
}


@pytest.mark.parametrize("body", REFUSED.values(), ids=REFUSED.keys())
def test_the_schema_refuses_what_the_service_refuses(body):
    assert not validator("/predict").is_valid(body)


def test_the_schema_accepts_whole_requests():
    accepts = validator("/predict")
    for modalities in (("omic",), ("wsi",), ("omic", "wsi", "clinical")):
        assert accepts.is_valid(demo_payload(modalities=modalities))
    assert accepts.is_valid(
        {"wsi_features_base64": "AAAAAA==", "wsi_coords": [[0, 0]], "return_attention": True}
    )
    batch = validator("/predict_batch")
    assert batch.is_valid([demo_payload(), {"clinical": {"age": 61, "oncotree_code": "IDC"}}])
    assert not batch.is_valid([])
    assert not batch.is_valid([{"omics": {}, "clinical": {}}])
    assert not batch.is_valid([{"clinical": {"age": 1}}] * 65)


def test_the_multipart_form_needs_a_modality_and_reads_json_parts():
    form = validator("/predict", "multipart/form-data")
    assert not form.is_valid({})
    assert not form.is_valid({"return_attention": True})
    assert not form.is_valid({"omics": {}, "wsi_coords": [[0, 0]]})
    assert form.is_valid({"wsi_tiles": ["…"], "wsi_coords": [[0, 0]], "return_attention": True})
    assert form.is_valid({"omics": {"mut": {"TP53_mut": 1}}})
    encoding = DOCUMENT["paths"]["/predict"]["post"]["requestBody"]["content"]["multipart/form-data"][
        "encoding"
    ]
    assert {part: value["contentType"] for part, value in encoding.items()} == dict.fromkeys(
        ("omics", "clinical", "wsi_coords", "return_attention"), "application/json"
    )


def test_absent_answer_fields_are_never_null():
    answer = DOCUMENT["components"]["schemas"]["PredictResponse"]
    for name in ("attention", "attention_coords"):
        assert name not in answer["required"]
        assert "null" not in json.dumps(answer["properties"][name])
