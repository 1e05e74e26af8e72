"""The node's half of a stream: an order queued on this node, and its events as the render thread produces
them (each partial image encoded there, in the order's output format), then its images. A node serves
them as OpenAI's frames (`server.sse.frames`); an in-process front door may read them as they are.
Closing the events (client gone) abandons the render: it leaves the queue, or stops at its next step.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator

import engines
from server import images
from server.errors import ApiError
from server.node.queue import ModelQueue
from server.node.ticket import Ticket
from server.wire import PartialImage, RenderOrder, StreamEvent

log = logging.getLogger("sdserve.server")
_DONE = object()


def open_events(queue: ModelQueue, order: RenderOrder, timeout: float) -> AsyncGenerator[StreamEvent, None]:
    """Queue a streamed order (refusals raise here, before any event) and return its events; past
    `timeout` seconds they end with a 504."""
    loop = asyncio.get_running_loop()
    items: asyncio.Queue[object] = asyncio.Queue()

    def on_partial(partial: engines.Partial) -> None:  # on the render thread
        encoded = images.encode(partial.image, order.output_format, order.output_compression)
        log.info("request %s: partial image %d of image %d at step %d/%d", order.request_id, partial.partial_index,
                 partial.index, partial.step, partial.total)
        loop.call_soon_threadsafe(items.put_nowait, PartialImage(partial.index, partial.partial_index, encoded))

    ticket = queue.enqueue(order, on_partial)
    ticket.future.add_done_callback(lambda _: items.put_nowait(_DONE))
    return _events(queue, ticket, items, timeout)


async def _events(queue: ModelQueue, ticket: Ticket, items: asyncio.Queue[object], timeout: float
                  ) -> AsyncGenerator[StreamEvent, None]:
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                item = await asyncio.wait_for(items.get(), timeout=max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                raise ApiError(504, f"the render took longer than the {timeout:g} s request timeout",
                               code="timeout") from None
            if item is _DONE:
                yield ticket.future.result()  # or its error
                return
            assert isinstance(item, PartialImage)
            yield item
    finally:
        if not ticket.future.done():
            log.info("request %s: the stream was closed before the render ended; cancelling it",
                     ticket.order.request_id)
            queue.abandon(ticket)
