"""Step-level batching across requests (`--batch-window MS` above 0): one render slot interleaves the
renders of its model, one UNet call per step over the rows of several of them.

Each request keeps its own seed, sampler, step count, strength, inpainting inputs, LoRA adapters and
callbacks (`engines.rendering.Rendering`); only the UNet call is shared. A request joins at its first
step and leaves after its last, without waiting for the others (continuous batching):

* An idle slot takes the first waiting request, then waits up to the window for others, until their rows
  would fill a call (`--max-batch` rows). A busy slot takes what waits between two steps, without waiting.
* A slot interleaves up to `--max-batch` requests. Each call starts from the request that has waited
  longest for a step and adds the others that can share its call (same latent size, prompt length and
  adapters: `Pipeline.batch_key`), longest-waiting first, while the rows fit. So a 150-step render gets
  one step per turn like everyone else: it never holds back a short one, nor is held back itself.
* A request that fails, or whose client leaves, ends alone; the others go on.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Protocol

import engines
from engines.rendering import Rendering
from server.metrics import Metrics
from server.node.ticket import Ticket
from server.wire import RenderedImages, RenderOrder

log = logging.getLogger("sdserve.server")


@dataclass(frozen=True)
class Batching:
    max_rows: int  # UNet rows per call; also the most requests one slot interleaves
    window: float  # seconds an idle slot waits for more requests before its first call


class Slot(Protocol):
    """What a batcher is handed: its model's queue, as one render slot sees it (`server.node.queue`)."""

    id: str
    pipeline: engines.Pipeline
    metrics: Metrics

    def take(self, wait: bool = True) -> Ticket | None: ...

    def wait_for_more(self, count: int, deadline: float) -> None: ...

    def rows(self, order: RenderOrder) -> int: ...

    def begin(self, ticket: Ticket) -> Rendering: ...

    def rendered(self, ticket: Ticket, result: engines.RenderResult) -> RenderedImages: ...

    def finish(self, ticket: Ticket, outcome: RenderedImages | BaseException) -> None: ...


class Batcher:
    """One render slot of one model, batching at the step level. Its tickets carry their renders; `turns`
    holds, per ticket, the call count when it last stepped or joined (for the round robin)."""

    def __init__(self, queue: Slot, batching: Batching) -> None:
        self.queue, self.batching = queue, batching
        self.pipeline, self.metrics, self.model = queue.pipeline, queue.metrics, queue.id
        self.active: list[Ticket] = []
        self.turns: dict[Ticket, int] = {}
        self.stepped: set[Ticket] = set()  # tickets that had their first step (for the batch wait metric)
        self.calls = 0

    def run(self) -> None:
        while True:
            try:
                if not self.join():
                    return
                self.leave_cancelled()
                if self.active:
                    self.step(self.next_call())
            except Exception as exc:  # a fault of the batcher's own must not strand this slot's requests
                log.exception("batcher of %s failed; its requests get the error", self.model)
                for ticket in list(self.active):
                    self.leave(ticket, exc)

    def join(self) -> bool:
        """Start what waits, as room allows; an idle slot blocks for tickets, then waits up to the window.
        False once the queue is closed and nothing is left here."""
        idle = not self.active
        if len(self.active) >= self.batching.max_rows:  # full: what waits stays in the queue (and counts there)
            return True
        first = self.queue.take(wait=idle)
        if first is None:
            return not idle
        taken = [first]
        if idle and self.batching.window > 0:
            wanted = math.ceil(self.batching.max_rows / max(1, self.queue.rows(first.order)))
            self.queue.wait_for_more(wanted - 1, time.monotonic() + self.batching.window)
        while len(self.active) + len(taken) < self.batching.max_rows and (ticket := self.queue.take(wait=False)):
            taken.append(ticket)
        for ticket in taken:
            self.start(ticket)
        return True

    def start(self, ticket: Ticket) -> None:
        if ticket.cancel.is_set():  # its client left during the window: no work for a request nobody waits for
            self.queue.finish(ticket, engines.RenderCancelled(
                f"request {ticket.order.request_id} cancelled before it began"))
            return
        try:
            self.queue.begin(ticket)
        except Exception as exc:  # bad input, a failed text encoder: this request's answer, nobody else's
            self.queue.finish(ticket, exc)
            return
        self.active.append(ticket)
        self.turns[ticket] = self.calls

    def leave(self, ticket: Ticket, outcome: RenderedImages | BaseException) -> None:
        self.active.remove(ticket)
        self.turns.pop(ticket, None)
        self.stepped.discard(ticket)
        self.queue.finish(ticket, outcome)

    def leave_cancelled(self) -> None:
        """Requests whose client left go now, without another step (they may wait several turns for one)."""
        for ticket in [t for t in self.active if t.cancel.is_set()]:
            r = _rendering(ticket)
            step = r.chunk.step if r.chunk else 0
            self.leave(ticket, engines.RenderCancelled(
                f"request {ticket.order.request_id} cancelled at step {step}/{len(r.schedule.timesteps)}"))

    def next_call(self) -> list[Ticket]:
        """The request that waited longest for a step, and those that can share its call, while rows fit."""
        waiting = sorted(self.active, key=lambda t: self.turns[t])  # stable: joined earlier first among equals
        key = self.pipeline.batch_key(_rendering(waiting[0]))
        call, rows = [], 0
        for candidate in waiting:
            r = _rendering(candidate)
            if call and (rows + r.rows > self.batching.max_rows or self.pipeline.batch_key(r) != key):
                continue
            call.append(candidate)
            rows += r.rows
        return call

    def step(self, call: list[Ticket]) -> None:
        self.calls += 1
        renderings = [_rendering(t) for t in call]
        self.metrics.unet_batch_rows.labels(self.model).observe(sum(r.rows for r in renderings))
        now = time.perf_counter()
        for ticket in call:
            self.turns[ticket] = self.calls
            if ticket not in self.stepped:
                self.stepped.add(ticket)
                self.metrics.batch_wait.labels(self.model).observe(now - ticket.started)
        try:
            self.pipeline.step(renderings, self.batching.max_rows)
        except Exception as exc:  # never expected (step keeps each render's own error), never a lost request
            for r in renderings:
                r.fail(exc)
        for ticket, r in zip(call, renderings, strict=True):
            if r.finished:
                self.leave(ticket, self.outcome(ticket, r))

    def outcome(self, ticket: Ticket, rendering: Rendering) -> RenderedImages | BaseException:
        try:
            return self.queue.rendered(ticket, rendering.result())
        except BaseException as exc:  # its own error (or cancellation), delivered to its request only
            return exc


def _rendering(ticket: Ticket) -> Rendering:
    assert ticket.rendering is not None  # every ticket a batcher holds has begun
    return ticket.rendering
