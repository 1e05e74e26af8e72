"""`create_app(settings)`: the Litestar app for one process in its role, wrapped in the access log, and the
process's probes: GET /healthz (alive: it answers, and its engine pool has not been sick for
--liveness-seconds), /readyz (a model can render, and the node is not sick), /metrics (Prometheus).

    standalone  public API + a dispatcher whose first node is this process's own engine pool
                (remote nodes may join too, given a node token)
    router      public API + a dispatcher over registered nodes; no engines
    node        an engine pool behind the internal /v0 render route, registered with routers
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import partial

from litestar import Litestar, Request, Response, Router, get
from litestar.config.cors import CORSConfig
from litestar.enums import MediaType
from litestar.exceptions import MethodNotAllowedException, NotFoundException
from litestar.openapi import OpenAPIConfig
from litestar.types import ASGIApp

from engines.manifest import sdserve_version
from server import errors
from server.a1111 import routes as sdapi
from server.errors import ApiError, documented
from server.guards import api_key
from server.logs import AccessLog
from server.metrics import CONTENT_TYPE, Metrics
from server.node.agent import NodeAgent, node_report
from server.node.local import LocalNode
from server.node.models_dir import discover
from server.node.pool import EnginePool
from server.node.routes import NODE_ROUTES, POOL_ROUTES
from server.openai import models, playground
from server.openai import routes as images
from server.openai.store import ImageStore
from server.router.dispatch import Dispatcher
from server.router.prober import Prober
from server.router.registry import Registry
from server.router.routes import FLEET_ROUTES
from server.settings import Settings
from server.state import AppState
from server.supervisor import supervise

log = logging.getLogger("sdserve.server")
SWEEP_SECONDS = 60.0
LOCAL_NODE = "local"


@dataclass
class Parts:
    """What one process runs, by role: an engine pool (node, standalone), its agent (node), a registry and
    dispatcher with the image store (front doors: standalone, router)."""

    state: AppState
    pool: EnginePool | None = None
    agent: NodeAgent | None = None
    registry: Registry | None = None
    dispatcher: Dispatcher | None = None
    store: ImageStore | None = None


def build(settings: Settings, metrics: Metrics) -> Parts:
    role = settings.role
    pool = EnginePool(settings, metrics) if role in ("standalone", "node") else None
    if role == "node":
        assert pool is not None
        state = AppState(settings=settings, renderer=pool, metrics=metrics, problem_sources=(pool.problems,),
                         unready_sources=(pool.why_not_ready,), dead=pool.dead)
        return Parts(state, pool=pool, agent=NodeAgent(settings, pool))
    registry = Registry(settings.heartbeat_timeout)
    # Standalone answers 429 from its own pool's queue; a router queues when every node is full.
    dispatcher = Dispatcher(registry, metrics, settings.retries,
                            wait_limit=0 if role == "standalone" else settings.queue_depth,
                            default_model=default_model(settings))
    if pool is not None:
        local = LocalNode(pool, partial(node_report, pool, settings, LOCAL_NODE, "in-process"))
        registry.register(local.report(), local, refresh=local.report)
    sources = (pool.problems, dispatcher.problems) if pool is not None else (dispatcher.problems,)
    unready = (pool.why_not_ready, dispatcher.why_not_ready) if pool is not None else (dispatcher.why_not_ready,)
    state = AppState(settings=settings, renderer=dispatcher, metrics=metrics, default_model=dispatcher.default_model,
                     capacity=dispatcher, problem_sources=sources, unready_sources=unready,
                     api_keys=tuple(settings.keys()),
                     tenants={tenant.key: tenant for tenant in settings.tenants()},
                     dead=pool.dead if pool is not None else None, models=pool.cache if pool is not None else None)
    store = ImageStore(settings.images_dir, settings.image_ttl, settings.images_max_bytes)
    return Parts(state, pool=pool, registry=registry, dispatcher=dispatcher, store=store)


def create_app(settings: Settings, metrics: Metrics | None = None) -> Litestar:
    parts = build(settings, metrics or Metrics())

    @contextlib.asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        app.state.loop = asyncio.get_running_loop()
        background = []
        if parts.pool is not None:
            parts.pool.start()
        if parts.dispatcher is not None and parts.registry is not None and parts.store is not None:
            prober = Prober(parts.registry, parts.dispatcher, settings.probe_timeout)
            background += [supervise("prober", prober.run), supervise("image sweeper", partial(_sweep, parts.store))]
        if parts.agent is not None:
            parts.agent.start()
        try:
            yield
        finally:
            for task in background:
                task.cancel()
            if parts.pool is not None:
                await parts.pool.drain(timeout=settings.drain_timeout)
            if parts.agent is not None:
                await parts.agent.stop()
            if parts.pool is not None:
                await asyncio.to_thread(parts.pool.close)
            if parts.registry is not None:
                for record in list(parts.registry.nodes.values()):
                    await record.transport.close()

    handlers: list = [healthz, readyz, prometheus]
    if parts.dispatcher is not None:
        handlers += [
            Router("/v1", route_handlers=[images.generations, images.edits, images.variations, models.list_models,
                                          models.retrieve_model], guards=[api_key]),
            Router("/v1", route_handlers=[images.image_file]),
            Router("/v0", route_handlers=FLEET_ROUTES),
            sdapi.router(),  # AUTOMATIC1111's API
        ]
        if settings.playground:
            handlers += playground.handlers()
    if parts.agent is not None:
        handlers.append(Router("/v0", route_handlers=NODE_ROUTES))
    if parts.pool is not None:
        handlers.append(Router("/v0", route_handlers=POOL_ROUTES))
    app = Litestar(
        route_handlers=handlers,
        # unknown routes (and methods) under /sdapi and /controlnet answer as FastAPI does there
        exception_handlers={Exception: errors.handle, NotFoundException: sdapi.unknown_route,
                            MethodNotAllowedException: sdapi.unknown_route},
        lifespan=[lifespan],
        # two files at the upload limit (image and mask), as base64 data URLs in a JSON edit a third larger
        request_max_body_size=2 * (settings.max_upload_bytes * 4 // 3 + 4) + 1024 * 1024,
        openapi_config=OpenAPIConfig(title="sdserve", version=sdserve_version(),
                                     description="OpenAI-compatible image generation: Stable Diffusion on ONNX "
                                     "Runtime and TensorRT"),
        logging_config=None,
        cors_config=_cors(settings),
    )
    # the wings' routes find their parts here (`server.node.routes.pool_of`, `server.router.routes.fleet_of`…)
    app.state.sdserve = parts.state
    app.state.parts = parts
    app.state.pool, app.state.agent, app.state.store = parts.pool, parts.agent, parts.store
    app.state.registry, app.state.dispatcher = parts.registry, parts.dispatcher
    app.state.started = time.time()
    return app


def _cors(settings: Settings) -> CORSConfig | None:
    """Browsers may call the API from these origins; the request id is readable by their scripts."""
    if not settings.cors_origins:
        return None
    # Any request header: the OpenAI SDKs send their own (x-stainless-*) from browsers too.
    return CORSConfig(allow_origins=settings.cors_origins, allow_methods=["GET", "POST", "OPTIONS"],
                      allow_headers=["*"], expose_headers=["X-Request-Id"], max_age=600)


def asgi(app: Litestar) -> ASGIApp:
    """What the ASGI server runs: the app inside the access log."""
    return AccessLog(app, app.state.sdserve.metrics)


def on_terminate(app: Litestar) -> None:
    """SIGTERM: a node stops taking work at once and tells its routers, before the server stops
    accepting connections and waits for what is in flight; a front door keeps waiting on its nodes."""
    parts: Parts = app.state.parts
    if parts.pool is not None:
        parts.pool.draining = True
    if parts.registry is not None:  # its listener closes: no more heartbeats
        parts.registry.listening = False
    loop = getattr(app.state, "loop", None)
    if loop is None:
        return
    if parts.pool is not None:  # the drain timeout counts from the signal
        loop.call_soon_threadsafe(parts.pool.drain, parts.state.settings.drain_timeout)
    if parts.agent is not None:
        loop.call_soon_threadsafe(parts.agent.beat_now)


async def _sweep(store: ImageStore) -> None:
    while True:
        await asyncio.sleep(SWEEP_SECONDS)
        try:
            await asyncio.to_thread(store.sweep)
        except OSError as exc:  # a full or vanished disk must not end the sweeper
            log.warning("image store sweep failed: %s", exc)


def default_model(settings: Settings) -> str | None:
    """Decided once, from configuration: `--default-model`, else (standalone) the first `--model`, else the
    first model directory by name. A router has none configured unless given one (its models come and go):
    requests then get the fleet's model while the nodes serve exactly one (`AppState.default`)."""
    if settings.default_model or settings.role == "router":
        return settings.default_model
    if settings.models:
        return settings.models[0]
    found = discover(settings.models_dir, [])
    return found[0].name if found else None


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
async def prometheus(request: Request) -> Response[bytes]:
    body = AppState.of(request).metrics.text()
    return Response(body, media_type=MediaType.TEXT, headers={"content-type": CONTENT_TYPE})
