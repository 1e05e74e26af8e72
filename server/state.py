"""What route handlers share: settings, metrics, the renderer orders go to, the API keys, and which model a
request gets. The wings' own parts (engine pool, registry, image store…) are kept beside it by `app.py`;
here they are seen only through the Protocols below, so that the floor knows no wing."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from litestar import Request
from litestar.connection import ASGIConnection

from engines.errors import RenderCancelled
from engines.info import ModelInfo
from server.errors import ApiError
from server.metrics import Metrics
from server.settings import OPENAI_MODEL_NAMES, Settings
from server.tenants import RateLimiter, Tenant
from server.wire import RenderedImages, RenderOrder, StreamEvent

T = TypeVar("T")


class Renderer(Protocol):
    """Where orders go: the dispatcher over nodes (standalone, router) or the engine pool (node)."""

    def ready_models(self) -> dict[str, ModelInfo]: ...

    def known_models(self) -> set[str]: ...

    def ready(self) -> bool: ...

    def problems(self) -> dict[str, object]: ...

    async def render(self, order: RenderOrder) -> RenderedImages: ...

    async def open_stream(self, order: RenderOrder) -> AsyncIterator[bytes]: ...

    async def open_events(self, order: RenderOrder) -> AsyncIterator[StreamEvent]: ...


class Models(Protocol):
    """The models of this process's engine pool, as a cache (`server.node.cache`): what A1111's checkpoint
    routes act on."""

    async def rescan(self) -> tuple[list[str], list[str]]: ...

    async def load(self, name: str) -> object: ...

    async def unload_idle(self) -> list[str]: ...


class Capacity(Protocol):
    """A front door's room for more orders of a model (the dispatcher's)."""

    def room(self, model: str) -> int | None: ...

    def full_error(self, model: str) -> ApiError: ...


@dataclass
class AppState:
    settings: Settings
    renderer: Renderer
    metrics: Metrics
    default_model: str | None = None  # decided once at start-up (`server.app.default_model`); front doors only
    capacity: Capacity | None = None  # front doors: room before a 429
    models: Models | None = None  # the engine pool's models (standalone; a router's are its nodes')
    problem_sources: tuple[Callable[[], dict[str, object]], ...] = ()  # what /readyz reports beside readiness
    unready_sources: tuple[Callable[[], str | None], ...] = ()  # why nothing can render, for /readyz
    dead: Callable[[], str | None] | None = None  # why /healthz should fail (restart me), with an engine pool
    api_keys: tuple[str, ...] = ()  # read once at start-up (settings and the keys file)
    tenants: dict[str, Tenant] = field(default_factory=dict)  # key → its limits (front doors)
    limiter: RateLimiter = field(default_factory=RateLimiter)  # each key's request rate
    admitting: Counter[str] = field(default_factory=Counter)  # requests decoding uploads, per model

    @staticmethod
    def of(connection: ASGIConnection) -> AppState:
        return connection.app.state.sdserve

    def model(self, name: str | None) -> ModelInfo:
        """A request's `model` → a model that can render now. No model and OpenAI's names mean the default
        model; configured aliases map to their model; unknown names are 404; known models that cannot
        render now (loading, no healthy node) are 503."""
        ready, known = self.renderer.ready_models(), self.renderer.known_models()
        target = self.default(known) if name is None or name in OPENAI_MODEL_NAMES else name
        target = self.settings.model_aliases.get(name or "", target)
        if target is None:
            served = ", ".join(sorted(known | set(ready))) or "none yet"
            raise ApiError(400, f"no model named and this server has no default model (it serves {served}): name "
                           "one in 'model' (see /v1/models), or start it with --default-model", param="model",
                           code="model_required")
        if target in ready:
            return ready[target]
        if target in known:
            raise ApiError(503, f"model '{target}' cannot render right now (still loading, failed, or no healthy "
                           "node)", code="model_unavailable", headers={"Retry-After": "10"})
        if target != name:
            raise ApiError(503, f"the default model '{target}' (--default-model) is not served by any node now",
                           code="model_unavailable", headers={"Retry-After": "10"})
        available = ", ".join(sorted(known | set(ready))) or "none"
        raise ApiError(404, f"the model '{name}' does not exist; available: {available}", param="model",
                       code="model_not_found")

    def default(self, known: set[str]) -> str | None:
        """The model a request naming none gets: the one decided at start-up, else (a router without
        --default-model) the one model the renderer knows while it knows exactly one."""
        if self.default_model is not None:
            return self.default_model
        return next(iter(known)) if len(known) == 1 else None

    def resolve_model(self, name: str | None, connection: ASGIConnection) -> ModelInfo:
        """`model(name)`, noted on the request for the access log."""
        info = self.model(name)
        connection.state.model = info.id
        return info

    @contextlib.contextmanager
    def admission(self, model: str) -> Iterator[None]:
        """Room in the queue is reserved before uploads are decoded (the costly part of an edit): a full
        queue answers 429 at once, and no more uploads are decoded at a time than could be queued."""
        room = self.capacity.room(model) if self.capacity is not None else None
        if self.capacity is not None and room is not None and self.admitting[model] >= room:
            raise self.capacity.full_error(model)
        self.admitting[model] += 1
        try:
            yield
        finally:
            self.admitting[model] -= 1

    def problems(self) -> dict[str, object]:
        """What /readyz reports beside readiness: models that failed to load, a default model no node has."""
        found: dict[str, object] = {}
        for source in self.problem_sources:
            found |= source()
        return found

    def why_not_ready(self) -> str:
        """What /readyz says while no model can render: nothing found, loading, failed, draining, the nodes'
        states (each source says what it knows, or None)."""
        reasons = [reason for source in self.unready_sources if (reason := source())]
        return "; ".join(reasons) or "no model is loaded"

    @staticmethod
    def request_id(connection: ASGIConnection) -> str:
        return connection.scope.get("state", {}).get("request_id", "-")

    def base_url(self, connection: ASGIConnection) -> str:
        return (self.settings.public_url or str(connection.base_url)).rstrip("/")

    async def render_while_connected(self, request: Request, order: RenderOrder) -> RenderedImages:
        """Render within the request timeout; a client that disconnects cancels its render (which stops at
        its next step, or leaves the queue)."""
        return await self.while_connected(request, order, self.renderer.render(order))

    async def while_connected(self, request: Request, order: RenderOrder, work: Awaitable[T]) -> T:
        """`work` for `order` within the request timeout (504), cancelled when the client disconnects: a render,
        or a stream's wait for a node to accept it."""
        render = asyncio.ensure_future(asyncio.wait_for(work, self.settings.request_timeout))
        gone = asyncio.ensure_future(client_gone(request))
        try:
            done, _ = await asyncio.wait({render, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not render.done():  # the client left, or this request was cancelled (a shutdown's last resort)
                render.cancel()
                render.add_done_callback(_read)  # whatever it ends with, nobody else reads it
        if render not in done:
            raise RenderCancelled(f"client disconnected; request {order.request_id} cancelled")
        try:
            return render.result()
        except TimeoutError:
            raise ApiError(504, f"the render took longer than the {self.settings.request_timeout:g} s request "
                           "timeout", code="timeout") from None


def _read(task: asyncio.Future[object]) -> None:
    if not task.cancelled():
        task.exception()


async def client_gone(request: Request) -> None:
    """Returns when the client disconnects."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
