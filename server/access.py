"""The outermost ASGI layer: a request id for every request (the client's `x-request-id` when sane),
echoed in the response; one access-log line per request (`user` only as a hash); request counts by route
and status.

It wraps the whole app, not a route, so unknown routes and early errors are logged and counted too.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import time
import uuid

import msgspec
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import error_type
from server.metrics import Metrics
from server.protocol import ErrorDetail, ErrorResponse

log = logging.getLogger("sdserve.access")
_SANE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def user_hash(user: str | None) -> str:
    """`user` is logged as a hash only."""
    return hashlib.sha256(user.encode()).hexdigest()[:12] if user else "-"


def _printable(path: str) -> str:
    """The path is percent-decoded: a `%0A` in it would start a forged log line. Encode controls again."""
    return _CONTROL.sub(lambda match: f"%{ord(match.group()):02X}", path)


class AccessLog:
    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = given if _SANE_ID.match(given) else uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        started = time.perf_counter()
        status = 0

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except asyncio.CancelledError:
            if status:
                raise
            # uvicorn cancels what still runs when its shutdown grace ends, and would answer a bare 500
            await _shutting_down(send_with_id)
        finally:
            status = status or 500
            route = scope.get("path_template") or "unmatched"
            self.metrics.requests.labels(route, str(status)).inc()
            fields = {"request_id": request_id, "method": scope["method"], "path": _printable(scope["path"]),
                      "status": status, "model": state.get("model", "-"), "user": state.get("user", "-"),
                      "ms": round((time.perf_counter() - started) * 1000)}
            log.info("%(request_id)s %(method)s %(path)s %(status)d model=%(model)s user=%(user)s %(ms)dms", fields,
                     extra=fields)


async def _shutting_down(send: Send) -> None:
    """503 with the OpenAI error body, which a router re-dispatches."""
    body = msgspec.json.encode(ErrorResponse(ErrorDetail(
        message="the server shut down before this request finished; retry", type=error_type(503), param=None,
        code="shutting_down")))
    await send({"type": "http.response.start", "status": 503,
                "headers": [(b"content-type", b"application/json"), (b"retry-after", b"5"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
