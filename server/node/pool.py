"""The node's engine pool: the models it serves (`server.node.cache`: loaded on demand within a budget, or all
at start-up without one), each loaded model behind its own queue and render threads (`server.node.queue`)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator
from functools import partial
from pathlib import Path

import engines
from engines import limits
from server import sse
from server.errors import ApiError
from server.metrics import Metrics
from server.node import stream
from server.node.batcher import Batching
from server.node.cache import ModelCache
from server.node.health import Limits, NodeHealth
from server.node.queue import ModelQueue
from server.settings import Settings
from server.supervisor import supervise
from server.wire import RenderedImages, RenderOrder, StreamEvent

log = logging.getLogger("sdserve.server")


def draining_error() -> ApiError:
    """What an order that arrives while this node drains gets (a router sends it elsewhere)."""
    return ApiError(503, "this node is draining and takes no new work", code="draining", headers={"Retry-After": "5"})


class EnginePool:
    """Every model directory under the models dir, known at start-up; loaded as `server.node.cache` says.
    A model that fails to load, for any reason, is reported (log, `failed`, metrics) and the others serve."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings, self.metrics = settings, metrics
        self.cache = ModelCache(settings, metrics, self._load)
        self.draining = False
        self.health = NodeHealth(Limits(stall_seconds=settings.stall_seconds, stall_factor=settings.stall_factor,
                                        failure_limit=settings.unhealthy_after_failures,
                                        liveness_seconds=settings.liveness_seconds))
        self._drain: asyncio.Task[None] | None = None
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        """From the event loop: the start-up loads (no budget), and the periodic rescan."""
        if self.cache.empty:
            log.warning("%s: this server can render nothing until models are there (it looks again every "
                        "--rescan-interval, and on POST /v0/models/rescan)", self.cache.empty)
        if self.cache.preloading:
            self._tasks.append(asyncio.ensure_future(self.cache.preload()))
        if self.settings.rescan_interval > 0:
            self._tasks.append(supervise("models folder rescan",
                                         partial(self.cache.rescan_every, self.settings.rescan_interval)))

    async def wait_loaded(self) -> None:
        """Until the start-up loads have ended."""
        while self.cache.preloading:
            await asyncio.sleep(0.05)

    @property
    def queues(self) -> dict[str, ModelQueue]:
        """The loaded models' queues."""
        return self.cache.loaded()

    @property
    def states(self) -> dict[str, str]:
        return {name: entry.state for name, entry in self.cache.entries.items()}

    def _load(self, path: Path) -> ModelQueue:
        s = self.settings
        pipeline = engines.load(path, backend=s.backend, threads=s.threads, verify=s.verify_models,
                                lora_dir=s.lora_dir, precision=s.precision)
        batching = None
        if s.batch_window > 0:  # rows per call: the setting, else what the backend runs best, else a full chunk
            rows = s.max_batch or pipeline.unet_rows or 2 * pipeline.max_batch
            # renders: the setting, else as many default requests (one image) as one call steps together
            per_render = limits.rows_per_image(pipeline.info.defaults.guidance_scale)
            batching = Batching(max_rows=rows, max_renders=s.batch_renders or max(1, rows // per_render),
                                window=s.batch_window / 1000)
        return ModelQueue(pipeline, s.render_slots, s.queue_depth, self.metrics, s.preview, batching, self.health)

    def failed(self) -> dict[str, str]:
        """Models that failed to load, with why."""
        return {name: entry.error.message for name, entry in self.cache.entries.items()
                if entry.state == "failed" and entry.error is not None}

    def ready_models(self) -> dict[str, engines.ModelInfo]:
        """The models requests may ask for: loaded, or loaded on their first request (while the start-up loads
        run, only those loaded so far)."""
        entries = self.cache.entries.items()
        if self.cache.preloading:
            return {name: entry.queue.pipeline.info for name, entry in entries if entry.queue is not None}
        return {name: entry.info for name, entry in entries if entry.offered and entry.info is not None}

    def known_models(self) -> set[str]:
        return set(self.cache.entries)

    async def reload_adapters(self) -> None:
        """Read the LoRA directory again for every model (renders in flight keep their adapters)."""
        queues = list(self.queues.values())  # taken on the event loop, which alone changes the cache

        def reload() -> None:
            for queue in queues:
                queue.pipeline.load_adapters(self.settings.lora_dir)

        await asyncio.to_thread(reload)
        for entry in self.cache.entries.values():
            if entry.queue is not None:
                entry.info = entry.queue.pipeline.info
        await self.cache.reread()

    def ready(self) -> bool:
        return bool(self.ready_models()) and not self.draining and self.health.check().ready

    def why_not_ready(self) -> str:
        """What /readyz says while no model can render: draining, sick, nothing found, loading, or every model
        failed to load."""
        loading = sorted(name for name, state in self.states.items() if state == "loading")
        if self.draining:
            return "draining: this server is shutting down"
        if sick := self.sick():
            return f"unhealthy: {sick}"
        if self.cache.empty:
            return self.cache.empty
        if loading:
            return f"loading {', '.join(loading)}"
        return "every model failed to load: " + "; ".join(f"{name}: {why}" for name, why in self.failed().items())

    def sick(self) -> str | None:
        """Why this node should take no new work (a render stalled, renders failing), or None."""
        health = self.health.check()
        return None if health.ready else health.problem

    def dead(self) -> str | None:
        """Why this process should be restarted (sick for longer than --liveness-seconds), or None."""
        health = self.health.check()
        return None if health.live else f"unhealthy for over {self.settings.liveness_seconds:g} s: {health.problem}"

    def problems(self) -> dict[str, object]:
        """What /readyz reports beside readiness: models that failed to load, and why the node is sick."""
        found: dict[str, object] = {"failed_models": self.failed()} if self.failed() else {}
        return found | ({"unhealthy": sick} if (sick := self.sick()) else {})

    async def render(self, order: RenderOrder) -> RenderedImages:
        queue = await self.queue_for(order)
        return await queue.submit(order)  # queued before its first await: the model stays loaded

    async def open_events(self, order: RenderOrder) -> AsyncGenerator[StreamEvent, None]:
        """A streamed order's events (refusals raise here, before any event); its model's load, if it waits for
        one, counts toward its timeout."""
        started, timeout = time.monotonic(), self.settings.request_timeout
        try:  # bounded as a non-streamed order's whole answer is; in this task, so it queues before any other runs
            async with asyncio.timeout(timeout):
                queue = await self.queue_for(order)
        except TimeoutError:
            raise ApiError(504, f"model '{order.model}' did not load within the {timeout:g} s request timeout",
                           code="timeout") from None
        return stream.open_events(queue, order, timeout - (time.monotonic() - started))

    async def open_stream(self, order: RenderOrder) -> AsyncIterator[bytes]:
        """A streamed order as OpenAI's frames (refusals raise here, before any byte)."""
        return sse.frames(order, await self.open_events(order), self.settings.keepalive_interval)

    async def queue_for(self, order: RenderOrder) -> ModelQueue:
        """The model's queue, loaded first if need be, or the error a request for it gets (503 draining or
        sick, 404 unknown, its load's error)."""
        if self.draining:
            raise draining_error()
        if sick := self.sick():
            raise ApiError(503, f"this node is unhealthy and takes no new work: {sick}", code="unhealthy",
                           headers={"Retry-After": str(int(self.settings.stall_seconds))})
        queue = await self.cache.acquire(order.model)
        if self.draining:  # it began draining while the model loaded: refused as if it had been draining before
            raise draining_error()
        return queue

    def load(self) -> dict[str, dict[str, int]]:
        """Per model: renders running, waiting, their work units (for balancing), the wait estimate and how many
        requests it takes before refusing (429); for a model not loaded, what its queue will take."""
        unloaded = {"capacity": self.settings.render_slots * (self.settings.batch_renders or 1)
                    + self.settings.queue_depth}
        loaded = {name: {"running": q.running, "waiting": q.waiting, "work": q.outstanding_work(),
                         "retry_after": q.retry_after(), "capacity": q.capacity + q.depth}
                  for name, q in self.queues.items()}
        return {name: loaded.get(name, unloaded) for name in self.ready_models()}

    def idle(self) -> bool:
        return all(q.idle() for q in self.queues.values())

    def drain(self, timeout: float) -> asyncio.Task[None]:
        """Refuse new work from now on, and give what was accepted up to `timeout` seconds to finish (from the
        event loop; SIGTERM starts it, the shutdown awaits the same drain)."""
        self.draining = True
        if self._drain is None:
            self._drain = asyncio.get_running_loop().create_task(self._drain_within(timeout))
        return self._drain

    async def _drain_within(self, timeout: float) -> None:
        """What is unfinished at the deadline is answered 503 `draining`, which a router sends to another node:
        an honest answer before the HTTP server gives up on the request (`server.__main__` waits longer)."""
        running = sum(q.running for q in self.queues.values())
        waiting = sum(q.waiting for q in self.queues.values())
        log.info("draining: taking no new work; waiting up to %g s for %d running and %d waiting renders", timeout,
                 running, waiting)
        deadline = time.monotonic() + timeout
        while not self.idle() and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        if self.idle():
            log.info("drained: every accepted render has finished")
            return
        error = ApiError(503, f"this node shut down before the render finished (--drain-timeout {timeout:g} s); "
                         "retry on another node", code="draining", headers={"Retry-After": "5"})
        unfinished = sum(q.give_up(error) for q in self.queues.values())
        log.warning("drain timeout (%g s): %d render(s) unfinished, answered 503 so that a router sends them to "
                    "another node", timeout, unfinished)

    def close(self, wait: float = 30.0) -> None:
        for task in self._tasks:
            task.get_loop().call_soon_threadsafe(task.cancel)
        for queue in list(self.queues.values()):
            queue.close(wait)
