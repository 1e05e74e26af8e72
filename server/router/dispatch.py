"""Dispatch: each job to the healthy node hosting its model with the least outstanding work.

Work is weighted by steps × pixels × images; ties are broken at random. A node that cannot be reached or
refuses before starting is taken out of rotation and the job is retried on another node (at most
`retries` times). When every node is full, the job waits at the router for room (up to `wait_limit`
waiting jobs per model, then 429) until the request's own timeout. A prober puts failed nodes back
when they answer again.
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
from server.protocol import RenderedImages, RenderJob
from server.router.node_client import NodeClient, NodeFull, NodeUnavailable
from server.router.registry import NodeRecord, Registry
from server.streaming import NodeGone, NodeStream, relay

log = logging.getLogger("sdserve.router")
PROBE_SECONDS = 1.0
T = TypeVar("T")


class Dispatcher:
    def __init__(self, registry: Registry, metrics: Metrics, retries: int, wait_limit: int) -> None:
        self.registry, self.metrics = registry, metrics
        self.retries, self.wait_limit = retries, wait_limit
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
        return relay(job, first, lambda job, failed: self._dispatch(job, self._open, set(failed)))

    async def _dispatch(self, job: RenderJob, attempt: Callable[[NodeRecord, RenderJob, bool], Awaitable[T]],
                        failures: set[str]) -> T:
        full: set[str] = set()
        waiting = False
        wanted = frozenset(ref.name for ref in job.lora)  # only nodes offering every named adapter
        self._check_adapters(job.model, wanted)
        try:
            while True:
                node = self._choose(job.model, exclude=failures | full, wanted=wanted)
                if node is None:
                    if not self._hosting(job.model, exclude=failures, wanted=wanted):
                        raise ApiError(503, f"no healthy node can render model '{job.model}' right now",
                                       code="no_node_available", headers={"Retry-After": "5"})
                    if not waiting:
                        if self._waiting[job.model] >= self.wait_limit:
                            raise self._full_error(job.model)
                        self._waiting[job.model] += 1
                        waiting = True
                    await self._wait_for_room()
                    full.clear()
                    continue
                try:
                    return await attempt(node, job, bool(failures))
                except NodeFull:
                    full.add(node.id)
                except NodeUnavailable as exc:
                    failures.add(node.id)
                    log.warning("request %s: node %s failed (%s); %s", job.request_id, node.id, exc,
                                "retrying" if len(failures) <= self.retries else "giving up")
                    if len(failures) > self.retries:
                        raise ApiError(503, f"{len(failures)} nodes failed this request; try again",
                                       code="nodes_failed", headers={"Retry-After": "5"}) from exc
        finally:
            if waiting:
                self._waiting[job.model] -= 1

    # -- internals ---------------------------------------------------------------------------------

    async def _send(self, node: NodeRecord, job: RenderJob, retry: bool) -> RenderedImages:
        self._begin(node, job, retry)
        started = time.perf_counter()
        try:
            result = await node.client.render(job)
            self.metrics.node_latency.labels(node.id).observe(time.perf_counter() - started)
            return result
        except NodeUnavailable as exc:
            self._node_failed(node, str(exc))
            raise
        finally:
            await self._end(node, job)

    async def _open(self, node: NodeRecord, job: RenderJob, retry: bool) -> NodeStream:
        """Start a stream on `node`; it counts as in flight there until the stream ends."""
        self._begin(node, job, retry)
        try:
            chunks = await node.client.open_stream(job)
        except NodeUnavailable as exc:
            self._node_failed(node, str(exc))
            await self._end(node, job)
            raise
        except BaseException:
            await self._end(node, job)
            raise

        async def tracked() -> AsyncIterator[bytes]:
            try:
                async for chunk in chunks:
                    yield chunk
            except NodeGone as exc:
                self._node_failed(node, str(exc))
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
        async with self._room:
            self._room.notify_all()

    def _node_failed(self, node: NodeRecord, reason: str) -> None:
        self.registry.mark_failed(node, reason)
        self.metrics.node_failures.labels(node.id).inc()
        self._count_healthy()

    def _check_adapters(self, model: str, wanted: frozenset[str]) -> None:
        """400 when the nodes serving `model` hold its adapters nowhere together (none hosting it: 503 below)."""
        self._refresh_local()
        hosting = self.registry.candidates(model)
        if wanted and hosting and not self.registry.candidates(model, wanted):
            infos = [m for node in hosting for m in node.report.models if m.id == model]
            raise adapters.unavailable(model, set(wanted), infos)

    def _choose(self, model: str, exclude: set[str], wanted: frozenset[str] = frozenset()) -> NodeRecord | None:
        self._refresh_local()
        nodes = [n for n in self.registry.candidates(model, wanted) if n.id not in exclude and n.has_room(model)]
        if not nodes:
            return None
        best = min(node.score() for node in nodes)
        return random.choice([node for node in nodes if node.score() == best])

    def _hosting(self, model: str, exclude: set[str], wanted: frozenset[str] = frozenset()) -> bool:
        return any(n.id not in exclude for n in self.registry.candidates(model, wanted))

    def _full_error(self, model: str) -> ApiError:
        queued = f" and {self.wait_limit} requests are waiting" if self.wait_limit else ""
        return ApiError(429, f"every node serving '{model}' is busy{queued}; retry shortly", code="queue_full",
                        headers={"Retry-After": "2"})

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

    def _count_healthy(self) -> None:
        self.metrics.nodes_healthy.set(sum(1 for n in self.registry.nodes.values() if self.registry.in_rotation(n)))

    async def probe_forever(self) -> None:
        """Put failed nodes back when they answer; forget nodes silent for 20 heartbeat timeouts."""
        while True:
            await asyncio.sleep(PROBE_SECONDS)
            for record in list(self.registry.nodes.values()):
                if record.local or self.registry.in_rotation(record):
                    continue
                silent = time.monotonic() - record.last_seen
                if silent > 20 * self.registry.heartbeat_timeout:
                    log.info("forgetting node %s (silent for %.0f s)", record.id, silent)
                    self.registry.remove(record)
                    await record.client.close()
                    continue
                if not isinstance(record.client, NodeClient):
                    continue
                try:
                    report = await record.client.status()
                except NodeUnavailable as exc:
                    record.last_error = str(exc)
                    continue
                if report.node_id == record.id:
                    self.registry.heartbeat(record, report)
                    log.info("node %s answers again: back in rotation", record.id)
                    await self.notify()
            self._count_healthy()
