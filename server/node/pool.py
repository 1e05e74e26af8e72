"""The node's engine pool: every model directory under the models dir loaded once, each behind its own
queue and render threads (`server.node.queue`)."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path

import msgspec

import engines
from engines import limits
from server import sse
from server.errors import ApiError
from server.metrics import Metrics
from server.node import stream
from server.node.batcher import Batching
from server.node.health import Limits, NodeHealth
from server.node.models_dir import discover, nothing_servable
from server.node.queue import ModelQueue
from server.settings import Settings
from server.wire import RenderedImages, RenderOrder, StreamEvent

log = logging.getLogger("sdserve.server")


class EnginePool:
    """Every model directory under the models dir, loaded in the background at start-up.

    The loader thread replaces `queues` and `states` with new dicts rather than changing them, so the event
    loop can iterate them at any time; a model that fails to load, for any reason, is reported (log,
    `failed`, metrics) and the others still load.
    """

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings, self.metrics = settings, metrics
        self.queues: dict[str, ModelQueue] = {}
        self.states: dict[str, str] = {p.name: "loading" for p in discover(settings.models_dir, settings.models)}
        self.empty = nothing_servable(settings.models_dir, settings.models)  # why there is nothing to load
        self.draining = False
        self.health = NodeHealth(Limits(stall_seconds=settings.stall_seconds, stall_factor=settings.stall_factor,
                                        failure_limit=settings.unhealthy_after_failures,
                                        liveness_seconds=settings.liveness_seconds))
        self._drain: asyncio.Task[None] | None = None
        self._loader: threading.Thread | None = None

    def start(self) -> None:
        self._loader = threading.Thread(target=self._load_all, name="model-loader", daemon=True)
        self._loader.start()

    def wait_loaded(self, timeout: float | None = None) -> None:
        if self._loader is not None:
            self._loader.join(timeout)

    def _load_all(self) -> None:
        if self.empty:
            log.warning("%s: this server can render nothing until models are there and it is restarted",
                        self.empty)
        for path in discover(self.settings.models_dir, self.settings.models):
            started = time.perf_counter()
            try:
                queue = self._load(path)
            except Exception as exc:  # any failure is this model's, never the loader's
                log.error("model %s failed to load: %s: %s", path.name, type(exc).__name__, exc,
                          exc_info=not isinstance(exc, engines.EngineError))
                self.states = {**self.states, path.name: f"failed: {type(exc).__name__}: {exc}"}
                self.metrics.model_load_failures.labels(path.name).inc()
                continue
            self.queues = {**self.queues, path.name: queue}
            self.states = {**self.states, path.name: "ready"}
            log.info("model %s ready on %s in %.1f s", path.name, queue.pipeline.info.device,
                     time.perf_counter() - started)

    def _load(self, path: Path) -> ModelQueue:
        from engines import controlnet  # with the engines: a router imports this module without them

        s = self.settings
        pipeline = engines.load(path, backend=s.backend, threads=s.threads, verify=s.verify_models,
                                lora_dir=s.lora_dir, precision=s.precision)
        # the ControlNets beside it reach the front doors with its card, as its adapters do
        pipeline.info = msgspec.structs.replace(pipeline.info, controlnets=controlnet.infos(pipeline.manifest))
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
        return {name: state.removeprefix("failed: ") for name, state in self.states.items()
                if state.startswith("failed: ")}

    def ready_models(self) -> dict[str, engines.ModelInfo]:
        return {name: queue.pipeline.info for name, queue in self.queues.items()}

    def known_models(self) -> set[str]:
        return set(self.states)

    def reload_adapters(self) -> None:
        """Read the LoRA directory again for every loaded model (renders in flight keep their adapters)."""
        for queue in self.queues.values():
            queue.pipeline.load_adapters(self.settings.lora_dir)

    def ready(self) -> bool:
        return bool(self.queues) and not self.draining and self.health.check().ready

    def why_not_ready(self) -> str:
        """What /readyz says while no model can render: draining, sick, nothing found, loading, or every model
        failed to load."""
        loading = sorted(name for name, state in self.states.items() if state == "loading")
        if self.draining:
            return "draining: this server is shutting down"
        if sick := self.sick():
            return f"unhealthy: {sick}"
        if self.empty:
            return self.empty
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
        return await self.queue_for(order).submit(order)

    async def open_events(self, order: RenderOrder) -> AsyncGenerator[StreamEvent, None]:
        """A streamed order's events (refusals raise here, before any event)."""
        return stream.open_events(self.queue_for(order), order, self.settings.request_timeout)

    async def open_stream(self, order: RenderOrder) -> AsyncIterator[bytes]:
        """A streamed order as OpenAI's frames (refusals raise here, before any byte)."""
        return sse.frames(order, await self.open_events(order), self.settings.keepalive_interval)

    def queue_for(self, order: RenderOrder) -> ModelQueue:
        """The model's queue, or the error a request for it gets now (503 draining/loading, 404 unknown)."""
        if self.draining:
            raise ApiError(503, "this node is draining and takes no new work", code="draining",
                           headers={"Retry-After": "5"})
        if sick := self.sick():
            raise ApiError(503, f"this node is unhealthy and takes no new work: {sick}", code="unhealthy",
                           headers={"Retry-After": str(int(self.settings.stall_seconds))})
        queue = self.queues.get(order.model)
        if queue is None:
            state = self.states.get(order.model)
            if state is None:
                raise ApiError(404, f"model '{order.model}' not found", param="model", code="model_not_found")
            what = "failed to load (see the server log)" if state.startswith("failed") else state
            raise ApiError(503, f"model '{order.model}' {what}", code="model_unavailable",
                           headers={"Retry-After": "10"})
        return queue

    def load(self) -> dict[str, dict[str, int]]:
        """Per model: renders running, waiting, their work units (for balancing), the wait estimate and how many
        requests it takes before refusing (429)."""
        return {name: {"running": q.running, "waiting": q.waiting, "work": q.outstanding_work(),
                       "retry_after": q.retry_after(), "capacity": q.capacity + q.depth}
                for name, q in self.queues.items()}

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
        for queue in self.queues.values():
            queue.close(wait)
