"""A1111 renders in progress, per client: what `/sdapi/v1/progress` reports and `/interrupt` stops.

A render runs as a stream of events (`Renderer.open_events`: in-process, images as they are; from a remote
node, its frames read back), so the front door sees its partial images as they come: each is the
denoiser's estimate of the final image (x0) at an evenly spaced step, and the latest one is
`current_image`. How many there are follows A1111's options:
`live_previews_enable`, and `show_progress_every_n_steps` (N: about one every N steps; 0: every step;
-1: none while rendering). Progress moves with them: with previews off it jumps from 0 to 1.

A client is the API key it authenticates with (Bearer or Basic), or its address on an open server.
Interrupting closes the stream, which stops the render at its next step (or takes it off the queue);
the request then answers with the latest estimate of each image that has one, as A1111 returns the
current latents decoded. With several front doors, each render's progress is published to the state they
share (`server.a1111.shared`), and an /interrupt that reached another front door is picked up from there.
"""

from __future__ import annotations

import asyncio
import base64
import math
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal

from engines import limits
from server.a1111.protocol import ProgressResponse, ProgressState
from server.a1111.shared import SharedState
from server.errors import ApiError
from server.state import Renderer
from server.wire import PartialImage, RenderOrder, StreamEvent

INTERRUPT_POLL_SECONDS = 0.25  # how soon a render notices an /interrupt sent to another front door


def preview_count(options: dict[str, Any], steps: int, strength: float) -> int:
    """Partial images per image for A1111's live-preview options."""
    every = options.get("show_progress_every_n_steps", 10)
    if not options.get("live_previews_enable", True) or not isinstance(every, int) or every < 0:
        return 0
    total = limits.steps_run(steps, strength)
    return total if every == 0 else max(0, math.ceil(total / every) - 1)


def preview_mode(options: dict[str, Any], tiny: bool) -> Literal["tiny", "full", "linear"]:
    """A1111's `show_progress_type`: "Full" decodes each preview with the VAE, "Approx cheap" is the linear latent
    map; "TAESD", "Approx NN" and the default take the model's tiny decoder where it has one (`tiny`), else the
    linear map."""
    kind = str(options.get("show_progress_type", "")).lower()
    if kind in ("full", "approx cheap"):
        return "full" if kind == "full" else "linear"
    return "tiny" if tiny else "linear"


@dataclass
class Task:
    """One A1111 request's render, as its stream reports it."""

    client: str
    order: RenderOrder
    kind: str
    previews: int  # partial images per image
    started: float = field(default_factory=time.time)
    done: dict[int, float] = field(default_factory=dict)  # image index → fraction of its steps done
    latest: dict[int, bytes] = field(default_factory=dict)  # image index → its latest estimate (encoded)
    current: bytes | None = None  # the latest estimate of any image
    finished: list[bytes] | None = None
    seeds: list[int] = field(default_factory=list)
    interrupted: bool = False
    consumer: asyncio.Task[None] | None = None

    def progress(self) -> float:
        return sum(self.done.values()) / self.order.n

    def on_partial(self, event: PartialImage) -> None:
        self.latest[event.index] = self.current = event.image
        self.done[event.index] = (event.partial_index + 1) / (self.previews + 1)

    def report(self, with_image: bool) -> ProgressResponse:
        """A1111's progress: at least 0.01 once started, and its eta formula."""
        fraction = min(1.0, 0.01 + self.progress())
        elapsed = time.time() - self.started
        steps = self.order.steps
        image_no = min(self.order.n - 1, sum(1 for v in self.done.values() if v >= 1.0))
        step = round(self.done.get(image_no, 0.0) * steps)
        state = ProgressState(interrupted=self.interrupted, job=f"scripts_{self.kind}", job_count=self.order.n,
                              job_timestamp=time.strftime("%Y%m%d%H%M%S", time.localtime(self.started)),
                              job_no=image_no, sampling_step=step, sampling_steps=steps)
        image = base64.b64encode(self.current).decode("ascii") if with_image and self.current else None
        return ProgressResponse(progress=fraction, eta_relative=elapsed / fraction - elapsed, state=state,
                                current_image=image)


class Tasks:
    """Every A1111 render in progress on this front door."""

    def __init__(self, shared: SharedState | None = None) -> None:
        self.running: list[Task] = []
        self.shared = shared

    async def run(self, renderer: Renderer, task: Task, gone: asyncio.Future[Any]) -> Task:
        """Render `task.order` as a stream, recording its progress, until it completes, is interrupted, or the
        client goes away (`gone`). Errors before or during the render raise, as the OpenAI routes'."""
        events = await renderer.open_events(task.order)  # refusals (429, 503…) raise here
        task.consumer = asyncio.ensure_future(self._consume(task, events))
        self.running.append(task)
        watch = asyncio.ensure_future(self._watch(task))
        try:
            await asyncio.wait({task.consumer, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
            self.running.remove(task)
            self._publish(task.client)
            if not task.consumer.done():
                task.consumer.cancel()
                await asyncio.wait({task.consumer})
        if gone.done() and not task.interrupted and task.finished is None:
            raise ApiError(499, "the client closed the request", code="client_closed_request")
        if not task.consumer.cancelled() and task.consumer.exception() is not None:
            raise task.consumer.exception()  # type: ignore[misc]
        return task

    async def _watch(self, task: Task) -> None:
        """Publish the task's start, then poll the shared state for an /interrupt another front door took."""
        if self.shared is None:
            return
        self.shared.take_interrupt(task.client)  # one from before this render is not for it
        self._publish(task.client)
        while True:
            await asyncio.sleep(INTERRUPT_POLL_SECONDS)
            if self.shared.take_interrupt(task.client):
                self.interrupt(task.client)

    def _publish(self, client: str) -> None:
        """The client's latest render in progress here, as /progress reports it, for the other front doors."""
        if self.shared is None:
            return
        tasks = self.of(client)
        if tasks:
            self.shared.publish(client, tasks[-1].report(with_image=True))
        else:
            self.shared.withdraw(client)

    async def _consume(self, task: Task, events: AsyncIterator[StreamEvent]) -> None:
        try:
            async for event in events:  # errors (a failed render, a node lost mid-render) raise here
                if isinstance(event, PartialImage):
                    task.on_partial(event)
                    self._publish(task.client)
                else:
                    task.seeds = event.seeds
                    task.done = dict.fromkeys(range(len(event.images)), 1.0)
                    task.finished = event.images
        finally:
            closing = getattr(events, "aclose", None)
            if closing is not None:  # closing the stream stops the render (or takes it off the queue)
                await closing()

    def of(self, client: str) -> list[Task]:
        return [task for task in self.running if task.client == client]

    def interrupt(self, client: str) -> int:
        tasks = self.of(client)
        for task in tasks:
            task.interrupted = True
            if task.consumer is not None:
                task.consumer.cancel()
        return len(tasks)


def idle() -> ProgressResponse:
    return ProgressResponse(progress=0.0, eta_relative=0.0, state=ProgressState())


def interrupted_images(task: Task) -> tuple[list[bytes], list[int]]:
    """The latest estimate of each image that has one, in order, with its seed."""
    indices = sorted(task.latest)
    return [task.latest[i] for i in indices], [task.order.seed + i for i in indices]
