"""OpenAI image streaming: a render in progress as Server-Sent Events.

    event: image_generation.partial_image     (or image_edit.*)   `partial_images` per image, as produced
    data: {"type": …, "b64_json": …, "partial_image_index": 0, "index": 0, "seed": 7, …}

    event: image_generation.completed                             one per image, in order of index
    data: {…, "usage": {…}}

    event: error                                                  a failure after the stream started
    data: {"type": "error", "error": {"message", "type", "param", "code"}}

The engine pool (node, standalone) writes the frames (`open_local`); a front door passes them on frame
by frame (`relay`), so the same bytes reach the client whichever way they came. Each frame is sent as
soon as it exists; `: keep-alive` comments fill long silences. Closing the stream (client gone) abandons
the render: it leaves the queue, or stops at its next step.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import msgspec
from litestar import Request
from litestar.response import Stream

import engines
from server import images
from server.errors import ApiError, to_response
from server.protocol import (
    CompletedImageEvent,
    ErrorEvent,
    PartialImageEvent,
    RenderedImages,
    RenderJob,
    Usage,
)

if TYPE_CHECKING:
    from server.pool import EnginePool, ModelQueue, Work
    from server.state import AppState

log = logging.getLogger("sdserve.server")
MEDIA_TYPE = "text/event-stream"
KEEPALIVE = b": keep-alive\n\n"
HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}  # and tell proxies not to buffer
_DONE = object()


def frame(event: str, data: msgspec.Struct) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + msgspec.json.encode(data) + b"\n\n"


def error_frame(exc: Exception, request_id: str | None = None) -> bytes:
    body = to_response(exc, request_id).content
    return frame("error", ErrorEvent(error=body.error))


async def respond(state: AppState, request: Request, job: RenderJob) -> Stream:
    """The public answer to `stream: true`: errors before a node accepted the job are ordinary HTTP errors."""
    request.state.model = job.model
    chunks = await state.while_connected(request, job, state.renderer.open_stream(job))
    return Stream(chunks, media_type=MEDIA_TYPE, headers=HEADERS)


# -- the engine pool's side ------------------------------------------------------------------------


def open_local(pool: EnginePool, job: RenderJob, timeout: float, keepalive: float) -> AsyncIterator[bytes]:
    """Queue a streamed job (refusals raise here, before any byte) and return its frames."""
    queue = pool.queue_for(job)
    loop = asyncio.get_running_loop()
    items: asyncio.Queue[object] = asyncio.Queue()

    def on_partial(partial: engines.Partial) -> None:  # on the render thread
        encoded = images.encode(partial.image, job.output_format, job.output_compression)
        log.info("request %s: partial image %d of image %d at step %d/%d", job.request_id, partial.partial_index,
                 partial.index, partial.step, partial.total)
        loop.call_soon_threadsafe(items.put_nowait, (partial, encoded))

    work = queue.enqueue(job, on_partial)
    work.future.add_done_callback(lambda _: items.put_nowait(_DONE))
    return _frames(queue, work, items, timeout, keepalive)


async def _frames(queue: ModelQueue, work: Work, items: asyncio.Queue[object], timeout: float,
                  keepalive: float) -> AsyncIterator[bytes]:
    job, created = work.job, int(time.time())
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                wait = min(keepalive, max(0.0, deadline - time.monotonic()))
                item = await asyncio.wait_for(items.get(), timeout=wait)
            except TimeoutError:
                if time.monotonic() >= deadline:
                    yield error_frame(ApiError(504, f"the render took longer than the {timeout:g} s request timeout",
                                               code="timeout"), job.request_id)
                    return
                yield KEEPALIVE
                continue
            if item is not _DONE:
                partial, encoded = item
                yield frame(f"{job.events}.partial_image", _partial_event(job, created, partial, encoded))
                continue
            error = work.future.exception()
            if error is not None:
                yield error_frame(error, job.request_id)
                return
            for event in completed_events(job, created, work.future.result()):
                yield event
            return
    finally:
        if not work.future.done():
            log.info("request %s: the stream was closed before the render ended; cancelling it", job.request_id)
            queue.abandon(work)


def _partial_event(job: RenderJob, created: int, partial: engines.Partial, encoded: bytes) -> PartialImageEvent:
    return PartialImageEvent(
        type=f"{job.events}.partial_image", b64_json=base64.b64encode(encoded).decode("ascii"), created_at=created,
        size=f"{job.width}x{job.height}", quality=job.quality, background="opaque", output_format=job.output_format,
        partial_image_index=partial.partial_index, index=partial.index, seed=job.seed + partial.index,
    )


def completed_events(job: RenderJob, created: int, rendered: RenderedImages) -> list[bytes]:
    usage = Usage.of_text(rendered.input_tokens)
    return [frame(f"{job.events}.completed", CompletedImageEvent(
        type=f"{job.events}.completed", b64_json=base64.b64encode(image).decode("ascii"), created_at=created,
        size=f"{job.width}x{job.height}", quality=job.quality, background="opaque", output_format=job.output_format,
        usage=usage, index=index, seed=seed,
    )) for index, (image, seed) in enumerate(zip(rendered.images, rendered.seeds, strict=True))]


# -- a front door's side ---------------------------------------------------------------------------


class NodeGone(Exception):
    """The node serving a stream went away (connection lost, or the stream ended without its last event)."""


@dataclass
class NodeStream:
    """An accepted stream on one node: its frames as they arrive (raising `NodeGone` if it dies)."""

    node_id: str
    chunks: AsyncIterator[bytes]


class Reopen(Protocol):
    def __call__(self, job: RenderJob, exclude: set[str]) -> Awaitable[NodeStream]: ...


async def relay(job: RenderJob, stream: NodeStream, reopen: Reopen,
                on_close: Callable[[], None] | None = None) -> AsyncIterator[bytes]:
    """Pass a node's frames on, whole and at once. A node that dies before its first event is replaced by
    another (`reopen`); one that dies later ends the stream with an error event, never a hang."""
    failed: set[str] = set()
    started = False
    try:
        while True:
            try:
                async for piece in _whole_frames(stream.chunks, job.n):
                    started = started or not piece.startswith(b":")
                    yield piece
                return
            except NodeGone as exc:
                failed.add(stream.node_id)
                log.warning("request %s: node %s failed mid-stream (%s)", job.request_id, stream.node_id, exc)
                if started:
                    yield error_frame(ApiError(502, f"the node rendering this stream failed: {exc}",
                                               code="node_failed"), job.request_id)
                    return
            try:
                stream = await reopen(job, failed)
            except Exception as exc:  # no node left to take it: the client still gets an answer
                yield error_frame(exc, job.request_id)
                return
    finally:
        closing = getattr(stream.chunks, "aclose", None)
        if closing is not None:  # the client left, or the last event is out: let go of the node's stream
            await closing()
        if on_close is not None:
            on_close()


async def _whole_frames(chunks: AsyncIterator[bytes], images_expected: int) -> AsyncIterator[bytes]:
    """Frames from arbitrary chunks; a stream that ends before its last event (all completed, or an error)
    counts as a dead node."""
    pending, completed = b"", 0
    async for chunk in chunks:
        pending += chunk
        *frames, pending = pending.split(b"\n\n")
        for piece in frames:
            yield piece + b"\n\n"
            if piece.startswith(b"event: error"):
                return
            if piece.startswith(b"event: ") and b".completed\n" in piece:
                completed += 1
                if completed == images_expected:
                    return
    raise NodeGone("the stream ended before its last event")
