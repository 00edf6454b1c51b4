"""Fixes for BentoML 1.4, applied when the service module is imported. Each replaces only the
implementation it was written against (checked by the sha256 of its source): if BentoML's changes, that
one is kept and a warning says so.

Request timers: BentoML's `TimeoutMiddleware` schedules `loop.call_later(timeout, ...)` for every request
and never cancels it. Each pending timer keeps the request's context alive, with its OpenTelemetry span,
for the whole timeout (60 s): at 800 requests/s one worker held about 200 MB more, and its throughput
fell by a tenth as the garbage collector walked the retained objects. The replacement behaves the same
(504 when no response has started within the timeout) and cancels the timer when the request ends.

Request metric labels: BentoML's `RunnerTrafficMetricsMiddleware` labels its request metrics with the raw
request path, which the client chooses: 3,000 GETs to random paths grew /metrics from 0.4 to 13 MB, its
scrape from 0.11 to 4.7 s and a worker by 270 MiB (every series lives on in the multiprocess files). The
replacement labels a request with the path template of the route that answers it ("/predict", "/readyz",
the prefix of a mount) and every other path with "other", so the series are bounded by the routes.

JSON parse of list inputs: BentoML parses the body of an API whose input is a list (`/predict_batch`)
with the standard library's `json.loads` and then validates the Python objects, on the event loop,
rebuilding the input's JSON schema on every request; a 62.7 MiB batch held the loop for about 0.45 s
(pydantic's own JSON parser, used for `/predict`, takes 45 ms). The replacement validates the body with
pydantic's JSON parser, as for every other input, through one TypeAdapter per input type.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import logging
from timeit import default_timer
from typing import Annotated

from _bentoml_sdk.io_models import IORootModel
from bentoml._internal.context import server_context
from bentoml._internal.server.http.instruments import RunnerTrafficMetricsMiddleware
from bentoml._internal.server.http.traffic import TimeoutMiddleware
from pydantic import TypeAdapter
from starlette.responses import JSONResponse
from starlette.routing import Match

from serving.openapi import TIMED_OUT

logger = logging.getLogger("healnet.serving")
# sha256 of the source of TimeoutMiddleware.__call__ in BentoML 1.4.40.
LEAKING_TIMEOUT_SOURCE = "fd8b9e3da28ed2b44cfd508d641617e049fcd4986138197ce7bb227332505896"
# sha256 of the sources of RunnerTrafficMetricsMiddleware.__call__ and of its _setup (which creates the
# metrics and label names the replacement uses) in BentoML 1.4.40.
PATH_LABELLED_METRICS_SOURCES = (
    "b7dc25ae0208d7b27864271735f917f20fe7712a3d76e9afefca4271f5b458d9",
    "2aaf597231c95f1be2cf74473c63df342ba72f2e4f50953675cff464a6679b00",
)
# sha256 of the source of IORootModel.model_validate_json in BentoML 1.4.40.
STDLIB_ROOT_JSON_SOURCE = "91bb58747b931a55169a9a0a237ce5b35c155dcba8b016d0139b9ee3e834324a"
# The endpoint label of a request that no route answers (a 404): one series however many such paths.
UNROUTED_ENDPOINT = "other"


async def _call_with_cancelled_timer(self: TimeoutMiddleware, scope, receive, send) -> None:
    if scope["type"] not in ("http", "websocket"):
        return await self.app(scope, receive, send)
    loop = asyncio.get_running_loop()
    started = loop.create_future()
    timer = loop.call_later(self.timeout, self._set_timer_out, started)

    async def send_started(message) -> None:
        if not started.done():
            started.set_result(None)
        await send(message)

    request = asyncio.ensure_future(self.app(scope, receive, send_started))
    try:
        # Waiting on the request too: one that fails before its response starts raises at once instead
        # of holding the client until the timeout.
        await asyncio.wait((started, request), return_when=asyncio.FIRST_COMPLETED)
        if started.done() and isinstance(started.exception(), TimeoutError):
            if request.cancel():
                response = JSONResponse(
                    {
                        "error": f"Not able to process the request in {self.timeout} seconds",
                        "reason": TIMED_OUT,
                    },
                    status_code=504,
                )
                await response(scope, receive, send)
        else:
            await request
    finally:
        timer.cancel()


def route_label(scope) -> str:
    """The path template of the route that answers this request, or UNROUTED_ENDPOINT: never the raw path.

    A route that matches the path but not the method (a 405) still names the request; Starlette sets
    scope["app"] before the middleware runs."""
    for route in scope["app"].router.routes:
        match, _ = route.matches(scope)
        if match is not Match.NONE:
            return route.path
    return UNROUTED_ENDPOINT


async def _call_with_route_labels(self: RunnerTrafficMetricsMiddleware, scope, receive, send) -> None:
    """BentoML 1.4.40's implementation with the endpoint label taken from `route_label`."""
    if not self._is_setup:
        self._setup()
    if not scope["type"].startswith(("http", "websocket")) or (
        scope["type"].startswith("http") and scope["path"] == "/metrics"
    ):
        await self.app(scope, receive, send)
        return
    service = {
        "service_name": server_context.bento_name,
        "service_version": server_context.bento_version,
        "runner_name": server_context.service_name,
    }
    labels = {"endpoint": route_label(scope), **service}
    if not scope["path"].startswith(tuple(self.skip_paths)):
        self.metrics_last_request_timestamp.labels(**service).set_to_current_time()
    start_time = default_timer()
    status_code = 0

    def data_length(message) -> int:
        return len(message["bytes"]) if message.get("bytes") is not None else len(message["text"])

    async def wrapped_receive():
        message = await receive()
        if message["type"] == "websocket.disconnect":
            self.metrics_websocket_connections.labels(**labels).dec()
        elif message["type"] == "websocket.receive":
            self.metrics_websocket_data_received.labels(**labels).observe(data_length(message))
        return message

    async def wrapped_send(message) -> None:
        nonlocal status_code
        if message["type"] == "http.response.start":
            status_code = message["status"]
        elif message["type"] == "http.response.body" and not message.get("more_body", False):
            self.metrics_request_total.labels(**labels, http_response_code=status_code).inc()
            self.metrics_request_duration.labels(**labels, http_response_code=status_code).observe(
                max(default_timer() - start_time, 0)
            )
        elif message["type"] == "websocket.send":
            self.metrics_websocket_data_sent.labels(**labels).observe(data_length(message))
        elif message["type"] == "websocket.accept":
            self.metrics_websocket_connections.labels(**labels).inc()
        elif message["type"] == "websocket.close":
            self.metrics_websocket_connections.labels(**labels).dec()
        await send(message)

    with self.metrics_request_in_progress.labels(**labels).track_inprogress():
        await self.app(scope, wrapped_receive, wrapped_send)


_stdlib_validate_root_json = IORootModel.model_validate_json.__func__
_root_adapters: dict[type, TypeAdapter | None] = {}  # None: a text or file input, left to BentoML


def _root_adapter(cls: type[IORootModel]) -> TypeAdapter | None:
    if cls not in _root_adapters:
        field = cls.model_fields["root"]
        annotated = Annotated[(field.annotation, *field.metadata)] if field.metadata else field.annotation
        text_or_file = cls.model_json_schema().get("type") in ("string", "file")
        _root_adapters[cls] = None if text_or_file else TypeAdapter(annotated)  # type: ignore[arg-type]
    return _root_adapters[cls]


def _validate_root_json_with_pydantic(cls: type[IORootModel], json_data, **kwargs) -> IORootModel:
    adapter = _root_adapter(cls)
    if adapter is None:
        return _stdlib_validate_root_json(cls, json_data, **kwargs)
    # the validated items are model instances, which the root model's own validation takes as they are
    return cls.model_validate(adapter.validate_json(json_data), **kwargs)


def _source_digest(function) -> str:
    return hashlib.sha256(inspect.getsource(function).encode()).hexdigest()


def cancel_request_timers() -> bool:
    """Install the fixed `TimeoutMiddleware.__call__`; True when installed (now or before)."""
    if TimeoutMiddleware.__call__ is _call_with_cancelled_timer:
        return True
    if _source_digest(TimeoutMiddleware.__call__) != LEAKING_TIMEOUT_SOURCE:
        logger.warning(
            "BentoML's TimeoutMiddleware is not the version this fix was written for; left as it is"
        )
        return False
    TimeoutMiddleware.__call__ = _call_with_cancelled_timer
    return True


def bound_request_metric_labels() -> bool:
    """Install the route-labelled `RunnerTrafficMetricsMiddleware.__call__`; True when installed (now or
    before)."""
    middleware = RunnerTrafficMetricsMiddleware
    if middleware.__call__ is _call_with_route_labels:
        return True
    digests = (_source_digest(middleware.__call__), _source_digest(middleware._setup))
    if digests != PATH_LABELLED_METRICS_SOURCES:
        logger.warning(
            "BentoML's RunnerTrafficMetricsMiddleware is not the version this fix was written for; left as"
            " it is: its request metrics are labelled by the raw path"
        )
        return False
    middleware.__call__ = _call_with_route_labels
    return True


def parse_list_inputs_with_pydantic() -> bool:
    """Install the pydantic JSON parse for list inputs (`IORootModel.model_validate_json`); True when
    installed (now or before)."""
    if IORootModel.model_validate_json.__func__ is _validate_root_json_with_pydantic:
        return True
    if _source_digest(_stdlib_validate_root_json) != STDLIB_ROOT_JSON_SOURCE:
        logger.warning(
            "BentoML's IORootModel.model_validate_json is not the version this fix was written for; left"
            " as it is: list inputs are parsed with json.loads on the event loop"
        )
        return False
    IORootModel.model_validate_json = classmethod(_validate_root_json_with_pydantic)  # type: ignore[assignment]
    return True
