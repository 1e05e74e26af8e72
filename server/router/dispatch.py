"""Dispatch: each job to the healthy node hosting its model with the least outstanding work.

Work is weighted by steps × pixels × images; ties are broken at random. A node that cannot be reached,
refuses before starting, or is lost while the job waits on it (its lease expired, a probe failed, it was
replaced) is taken out of rotation and the job is sent to another node (at most `retries` times): the
router answers a client only once a node has answered it, so nothing was sent yet. When every node is
full, the job waits at the router for room (up to `wait_limit` waiting jobs per model, then 429 with the
nodes' own estimate in `Retry-After`) until the request's own timeout. The prober (`prober.py`) puts
nodes back when they answer again. Streams are dispatched the same way; once a node has sent a stream's
first event, its failure ends the stream with an error event instead (`streaming.relay`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

from engines.info import ModelInfo
from server import adapters
from server.errors import ApiError
from server.metrics import Metrics
from server.protocol import ModelLoad, RenderedImages, RenderJob
from server.router.node_client import NodeFull, NodeRefused, NodeUnavailable
from server.router.registry import NodeRecord, Registry
from server.streaming import NodeGone, NodeStream, relay

log = logging.getLogger("sdserve.router")
T = TypeVar("T")


class Dispatcher:
    def __init__(self, registry: Registry, metrics: Metrics, retries: int, wait_limit: int,
                 default_model: str | None = None) -> None:
        self.registry, self.metrics = registry, metrics
        self.retries, self.wait_limit = retries, wait_limit
        self.default_model = default_model
        self._default_problem: str | None = None
        self._room = asyncio.Condition()
        self._waiting: dict[str, int] = defaultdict(int)

    # -- the Renderer interface the public routes use --------------------------------------------

    def ready_models(self) -> dict[str, ModelInfo]:
        self._refresh_local()
        return self.registry.ready_models()

    def known_models(self) -> set[str]:
        self._refresh_local()
        return self.registry.known_models()

    def ready(self) -> bool:
        return bool(self.ready_models())

    async def render(self, job: RenderJob) -> RenderedImages:
        return await self._dispatch(job, self._send, set())

    async def open_stream(self, job: RenderJob) -> AsyncIterator[bytes]:
        """A streamed job: returns once a node accepted it (errors before that are the usual HTTP ones),
        then its frames; a node failing before its first event is replaced, as `render` retries."""
        first = await self._dispatch(job, self._open, set())

        def reopen(job: RenderJob, failed: set[str]) -> Awaitable[NodeStream]:
            return self._dispatch(job, self._open, {n for n in self.registry.nodes.values() if n.id in failed})

        return relay(job, first, reopen)

    async def _dispatch(self, job: RenderJob, attempt: Callable[[NodeRecord, RenderJob, bool], Awaitable[T]],
                        failures: set[NodeRecord]) -> T:
        full: dict[NodeRecord, int] = {}  # node → its Retry-After
        waiting = False
        wanted = frozenset(ref.name for ref in job.lora)  # only nodes offering every named adapter
        self._check_adapters(job.model, wanted)
        try:
            while True:
                node = self._choose(job.model, exclude=failures | set(full), wanted=wanted)
                if node is None:
                    if not self._hosting(job.model, exclude=failures, wanted=wanted):
                        raise ApiError(503, f"no healthy node can render model '{job.model}' right now",
                                       code="no_node_available", headers={"Retry-After": "5"})
                    if not waiting:
                        if self._waiting[job.model] >= self.wait_limit:
                            raise self._full_error(job.model, full)
                        self._waiting[job.model] += 1
                        waiting = True
                    await self._wait_for_room()
                    full.clear()
                    continue
                try:
                    return await attempt(node, job, bool(failures))
                except NodeFull as exc:
                    full[node] = _seconds(exc.error.headers.get("Retry-After"))
                except NodeUnavailable as exc:
                    failures.add(node)
                    log.warning("request %s: node %s failed (%s); %s", job.request_id, node.id, exc,
                                "retrying" if len(failures) <= self.retries else "giving up")
                    if len(failures) > self.retries:
                        raise ApiError(503, f"{len(failures)} nodes failed this request; try again",
                                       code="nodes_failed", headers={"Retry-After": "5"}) from exc
        finally:
            if waiting:
                self._waiting[job.model] -= 1

    def room(self, model: str) -> int | None:
        """How many more jobs for `model` would be taken now (sent to a node, or waiting here) before a 429;
        None when no node hosts it (render answers 503 then)."""
        nodes = self.registry.candidates(model)
        if not nodes:
            return None
        free = sum(max(0, n.report.load.get(model, ModelLoad()).capacity - n.in_flight.get(model, 0)) for n in nodes)
        return free + max(0, self.wait_limit - self._waiting[model])

    def full_error(self, model: str) -> ApiError:
        return self._full_error(model, {})

    # -- internals ---------------------------------------------------------------------------------

    async def _send(self, node: NodeRecord, job: RenderJob, retry: bool) -> RenderedImages:
        self._begin(node, job, retry)
        started = time.perf_counter()
        try:
            result = await _unless_lost(node, node.client.render(job))
            self.metrics.node_latency.labels(node.id).observe(time.perf_counter() - started)
            return result
        except NodeUnavailable as exc:
            self._node_failed(node, exc)
            raise
        finally:
            await self._end(node, job)

    async def _open(self, node: NodeRecord, job: RenderJob, retry: bool) -> NodeStream:
        """Start a stream on `node`; it counts as in flight there until the stream ends. A node lost while
        the stream runs (lease expired, probe failed, replaced) ends it as a dead connection would."""
        self._begin(node, job, retry)
        try:
            chunks = await _unless_lost(node, node.client.open_stream(job))
        except NodeUnavailable as exc:
            self._node_failed(node, exc)
            await self._end(node, job)
            raise
        except BaseException:
            await self._end(node, job)
            raise

        async def tracked() -> AsyncIterator[bytes]:
            try:
                while True:
                    try:
                        chunk = await _unless_lost(node, anext(chunks))
                    except StopAsyncIteration:
                        return
                    except NodeUnavailable as exc:
                        raise NodeGone(str(exc)) from exc
                    yield chunk
            except NodeGone as exc:
                self._node_failed(node, exc)
                raise
            finally:
                await chunks.aclose()
                await self._end(node, job)

        return NodeStream(node.id, tracked())

    def _begin(self, node: NodeRecord, job: RenderJob, retry: bool) -> None:
        node.in_flight[job.model] = node.in_flight.get(job.model, 0) + 1
        node.in_flight_work += job.work
        node.requests += 1
        self.metrics.node_requests.labels(node.id).inc()
        if retry:
            self.metrics.retries.inc()

    async def _end(self, node: NodeRecord, job: RenderJob) -> None:
        node.in_flight[job.model] -= 1
        node.in_flight_work -= job.work
        await node.close_if_retired()
        async with self._room:
            self._room.notify_all()

    def _node_failed(self, node: NodeRecord, exc: Exception) -> None:
        """Out of rotation; its other requests are re-dispatched too unless it refused (`NodeRefused`: it
        answered 503 or refused the connection), since then it finishes what it has."""
        if node.healthy:
            self.registry.mark_failed(node, str(exc), abandon=not isinstance(exc, NodeRefused))
        self.metrics.node_failures.labels(node.id).inc()
        self.count_healthy()

    def _check_adapters(self, model: str, wanted: frozenset[str]) -> None:
        """400 when the nodes serving `model` hold its adapters nowhere together (none hosting it: 503 below)."""
        self._refresh_local()
        hosting = self.registry.candidates(model)
        if wanted and hosting and not self.registry.candidates(model, wanted):
            infos = [m for node in hosting for m in node.report.models if m.id == model]
            raise adapters.unavailable(model, set(wanted), infos)

    def _choose(self, model: str, exclude: set[NodeRecord], wanted: frozenset[str] = frozenset()) -> NodeRecord | None:
        self._refresh_local()
        nodes = [n for n in self.registry.candidates(model, wanted) if n not in exclude and n.has_room(model)]
        if not nodes:
            return None
        best = min(node.score() for node in nodes)
        return random.choice([node for node in nodes if node.score() == best])

    def _hosting(self, model: str, exclude: set[NodeRecord], wanted: frozenset[str] = frozenset()) -> bool:
        return any(n not in exclude for n in self.registry.candidates(model, wanted))

    def _full_error(self, model: str, full: dict[NodeRecord, int]) -> ApiError:
        """429, with the soonest wait any node estimates (from its refusal, else its last report). A standalone
        server with no other node answers as its own queue does."""
        nodes = self.registry.candidates(model)
        if nodes and all(n.local for n in nodes):
            return nodes[0].client.full_error(model)
        seconds = max(1, min(list(full.values()) or [n.retry_after(model) for n in nodes], default=1))
        queued = f" and {self.wait_limit} requests are waiting here" if self.wait_limit else ""
        return ApiError(429, f"every node serving '{model}' is busy{queued}; retry in about {seconds} s",
                        code="queue_full", headers={"Retry-After": str(seconds)})

    async def _wait_for_room(self) -> None:
        """Until a render finishes somewhere (or a short while passes: heartbeats may have freed room)."""
        async with self._room:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._room.wait(), timeout=0.5)

    async def notify(self) -> None:
        async with self._room:
            self._room.notify_all()

    def _refresh_local(self) -> None:
        for record in self.registry.nodes.values():
            if record.local:
                record.report = record.client.report()

    def default_model_problem(self) -> str | None:
        """Why the configured default model cannot serve, once the fleet knows some models."""
        known = self.known_models()
        if self.default_model is None or not known or self.default_model in known:
            return None
        return (f"--default-model '{self.default_model}' matches no model of any node (they have: "
                f"{', '.join(sorted(known))}); requests without a model fail")

    def check_default_model(self) -> None:
        problem = self.default_model_problem()
        if problem and problem != self._default_problem:
            log.warning("%s", problem)
        self._default_problem = problem

    def count_healthy(self) -> None:
        self.metrics.nodes_healthy.set(sum(1 for n in self.registry.nodes.values() if self.registry.in_rotation(n)))


async def _unless_lost(node: NodeRecord, render: Awaitable[T]) -> T:
    """The node's answer, or NodeUnavailable as soon as the node is lost (the render is abandoned, so the
    node stops it at its next step if it is still there to notice)."""
    lost = node.lost  # the event of this spell in rotation: a later restore makes a new one
    answer = asyncio.ensure_future(render)
    gone = asyncio.ensure_future(lost.wait())
    try:
        await asyncio.wait({answer, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not answer.done():
            answer.cancel()
            with contextlib.suppress(BaseException):
                await answer
    if answer.cancelled():
        raise NodeUnavailable(f"node lost while rendering ({node.last_error or 'replaced'})")
    return answer.result()


def _seconds(value: str | None) -> int:
    try:
        return max(1, int(value or 1))
    except ValueError:
        return 1
