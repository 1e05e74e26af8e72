"""OpenAI image streaming as Server-Sent Events, written and read:

    event: image_generation.partial_image     (or image_edit.*)   `partial_images` per image, as produced
    data: {"type": …, "b64_json": …, "partial_image_index": 0, "index": 0, "seed": 7, …}

    event: image_generation.completed                             one per image, in order of index
    data: {…, "usage": {…}}

    event: error                                                  a failure after the stream started
    data: {"type": "error", "error": {"message", "type", "param", "code"}}

A node writes an order's events as these frames (`frames`) and a front door passes them on frame by frame
(`server.router.relay`), so the same bytes reach the client whichever way they came. Each frame is sent as
soon as it exists; `: keep-alive` comments fill long silences. A front door that wants the events
themselves (A1111's progress) reads a remote node's frames back (`events`).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterator

import msgspec

from server.errors import from_detail, to_response
from server.protocol import CompletedImageEvent, ErrorEvent, PartialImageEvent, Usage
from server.wire import PartialImage, RenderedImages, RenderOrder, StreamCut, StreamEvent

MEDIA_TYPE = "text/event-stream"
KEEPALIVE = b": keep-alive\n\n"
HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}  # and tell proxies not to buffer


def frame(event: str, data: msgspec.Struct) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + msgspec.json.encode(data) + b"\n\n"


def error_frame(exc: Exception, request_id: str | None = None) -> bytes:
    body = to_response(exc, request_id).content
    return frame("error", ErrorEvent(error=body.error))


async def frames(order: RenderOrder, events: AsyncGenerator[StreamEvent, None], keepalive: float
                 ) -> AsyncIterator[bytes]:
    """An order's events as frames, a keep-alive comment after each `keepalive` seconds of silence; an error
    ends the stream with an error event. Closing the frames closes the events (which abandons the render)."""
    created = int(time.time())
    pending: asyncio.Future[StreamEvent] | None = None
    try:
        while True:
            pending = pending or asyncio.ensure_future(anext(events))
            done, _ = await asyncio.wait({pending}, timeout=keepalive)
            if not done:
                yield KEEPALIVE
                continue
            arrived, pending = pending, None
            try:
                event = arrived.result()
            except StopAsyncIteration:
                return
            except Exception as exc:
                yield error_frame(exc, order.request_id)
                return
            if isinstance(event, PartialImage):
                yield frame(f"{order.events}.partial_image", _partial_event(order, created, event))
            else:
                for piece in _completed_events(order, created, event):
                    yield piece
    finally:
        if pending is not None and not pending.done():
            pending.cancel()
            with contextlib.suppress(BaseException):
                await pending
        await events.aclose()


def _partial_event(order: RenderOrder, created: int, partial: PartialImage) -> PartialImageEvent:
    return PartialImageEvent(
        type=f"{order.events}.partial_image", b64_json=base64.b64encode(partial.image).decode("ascii"),
        created_at=created, size=f"{order.width}x{order.height}", quality=order.quality, background="opaque",
        output_format=order.output_format, partial_image_index=partial.partial_index, index=partial.index,
        seed=order.seed + partial.index,
    )


def _completed_events(order: RenderOrder, created: int, rendered: RenderedImages) -> list[bytes]:
    usage = Usage.of_text(rendered.input_tokens)
    return [frame(f"{order.events}.completed", CompletedImageEvent(
        type=f"{order.events}.completed", b64_json=base64.b64encode(image).decode("ascii"), created_at=created,
        size=f"{order.width}x{order.height}", quality=order.quality, background="opaque",
        output_format=order.output_format, usage=usage, index=index, seed=seed,
    )) for index, (image, seed) in enumerate(zip(rendered.images, rendered.seeds, strict=True))]


async def whole_frames(chunks: AsyncGenerator[bytes, None], images_expected: int) -> AsyncGenerator[bytes, None]:
    """Frames from arbitrary chunks, up to the stream's last event (all completed, or an error); a stream
    that ends before it raises `StreamCut`. Closing the frames closes the chunks."""
    pending, completed = b"", 0
    try:
        async for chunk in chunks:
            pending += chunk
            *pieces, pending = pending.split(b"\n\n")
            for piece in pieces:
                yield piece + b"\n\n"
                if piece.startswith(b"event: error"):
                    return
                if piece.startswith(b"event: ") and b".completed\n" in piece:
                    completed += 1
                    if completed == images_expected:
                        return
        raise StreamCut("the stream ended before its last event")
    finally:
        await chunks.aclose()


async def events(frames: AsyncGenerator[bytes, None]) -> AsyncGenerator[StreamEvent, None]:
    """Whole frames read back into events (keep-alives dropped); an error event raises the error the
    OpenAI routes would have answered."""
    images: list[bytes] = []
    seeds: list[int] = []
    tokens = 0
    try:
        async for piece in frames:
            kind, data = _parse(piece)
            if kind.endswith(".partial_image"):
                partial = msgspec.json.decode(data, type=PartialImageEvent)
                yield PartialImage(partial.index, partial.partial_image_index, base64.b64decode(partial.b64_json))
            elif kind.endswith(".completed"):
                completed = msgspec.json.decode(data, type=CompletedImageEvent)
                images.append(base64.b64decode(completed.b64_json))
                seeds.append(completed.seed)
                tokens = completed.usage.input_tokens
            elif kind == "error":
                raise from_detail(msgspec.json.decode(data, type=ErrorEvent).error)
        yield RenderedImages(images=images, seeds=seeds, input_tokens=tokens)
    finally:
        await frames.aclose()


def _parse(piece: bytes) -> tuple[str, bytes]:
    """A frame → (event type, data); comments (keep-alives) have no type."""
    kind, data = "", b""
    for line in piece.split(b"\n"):
        if line.startswith(b"event: "):
            kind = line[7:].decode()
        elif line.startswith(b"data: "):
            data = line[6:]
    return kind, data
