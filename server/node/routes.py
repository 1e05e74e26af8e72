"""The node role's internal routes (node token): render a job for a router, report status."""

from __future__ import annotations

import msgspec
from litestar import Request, Response, get, post
from litestar.response import Stream

from server import streaming
from server.errors import ApiError
from server.protocol import NodeReport, RenderJob
from server.router.node_client import MSGPACK
from server.routes.guards import node_token
from server.state import AppState


@post("/render", status_code=200, guards=[node_token], summary="Render a resolved job (msgpack in and out)")
async def render(request: Request) -> Response[bytes]:
    state = AppState.of(request)
    job = await _job(request)
    result = await state.render_while_connected(request, job)
    return Response(msgspec.msgpack.encode(result), media_type=MSGPACK)


@post("/stream", status_code=200, guards=[node_token], summary="Render a resolved job as an OpenAI event stream")
async def stream(request: Request) -> Stream:
    state = AppState.of(request)
    job = await _job(request)
    assert state.pool is not None  # the node role always has one
    s = state.settings
    chunks = streaming.open_local(state.pool, job, s.request_timeout, s.keepalive_interval)
    return Stream(chunks, media_type=streaming.MEDIA_TYPE, headers=streaming.HEADERS)


async def _job(request: Request) -> RenderJob:
    try:
        job = msgspec.msgpack.decode(await request.body(), type=RenderJob)
    except msgspec.DecodeError as exc:
        raise ApiError(400, f"invalid render job: {exc}", code="invalid_job") from exc
    request.state.model = job.model
    return job


@get("/status", guards=[node_token], summary="This node's report: models, load, draining")
async def status(request: Request) -> NodeReport:
    return AppState.of(request).agent.report()
