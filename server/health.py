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
    state = AppState.of(request)
    problems = state.problems()
    if not state.renderer.ready():
        detail = f"; {problems}" if problems else ""
        raise ApiError(503, f"not ready: no model can render yet (loading, draining, or no healthy node){detail}",
                       code="not_ready", headers={"Retry-After": "5"})
    return {"status": "ready", "models": sorted(state.renderer.ready_models()), **problems}


@get("/metrics", media_type=MediaType.TEXT, summary="Prometheus metrics")
async def metrics(request: Request) -> Response[bytes]:
    body = AppState.of(request).metrics.text()
    return Response(body, media_type=MediaType.TEXT, headers={"content-type": CONTENT_TYPE})
