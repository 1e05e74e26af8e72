"""What route handlers share: settings, the renderer, the image store, metrics, and the fleet parts of
the role (registry and dispatcher on routers, the agent on nodes)."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, TypeVar

from litestar import Request
from litestar.connection import ASGIConnection

from engines.errors import RenderCancelled
from engines.info import ModelInfo
from server import jobs
from server.errors import ApiError
from server.metrics import Metrics
from server.protocol import RenderedImages, RenderJob
from server.settings import Settings
from server.store import ImageStore

T = TypeVar("T")

if TYPE_CHECKING:
    from server.node import NodeAgent
    from server.pool import EnginePool
    from server.router.dispatch import Dispatcher
    from server.router.registry import Registry


class Renderer(Protocol):
    """Where jobs go: the dispatcher over nodes (standalone, router) or the engine pool (node)."""

    def ready_models(self) -> dict[str, ModelInfo]: ...

    def known_models(self) -> set[str]: ...

    def ready(self) -> bool: ...

    async def render(self, job: RenderJob) -> RenderedImages: ...

    async def open_stream(self, job: RenderJob) -> AsyncIterator[bytes]: ...


@dataclass
class AppState:
    settings: Settings
    renderer: Renderer
    metrics: Metrics
    store: ImageStore | None = None
    pool: EnginePool | None = None
    registry: Registry | None = None
    dispatcher: Dispatcher | None = None
    agent: NodeAgent | None = None
    api_keys: tuple[str, ...] = ()  # read once at start-up (settings and the keys file)
    admitting: Counter[str] = field(default_factory=Counter)  # requests decoding uploads, per model

    @staticmethod
    def of(connection: ASGIConnection) -> AppState:
        return connection.app.state.sdserve

    @property
    def default_model(self) -> str | None:
        """The model a request naming none gets (decided once at start-up; see server.app.default_model)."""
        return self.dispatcher.default_model if self.dispatcher is not None else None

    def resolve_model(self, name: str | None, connection: ASGIConnection) -> ModelInfo:
        info = jobs.resolve_model(name, self.renderer.ready_models(), self.renderer.known_models(), self.settings,
                                  self.default_model)
        connection.state.model = info.id
        return info

    @contextlib.contextmanager
    def admission(self, model: str) -> Iterator[None]:
        """Room in the queue is reserved before uploads are decoded (the costly part of an edit): a full
        queue answers 429 at once, and no more uploads are decoded at a time than could be queued."""
        room = self.dispatcher.room(model) if self.dispatcher is not None else None
        if room is not None and self.admitting[model] >= room:
            raise self.dispatcher.full_error(model)
        self.admitting[model] += 1
        try:
            yield
        finally:
            self.admitting[model] -= 1

    def problems(self) -> dict[str, object]:
        """What /readyz reports beside readiness: models that failed to load, a default model no node has."""
        found: dict[str, object] = {}
        if self.pool is not None and self.pool.failed():
            found["failed_models"] = self.pool.failed()
        problem = self.dispatcher.default_model_problem() if self.dispatcher is not None else None
        if problem:
            found["default_model"] = problem
        return found

    @staticmethod
    def request_id(connection: ASGIConnection) -> str:
        return connection.scope.get("state", {}).get("request_id", "-")

    def base_url(self, connection: ASGIConnection) -> str:
        return (self.settings.public_url or str(connection.base_url)).rstrip("/")

    async def render_while_connected(self, request: Request, job: RenderJob) -> RenderedImages:
        """Render within the request timeout; a client that disconnects cancels its render (which stops at
        its next step, or leaves the queue)."""
        return await self.while_connected(request, job, self.renderer.render(job))

    async def while_connected(self, request: Request, job: RenderJob, work: Awaitable[T]) -> T:
        """`work` for `job` within the request timeout (504), cancelled when the client disconnects: a render,
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
            raise RenderCancelled(f"client disconnected; request {job.request_id} cancelled")
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
