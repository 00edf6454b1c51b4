"""ASGI guard in front of the prediction routes: JSON (or, for one case, multipart tiles) only, a bounded
body, and a count of the schema errors that BentoML answers (400) before the service code sees the request.

A multipart/form-data `/predict` is rewritten into the JSON request it stands for (tile files become
base64 `wsi_tiles`), so that both encodings go through the same validation, metrics and model path.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable

from starlette.datastructures import Headers, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from serving import metrics
from serving.config import Limits
from serving.validation import RejectedRequest

REJECTION_HEADER = "x-healnet-rejection"  # set on every rejection the service itself answers
JSON_MEDIA_TYPE = "application/json"
MULTIPART_MEDIA_TYPE = "multipart/form-data"
MULTIPART_PATH = "/predict"
# Text parts, each holding the JSON value of the JSON request's field of the same name.
MULTIPART_JSON_FIELDS = ("omics", "clinical", "wsi_coords", "return_attention")
MULTIPART_FIELDS = ("wsi_tiles", *MULTIPART_JSON_FIELDS)
OPENAPI_PATH = "/docs.json"
# The multipart form of /predict, added to BentoML's OpenAPI document (BentoML never sees that form).
MULTIPART_SCHEMA = {
    "type": "object",
    "properties": {
        "wsi_tiles": {
            "type": "array",
            "items": {"type": "string", "format": "binary"},
            "description": "Slide tiles as PNG or JPEG files, one part each.",
        },
        "omics": {"type": "string", "description": "JSON object: the omics field of the JSON request."},
        "clinical": {"type": "string", "description": "JSON object: the clinical field of the JSON request."},
        "wsi_coords": {
            "type": "string",
            "description": "JSON array of [x, y], one per tile in upload order: the wsi_coords field.",
        },
        "return_attention": {"type": "string", "enum": ["true", "false"]},
    },
}


Message = dict
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


async def send_rejection(send: Send, status: int, reason: str, error: str) -> None:
    """Count the rejection by `reason` and answer it with `status` and a JSON body that names the problem."""
    metrics.record_rejection(reason)
    body = json.dumps({"error": error, "reason": reason}).encode()
    headers = [
        (b"content-type", JSON_MEDIA_TYPE.encode()),
        (b"content-length", str(len(body)).encode()),
        (REJECTION_HEADER.encode(), reason.encode()),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class RequestGuard:
    def __init__(self, app, paths: Iterable[str]):
        self.app = app
        self.paths = frozenset(paths)
        limits = Limits.from_env()
        self.max_body_bytes = limits.max_body_bytes
        self.max_tiles = limits.max_tiles

    async def __call__(self, scope: dict, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "GET" and scope["path"] == OPENAPI_PATH:
            await self.app(scope, receive, documenting_multipart(send))
            return
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in self.paths:
            await self.app(scope, receive, send)
            return
        headers = {key.decode("latin-1").lower(): value.decode("latin-1") for key, value in scope["headers"]}
        media_type = headers.get("content-type", JSON_MEDIA_TYPE).split(";")[0].strip().lower()
        multipart = media_type == MULTIPART_MEDIA_TYPE and scope["path"] == MULTIPART_PATH
        if media_type != JSON_MEDIA_TYPE and not multipart:
            accepted = "JSON, or multipart/form-data tiles on /predict"
            await send_rejection(
                send, 415, "invalid_schema", f"content type {media_type!r} is not accepted: send {accepted}"
            )
            return
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            body, outcome = b"", "too_large"
        else:
            body, outcome = await self._read_body(receive)
        if outcome == "too_large":
            await send_rejection(
                send, 413, "too_large", f"the body exceeds the limit of {self.max_body_bytes} bytes"
            )
        elif outcome == "complete":
            if multipart:
                try:
                    body = await multipart_as_json(scope, body, self.max_tiles)
                except RejectedRequest as rejection:
                    await send_rejection(send, rejection.status, rejection.reason, str(rejection))
                    return
                scope = _as_json_scope(scope, len(body))
            await self.app(scope, _replay(body, receive), guarded_send(send))

    async def _read_body(self, receive: Receive) -> tuple[bytes, str]:
        """The request body and "complete", or stop early with "too_large" or "disconnected"."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return b"", "disconnected"
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return b"", "too_large"
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks), "complete"


async def multipart_as_json(scope: dict, body: bytes, max_tiles: int) -> bytes:
    """The JSON body that a multipart /predict stands for: `wsi_tiles` file parts (PNG/JPEG), and optional
    text parts `omics`, `clinical`, `wsi_coords` and `return_attention`, each holding the JSON value of the
    JSON request's field of that name."""

    async def chunks() -> AsyncGenerator[bytes, None]:
        yield body

    parser = MultiPartParser(
        Headers(scope=scope), chunks(), max_files=max_tiles + 1, max_fields=len(MULTIPART_FIELDS)
    )
    try:
        form = await parser.parse()
    except MultiPartException as error:
        if "too many files" in str(error).lower():
            raise RejectedRequest("too_large", f"more than {max_tiles} tiles") from None
        raise RejectedRequest("invalid_schema", f"malformed multipart body: {error}") from None
    try:
        unknown = sorted(set(form.keys()) - set(MULTIPART_FIELDS))
        if unknown:
            raise RejectedRequest(
                "invalid_schema",
                f"unknown multipart fields {unknown}; expected {list(MULTIPART_FIELDS)}",
            )
        request_json: dict = {}
        tiles = form.getlist("wsi_tiles")
        files = [tile for tile in tiles if isinstance(tile, UploadFile)]
        if len(files) != len(tiles):
            raise RejectedRequest("invalid_schema", "wsi_tiles parts must be image files")
        if files:
            request_json["wsi_tiles"] = [base64.b64encode(await file.read()).decode() for file in files]
        for name in MULTIPART_JSON_FIELDS:
            values = form.getlist(name)
            texts = [value for value in values if isinstance(value, str)]
            if len(values) > 1 or len(texts) != len(values):
                raise RejectedRequest("invalid_schema", f"{name} must be one text field")
            if texts:
                try:
                    request_json[name] = json.loads(texts[0])
                except json.JSONDecodeError as error:
                    raise RejectedRequest("invalid_schema", f"{name} is not JSON: {error}") from None
    finally:
        await form.close()
    return json.dumps(request_json).encode()


def _as_json_scope(scope: dict, length: int) -> dict:
    headers = [
        (key, value)
        for key, value in scope["headers"]
        if key.lower() not in (b"content-type", b"content-length")
    ]
    headers += [(b"content-type", JSON_MEDIA_TYPE.encode()), (b"content-length", str(length).encode())]
    return {**scope, "headers": headers}


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


def whole_response(send: Send, rewrite: Callable[[Message, bytes], bytes] | None = None) -> Send:
    """`send` that holds a response until its body is complete, then sends one start and one body message.

    BentoML ends each body with an empty message, and every message crosses its whole middleware
    chain. `rewrite(start, body)` may replace the body; the content-length follows it.
    """
    start: Message | None = None
    chunks: list[bytes] = []

    async def sending(message: Message) -> None:
        nonlocal start
        if message["type"] == "http.response.start":
            start = message
            return
        if message["type"] != "http.response.body" or start is None:
            await send(message)
            return
        chunks.append(message.get("body", b""))
        if message.get("more_body", False):
            return
        body = b"".join(chunks)
        if rewrite is not None:
            body = rewrite(start, body)
        headers = [
            (key, value) for key, value in start.get("headers", []) if key.lower() != b"content-length"
        ]
        await send({**start, "headers": [*headers, (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    return sending


def guarded_send(send: Send) -> Send:
    """`whole_response` that gives BentoML's own 4xx answers (malformed JSON, schema errors, caught before
    the service code runs) the service's `{error, reason}` shape and header, counted as invalid_schema."""
    bentoml_answer = False

    def rewrite(start: Message, body: bytes) -> bytes:
        return _as_rejection_body(body) if bentoml_answer else body

    sending = whole_response(send, rewrite)

    async def guarded(message: Message) -> None:
        nonlocal bentoml_answer
        if message["type"] == "http.response.start" and 400 <= message["status"] < 500:
            names = {key.decode("latin-1").lower() for key, _ in message.get("headers", [])}
            if REJECTION_HEADER not in names:
                bentoml_answer = True
                metrics.record_rejection("invalid_schema")
                kept = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"content-type"]
                json_type = (b"content-type", JSON_MEDIA_TYPE.encode())
                message = {
                    **message,
                    "headers": [*kept, json_type, (REJECTION_HEADER.encode(), b"invalid_schema")],
                }
        await sending(message)

    return guarded


def _as_rejection_body(body: bytes) -> bytes:
    """BentoML's error body (JSON with an "error", or text) as the service's rejection body."""
    text = body.decode("utf-8", "replace").strip()
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError:
        parsed = None
    message = parsed.get("error") if isinstance(parsed, dict) else None
    error = str(message or text or "the request body is not a valid request")
    return json.dumps({"error": error, "reason": "invalid_schema"}).encode()


def documenting_multipart(send: Send) -> Send:
    """`send` for BentoML's OpenAPI document that adds the multipart form of /predict to it."""
    return whole_response(send, _with_multipart_form)


def _with_multipart_form(start: Message, body: bytes) -> bytes:
    if start["status"] != 200:
        return body
    spec = json.loads(body)
    spec["paths"][MULTIPART_PATH]["post"]["requestBody"]["content"][MULTIPART_MEDIA_TYPE] = {
        "schema": MULTIPART_SCHEMA
    }
    return json.dumps(spec).encode()
