"""ASGI guard in front of the prediction routes: JSON (or, for one case, multipart tiles) only, a bounded
body, and a count of the schema errors that BentoML answers (400) before the service code sees the request.

A multipart/form-data `/predict` is rewritten into the JSON request it stands for (tile files become
base64 `wsi_tiles`), so that both encodings go through the same validation, metrics and model path.

The guard also bounds what parsing the body will cost before anything parses it: BentoML's JSON parse
(pydantic) holds the event loop throughout and 70 to 180 bytes per value, so the values of a JSON body
are counted as it arrives and a body with too many is refused (docs/serving.md, "Memory budget per
request").
"""

from __future__ import annotations

import asyncio
import base64
import ctypes
import ctypes.util
import io
import json
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable
from typing import cast

from python_multipart.multipart import parse_options_header
from starlette.datastructures import FormData, Headers, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from serving import metrics
from serving.config import LARGE_REQUEST_BYTES, Limits
from serving.openapi import contract_document
from serving.reasons import Reason
from serving.schemas import JSON_MEDIA_TYPE, MULTIPART_JSON_FIELDS, MULTIPART_MEDIA_TYPE, MULTIPART_PATH
from serving.validation import RejectedRequest

REJECTION_HEADER = "x-healnet-rejection"  # set on every rejection the service itself answers
MULTIPART_FIELDS = ("wsi_tiles", *MULTIPART_JSON_FIELDS)
OPENAPI_PATH = "/docs.json"


Message = dict
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


async def send_rejection(send: Send, status: int, reason: Reason, error: str) -> None:
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


def _malloc_trim() -> Callable[[int], int] | None:
    library = ctypes.util.find_library("c")
    return getattr(ctypes.CDLL(library), "malloc_trim", None) if library else None


MALLOC_TRIM = _malloc_trim()  # glibc only; elsewhere the allocator keeps its own policy


def release_freed_memory() -> None:
    """Hand the heap pages freed by a large request back to the system. glibc keeps them otherwise:
    after a large block is freed it raises its mmap threshold, so the next request's arrays of up to
    32 MiB come from the heap, and pages freed between live blocks stay resident. In the adversarial
    soak (benchmarks/adversarial_soak.py) the worker ended 31 % above its starting memory without this."""
    if MALLOC_TRIM is not None:
        MALLOC_TRIM(0)


class RequestGuard:
    def __init__(self, app, paths: Iterable[str]):
        self.app = app
        self.paths = frozenset(paths)
        self.limits = Limits.from_env()
        self.large_requests = asyncio.Semaphore(self.limits.max_large_requests)

    async def __call__(self, scope: dict, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "GET" and scope["path"] == OPENAPI_PATH:
            await self.app(scope, receive, documenting_contract(send, self.limits))
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
                send,
                415,
                Reason.INVALID_SCHEMA,
                f"content type {media_type!r} is not accepted: send {accepted}",
            )
            return
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.limits.max_body_bytes:
            limit = self.limits.max_body_bytes
            await send_rejection(send, 413, Reason.TOO_LARGE, f"the body exceeds the limit of {limit} bytes")
            return
        if declared.isdigit() and int(declared) <= LARGE_REQUEST_BYTES:
            await self._guarded(scope, receive, send, multipart)
            return
        # Before its body is read: a waiting request costs its connection, not its body
        async with self.large_requests:
            await self._guarded(scope, receive, send, multipart)
        await asyncio.to_thread(release_freed_memory)

    async def _guarded(self, scope: dict, receive: Receive, send: Send, multipart: bool) -> None:
        try:
            # a multipart body is mostly binary tiles: only its JSON text parts are counted
            body = await self._read_body(receive, count_values=not multipart)
            if body is None:  # the client went away
                return
            if multipart:
                body = await multipart_as_json(scope, body, self.limits)
                scope = _as_json_scope(scope, len(body))
        except RejectedRequest as rejection:
            await send_rejection(send, rejection.status, rejection.reason, str(rejection))
            return
        await self.app(scope, _replay(body, receive), guarded_send(send))

    async def _read_body(self, receive: Receive, count_values: bool) -> bytes | None:
        """The request body, or None when the client disconnects; stops reading with RejectedRequest
        (too_large) as soon as it exceeds the body limit or, with `count_values`, the JSON value budget."""
        chunks: list[bytes] = []
        size = values = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limits.max_body_bytes:
                raise RejectedRequest(
                    Reason.TOO_LARGE, f"the body exceeds the limit of {self.limits.max_body_bytes} bytes"
                )
            if count_values:
                values += json_values(chunk)
                check_json_values(values, self.limits.max_json_values, "the body")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)
            # A chunk already received is returned without a turn of the event loop: without this, a
            # large body is read and counted in one stretch while the other requests wait.
            await asyncio.sleep(0)


def json_values(text: bytes) -> int:
    """At least the number of array items and object members in JSON `text` (or any part of it): each
    but the first of its container follows a comma. Commas and brackets inside strings count too, which
    only overestimates; a count this plain is cheap enough to run on every chunk as it arrives."""
    return text.count(b",") + text.count(b"[") + text.count(b"{")


def check_json_values(values: int, max_values: int, where: str) -> None:
    if values > max_values:
        raise RejectedRequest(
            Reason.TOO_LARGE,
            f"{where} holds more than {max_values} JSON values (array items and object members); "
            "wsi_features_base64 sends a bag of patch features as one value",
        )


async def multipart_as_json(scope: dict, body: bytes, limits: Limits) -> bytes:
    """The JSON body that a multipart /predict stands for: `wsi_tiles` file parts (PNG/JPEG), and optional
    text parts `omics`, `clinical`, `wsi_coords` and `return_attention`, each holding the JSON value of the
    JSON request's field of that name. Raises RejectedRequest for every malformed part."""

    async def chunks() -> AsyncGenerator[bytes, None]:
        yield body

    parser = MultiPartParser(
        Headers(scope=scope), chunks(), max_files=limits.max_tiles + 1, max_fields=len(MULTIPART_FIELDS)
    )
    _, options = parse_options_header(Headers(scope=scope).get("content-type", ""))
    closing = b"--" + options.get(b"boundary", b"") + b"--"
    if options.get(b"boundary") and closing not in body:  # the parser takes a cut body for a shorter one
        raise RejectedRequest(Reason.INVALID_SCHEMA, "malformed multipart body: it has no closing boundary")
    try:
        form = await parser.parse()
    except MultiPartException as error:
        if "too many files" in str(error).lower():
            raise RejectedRequest(Reason.TOO_LARGE, f"more than {limits.max_tiles} tiles") from None
        if "exceeded maximum size" in str(error).lower():  # a text part (starlette's limit: 1 MiB)
            raise RejectedRequest(Reason.TOO_LARGE, f"a multipart text part is too large: {error}") from None
        raise RejectedRequest(Reason.INVALID_SCHEMA, f"malformed multipart body: {error}") from None
    try:
        # base64 and JSON over up to max_body_bytes: in a thread, so that the event loop runs between parts
        return await asyncio.to_thread(_form_as_json, form, limits.max_json_values)
    finally:
        await form.close()


def _form_as_json(form: FormData, max_values: int) -> bytes:
    unknown = sorted(set(form.keys()) - set(MULTIPART_FIELDS))
    if unknown:
        raise RejectedRequest(
            Reason.INVALID_SCHEMA, f"unknown multipart fields {unknown}; expected {list(MULTIPART_FIELDS)}"
        )
    tiles = form.getlist("wsi_tiles")
    files = [tile for tile in tiles if isinstance(tile, UploadFile)]
    if len(files) != len(tiles):
        raise RejectedRequest(Reason.INVALID_SCHEMA, "wsi_tiles parts must be image files")
    texts = {}
    for name in MULTIPART_JSON_FIELDS:
        parts = form.getlist(name)
        if len(parts) > 1 or not all(isinstance(part, str) for part in parts):
            raise RejectedRequest(Reason.INVALID_SCHEMA, f"{name} must be one text field")
        if parts:
            texts[name] = cast(str, parts[0])
    text_values = sum(json_values(text.encode()) for text in texts.values())
    check_json_values(text_values, max_values, "the text parts")
    members = []
    for name, text in texts.items():
        try:
            value = json.loads(text)
        # ValueError: not JSON, or an integer beyond Python's limit on digits; RecursionError: nested deeper
        # than Python's recursion limit
        except (ValueError, RecursionError) as error:
            raise RejectedRequest(
                Reason.INVALID_SCHEMA, f"{name} is not JSON the service reads: {error}"
            ) from None
        members.append(f"{json.dumps(name)}:{json.dumps(value)}".encode())
    body = io.BytesIO()
    body.write(b"{" + b",".join(members))
    if files:
        # Written tile by tile, each file closed once copied: no second copy of every tile at once, and
        # the event loop gets the interpreter between tiles. Base64 needs no escaping in a JSON string.
        body.write(b',"wsi_tiles":[' if members else b'"wsi_tiles":[')
        for index, file in enumerate(files):
            body.write(b',"' if index else b'"')
            body.write(base64.b64encode(file.file.read()))
            body.write(b'"')
            file.file.close()
        body.write(b"]")
    body.write(b"}")
    return body.getvalue()


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
                metrics.record_rejection(Reason.INVALID_SCHEMA)
                kept = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"content-type"]
                json_type = (b"content-type", JSON_MEDIA_TYPE.encode())
                message = {
                    **message,
                    "headers": [
                        *kept,
                        json_type,
                        (REJECTION_HEADER.encode(), Reason.INVALID_SCHEMA.encode()),
                    ],
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
    return json.dumps({"error": error, "reason": Reason.INVALID_SCHEMA}).encode()


def documenting_contract(send: Send, limits: Limits) -> Send:
    """`send` for BentoML's OpenAPI document that rewrites it into the service's contract
    (`serving.openapi.contract_document`)."""

    def rewrite(start: Message, body: bytes) -> bytes:
        if start["status"] != 200:
            return body
        return json.dumps(contract_document(json.loads(body), limits)).encode()

    return whole_response(send, rewrite)
