"""The router ↔ node protocol (`/v0`): what a front door sends a node, what the node sends back, how nodes
join, and the transport a front door reaches a node through. No framework or ML imports here.

    front door ──RenderOrder──▶ node        (msgpack; a stream answers with OpenAI's events, `server.sse`)
    front door ◀─RenderedImages── node
    node ──NodeReport──▶ router             (registration and every heartbeat; the router answers `Registered`)

A front door reaches each node through a `NodeTransport`: HTTP (`server.router.node_client.NodeClient`) or
in-process (`server.node.local.LocalNode`, the standalone role). Every transport raises the same signals
for dispatch: `NodeFull` (no room: try another node or wait), `NodeUnavailable` (unreachable, gone, or it
refused before starting: take it out of rotation and retry elsewhere; `NodeRefused` when it will finish
what it already has) and `NodeGone` (a stream's node died mid-stream). Any other error is the request's
own and final.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Literal, Protocol

import msgspec

from engines.info import ModelInfo
from server.errors import ApiError
from server.protocol import LoraRef, OutputFormat

PROTOCOL_VERSION = 1
MSGPACK = "application/msgpack"  # orders and answers travel as msgpack


class ControlOrder(msgspec.Struct, kw_only=True):
    """A ControlNet unit of an order: its control image read, checked and fitted to the render size."""

    name: str
    image: bytes  # PNG at the render size
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0
    preprocess: str = "none"
    low: float = 100.0
    high: float = 200.0


class RenderOrder(msgspec.Struct, kw_only=True):
    """A request with every parameter resolved against the model: what a node renders, unchanged on a
    retry (the seed is drawn before dispatch, so a retried request gives the same images)."""

    request_id: str
    model: str
    prompt: str
    negative_prompt: str | None
    width: int
    height: int
    steps: int
    guidance_scale: float
    sampler: str
    seed: int
    n: int
    strength: float
    image: bytes | None = None  # PNG
    mask: bytes | None = None  # PNG, 8-bit gray, white = repaint
    output_format: OutputFormat = "png"
    output_compression: int | None = None
    quality: str = "medium"  # in responses and events: low, medium or high, as OpenAI reports it
    partial_images: int = 0  # streaming: previews per image
    preview: Literal["tiny", "full", "linear"] | None = None  # streaming: how previews are drawn; None: --preview
    events: str | None = None  # streaming: the event type prefix, "image_generation" or "image_edit"
    lora: list[LoraRef] = msgspec.field(default_factory=list)
    decoder: str = "full"  # the final image's: "full" (the VAE) or "tiny" (the model's TAESD)
    controlnet: list[ControlOrder] = msgspec.field(default_factory=list)
    tenant: str = ""  # who asked (a hash of the API key): a model's queue takes turns between tenants
    tenant_cap: int = 0  # renders of this tenant at once on a node (its keys-file max_concurrent); 0: no cap

    @property
    def work(self) -> int:
        """Relative cost, for balancing: steps × pixels × images."""
        return self.steps * self.width * self.height * self.n


class RenderedImages(msgspec.Struct):
    """A node's answer to an order, and a stream's last event."""

    images: list[bytes]  # encoded in the order's output_format
    seeds: list[int]
    timings: dict[str, float] = msgspec.field(default_factory=dict)  # seconds per stage, with "queue"
    steps_run: int = 0  # UNet steps per image (a stream's events do not carry it, nor timings)
    input_tokens: int = 0  # prompt tokens the text encoders read


class PartialImage(msgspec.Struct):
    """A stream's preview: image `index`'s estimate of the final image at one of its evenly spaced steps."""

    index: int
    partial_index: int
    image: bytes  # encoded in the order's output_format


StreamEvent = PartialImage | RenderedImages  # what a stream yields, RenderedImages last


class ModelLoad(msgspec.Struct):
    """A node's load for one model: what dispatch balances on."""

    running: int = 0
    waiting: int = 0
    work: int = 0  # outstanding steps × pixels × images
    capacity: int = 1  # renders at once (slots, × --max-batch when batching) + queue depth: beyond → 429
    retry_after: int = 1  # seconds the node estimates until it has room again (its 429's Retry-After)


class NodeReport(msgspec.Struct, kw_only=True):
    """What a node tells a router at registration and every heartbeat: enough to dispatch on."""

    protocol: int = PROTOCOL_VERSION
    node_id: str
    url: str
    version: str
    models: list[ModelInfo]  # models it serves: loaded, or loaded on their first request
    loading: list[str] = msgspec.field(default_factory=list)  # models loading now
    loaded: list[str] | None = None  # models loaded now (None: a node that loads everything at start-up)
    room_for: list[str] = msgspec.field(default_factory=list)  # models not loaded that load without unloading another
    backend: str
    device: str
    render_slots: int
    load: dict[str, ModelLoad] = msgspec.field(default_factory=dict)
    draining: bool = False
    sick: str | None = None  # why it takes no new work now (a render stalled, renders failing): out of rotation


class Registered(msgspec.Struct):
    """The router's answer: a lease that later heartbeats and the deregistration must present."""

    node_id: str
    lease: str
    heartbeat_interval: float


class NodeTransport(Protocol):
    """How a front door reaches one node. Renders are idempotent (the seed is fixed before dispatch), so
    retrying one that a dead node had started is safe."""

    async def render(self, order: RenderOrder) -> RenderedImages: ...

    async def open_stream(self, order: RenderOrder) -> AsyncIterator[bytes]:
        """The order's OpenAI event stream, whole frames; returns once the node accepted it (refusals raise
        here), and raises `NodeGone` if the node dies before the stream's last event."""
        ...

    async def open_events(self, order: RenderOrder) -> AsyncIterator[StreamEvent]:
        """The same stream as typed events (for a front door's own use: A1111's progress)."""
        ...

    async def status(self, timeout: float) -> NodeReport: ...

    async def close(self) -> None: ...


class NodeFull(Exception):
    """The node refused for lack of room (its 429, kept for the client): try another node or wait."""

    def __init__(self, error: ApiError) -> None:
        super().__init__(error.message)
        self.error = error


class NodeUnavailable(Exception):
    """The node could not be reached, went away, or refused before starting."""


class NodeRefused(NodeUnavailable):
    """The node will not take this order: it answered 503 (draining, its model unavailable) or refused the
    connection (its listener is closed: shutting down). The order goes elsewhere; what the node already has
    is left to finish there."""


class NodeGone(Exception):
    """The node serving a stream went away (connection lost, or the stream ended without its last event)."""


class StreamCut(NodeGone):
    """A stream that ended cleanly without its last event: gone for this stream, not proof that the node is."""
