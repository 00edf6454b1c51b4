"""The service's ASGI app (BentoML's `Service.to_asgi()`) through a test client: HTTP status codes,
bodies, the request guard, and a property-based fuzz of the request schema (never a 5xx)."""

from __future__ import annotations

import asyncio
import base64
import json
import math
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY

from devtools.demo import DemoSpec, demo_feature_names, demo_payload, demo_tiles
from serving.middleware import guarded_send
from serving.schemas import PredictResponse
from serving.service import HEALNetService

pytest_plugins = ("serving_fixtures",)
SPEC = DemoSpec()
MAX_BODY_BYTES = 64 * 1024
MAX_TILES = 4
GENES = [name for names in demo_feature_names(SPEC).values() for name in names]


@pytest.fixture(scope="module")
def client(demo_registry, poll):
    with warnings.catch_warnings():  # starlette asks for httpx2, which is not installed; httpx works
        warnings.simplefilter("ignore")
        from starlette.testclient import TestClient
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HEALNET_MAX_BODY_BYTES", str(MAX_BODY_BYTES))
        patch.setenv("HEALNET_MAX_PATCHES", "64")
        patch.setenv("HEALNET_MAX_TILES", str(MAX_TILES))
        with TestClient(HEALNetService.to_asgi(), raise_server_exceptions=False) as client:
            assert poll(lambda: client.get("/readyz").status_code == 200, 60)
            yield client


def errors(reason: str) -> float:
    return REGISTRY.get_sample_value("healnet_validation_errors_total", {"reason": reason}) or 0.0


def test_health_endpoints(client):
    assert client.get("/livez").status_code == 200
    assert client.get("/readyz").status_code == 200


@pytest.mark.parametrize("modalities", [("omic", "wsi"), ("omic",), ("wsi",)])
def test_predict_over_http(client, modalities):
    response = client.post("/predict", json=demo_payload(SPEC, modalities, patches=5))
    assert response.status_code == 200, response.text
    answer = PredictResponse.model_validate(response.json())
    assert answer.modalities_used == list(modalities)


def test_predict_batch_takes_a_json_array(client):
    cases = [demo_payload(SPEC, ("omic",)), {"wsi_tiles": demo_tiles(2, size=32)}]
    response = client.post("/predict_batch", json=cases)
    assert response.status_code == 200, response.text
    assert [answer["modalities_used"] for answer in response.json()] == [["omic"], ["wsi"]]


SCHEMA_ERRORS = {
    "malformed JSON": (b'{"omics": {', "application/json"),
    "string for a number": (b'{"omics": {"mut": {"G0_mut": "1"}}}', "application/json"),
    "unknown field": (b'{"wsi": [[1.0]]}', "application/json"),
    "slide given twice": (
        json.dumps({"wsi_features": [[0.0] * 31], "wsi_tiles": ["AA=="]}).encode(),
        "application/json",
    ),
    "object for a batch": (b"{}", "application/json"),
}


@pytest.mark.parametrize("body, content_type", SCHEMA_ERRORS.values(), ids=SCHEMA_ERRORS.keys())
def test_schema_errors_are_400_and_counted_once(client, body, content_type):
    path = "/predict_batch" if body == b"{}" else "/predict"
    before = errors("invalid_schema")
    response = client.post(path, content=body, headers={"content-type": content_type})
    assert response.status_code == 400, response.text
    # BentoML's own answer, in the service's one error shape
    assert set(response.json()) == {"error", "reason"} and response.json()["reason"] == "invalid_schema"
    assert response.json()["error"] and response.headers["x-healnet-rejection"] == "invalid_schema"
    assert response.headers["content-type"].startswith("application/json")
    assert errors("invalid_schema") == before + 1


def test_a_non_json_body_is_415(client):
    before = errors("invalid_schema")
    response = client.post(
        "/predict", content=b"omics=1", headers={"content-type": "application/x-www-form-urlencoded"}
    )
    assert (response.status_code, response.json()["reason"]) == (415, "invalid_schema")
    assert errors("invalid_schema") == before + 1


def tile_files(
    count: int, size: int = 32, image_format: str = "PNG"
) -> list[tuple[str, tuple[str, bytes, str]]]:
    tiles = demo_tiles(count, size=size, image_format=image_format)
    kind = f"image/{image_format.lower()}"
    return [
        ("wsi_tiles", (f"tile{i}.{image_format.lower()}", base64.b64decode(t), kind))
        for i, t in enumerate(tiles)
    ]


def test_multipart_tiles_get_the_same_answer_as_base64_json(client):
    fields = demo_payload(SPEC, ("omic", "clinical"))
    coords = [[0, 0], [256, 0], [0, 256]]
    files = tile_files(3)
    tiles = [base64.b64encode(f[1][1]).decode() for f in files]
    as_json = client.post(
        "/predict", json={**fields, "wsi_tiles": tiles, "wsi_coords": coords, "return_attention": True}
    )
    text_parts = {name: json.dumps(value) for name, value in {**fields, "wsi_coords": coords}.items()}
    as_multipart = client.post("/predict", files=files, data={**text_parts, "return_attention": "true"})
    assert as_json.status_code == as_multipart.status_code == 200, as_multipart.text
    answer = as_multipart.json()
    assert answer["risk"] == pytest.approx(as_json.json()["risk"], abs=1e-6)
    assert answer["modalities_used"] == as_json.json()["modalities_used"] == ["omic", "wsi"]
    # the demo model has no clinical modality: the covariates arrive and are named as unused
    assert answer["unknown_features"] == as_json.json()["unknown_features"] == ["age", "is_female"]
    assert len(answer["attention"]["wsi"]) == 3
    assert answer["attention_coords"] == coords
    tiles_only = client.post("/predict", files=tile_files(2))
    assert tiles_only.status_code == 200 and tiles_only.json()["modalities_used"] == ["wsi"]


MULTIPART_ERRORS = {
    "tiles as text": (
        {"files": [("wsi_tiles", (None, b"https://example.org/tile.png"))]},
        400,
        "invalid_schema",
    ),
    "unknown field": ({"files": tile_files(1), "data": {"slide": "x"}}, 400, "invalid_schema"),
    "omics not JSON": ({"files": tile_files(1), "data": {"omics": "{mut"}}, 400, "invalid_schema"),
    "omics of wrong type": ({"files": tile_files(1), "data": {"omics": '{"mut": 1}'}}, 400, "invalid_schema"),
    "clinical not JSON": ({"files": tile_files(1), "data": {"clinical": "age=61"}}, 400, "invalid_schema"),
    "coords of wrong count": (
        {"files": tile_files(2), "data": {"wsi_coords": "[[0, 0]]"}},
        422,
        "wrong_dimensions",
    ),
    "GIF tile": ({"files": tile_files(1, image_format="GIF")}, 422, "bad_image"),
    "too many tiles": ({"files": tile_files(MAX_TILES + 1, size=8)}, 413, "too_large"),
    "far too many tiles": ({"files": tile_files(MAX_TILES + 3, size=8)}, 413, "too_large"),
    "only return_attention": ({"files": [("return_attention", (None, b"false"))]}, 422, "no_modality"),
}


@pytest.mark.parametrize(
    "request_parts, status, reason", MULTIPART_ERRORS.values(), ids=MULTIPART_ERRORS.keys()
)
def test_bad_multipart_requests_are_refused_with_their_reason(client, request_parts, status, reason):
    before = errors(reason)
    response = client.post("/predict", **request_parts)
    assert response.status_code == status, response.text
    assert response.json()["error"]
    assert errors(reason) == before + 1


def test_multipart_is_for_single_cases_only(client):
    response = client.post("/predict_batch", files=tile_files(1))
    assert (response.status_code, response.json()["reason"]) == (415, "invalid_schema")


def test_semantic_errors_are_422_with_their_reason_and_counted_once(client):
    before = {reason: errors(reason) for reason in ("non_finite", "invalid_schema")}
    body = json.dumps(
        {"omics": {"mut": {GENES[0]: math.nan}}}
    )  # json.dumps writes NaN, which the schema takes
    response = client.post("/predict", content=body, headers={"content-type": "application/json"})
    assert (response.status_code, response.headers["x-healnet-rejection"]) == (422, "non_finite")
    assert errors("non_finite") == before["non_finite"] + 1
    assert errors("invalid_schema") == before["invalid_schema"]


def test_an_oversized_body_is_413_declared_or_streamed(client):
    before = errors("too_large")
    big = json.dumps(demo_payload(SPEC, ("wsi",), patches=400)).encode()
    assert len(big) > MAX_BODY_BYTES
    declared = client.post("/predict", content=big, headers={"content-type": "application/json"})
    chunks = (big[i : i + 4096] for i in range(0, len(big), 4096))  # no content-length: chunked upload
    streamed = client.post("/predict", content=chunks, headers={"content-type": "application/json"})
    for response in (declared, streamed):
        assert (response.status_code, response.json()["reason"]) == (413, "too_large")
    assert errors("too_large") == before + 2


def test_a_streamed_body_under_the_limit_is_served(client):
    body = json.dumps(demo_payload(SPEC, ("omic",))).encode()
    chunks = (body[i : i + 256] for i in range(0, len(body), 256))
    response = client.post("/predict", content=chunks, headers={"content-type": "application/json"})
    assert response.status_code == 200, response.text


numbers = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.sampled_from([1e308, -1e308, 1e39, 0.0]),
)
json_values = st.recursive(
    st.none() | st.booleans() | numbers | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=12,
)
feature_names = st.sampled_from(GENES) | st.text(max_size=10)
tables = st.sampled_from(["mut", "cnv", "rnaseq", "omic", "proteome", ""])
omics = st.dictionaries(
    tables, st.dictionaries(feature_names, numbers | st.none() | json_values, max_size=6), max_size=4
)
patch_rows = st.lists(
    st.lists(numbers, min_size=SPEC.wsi_dim, max_size=SPEC.wsi_dim) | st.lists(numbers, max_size=40),
    max_size=70,
)
tiles = st.lists(st.sampled_from(demo_tiles(1, size=16)) | st.text(max_size=40), max_size=3)
requests = st.fixed_dictionaries(
    {},
    optional={
        "omics": omics | json_values,
        "wsi_features": patch_rows | json_values,
        "wsi_tiles": tiles | json_values,
        "wsi_features_base64": st.binary(max_size=SPEC.wsi_dim * 4 * 3).map(
            lambda b: base64.b64encode(b).decode()
        )
        | st.text(max_size=12)
        | json_values,
        "return_attention": st.booleans() | json_values,
        "extra": json_values,
    },
)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=requests | json_values, batch=st.booleans())
def test_fuzzed_requests_never_get_a_server_error(client, body, batch):
    payload = [body] if batch else body
    response = client.post(
        "/predict_batch" if batch else "/predict",
        content=json.dumps(payload, allow_nan=True),
        headers={"content-type": "application/json"},
    )
    assert response.status_code < 500, response.text
    if response.status_code == 200:
        answers = response.json() if batch else [response.json()]
        for answer in answers:
            PredictResponse.model_validate(answer)
            assert math.isfinite(answer["risk"])
    else:
        assert response.status_code in (400, 413, 422) and response.json()["error"]


tile_bytes = base64.b64decode(demo_tiles(1, size=16)[0])
part_names = st.sampled_from(["wsi_tiles", "omics", "return_attention"]) | st.text(min_size=1, max_size=6)
part_values = st.one_of(
    st.just(tile_bytes),
    st.binary(max_size=64),
    json_values.map(lambda value: json.dumps(value, allow_nan=True).encode()),
    omics.map(lambda value: json.dumps(value, allow_nan=True).encode()),
)
parts = st.lists(
    st.tuples(part_names, st.sampled_from([None, "tile.png", "tile.jpg"]), part_values),
    max_size=MAX_TILES + 3,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(parts=parts)
def test_fuzzed_multipart_requests_never_get_a_server_error(client, parts):
    files = [(name, (filename, value)) for name, filename, value in parts] or [("omics", (None, b"{}"))]
    response = client.post("/predict", files=files)
    assert response.status_code < 500, response.text
    assert response.status_code == 200 or response.json()["error"]


def test_the_guard_sends_a_response_body_given_in_parts_as_one_message():
    sent = []

    async def send(message):
        sent.append(message)

    async def respond():
        send_guarded = guarded_send(send)
        await send_guarded({"type": "http.response.start", "status": 200, "headers": []})
        await send_guarded({"type": "http.response.body", "body": b"ab", "more_body": True})
        held = list(sent)
        await send_guarded({"type": "http.response.body", "body": b"c", "more_body": True})
        await send_guarded({"type": "http.response.body", "body": b"", "more_body": False})
        return held

    assert asyncio.run(respond()) == []  # nothing leaves before the body is complete
    assert [message["type"] for message in sent] == ["http.response.start", "http.response.body"]
    assert sent[1]["body"] == b"abc" and not sent[1].get("more_body", False)


def test_the_openapi_document_describes_both_forms_of_predict(client):
    response = client.get("/docs.json")
    assert response.status_code == 200
    content = response.json()["paths"]["/predict"]["post"]["requestBody"]["content"]
    assert set(content) == {"application/json", "multipart/form-data"}
    form = content["multipart/form-data"]["schema"]["properties"]
    assert set(form) == {"wsi_tiles", "omics", "clinical", "wsi_coords", "return_attention"}
    assert form["wsi_tiles"]["items"] == {"type": "string", "format": "binary"}
    assert int(response.headers["content-length"]) == len(response.content)
