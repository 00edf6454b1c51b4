"""The fixed BentoML request timeout: same answers, and no timer left behind per request."""

from __future__ import annotations

import asyncio
import json

from bentoml._internal.server.http.traffic import TimeoutMiddleware

from serving.bentoml_patches import cancel_request_timers


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
