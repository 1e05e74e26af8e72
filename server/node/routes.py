"""A node's routes: render an order for a router, stream one, report status (node token); and, on nodes
and standalone servers, read the LoRA directory again (admin key)."""

from __future__ import annotations

import anyio
import msgspec
from litestar import Request, Response, get, post
from litestar.response import Stream

from server import sse
from server.adapters import cards
from server.errors import ApiError, documented
from server.guards import admin_key, node_token
from server.node.agent import NodeAgent
from server.node.pool import EnginePool
from server.protocol import AdapterCard
from server.state import AppState
from server.wire import MSGPACK, NodeReport, RenderOrder


def pool_of(request: Request) -> EnginePool:
    return request.app.state.pool


@post("/render", status_code=200, guards=[node_token], summary="Render a resolved order (msgpack in and out)")
async def render(request: Request) -> Response[bytes]:
    order = await _order(request)
    result = await AppState.of(request).while_connected(request, order, pool_of(request).render(order))
    return Response(msgspec.msgpack.encode(result), media_type=MSGPACK)


@post("/stream", status_code=200, guards=[node_token], summary="Render a resolved order as an OpenAI event stream")
async def stream(request: Request) -> Stream:
    frames = await pool_of(request).open_stream(await _order(request))
    return Stream(frames, media_type=sse.MEDIA_TYPE, headers=sse.HEADERS)


async def _order(request: Request) -> RenderOrder:
    try:
        order = msgspec.msgpack.decode(await request.body(), type=RenderOrder)
    except msgspec.DecodeError as exc:
        raise ApiError(400, f"invalid render order: {exc}", code="invalid_job") from exc
    request.state.model = order.model
    return order


@get("/status", guards=[node_token], summary="This node's report: models, load, draining")
async def status(request: Request) -> NodeReport:
    agent: NodeAgent = request.app.state.agent
    return agent.report()


@post("/adapters/reload", status_code=200, guards=[admin_key], responses=documented(401),
      summary="Read the LoRA directory again (admin key): adapters added, changed or removed since start-up")
async def reload_adapters(request: Request) -> dict[str, list[AdapterCard]]:
    pool = pool_of(request)
    await anyio.to_thread.run_sync(pool.reload_adapters)
    return {name: cards(info) for name, info in sorted(pool.ready_models().items())}


NODE_ROUTES = [render, stream, status]  # the node role
POOL_ROUTES = [reload_adapters]  # wherever an engine pool runs (node, standalone)
