"""GET /healthz (alive), /readyz (a model can render), /metrics (Prometheus)."""

from __future__ import annotations

from litestar import Request, Response, get
from litestar.enums import MediaType

from server.errors import ApiError, documented
from server.metrics import CONTENT_TYPE
from server.state import AppState


@get("/healthz", summary="Liveness: the process answers")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@get("/readyz", responses=documented(503), summary="Readiness: at least one model can render")
async def readyz(request: Request) -> dict[str, object]:
    renderer = AppState.of(request).renderer
    if not renderer.ready():
        raise ApiError(503, "not ready: no model can render yet (loading, draining, or no healthy node)",
                       code="not_ready", headers={"Retry-After": "5"})
    return {"status": "ready", "models": sorted(renderer.ready_models())}


@get("/metrics", media_type=MediaType.TEXT, summary="Prometheus metrics")
async def metrics(request: Request) -> Response[bytes]:
    body = AppState.of(request).metrics.text()
    return Response(body, media_type=MediaType.TEXT, headers={"content-type": CONTENT_TYPE})
