"""A ticket: one order on this node, from its place in a model's queue to its answer."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from engines.render import Tokens
from engines.rendering import Rendering
from server.node.estimate import Progress
from server.wire import PartialImage, RenderedImages, RenderOrder


@dataclass(eq=False)
class Ticket:
    """The order and its tokens, the future its request awaits (on `loop`), the cancellation a render checks
    at every step (set once nobody waits for it), when it was queued and taken, the streaming callback, and,
    once a render slot began it, its render in progress and how far it got."""

    order: RenderOrder
    tokens: Tokens  # its prompts, tokenized once when it was queued
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[RenderedImages]
    enqueued: float = field(default_factory=time.perf_counter)
    started: float = 0.0  # when a render slot took it
    cancel: threading.Event = field(default_factory=threading.Event)
    on_partial: Callable[[PartialImage], None] | None = None  # streaming: each preview, encoded (finishing thread)
    rendering: Rendering | None = None
    progress: Progress = field(default_factory=Progress)  # its steps so far, for Retry-After
