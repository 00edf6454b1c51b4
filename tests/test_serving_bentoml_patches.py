"""The BentoML fixes: the request timeout gives the same answers and leaves no timer behind per request;
the request metrics are labelled by route, so client-chosen paths cannot grow /metrics; list inputs are
parsed by pydantic's JSON parser, with the answers of the standard library's."""

from __future__ import annotations

import asyncio
import json
import secrets
from concurrent.futures import ThreadPoolExecutor

import _bentoml_sdk.io_models
import httpx
import pytest
from bentoml._internal.server.http.instruments import RunnerTrafficMetricsMiddleware
from bentoml._internal.server.http.traffic import TimeoutMiddleware
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route

from serving.bentoml_patches import (
    UNROUTED_ENDPOINT,
    bound_request_metric_labels,
    cancel_request_timers,
    parse_list_inputs_with_pydantic,
    route_label,
)
from serving.schemas import PredictRequest

pytest_plugins = ("serving_fixtures",)
RANDOM_PATH_REQUESTS = 400


async def answer_after(seconds: float, scope, receive, send) -> None:
    await asyncio.sleep(seconds)
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"done"})


def serve(app_delay: float, timeout: float) -> tuple[list[dict], int]:
    """Messages sent for one request through TimeoutMiddleware, and the timers still pending after it."""
    sent = []

    async def send(message):
        sent.append(message)

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def scenario():
        middleware = TimeoutMiddleware(lambda *args: answer_after(app_delay, *args), timeout=timeout)
        await middleware({"type": "http", "method": "GET", "path": "/"}, receive, send)
        loop = asyncio.get_running_loop()
        return sum(not handle.cancelled() for handle in loop._scheduled)

    return sent, asyncio.run(scenario())


def test_the_fix_is_installed_for_this_bentoml():
    assert cancel_request_timers()
    assert cancel_request_timers()  # idempotent


def test_a_finished_request_leaves_no_pending_timer():
    assert cancel_request_timers()
    sent, pending = serve(app_delay=0.0, timeout=60)
    assert [message.get("body") for message in sent] == [None, b"done"]
    assert pending == 0


def test_a_slow_request_still_gets_a_504():
    assert cancel_request_timers()
    sent, _ = serve(app_delay=5.0, timeout=0.05)
    assert sent[0]["status"] == 504
    assert "0.05 seconds" in json.loads(sent[1]["body"])["error"]


def test_the_metric_label_fix_is_installed_for_this_bentoml():
    assert bound_request_metric_labels()
    assert bound_request_metric_labels()  # idempotent


def test_a_bentoml_whose_metrics_middleware_changed_is_left_as_it_is(monkeypatch, caplog):
    async def changed_upstream(self, scope, receive, send):
        await self.app(scope, receive, send)

    monkeypatch.setattr(RunnerTrafficMetricsMiddleware, "__call__", changed_upstream)
    assert not bound_request_metric_labels()
    assert RunnerTrafficMetricsMiddleware.__call__ is changed_upstream
    assert "not the version this fix was written for" in caplog.text


def test_the_list_parse_fix_is_installed_for_this_bentoml():
    assert parse_list_inputs_with_pydantic()
    assert parse_list_inputs_with_pydantic()  # idempotent


def test_a_list_input_is_parsed_without_the_standard_library_and_validated_the_same(monkeypatch):
    from serving.service import HEALNetService

    batch_input = HEALNetService.apis["predict_batch"].input_spec
    body = json.dumps([{"omics": {"mut": {"TP53_mut": 1}}}, {"clinical": {"age": 61.5, "stage": None}}])
    expected = [
        PredictRequest(omics={"mut": {"TP53_mut": 1.0}}),
        PredictRequest(clinical={"age": 61.5, "stage": None}),
    ]

    def refuse(*args, **kwargs):
        raise AssertionError("json.loads parsed the body")

    assert parse_list_inputs_with_pydantic()
    monkeypatch.setattr(_bentoml_sdk.io_models.json, "loads", refuse)
    assert batch_input.model_validate_json(body).root == expected
    for invalid in ('[{"omics": {"mut": {"TP53_mut": "1"}}}]', '[{"unknown": 1}]', "[" * 1000 + "]" * 1000):
        with pytest.raises(ValidationError):
            batch_input.model_validate_json(invalid)


def test_a_request_is_labelled_by_the_route_that_answers_it():
    async def ok(request):
        return PlainTextResponse("ok")

    app = Starlette(
        routes=[
            Route("/predict", ok, methods=["POST"]),
            Route("/tasks/{task_id}", ok),
            Mount("/static_content", routes=[Route("/{name:path}", ok)]),
        ]
    )

    def label(path: str, method: str = "GET") -> str:
        return route_label({"type": "http", "app": app, "path": path, "method": method, "root_path": ""})

    assert label("/predict", "POST") == label("/predict") == "/predict"  # a 405 still names its route
    assert label("/tasks/8d1c") == "/tasks/{task_id}"
    assert label("/static_content/any/file.js") == "/static_content"
    assert {label(f"/{secrets.token_hex(8)}") for _ in range(20)} == {UNROUTED_ENDPOINT}


def request_series(metrics: dict) -> dict[tuple, float]:
    """BentoML's own request series (bentoml_service_*): those labelled by endpoint."""
    return {key: value for key, value in metrics.items() if dict(key[1]).get("endpoint") is not None}


@pytest.mark.slow
def test_random_paths_do_not_grow_the_metrics_of_a_live_server(demo_registry, serve, metrics_of, tmp_path):
    with serve(demo_registry, tmp_path / "serve.log") as url:
        for path in ("/livez", "/readyz", "/no-such-page"):
            httpx.get(f"{url}{path}", timeout=10)
        size_before = len(httpx.get(f"{url}/metrics", timeout=10).content)
        series_before = request_series(metrics_of(url))
        paths = [f"/{secrets.token_hex(6)}/{secrets.token_hex(4)}" for _ in range(RANDOM_PATH_REQUESTS)]
        with ThreadPoolExecutor(max_workers=4) as pool:
            statuses = list(pool.map(lambda path: httpx.get(f"{url}{path}", timeout=10).status_code, paths))
        assert set(statuses) == {404}
        size_after = len(httpx.get(f"{url}/metrics", timeout=10).content)
        series_after = request_series(metrics_of(url))
    endpoints = {dict(labels)["endpoint"] for _, labels in series_after}
    assert endpoints <= {"/predict", "/predict_batch", "/livez", "/readyz", UNROUTED_ENDPOINT}, endpoints
    assert set(series_after) == set(series_before), "random paths added series"
    assert size_after < size_before + 2_000, (size_before, size_after)
    unrouted = {
        key: value
        for key, value in series_after.items()
        if key[0] == "bentoml_service_request_total" and dict(key[1])["endpoint"] == UNROUTED_ENDPOINT
    }
    assert sum(unrouted.values()) == RANDOM_PATH_REQUESTS + 1, unrouted
