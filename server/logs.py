"""Logs of the server process: text lines for people, or `--log-format json` for collectors; and the
access log, the outermost ASGI layer.

JSON is one object per line: time, level, logger, message, and the structured fields a record carries
(the access log's request_id, method, path, status, model, user, ms), so that a log pipeline need not
parse the message text.

The access log gives every request an id (the client's `x-request-id` when sane), echoed in the response;
writes one line per request (`user` only as a hash); and counts requests by route and status. It wraps
the whole app, not a route, so unknown routes and early errors are logged and counted too.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import sys
import time
import uuid
from typing import Literal

import msgspec
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import error_type
from server.metrics import Metrics
from server.protocol import ErrorDetail, ErrorResponse

LogFormat = Literal["text", "json"]
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Attributes every LogRecord has; anything else on a record came from `extra=` and is a field.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}",
                 "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage()}
        entry |= {key: value for key, value in vars(record).items() if key not in _STANDARD}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


def configure(level: str, log_format: LogFormat) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    # httpx logs every request at INFO: a router's probes and a node's heartbeats, several a second. Our own
    # lines say what matters about them (a node out of rotation, a router unreachable); --log-level debug shows all.
    root = logging.getLogger().level
    for chatty in ("httpx", "httpcore"):
        logging.getLogger(chatty).setLevel(root if root <= logging.DEBUG else max(root, logging.WARNING))


access_log = logging.getLogger("sdserve.access")
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
            access_log.info("%(request_id)s %(method)s %(path)s %(status)d model=%(model)s user=%(user)s %(ms)dms",
                            fields, extra=fields)


async def _shutting_down(send: Send) -> None:
    """503 with the OpenAI error body, which a router re-dispatches."""
    body = msgspec.json.encode(ErrorResponse(ErrorDetail(
        message="the server shut down before this request finished; retry", type=error_type(503), param=None,
        code="shutting_down")))
    await send({"type": "http.response.start", "status": 503,
                "headers": [(b"content-type", b"application/json"), (b"retry-after", b"5"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
