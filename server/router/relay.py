"""A front door's half of a stream: a node's stream passed on piece by piece, as it arrives (OpenAI's frames
for a streaming client, or the events themselves for A1111's progress). A node that dies before its first
event is replaced by another; one that dies later ends the stream with its last word, never a hang.
Closing the relay (the client left) closes the node's stream, which abandons the render there.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from server.errors import ApiError
from server.wire import NodeGone, RenderOrder

log = logging.getLogger("sdserve.router")
T = TypeVar("T")


@dataclass
class NodeStream(Generic[T]):
    """An accepted stream on one node: its pieces as they arrive (raising `NodeGone` if it dies)."""

    node_id: str
    pieces: AsyncGenerator[T, None]


class Reopen(Protocol[T]):
    def __call__(self, order: RenderOrder, exclude: set[str]) -> Awaitable[NodeStream[T]]: ...


async def relay(order: RenderOrder, stream: NodeStream[T], reopen: Reopen[T], last_word: Callable[[Exception], T],
                counts: Callable[[T], bool] = lambda _: True) -> AsyncIterator[T]:
    """Pass the pieces on. Before the first piece that `counts` (not a keep-alive), a node's death sends the
    order to another node (`reopen`); after it, or when no node is left, `last_word(error)` is the stream's
    last piece (it may raise instead)."""
    failed: set[str] = set()
    started = False
    try:
        while True:
            try:
                async for piece in stream.pieces:
                    started = started or counts(piece)
                    yield piece
                return
            except NodeGone as exc:
                failed.add(stream.node_id)
                log.warning("request %s: node %s failed mid-stream (%s)", order.request_id, stream.node_id, exc)
                if started:
                    yield last_word(ApiError(502, f"the node rendering this stream failed: {exc}", code="node_failed"))
                    return
            try:
                stream = await reopen(order, failed)
            except Exception as exc:  # no node left to take it: the client still gets an answer
                yield last_word(exc)
                return
    finally:  # the client left, or the last event is out: let go of the node's stream
        await stream.pieces.aclose()
