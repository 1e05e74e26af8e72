"""A node's routes: render an order for a router, stream one, report status (node token); and, on nodes
and standalone servers (admin key): read the LoRA directory again, and the models as a cache
(`server.node.cache`): list them with their state, look at the models folder again, load, unload."""

from __future__ import annotations

import asyncio

import msgspec
from litestar import Request, Response, get, post
from litestar.response import Stream

from server import sse
from server.adapters import cards
from server.errors import ApiError, documented
from server.guards import admin_key, node_token
from server.node.agent import NodeAgent
from server.node.catalog import ModelList, ModelView
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
    await pool.reload_adapters()
    return {name: cards(info) for name, info in sorted(pool.ready_models().items())}


@get("/models", guards=[admin_key], responses=documented(401),
     summary="Every model this node serves, with its state (available, loading, loaded, failed) and bytes (admin key)")
async def list_models(request: Request) -> ModelList:
    return pool_of(request).cache.listing()


@post("/models/rescan", status_code=200, guards=[admin_key], responses=documented(401),
      summary="Look at the models folder again: folders added are served, folders removed leave (admin key)")
async def rescan(request: Request) -> Rescanned:
    pool = pool_of(request)
    added, removed = await pool.cache.rescan()
    return Rescanned(added=added, removed=removed, models=pool.cache.listing())


@post("/models/{model:str}/load", status_code=200, guards=[admin_key], responses=documented(401, 404, 503, 504, 507),
      summary="Load a model now, unloading idle ones to make room (admin key); a model that failed is tried again")
async def load_model(model: str, request: Request) -> ModelView:
    pool = pool_of(request)
    try:
        entry = await asyncio.wait_for(pool.cache.load(model), pool.settings.request_timeout)
    except TimeoutError:  # it goes on loading
        raise ApiError(504, f"model '{model}' did not load within the {pool.settings.request_timeout:g} s request "
                       "timeout (it may be waiting for a loaded model to be idle)", code="timeout") from None
    return entry.view()


@post("/models/{model:str}/unload", status_code=200, guards=[admin_key], responses=documented(401, 404, 409),
      summary="Unload a model now (admin key); 409 while it renders or has requests waiting")
async def unload_model(model: str, request: Request) -> ModelView:
    return (await pool_of(request).cache.unload(model)).view()


class Rescanned(msgspec.Struct):
    added: list[str]
    removed: list[str]
    models: ModelList


NODE_ROUTES = [render, stream, status]  # the node role
POOL_ROUTES = [reload_adapters, list_models, rescan, load_model, unload_model]  # wherever an engine pool runs
