"""Route guards: content types (415), API keys (401) and each key's request rate (429), checked before the
body is read; and the tenant (API key) a request's order is tagged with."""

from __future__ import annotations

import base64
import binascii
import hmac
import math

import msgspec
from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler

from server.errors import ApiError
from server.state import AppState
from server.tenants import PERIOD_NAMES, Tenant
from server.wire import RenderOrder


def _content_type(connection: ASGIConnection) -> str:
    return connection.headers.get("content-type", "").split(";")[0].strip().lower()


def json_body(connection: ASGIConnection, _: BaseRouteHandler) -> None:
    if _content_type(connection) != "application/json":
        raise ApiError(415, "this route takes an application/json body", code="unsupported_media_type")


def multipart_body(connection: ASGIConnection, _: BaseRouteHandler) -> None:
    if _content_type(connection) != "multipart/form-data":
        raise ApiError(415, "this route takes a multipart/form-data body", code="unsupported_media_type")


def edit_body(connection: ASGIConnection, _: BaseRouteHandler) -> None:
    if _content_type(connection) not in ("multipart/form-data", "application/json"):
        raise ApiError(415, "this route takes a multipart/form-data or application/json body",
                       code="unsupported_media_type")


def api_key(connection: ASGIConnection, _: BaseRouteHandler) -> None:
    """With keys configured, `Authorization: Bearer <key>` must match one (constant-time comparison,
    against every key, so timing tells nothing about which or how much matched)."""
    keys = AppState.of(connection).api_keys
    if not keys:
        return
    given = _bearer(connection)
    if not given:
        raise ApiError(401, "missing API key: send 'Authorization: Bearer <key>'", code="missing_api_key")
    if not _matches(given, keys):
        raise ApiError(401, "incorrect API key provided", code="invalid_api_key")


def sdapi_key(connection: ASGIConnection, _: BaseRouteHandler) -> None:
    """/sdapi takes the same keys as Bearer, or as HTTP Basic (the key as the password, any user name; or
    as the user name with no password), which AUTOMATIC1111 clients send."""
    keys = AppState.of(connection).api_keys
    if not keys:
        return
    challenge = {"WWW-Authenticate": "Basic"}
    given = credential(connection)
    if not given:
        raise ApiError(401, "missing API key: send HTTP Basic auth with the key as the password, or "
                       "'Authorization: Bearer <key>'", code="missing_api_key", headers=challenge)
    if not _matches(given, keys):
        raise ApiError(401, "Incorrect username or password", code="invalid_api_key", headers=challenge)


def tenant_of(connection: ASGIConnection) -> Tenant | None:
    """The tenant a request authenticated as (its key's limits; after `api_key` or `sdapi_key`), None on an
    open server."""
    state = AppState.of(connection)
    return state.tenants.get(credential(connection)) if state.tenants else None


def rate_limit(connection: ASGIConnection, _: BaseRouteHandler) -> None:
    """A render request within its key's `rate=` (keys file), else 429 `rate_limit_exceeded` with the seconds
    until the key's next token as Retry-After."""
    tenant = tenant_of(connection)
    if tenant is None or not tenant.rate:
        return
    wait = AppState.of(connection).limiter.admit(tenant)
    if wait:
        seconds = max(1, math.ceil(wait))
        raise ApiError(429, f"rate limit reached for this API key ({tenant.rate:g} requests per "
                       f"{PERIOD_NAMES[tenant.period]}); retry in {seconds} s", code="rate_limit_exceeded",
                       headers={"Retry-After": str(seconds)})


def for_tenant(connection: ASGIConnection, order: RenderOrder) -> RenderOrder:
    """The order tagged with who asked (a hash of the key) and the key's cap on renders at once."""
    tenant = tenant_of(connection)
    if tenant is None:
        return order
    return msgspec.structs.replace(order, tenant=tenant.id, tenant_cap=tenant.max_concurrent)


def credential(connection: ASGIConnection) -> str:
    """The key a request presents as Bearer or HTTP Basic ("" when none)."""
    scheme, _, value = connection.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer":
        return value.strip()
    if scheme.lower() != "basic":
        return ""
    try:
        user, _, password = base64.b64decode(value.strip(), validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return ""
    return password or user


def _matches(given: str, keys: tuple[str, ...]) -> bool:
    """Compared against every key, so timing tells nothing about which or how much matched."""
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(given.encode(), key.encode())
    return matched


def _bearer(connection: ASGIConnection) -> str:
    scheme, _, given = connection.headers.get("authorization", "").partition(" ")
    return given.strip() if scheme.lower() == "bearer" else ""


def node_token(connection: ASGIConnection, _: BaseRouteHandler) -> None:
    """Router ↔ node routes need the shared node token; without one configured they are closed."""
    token = AppState.of(connection).settings.node_token
    if not token:
        raise ApiError(401, "no node token is configured here: set SDSERVE_NODE_TOKEN on routers and nodes",
                       code="node_token_not_configured")
    if not hmac.compare_digest(_bearer(connection).encode(), token.encode()):
        raise ApiError(401, "wrong or missing node token", code="invalid_node_token")


def admin_key(connection: ASGIConnection, _: BaseRouteHandler) -> None:
    """Admin routes need the admin key when one is configured. Without one they are open only on an open
    server (no API keys and no node token either: a node's port is reachable by whoever can reach its
    render route): an API key or the node token is not an admin key."""
    state = AppState.of(connection)
    key = state.settings.admin_key
    if not key:
        if state.api_keys or state.settings.node_token:
            raise ApiError(401, "API keys or a node token are configured but no admin key: set SDSERVE_ADMIN_KEY "
                           "to use the admin routes", code="admin_key_not_configured")
        return
    if not hmac.compare_digest(_bearer(connection).encode(), key.encode()):
        raise ApiError(401, "wrong or missing admin key", code="invalid_admin_key")
