"""The node's engine pool: every model loaded once, a bounded queue and render threads per model.

Renders run on threads (ONNX Runtime releases the GIL), so the event loop keeps answering health checks,
metrics and other requests while they run. Each model takes `render_slots` renders at once and keeps at
most `queue_depth` more waiting; beyond that a request is refused at once (429), before any work. A
request whose caller goes away (timeout, disconnect) is dropped from the queue, or, when already
running, stopped at its next step. With `--batch-window` above 0 each render slot is a step-level batcher
(`server.batcher`) that interleaves up to `--max-batch` requests and shares UNet calls among them.
"""

from __future__ import annotations

import asyncio
import io
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

import engines
from server import estimate, images
from server.batcher import Batcher, Batching
from server.errors import ApiError
from server.metrics import Metrics
from server.protocol import RenderedImages, RenderJob
from server.settings import Settings

log = logging.getLogger("sdserve.server")


@dataclass(eq=False)
class Work:
    job: RenderJob
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[RenderedImages]
    enqueued: float = field(default_factory=time.perf_counter)
    started: float = 0.0  # when a render slot took it
    cancel: threading.Event = field(default_factory=threading.Event)
    on_partial: Callable[[engines.Partial], None] | None = None  # streaming: called on the render thread
    progress: estimate.Progress = field(default_factory=estimate.Progress)


class ModelQueue:
    """One model: its pipeline, its waiting requests and its render threads."""

    def __init__(self, pipeline: engines.Pipeline, slots: int, depth: int, metrics: Metrics,
                 preview: str = "full", batching: Batching | None = None) -> None:
        self.pipeline, self.depth, self.metrics, self.preview = pipeline, depth, metrics, preview
        self.batching = batching
        # renders at once: one per slot, or as many as a batching slot interleaves
        self.capacity = slots * (batching.max_rows if batching else 1)
        self.id = pipeline.info.id
        self._waiting: deque[Work] = deque()
        self._ready = threading.Condition()
        self._running = 0
        self._running_work = 0
        self._step_seconds = estimate.FIRST_STEP_GUESS  # the latest step timed, of any render of this model
        self._closed = False
        self._current: set[Work] = set()  # running now
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

    def rows(self, job: RenderJob) -> int:
        """UNet rows a job's calls take: its images (up to a chunk), twice when guided."""
        return min(job.n, self.pipeline.max_batch) * (2 if job.guidance_scale > 1.0 else 1)

    def outstanding_work(self) -> int:
        with self._ready:
            return sum(w.job.work for w in self._waiting) + self._running_work

    async def submit(self, job: RenderJob) -> RenderedImages:
        return await self.outcome(self.enqueue(job))

    def enqueue(self, job: RenderJob, on_partial: Callable[[engines.Partial], None] | None = None) -> Work:
        """Queue a job (from the event loop), or refuse it at once: 429 when full, 503 when closing."""
        self.pipeline.check_prompt_lengths(job.prompt, job.negative_prompt)  # before it takes a place in the queue
        loop = asyncio.get_running_loop()
        work = Work(job, loop, loop.create_future(), on_partial=on_partial)
        with self._ready:
            if self._closed:
                raise ApiError(503, f"model {self.id} is shutting down", code="draining",
                               headers={"Retry-After": "5"})
            # full at capacity + depth jobs, counting one a free slot has not picked up yet as that slot's
            if self._running + len(self._waiting) >= self.capacity + self.depth:
                raise self.full_error()
            self._waiting.append(work)
            self.metrics.queue_depth.labels(self.id).set(len(self._waiting))
            self._ready.notify()
        return work

    async def outcome(self, work: Work) -> RenderedImages:
        try:
            return await asyncio.shield(work.future)
        except asyncio.CancelledError:  # timeout or client gone: drop it, or stop it at its next step
            self.abandon(work)
            raise

    def abandon(self, work: Work) -> None:
        """Nobody waits for this work any more (from the event loop): drop it from the queue, or stop it at its
        next step. Its future is cancelled, so the outcome that comes later is dropped, not left unread."""
        work.cancel.set()
        work.future.cancel()
        with self._ready:
            if work in self._waiting:
                self._waiting.remove(work)
                self.metrics.queue_depth.labels(self.id).set(len(self._waiting))

    def full_error(self) -> ApiError:
        """The 429 of a full queue, with the wait until a place frees."""
        seconds = self.retry_after()
        return ApiError(429, f"the queue for model '{self.id}' is full ({self.capacity} rendering, {self.depth} "
                        f"waiting); retry in about {seconds} s", code="queue_full",
                        headers={"Retry-After": str(seconds)})

    def retry_after(self) -> int:
        with self._ready:  # a reentrant lock: enqueue holds it too
            chunk = self.pipeline.max_batch
            return estimate.seconds_until_room([(w.progress, math.ceil(w.job.n / chunk), w.job.steps)
                                                for w in self._current], self._step_seconds)

    def _serve(self) -> None:
        if self.batching is not None:
            Batcher(self, self.batching).run()
            return
        while (work := self.take()) is not None:
            try:
                outcome: RenderedImages | BaseException = self._render(work)
            except BaseException as exc:  # delivered to the waiting request, never lost
                outcome = exc
            self.finish(work, outcome)

    def take(self, wait: bool = True) -> Work | None:
        """The next waiting work, now counted as running; None when closed (or, not `wait`ing, when none waits)."""
        with self._ready:
            while True:
                while wait and not self._waiting and not self._closed:
                    self._ready.wait()
                if not self._waiting:
                    return None
                work = self._waiting.popleft()
                self.metrics.queue_depth.labels(self.id).set(len(self._waiting))
                if not work.cancel.is_set():
                    break
            self._running += 1
            self._current.add(work)
            self._running_work += work.job.work
        self.metrics.in_flight.labels(self.id).inc()
        work.started = time.perf_counter()
        return work

    def wait_for_more(self, count: int, deadline: float) -> None:
        """Until `count` works wait (or the queue closes), at most until `deadline` (time.monotonic)."""
        with self._ready:
            while len(self._waiting) < count and not self._closed and (left := deadline - time.monotonic()) > 0:
                self._ready.wait(left)

    def finish(self, work: Work, outcome: RenderedImages | BaseException) -> None:
        """A taken work's outcome, delivered to its request."""
        if isinstance(outcome, engines.RenderCancelled):
            log.info("%s", outcome)
        self.metrics.in_flight.labels(self.id).dec()
        with self._ready:
            self._running -= 1
            self._current.discard(work)
            self._running_work -= work.job.work
            self._ready.notify_all()
        _answer(work, outcome)

    def render_request(self, job: RenderJob) -> engines.RenderRequest:
        return engines.RenderRequest(
            prompt=job.prompt, negative_prompt=job.negative_prompt, width=job.width, height=job.height,
            steps=job.steps, guidance_scale=job.guidance_scale, sampler=job.sampler, seed=job.seed, n=job.n,
            image=_open(job.image), mask=_open(job.mask), strength=job.strength,
            lora=[(ref.name, ref.scale) for ref in job.lora],
        )

    def on_step(self, work: Work) -> Callable[[int, int], None]:
        """The render's progress callback: times its steps, and stops it at its next step once nobody waits."""
        def on_step(done: int, total: int) -> None:
            seconds = work.progress.step(done, total)
            if seconds is not None:
                self._step_seconds = seconds
            if work.cancel.is_set():
                raise engines.RenderCancelled(f"request {work.job.request_id} cancelled at step {done}/{total}")
        return on_step

    def _render(self, work: Work) -> RenderedImages:
        result = self.pipeline.render(self.render_request(work.job), on_step=self.on_step(work),
                                      on_partial=work.on_partial, partial_images=work.job.partial_images,
                                      preview=self.preview)
        return self.rendered(work, result)

    def rendered(self, work: Work, result: engines.RenderResult) -> RenderedImages:
        """A finished render, encoded as its request asked, counted in the metrics."""
        job, started = work.job, time.perf_counter()
        encoded = [images.encode(image, job.output_format, job.output_compression) for image in result.images]
        queued = work.started - work.enqueued
        timings = dict(result.timings.stages) | {"encode": time.perf_counter() - started, "queue": queued}
        self.metrics.render_seconds.labels(self.id).observe(timings.get("total", 0.0))
        self.metrics.images.labels(self.id).inc(len(encoded))
        return RenderedImages(images=encoded, seeds=result.seeds, timings=timings, steps_run=result.steps_run,
                              input_tokens=self._input_tokens(job))

    def _input_tokens(self, job: RenderJob) -> int:
        """Prompt tokens (and negative prompt tokens) as the first text encoder's tokenizer counts them."""
        tokenizer = next(iter(self.pipeline.tokenizers.values()), None)
        if tokenizer is None:
            return 0
        return sum(tokenizer.tokens(text) for text in (job.prompt, job.negative_prompt or ""))

    def give_up(self, error: ApiError) -> int:
        """Answer every accepted request with `error` now: what waits leaves the queue, what runs stops at its
        next step (its outcome is then dropped). How many there were."""
        with self._ready:
            works = [*self._current, *self._waiting]
            for work in works:
                work.cancel.set()
                _answer(work, error)
            self._waiting.clear()
            self.metrics.queue_depth.labels(self.id).set(0)
            self._ready.notify_all()
        return len(works)

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

    def idle(self) -> bool:
        with self._ready:
            return not self._waiting and self._running == 0


def _open(data: bytes | None) -> Image.Image | None:
    return None if data is None else Image.open(io.BytesIO(data))


def _answer(work: Work, outcome: RenderedImages | BaseException) -> None:
    """Deliver `outcome` to the request waiting for `work`, from any thread."""
    try:
        work.loop.call_soon_threadsafe(_deliver, work.future, outcome)
    except RuntimeError:  # its event loop is closed: nobody is left to answer
        log.info("request %s: its event loop closed before its outcome", work.job.request_id)


def _deliver(future: asyncio.Future[RenderedImages], outcome: RenderedImages | BaseException) -> None:
    if future.done():  # abandoned, or already answered (drain timeout): nobody reads this outcome
        if isinstance(outcome, BaseException) and not isinstance(outcome, engines.RenderCancelled | ApiError):
            log.warning("a render failed after its request was answered: %s: %s", type(outcome).__name__, outcome)
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


def discover(models_dir: str | Path, only: list[str]) -> list[Path]:
    root = Path(models_dir)
    if not root.is_dir():
        return []
    found = sorted(p for p in root.iterdir() if engines.is_model_dir(p))
    return [p for p in found if not only or p.name in only]


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
        self.draining = False
        self._drain: asyncio.Task[None] | None = None
        self._loader: threading.Thread | None = None

    def start(self) -> None:
        self._loader = threading.Thread(target=self._load_all, name="model-loader", daemon=True)
        self._loader.start()

    def wait_loaded(self, timeout: float | None = None) -> None:
        if self._loader is not None:
            self._loader.join(timeout)

    def _load_all(self) -> None:
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
        s = self.settings
        pipeline = engines.load(path, backend=s.backend, threads=s.threads, verify=s.verify_models,
                                lora_dir=s.lora_dir)
        batching = None
        if s.batch_window > 0:  # rows per call: the setting, else what the backend runs best, else a full chunk
            rows = s.max_batch or pipeline.unet_rows or 2 * pipeline.max_batch
            batching = Batching(max_rows=rows, window=s.batch_window / 1000)
        return ModelQueue(pipeline, s.render_slots, s.queue_depth, self.metrics, s.preview, batching)

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
        return bool(self.queues) and not self.draining

    async def render(self, job: RenderJob) -> RenderedImages:
        return await self.queue_for(job).submit(job)

    def queue_for(self, job: RenderJob) -> ModelQueue:
        """The model's queue, or the error a request for it gets now (503 draining/loading, 404 unknown)."""
        if self.draining:
            raise ApiError(503, "this node is draining and takes no new work", code="draining",
                           headers={"Retry-After": "5"})
        queue = self.queues.get(job.model)
        if queue is None:
            state = self.states.get(job.model)
            if state is None:
                raise ApiError(404, f"model '{job.model}' not found", param="model", code="model_not_found")
            what = "failed to load (see the server log)" if state.startswith("failed") else state
            raise ApiError(503, f"model '{job.model}' {what}", code="model_unavailable",
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
