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
from typing import TYPE_CHECKING

import engines
from engines.rendering import Rendering

if TYPE_CHECKING:
    from server.pool import ModelQueue, Work
    from server.protocol import RenderedImages

log = logging.getLogger("sdserve.server")


@dataclass(frozen=True)
class Batching:
    max_rows: int  # UNet rows per call; also the most requests one slot interleaves
    window: float  # seconds an idle slot waits for more requests before its first call


@dataclass(eq=False)
class Active:
    """A request this slot renders: its state, and when it last had a step (for the round robin)."""

    work: Work
    rendering: Rendering
    turn: int  # the call count when it last stepped (or joined)
    stepped: bool = False


class Batcher:
    """One render slot of one model (`ModelQueue`), batching at the step level."""

    def __init__(self, queue: ModelQueue, batching: Batching) -> None:
        self.queue, self.batching = queue, batching
        self.pipeline, self.metrics, self.model = queue.pipeline, queue.metrics, queue.id
        self.active: list[Active] = []
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
                for a in self.active:
                    self.queue.finish(a.work, exc)
                self.active.clear()

    def join(self) -> bool:
        """Start what waits, as room allows; an idle slot blocks for work, then waits up to the window.
        False once the queue is closed and nothing is left here."""
        idle = not self.active
        if len(self.active) >= self.batching.max_rows:  # full: what waits stays in the queue (and counts there)
            return True
        first = self.queue.take(wait=idle)
        if first is None:
            return not idle
        taken = [first]
        if idle and self.batching.window > 0:
            wanted = math.ceil(self.batching.max_rows / max(1, self.queue.rows(first.job)))
            self.queue.wait_for_more(wanted - 1, time.monotonic() + self.batching.window)
        while len(self.active) + len(taken) < self.batching.max_rows and (work := self.queue.take(wait=False)):
            taken.append(work)
        for work in taken:
            self.start(work)
        return True

    def start(self, work: Work) -> None:
        q = self.queue
        if work.cancel.is_set():  # its client left during the window: no work for a request nobody waits for
            q.finish(work, engines.RenderCancelled(f"request {work.job.request_id} cancelled before it began"))
            return
        try:
            rendering = self.pipeline.begin(q.render_request(work.job), on_step=q.on_step(work),
                                            on_partial=work.on_partial, partial_images=work.job.partial_images,
                                            preview=q.preview)
        except Exception as exc:  # bad input, a failed text encoder: this request's answer, nobody else's
            q.finish(work, exc)
            return
        self.active.append(Active(work, rendering, turn=self.calls))

    def leave_cancelled(self) -> None:
        """Requests whose client left go now, without another step (they may wait several turns for one)."""
        for a in [a for a in self.active if a.work.cancel.is_set()]:
            self.active.remove(a)
            step = a.rendering.chunk.step if a.rendering.chunk else 0
            self.queue.finish(a.work, engines.RenderCancelled(
                f"request {a.work.job.request_id} cancelled at step {step}/{len(a.rendering.schedule.timesteps)}"))

    def next_call(self) -> list[Active]:
        """The request that waited longest for a step, and those that can share its call, while rows fit."""
        waiting = sorted(self.active, key=lambda a: a.turn)  # stable: joined earlier first among equals
        key = self.pipeline.batch_key(waiting[0].rendering)
        call, rows = [], 0
        for candidate in waiting:
            r = candidate.rendering
            if call and (rows + r.rows > self.batching.max_rows or self.pipeline.batch_key(r) != key):
                continue
            call.append(candidate)
            rows += r.rows
        return call

    def step(self, call: list[Active]) -> None:
        self.calls += 1
        self.metrics.unet_batch_rows.labels(self.model).observe(sum(a.rendering.rows for a in call))
        now = time.perf_counter()
        for a in call:
            a.turn = self.calls
            if not a.stepped:
                a.stepped = True
                self.metrics.batch_wait.labels(self.model).observe(now - a.work.started)
        try:
            self.pipeline.step([a.rendering for a in call], self.batching.max_rows)
        except Exception as exc:  # never expected (step keeps each render's own error), never a lost request
            for a in call:
                a.rendering.fail(exc)
        for a in call:
            if a.rendering.finished:
                self.active.remove(a)
                self.queue.finish(a.work, self.outcome(a))

    def outcome(self, active: Active) -> RenderedImages | BaseException:
        try:
            return self.queue.rendered(active.work, active.rendering.result())
        except BaseException as exc:  # its own error (or cancellation), delivered to its request only
            return exc
