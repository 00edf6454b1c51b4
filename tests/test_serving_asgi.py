"""The service's ASGI app (BentoML's `Service.to_asgi()`) through a test client: HTTP status codes,
bodies, the request guard, and a property-based fuzz of the request schema (never a 5xx)."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY

from serving.demo import DemoSpec, demo_feature_names, demo_payload, demo_tiles
from serving.schemas import PredictResponse
from serving.service import HEALNetService

pytest_plugins = ("serving_fixtures",)
SPEC = DemoSpec()
MAX_BODY_BYTES = 64 * 1024
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
    assert response.json()["error"]  # BentoML names the failing fields in "detail"
    assert errors("invalid_schema") == before + 1


def test_a_non_json_body_is_415(client):
    before = errors("invalid_schema")
    response = client.post(
        "/predict", content=b"omics=1", headers={"content-type": "application/x-www-form-urlencoded"}
    )
    assert (response.status_code, response.json()["reason"]) == (415, "invalid_schema")
    assert errors("invalid_schema") == before + 1


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
