"""A fix for BentoML 1.4's request timeout, applied when the service module is imported.

BentoML's `TimeoutMiddleware` schedules `loop.call_later(timeout, ...)` for every request and never
cancels it. Each pending timer keeps the request's context alive, with its OpenTelemetry span, for
the whole timeout (60 s): at 800 requests/s one worker held about 200 MB more, and its throughput
fell by a tenth as the garbage collector walked the retained objects. The replacement below behaves
the same (504 when no response has started within the timeout) and cancels the timer when the
request ends. It replaces only the implementation it was written against: if BentoML's changes,
that one is kept and a warning says so.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import logging

from bentoml._internal.server.http.traffic import TimeoutMiddleware
from starlette.responses import JSONResponse

logger = logging.getLogger("healnet.serving")
# sha256 of the source of TimeoutMiddleware.__call__ in BentoML 1.4.40.
LEAKING_TIMEOUT_SOURCE = "fd8b9e3da28ed2b44cfd508d641617e049fcd4986138197ce7bb227332505896"


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
        await started
    except TimeoutError:
        if request.cancel():
            response = JSONResponse(
                {"error": f"Not able to process the request in {self.timeout} seconds"}, status_code=504
            )
            await response(scope, receive, send)
    else:
        await request
    finally:
        timer.cancel()


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
