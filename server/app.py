"""`create_app(settings)`: the Litestar app for one process in its role, wrapped in the access log.

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
from functools import partial

from litestar import Litestar, Router
from litestar.config.cors import CORSConfig
from litestar.openapi import OpenAPIConfig
from litestar.types import ASGIApp

from server import errors, node
from server.access import AccessLog
from server.metrics import Metrics
from server.pool import EnginePool, discover
from server.router.dispatch import Dispatcher
from server.router.node_client import LocalNode
from server.router.prober import Prober
from server.router.registry import Registry
from server.routes import adapters, files, fleet, health, images, models, node_api, playground, sdapi
from server.routes.guards import api_key
from server.settings import Settings
from server.state import AppState
from server.store import ImageStore
from server.supervisor import supervise

log = logging.getLogger("sdserve.server")
SWEEP_SECONDS = 60.0
LOCAL_NODE = "local"


def build_state(settings: Settings, metrics: Metrics) -> AppState:
    role = settings.role
    pool = EnginePool(settings, metrics) if role in ("standalone", "node") else None
    if role == "node":
        assert pool is not None
        state = AppState(settings=settings, renderer=pool, metrics=metrics, pool=pool)
        state.agent = node.NodeAgent(settings, pool)
        return state
    registry = Registry(settings.heartbeat_timeout)
    # Standalone answers 429 from its own pool's queue; a router queues when every node is full.
    dispatcher = Dispatcher(registry, metrics, settings.retries,
                            wait_limit=0 if role == "standalone" else settings.queue_depth,
                            default_model=default_model(settings))
    if pool is not None:
        local = LocalNode(pool, lambda: node.report(pool, settings, LOCAL_NODE, "in-process"),
                          settings.request_timeout, settings.keepalive_interval)
        registry.register(local.report(), local, local=True)
    store = ImageStore(settings.images_dir, settings.image_ttl, settings.images_max_bytes)
    return AppState(settings=settings, renderer=dispatcher, metrics=metrics, pool=pool, registry=registry,
                    dispatcher=dispatcher, store=store, api_keys=tuple(settings.keys()))


def create_app(settings: Settings, metrics: Metrics | None = None) -> Litestar:
    state = build_state(settings, metrics or Metrics())

    @contextlib.asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        app.state.loop = asyncio.get_running_loop()
        background = []
        if state.pool is not None:
            state.pool.start()
        if state.dispatcher is not None:
            prober = Prober(state.registry, state.dispatcher, settings.probe_timeout)
            background += [supervise("prober", prober.run), supervise("image sweeper", partial(_sweep, state))]
        if state.agent is not None:
            state.agent.start()
        try:
            yield
        finally:
            for task in background:
                task.cancel()
            if state.pool is not None:
                await state.pool.drain(timeout=settings.drain_timeout)
            if state.agent is not None:
                await state.agent.stop()
            if state.pool is not None:
                await asyncio.to_thread(state.pool.close)
            if state.registry is not None:
                for record in list(state.registry.nodes.values()):
                    await record.client.close()

    handlers: list = [health.healthz, health.readyz, health.metrics]
    if state.dispatcher is not None:
        handlers += [
            Router("/v1", route_handlers=[images.generations, images.edits, images.variations, models.list_models,
                                          models.retrieve_model], guards=[api_key]),
            Router("/v1", route_handlers=[files.image_file]),
            Router("/v0", route_handlers=[fleet.register, fleet.heartbeat, fleet.deregister, fleet.list_nodes]),
            sdapi.router(),  # AUTOMATIC1111's API
        ]
        if settings.playground:
            handlers += playground.handlers()
    if state.agent is not None:
        handlers.append(Router("/v0", route_handlers=[node_api.render, node_api.stream, node_api.status]))
    if state.pool is not None:
        handlers.append(Router("/v0", route_handlers=[adapters.reload]))
    app = Litestar(
        route_handlers=handlers,
        exception_handlers={Exception: errors.handle},
        lifespan=[lifespan],
        # two files at the upload limit (image and mask), as base64 data URLs in a JSON edit a third larger
        request_max_body_size=2 * (settings.max_upload_bytes * 4 // 3 + 4) + 1024 * 1024,
        openapi_config=OpenAPIConfig(title="sdserve", version=node.version(),
                                     description="OpenAI-compatible image generation: Stable Diffusion on ONNX "
                                     "Runtime and TensorRT"),
        logging_config=None,
        cors_config=_cors(settings),
    )
    app.state.sdserve = state
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
    accepting connections and waits for what is in flight."""
    state: AppState = app.state.sdserve
    if state.pool is not None:
        state.pool.draining = True
    loop = getattr(app.state, "loop", None)
    if loop is None:
        return
    if state.pool is not None:  # the drain timeout counts from the signal
        loop.call_soon_threadsafe(state.pool.drain, state.settings.drain_timeout)
    if state.agent is not None:
        loop.call_soon_threadsafe(state.agent.beat_now)


async def _sweep(state: AppState) -> None:
    while True:
        await asyncio.sleep(SWEEP_SECONDS)
        try:
            await asyncio.to_thread(state.store.sweep)
        except OSError as exc:  # a full or vanished disk must not end the sweeper
            log.warning("image store sweep failed: %s", exc)


def default_model(settings: Settings) -> str | None:
    """Decided once, from configuration: `--default-model`, else (standalone) the first `--model`, else the
    first model directory by name. A router has no default unless configured (its models come and go)."""
    if settings.default_model or settings.role == "router":
        return settings.default_model
    if settings.models:
        return settings.models[0]
    found = discover(settings.models_dir, [])
    return found[0].name if found else None
