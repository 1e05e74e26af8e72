"""GET /healthz (alive: the process answers, and its engine pool has not been sick for --liveness-seconds),
/readyz (a model can render, and the node is not sick), /metrics (Prometheus)."""

from __future__ import annotations

from litestar import Request, Response, get
from litestar.enums import MediaType

from server.errors import ApiError, documented
from server.metrics import CONTENT_TYPE
from server.state import AppState


@get("/healthz", responses=documented(503), summary="Liveness: the process answers and is not stuck sick")
async def healthz(request: Request) -> dict[str, str]:
    dead = AppState.of(request).dead
    if dead is not None and (reason := dead()):
        raise ApiError(503, f"not live: {reason}", code="not_live")
    return {"status": "ok"}


@get("/readyz", responses=documented(503), summary="Readiness: at least one model can render")
async def readyz(request: Request) -> dict[str, object]:
    state = AppState.of(request)
    problems = state.problems()
    if not state.renderer.ready():
        detail = f"; {problems}" if problems else ""
        raise ApiError(503, f"not ready, no model can render: {state.why_not_ready()}{detail}", code="not_ready",
                       headers={"Retry-After": "5"})
    return {"status": "ready", "models": sorted(state.renderer.ready_models()), **problems}


@get("/metrics", media_type=MediaType.TEXT, summary="Prometheus metrics")
async def metrics(request: Request) -> Response[bytes]:
    body = AppState.of(request).metrics.text()
    return Response(body, media_type=MediaType.TEXT, headers={"content-type": CONTENT_TYPE})
