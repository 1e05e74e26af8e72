"""One model's queue on this node: its pipeline, the tickets waiting, its render threads, and the thread
that finishes their renders.

Renders run on threads (ONNX Runtime releases the GIL), so the event loop keeps answering health checks,
metrics and other requests while they run. A model takes `render_slots` renders at once and keeps at most
`queue_depth` more waiting; beyond that a request is refused at once (429), before any work. Waiting
requests take turns between tenants (API keys, `server.node.fair_queue`), a tenant at its cap on
concurrent renders waiting until one of its renders ends. A request
whose caller goes away (timeout, disconnect) is dropped from the queue, or, when already running, stopped
at its next step. With `--batch-window` above 0 each render slot is a step-level batcher
(`server.node.batcher`) that interleaves up to `--batch-renders` requests and shares UNet calls among them.

A render thread only renders: turning a finished render into its answer (pixels to images, encoded in the
requested format) and encoding streamed previews run on the model's finishing thread, in the order the
render thread hands them over (a stream's previews before its images), so that the next render (or,
batching, the others' next step) need not wait for them.
"""

from __future__ import annotations

import asyncio
import io
import logging
import math
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from PIL import Image

import engines
from engines.rendering import Rendering
from server import images
from server.errors import ApiError, queue_full
from server.metrics import Metrics
from server.node import estimate
from server.node.batcher import Batcher, Batching, Outcome
from server.node.fair_queue import FairQueue
from server.node.health import NodeHealth
from server.node.ticket import Ticket
from server.wire import PartialImage, RenderedImages, RenderOrder

log = logging.getLogger("sdserve.server")


class ModelQueue:
    """One model: its pipeline, its waiting tickets and its render threads (each a `batcher.Slot` user)."""

    def __init__(self, pipeline: engines.Pipeline, slots: int, depth: int, metrics: Metrics,
                 preview: str = "full", batching: Batching | None = None, health: NodeHealth | None = None) -> None:
        self.pipeline, self.depth, self.metrics, self.preview = pipeline, depth, metrics, preview
        self.batching = batching
        self.health = health or NodeHealth()  # told when each render starts, steps and ends
        # renders at once: one per slot, or as many as a batching slot interleaves
        self.capacity = slots * (batching.max_renders if batching else 1)
        self.id = pipeline.info.id
        self._waiting: FairQueue[Ticket] = FairQueue()
        self._tenants_running: Counter[str] = Counter()
        self._tenant_caps: dict[str, int] = {}
        self._ready = threading.Condition()
        self._running = 0
        self._running_work = 0
        self._closed = False
        self._current: set[Ticket] = set()  # running now
        self._finisher = ThreadPoolExecutor(1, thread_name_prefix=f"finish-{self.id}")  # one: keeps their order
        self._threads = [threading.Thread(target=self._serve, name=f"render-{self.id}-{i}", daemon=True)
                         for i in range(slots)]
        for thread in self._threads:
            thread.start()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return self._running

    def rows(self, order: RenderOrder) -> int:
        """UNet rows an order's calls take: its images (up to a chunk), twice when guided."""
        return self.pipeline.info.rows(order.n, order.guidance_scale)

    def outstanding_work(self) -> int:
        with self._ready:
            return sum(t.order.work for t in self._waiting) + self._running_work

    async def submit(self, order: RenderOrder) -> RenderedImages:
        return await self.outcome(self.enqueue(order))

    def enqueue(self, order: RenderOrder, on_partial: Callable[[PartialImage], None] | None = None) -> Ticket:
        """Queue an order (from the event loop), or refuse it at once: 429 when full, 503 when closing."""
        # tokenized once: checked before the order takes a place in the queue, counted, then encoded by the render
        tokens = self.pipeline.tokenize(order.prompt, order.negative_prompt)
        loop = asyncio.get_running_loop()
        ticket = Ticket(order, tokens, loop, loop.create_future(), on_partial=on_partial)
        with self._ready:
            if self._closed:
                raise ApiError(503, f"model {self.id} is shutting down", code="draining",
                               headers={"Retry-After": "5"})
            # full at capacity + depth tickets, counting one a free slot has not picked up yet as that slot's
            if self._running + len(self._waiting) >= self.capacity + self.depth:
                raise queue_full(self.id, self._running, len(self._waiting), self.retry_after())
            self._waiting.append(ticket, order.tenant)
            self._tenant_caps[order.tenant] = order.tenant_cap
            self.metrics.queue_depth.labels(self.id).set(len(self._waiting))
            self._ready.notify()
        return ticket

    async def outcome(self, ticket: Ticket) -> RenderedImages:
        try:
            return await asyncio.shield(ticket.future)
        except asyncio.CancelledError:  # timeout or client gone: drop it, or stop it at its next step
            self.abandon(ticket)
            raise

    def abandon(self, ticket: Ticket) -> None:
        """Nobody waits for this ticket any more (from the event loop): drop it from the queue, or stop it at
        its next step. Its future is cancelled, so the outcome that comes later is dropped, not left unread."""
        ticket.cancel.set()
        ticket.future.cancel()
        with self._ready:
            if ticket in self._waiting:
                self._waiting.remove(ticket)
                self.metrics.queue_depth.labels(self.id).set(len(self._waiting))

    def retry_after(self) -> int:
        """Seconds until the queue has room again (`server.node.estimate`)."""
        with self._ready:  # a reentrant lock: enqueue holds it too
            chunk = self.pipeline.max_batch
            return estimate.seconds_until_room([(t.progress, math.ceil(t.order.n / chunk), t.order.steps)
                                                for t in self._current],
                                               self.health.step_seconds(self.id) or estimate.FIRST_STEP_GUESS)

    def _serve(self) -> None:
        if self.batching is not None:
            Batcher(self, self.batching).run()
            return
        while (ticket := self.take()) is not None:
            try:
                outcome: Outcome = self._render(ticket)
            except BaseException as exc:  # delivered to the waiting request, never lost
                outcome = exc
            self.finish(ticket, outcome)

    def take(self, wait: bool = True) -> Ticket | None:
        """The next waiting ticket, now counted as running; None when closed (or, not `wait`ing, when none
        waits)."""
        with self._ready:
            while True:
                ticket = self._waiting.take(self._may_run)
                if ticket is None:  # none waits, or only tenants at their cap
                    if not wait or self._closed:
                        return None
                    self._ready.wait()
                    continue
                self.metrics.queue_depth.labels(self.id).set(len(self._waiting))
                if not ticket.cancel.is_set():
                    break
            self._running += 1
            self._current.add(ticket)
            self._running_work += ticket.order.work
            self._tenants_running[ticket.order.tenant] += 1
        self.health.started(ticket, self.id)
        self.metrics.in_flight.labels(self.id).inc()
        ticket.started = time.perf_counter()
        return ticket

    def _may_run(self, tenant: str) -> bool:
        cap = self._tenant_caps.get(tenant, 0)
        return not cap or self._tenants_running[tenant] < cap

    def wait_for_more(self, count: int, deadline: float) -> None:
        """Until `count` tickets wait (or the queue closes), at most until `deadline` (time.monotonic)."""
        with self._ready:
            while len(self._waiting) < count and not self._closed and (left := deadline - time.monotonic()) > 0:
                self._ready.wait(left)

    def finish(self, ticket: Ticket, outcome: Outcome) -> None:
        """A taken ticket's outcome (a render's result, a finished render, or its error), answered on the
        finishing thread, after the previews handed over before it."""
        try:
            self._finisher.submit(self._complete, ticket, outcome)
        except RuntimeError:  # closed: answered here, late in a shutdown
            self._complete(ticket, outcome)

    def _complete(self, ticket: Ticket, outcome: Outcome) -> None:
        """On the finishing thread: a finished render's images, encoded; then the ticket leaves the counts and
        its request gets its answer."""
        try:
            if isinstance(outcome, Rendering):
                outcome = outcome.result()
            if isinstance(outcome, engines.RenderResult):
                outcome = self.rendered(ticket, outcome)
        except BaseException as exc:  # its own error (or cancellation), delivered to its request only
            outcome = exc
        self._release(ticket, outcome)

    def _release(self, ticket: Ticket, outcome: RenderedImages | BaseException) -> None:
        if isinstance(outcome, engines.RenderCancelled):
            log.info("%s", outcome)
        self.health.finished(ticket, "ok" if isinstance(outcome, RenderedImages)
                             else "failed" if isinstance(outcome, engines.EngineFailure) else "other")
        self.metrics.in_flight.labels(self.id).dec()
        with self._ready:
            self._running -= 1
            self._current.discard(ticket)
            self._running_work -= ticket.order.work
            self._tenants_running[ticket.order.tenant] -= 1
            self._ready.notify_all()
        _answer(ticket, outcome)

    @staticmethod
    def render_request(ticket: Ticket) -> engines.RenderRequest:
        order = ticket.order
        return engines.RenderRequest(
            prompt=order.prompt, negative_prompt=order.negative_prompt, width=order.width, height=order.height,
            steps=order.steps, guidance_scale=order.guidance_scale, sampler=order.sampler, seed=order.seed,
            n=order.n, image=_open(order.image), mask=_open(order.mask), strength=order.strength,
            lora=[(ref.name, ref.scale) for ref in order.lora], decoder=order.decoder, tokens=ticket.tokens,
            controlnet=[engines.ControlUnit(name=c.name, image=_open(c.image), scale=c.scale, start=c.start, end=c.end,
                                            preprocess=c.preprocess, low=c.low, high=c.high) for c in order.controlnet],
        )

    def on_step(self, ticket: Ticket) -> Callable[[int, int], None]:
        """The render's progress callback: tells the node's health and the ticket's progress (for Retry-After)
        it stepped, and stops it at its next step once nobody waits for it."""
        def on_step(done: int, total: int) -> None:
            self.health.stepped(ticket)
            ticket.progress.step(done, total)
            if ticket.cancel.is_set():
                raise engines.RenderCancelled(f"request {ticket.order.request_id} cancelled at step {done}/{total}")
        return on_step

    def on_partial(self, ticket: Ticket) -> Callable[[engines.Partial], None] | None:
        """The render's preview callback: each preview is encoded on the finishing thread, then handed to the
        ticket's stream."""
        if ticket.on_partial is None:
            return None

        def on_partial(partial: engines.Partial) -> None:  # on the render thread
            self._finisher.submit(self._encode_partial, ticket, partial)
        return on_partial

    def _encode_partial(self, ticket: Ticket, partial: engines.Partial) -> None:
        order = ticket.order
        encoded = images.encode(partial.image, order.output_format, order.output_compression)
        log.info("request %s: partial image %d of image %d at step %d/%d", order.request_id, partial.partial_index,
                 partial.index, partial.step, partial.total)
        assert ticket.on_partial is not None
        try:
            ticket.on_partial(PartialImage(partial.index, partial.partial_index, encoded))
        except RuntimeError:  # its event loop is closed: nobody is left to show it to
            log.info("request %s: its event loop closed before its partial image", order.request_id)

    def begin(self, ticket: Ticket) -> Rendering:
        """The ticket's render, ready for its first step (`Pipeline.begin`: inputs checked, prompt encoded)."""
        order = ticket.order
        ticket.rendering = self.pipeline.begin(
            self.render_request(ticket), on_step=self.on_step(ticket), on_partial=self.on_partial(ticket),
            partial_images=order.partial_images, preview=order.preview or self.preview)
        return ticket.rendering

    def _render(self, ticket: Ticket) -> engines.RenderResult:
        order = ticket.order
        return self.pipeline.render(self.render_request(ticket), on_step=self.on_step(ticket),
                                    on_partial=self.on_partial(ticket), partial_images=order.partial_images,
                                    preview=order.preview or self.preview)

    def rendered(self, ticket: Ticket, result: engines.RenderResult) -> RenderedImages:
        """A finished render, encoded as its order asked, counted in the metrics."""
        order, started = ticket.order, time.perf_counter()
        encoded = [images.encode(image, order.output_format, order.output_compression) for image in result.images]
        queued = ticket.started - ticket.enqueued
        timings = dict(result.timings.stages) | {"encode": time.perf_counter() - started, "queue": queued}
        self.metrics.render_seconds.labels(self.id).observe(timings.get("total", 0.0))
        self.metrics.images.labels(self.id).inc(len(encoded))
        return RenderedImages(images=encoded, seeds=result.seeds, timings=timings, steps_run=result.steps_run,
                              input_tokens=ticket.tokens.count)  # by the first text encoder's tokenizer

    def give_up(self, error: ApiError) -> int:
        """Answer every accepted request with `error` now: what waits leaves the queue, what runs stops at its
        next step (its outcome is then dropped). How many there were."""
        with self._ready:
            tickets = [*self._current, *self._waiting]
            for ticket in tickets:
                ticket.cancel.set()
                _answer(ticket, error)
            self._waiting.clear()
            self.metrics.queue_depth.labels(self.id).set(0)
            self._ready.notify_all()
        return len(tickets)

    def close(self, wait: float) -> None:
        """Stop: what waits is answered 503, what runs stops at its next step; wait up to `wait` s for the
        threads (a process must not exit while a thread is inside ONNX Runtime)."""
        with self._ready:
            self._closed = True
        self.give_up(ApiError(503, f"model {self.id} is shutting down", code="draining",
                              headers={"Retry-After": "5"}))
        deadline = time.monotonic() + wait
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self._finisher.shutdown(wait=False)  # what it holds still runs: the answers of the last renders

    def idle(self) -> bool:
        with self._ready:
            return not self._waiting and self._running == 0


def _open(data: bytes | None) -> Image.Image | None:
    return None if data is None else Image.open(io.BytesIO(data))


def _answer(ticket: Ticket, outcome: RenderedImages | BaseException) -> None:
    """Deliver `outcome` to the request waiting for `ticket`, from any thread."""
    try:
        ticket.loop.call_soon_threadsafe(_deliver, ticket.future, outcome)
    except RuntimeError:  # its event loop is closed: nobody is left to answer
        log.info("request %s: its event loop closed before its outcome", ticket.order.request_id)


def _deliver(future: asyncio.Future[RenderedImages], outcome: RenderedImages | BaseException) -> None:
    if future.done():  # abandoned, or already answered (drain timeout): nobody reads this outcome
        if isinstance(outcome, BaseException) and not isinstance(outcome, engines.RenderCancelled | ApiError):
            log.warning("a render failed after its request was answered: %s: %s", type(outcome).__name__, outcome)
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)
