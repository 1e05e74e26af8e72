"""The in-process node: the standalone role's own engine pool, reached by its dispatcher as a
`server.wire.NodeTransport` without HTTP. Streams need no frames on the way to an in-process reader (A1111's
progress takes the events, images as they are)."""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import TypeVar

from server.errors import ApiError
from server.node.pool import EnginePool
from server.wire import NodeFull, NodeReport, RenderedImages, RenderOrder, StreamEvent

T = TypeVar("T")


class LocalNode:
    def __init__(self, pool: EnginePool, report: Callable[[], NodeReport]) -> None:
        self.pool = pool
        self.report = report  # read fresh each time

    async def render(self, order: RenderOrder) -> RenderedImages:
        return await _unless_full(self.pool.render(order))

    async def open_stream(self, order: RenderOrder) -> AsyncIterator[bytes]:
        return await _unless_full(self.pool.open_stream(order))

    async def open_events(self, order: RenderOrder) -> AsyncGenerator[StreamEvent, None]:
        return await _unless_full(self.pool.open_events(order))

    async def status(self, timeout: float) -> NodeReport:
        return self.report()

    async def close(self) -> None:
        return None


async def _unless_full(call: Awaitable[T]) -> T:
    """The pool's 429 is the dispatcher's cue to wait for room (`NodeFull`), as a remote node's."""
    try:
        return await call
    except ApiError as error:
        if error.status == 429:
            raise NodeFull(error) from error
        raise
