"""The one place where exceptions become HTTP statuses with the OpenAI error body.

    ApiError(status, message, …)  raised by our own HTTP layer (queue full, auth, limits, timeouts)
    engines.InvalidRequest        → 400, param = the request field
    engines.ModelNotFound         → 404 model_not_found, param "model"
    engines.RenderCancelled       → 499 (the client is gone; nobody reads the answer)
    a body cut off by the client  → 499 too (its doing, not a fault here)
    engines.EngineFailure         → 500, logged
    Litestar validation errors    → 400 with the field path as `param`
    Litestar HTTP exceptions      → their status (unknown route 404, body too large 413, …)
    anything else                 → 500, logged with the request id

Every body has all four keys: message, type, param, code.
"""

from __future__ import annotations

import logging
import re

import msgspec
from litestar import Request, Response
from litestar.exceptions import HTTPException, InternalServerException, ValidationException
from litestar.openapi import ResponseSpec

from engines.errors import EngineError, EngineFailure, InvalidRequest, ModelNotFound, RenderCancelled
from server.protocol import ErrorDetail, ErrorResponse

log = logging.getLogger("sdserve.server")

_TYPES = {401: "authentication_error", 429: "rate_limit_error"}
_WHEN = {
    400: "a field is invalid or missing (`param` names it), or the body is malformed",
    401: "API keys are configured and the key is missing or wrong",
    403: "the lease does not match the node's registration",
    404: "unknown model (`param` is `model`), route, or expired file",
    409: "the node id is taken by a live node, or not registered here; a model to unload is in use",
    413: "a file or the whole body is over the limit",
    415: "unsupported content type for the route",
    429: "the queue for the model is full; see `Retry-After`",
    500: "an internal fault, logged with the request id",
    503: "no node can serve the model now (none registered, loading, draining); see `Retry-After`",
    504: "the render took longer than the request timeout",
    507: "the model is larger than the node's memory budget (--max-loaded-bytes)",
}
IMAGE_ERRORS = (400, 401, 404, 413, 415, 429, 500, 503, 504)
_MISSING = re.compile(r"missing required field `([^`]+)`")


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}


def queue_full(model: str, running: int, waiting: int, seconds: int) -> ApiError:
    """The 429 of a model's full queue (a node's, or a standalone server's own), with the wait until room."""
    return ApiError(429, f"the queue for model '{model}' is full ({running} rendering, {waiting} waiting); retry in "
                    f"about {seconds} s", code="queue_full", headers={"Retry-After": str(seconds)})


def documented(*statuses: int) -> dict[int, ResponseSpec]:
    """A route's error statuses for OpenAPI, each with the OpenAI error body (instead of Litestar's own)."""
    return {status: ResponseSpec(data_container=ErrorResponse, description=_WHEN[status], generate_examples=False)
            for status in statuses}


def error_type(status: int) -> str:
    return _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> Response[ErrorResponse]:
    body = ErrorResponse(ErrorDetail(message=message, type=error_type(status), param=param, code=code))
    return Response(body, status_code=status, headers=headers or {}, media_type="application/json")


def to_response(exc: Exception, request_id: str | None = None) -> Response[ErrorResponse]:
    """Map any exception to the OpenAI error envelope (also used for errors from nodes)."""
    if isinstance(exc, ApiError):
        return error_response(exc.status, exc.message, exc.param, exc.code, exc.headers)
    if isinstance(exc, InvalidRequest):
        return error_response(400, exc.message, exc.param, exc.code or f"invalid_{exc.param}")
    if isinstance(exc, ModelNotFound):
        return error_response(404, str(exc), "model", "model_not_found")
    if isinstance(exc, RenderCancelled) or _client_gone(exc):
        return error_response(499, "the client closed the request", None, "client_closed_request")
    if isinstance(exc, ValidationException):
        return _validation_response(exc)
    if isinstance(exc, msgspec.ValidationError):
        return _strict_validation_response(exc)
    if isinstance(exc, msgspec.DecodeError):  # a body decoded by a handler itself (JSON edits)
        return error_response(400, f"the body is not valid JSON: {exc}", None, "invalid_body")
    if isinstance(exc, HTTPException):
        return _http_response(exc)
    if isinstance(exc, EngineFailure | EngineError):
        log.error("request %s: engine failure: %s", request_id, exc)
        return error_response(500, "the model failed to render this request; it was logged", None, "engine_failure")
    log.exception("request %s: internal error", request_id, exc_info=exc)
    return error_response(500, "internal server error; it was logged with the request id", None, "internal_error")


def _client_gone(exc: Exception) -> bool:
    """Litestar's body reader reports a client that left mid-upload as a 500 with this detail."""
    return isinstance(exc, InternalServerException) and exc.detail == "client disconnected prematurely"


def _validation_response(exc: ValidationException) -> Response[ErrorResponse]:
    """Litestar reports msgspec's errors with the field as `key` ("data" for the body as a whole)."""
    problems = exc.extra if isinstance(exc.extra, list) else []
    first = problems[0] if problems and isinstance(problems[0], dict) else {}
    message, key = str(first.get("message", exc.detail)), first.get("key")
    if message == "'data'":  # Litestar found no body at all
        return error_response(400, "the request body is empty", None, "invalid_body")
    missing = _MISSING.search(message)
    if missing:
        return error_response(400, f"missing required parameter '{missing.group(1)}'", missing.group(1),
                              "missing_required_parameter")
    param = None if key in (None, "data") else str(key).removeprefix("data.")
    text = f"invalid value for '{param}': {message}" if param else f"invalid request body: {message}"
    return error_response(400, text, param, f"invalid_{param}" if param else "invalid_request")


def _strict_validation_response(exc: msgspec.ValidationError) -> Response[ErrorResponse]:
    """A strict msgspec decode: "Expected `int`, got `str` - at `$.n`" names the field by its path."""
    message = str(exc)
    missing = _MISSING.search(message)
    if missing:
        return error_response(400, f"missing required parameter '{missing.group(1)}'", missing.group(1),
                              "missing_required_parameter")
    text, path = error_path(exc)
    param = path[0] if path else None
    body = f"invalid value for '{param}': {text}" if param else f"invalid request body: {text}"
    return error_response(400, body, param, f"invalid_{param}" if param else "invalid_request")


def error_path(exc: msgspec.ValidationError) -> tuple[str, list[str]]:
    """msgspec's "Expected `int`, got `str` - at `$.a[0].b`" → ("Expected `int`, got `str`", ["a", "0", "b"])."""
    text, _, path = str(exc).partition(" - at `$")
    return text, [part for part in path.rstrip("`").replace("[", ".").replace("]", "").split(".") if part]


def _http_response(exc: HTTPException) -> Response[ErrorResponse]:
    status = exc.status_code
    detail = str(exc.detail)
    if status == 404:
        return error_response(404, "no such route; see /schema/openapi.json", None, "not_found")
    if status == 405:
        return error_response(405, "method not allowed for this route", None, "method_not_allowed")
    if status == 413:
        return error_response(413, "the request body is too large", None, "request_too_large")
    if status == 400 and ("JSON" in detail or "multipart" in detail):
        return error_response(400, f"malformed request body: {detail}", None, "invalid_body")
    return error_response(status, detail, None, None, dict(exc.headers or {}))


def handle(request: Request, exc: Exception) -> Response[ErrorResponse]:
    """Litestar's exception handler for every exception type."""
    return to_response(exc, request.scope.get("state", {}).get("request_id"))


def decode_error_body(body: bytes, status: int) -> ApiError:
    """An error body from a node, re-raised at the router with the same status and fields."""
    try:
        return from_detail(msgspec.json.decode(body, type=ErrorResponse).error, status)
    except msgspec.DecodeError:
        return ApiError(502, f"a node answered {status} without an error body", code="bad_gateway")


def from_detail(detail: ErrorDetail, status: int | None = None) -> ApiError:
    """`to_response` in reverse: an OpenAI error body (a node's answer, a stream's error event) back into the
    error it was. A stream's event carries no status: its type and code tell it (400 for the client's
    errors, 429, 504, 502 for a node that failed, else 500)."""
    if status is None:
        if detail.type == "invalid_request_error":
            status = 400
        elif detail.code == "timeout":
            status = 504
        elif detail.type == "rate_limit_error":
            status = 429
        else:
            status = 502 if detail.code in ("node_failed", "bad_gateway") else 500
    return ApiError(status, detail.message, param=detail.param, code=detail.code)
