"""ASGI guard in front of the prediction routes: JSON only, a bounded body, and a count of the schema
errors that BentoML answers (400) before the service code sees the request."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterable

from serving import metrics
from serving.config import Limits

REJECTION_HEADER = "x-healnet-rejection"  # set on every rejection the service itself answers
JSON_MEDIA_TYPE = "application/json"

Message = dict
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


async def send_rejection(send: Send, status: int, reason: str, error: str) -> None:
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
        self.max_body_bytes = Limits.from_env().max_body_bytes

    async def __call__(self, scope: dict, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in self.paths:
            await self.app(scope, receive, send)
            return
        headers = {key.decode("latin-1").lower(): value.decode("latin-1") for key, value in scope["headers"]}
        media_type = headers.get("content-type", JSON_MEDIA_TYPE).split(";")[0].strip().lower()
        if media_type != JSON_MEDIA_TYPE:
            metrics.record_rejection("invalid_schema")
            await send_rejection(
                send, 415, "invalid_schema", f"content type {media_type!r} is not accepted: send JSON"
            )
            return
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            body, outcome = b"", "too_large"
        else:
            body, outcome = await self._read_body(receive)
        if outcome == "too_large":
            metrics.record_rejection("too_large")
            await send_rejection(
                send, 413, "too_large", f"the body exceeds the limit of {self.max_body_bytes} bytes"
            )
        elif outcome == "complete":
            await self.app(scope, _replay(body, receive), _count_schema_errors(send))

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


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


def _count_schema_errors(send: Send) -> Send:
    async def watch(message: Message) -> None:
        if message["type"] == "http.response.start" and message["status"] == 400:
            names = {key.decode("latin-1").lower() for key, _ in message.get("headers", [])}
            if REJECTION_HEADER not in names:
                metrics.record_rejection("invalid_schema")
        await send(message)

    return watch
