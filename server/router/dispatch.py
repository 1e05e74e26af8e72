"""Dispatch: each order to the healthy node hosting its model with the least outstanding work, among those
that have the model loaded, else those with room to load it without unloading another (`server.node.cache`).

Work is weighted by steps × pixels × images; ties are broken at random. A node that cannot be reached,
refuses before starting, or is lost while the order waits on it (its lease expired, a probe failed, it was
replaced) is taken out of rotation and the order is sent to another node (at most `retries` times): the
router answers a client only once a node has answered it, so nothing was sent yet. When every node is
full, the order waits at the router for room (up to `wait_limit` waiting orders per model, then 429 with the
nodes' own estimate in `Retry-After`) until the request's own timeout. The prober (`prober.py`) puts
nodes back when they answer again. Streams are dispatched the same way; once a node has sent a stream's
first event, its failure ends the stream with an error event instead (`relay`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import defaultdict
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import NoReturn, TypeVar

from engines.info import ModelInfo
from server import adapters, sse
from server.errors import ApiError, queue_full
from server.metrics import Metrics
from server.router.registry import NodeRecord, Registry
from server.router.relay import NodeStream, relay
from server.wire import (
    ModelLoad,
    NodeFull,
    NodeGone,
    NodeRefused,
    NodeTransport,
    NodeUnavailable,
    RenderedImages,
    RenderOrder,
    StreamCut,
    StreamEvent,
)

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

    def problems(self) -> dict[str, object]:
        """What /readyz reports beside readiness: a default model no node has."""
        problem = self.default_model_problem()
        return {"default_model": problem} if problem else {}

    def why_not_ready(self) -> str | None:
        """For /readyz while no model can render: the registered nodes' states, or that none has registered
        (a standalone server's own pool speaks for itself)."""
        remote = [record for record in self.registry.nodes.values() if not record.local]
        if not remote:
            return None if self.registry.nodes else "no node has registered yet"
        return "nodes: " + ", ".join(_node_state(record) for record in remote)

    async def render(self, order: RenderOrder) -> RenderedImages:
        return await self._dispatch(order, self._send, set())

    async def open_stream(self, order: RenderOrder) -> AsyncIterator[bytes]:
        """A streamed order: returns once a node accepted it (errors before that are the usual HTTP ones),
        then its frames; a node failing before its first event is replaced, as `render` retries."""
        return await self._relayed(order, lambda transport: transport.open_stream(order),
                                   lambda exc: sse.error_frame(exc, order.request_id),
                                   lambda frame: not frame.startswith(b":"))

    async def open_events(self, order: RenderOrder) -> AsyncIterator[StreamEvent]:
        """The same, as events (a failure after the first one raises)."""
        return await self._relayed(order, lambda transport: transport.open_events(order), _raise)

    async def _relayed(self, order: RenderOrder, opening: Callable[[NodeTransport], Awaitable[AsyncGenerator[T, None]]],
                       last_word: Callable[[Exception], T], counts: Callable[[T], bool] = lambda _: True
                       ) -> AsyncIterator[T]:
        def attempt(node: NodeRecord, order: RenderOrder, retry: bool) -> Awaitable[NodeStream[T]]:
            return self._open(node, order, retry, opening)

        def reopen(order: RenderOrder, failed: set[str]) -> Awaitable[NodeStream[T]]:
            return self._dispatch(order, attempt, {n for n in self.registry.nodes.values() if n.id in failed})

        first = await self._dispatch(order, attempt, set())
        return relay(order, first, reopen, last_word, counts)

    async def _dispatch(self, order: RenderOrder, attempt: Callable[[NodeRecord, RenderOrder, bool], Awaitable[T]],
                        failures: set[NodeRecord]) -> T:
        full: dict[NodeRecord, int] = {}  # node → its Retry-After
        waiting = False
        # only nodes offering every named adapter and ControlNet
        wanted = adapters.wanted([ref.name for ref in order.lora], [unit.name for unit in order.controlnet])
        self._check_adapters(order.model, wanted)
        try:
            while True:
                node = self._choose(order.model, exclude=failures | set(full), wanted=wanted)
                if node is None:
                    if not self._hosting(order.model, exclude=failures, wanted=wanted):
                        raise ApiError(503, f"no healthy node can render model '{order.model}' right now",
                                       code="no_node_available", headers={"Retry-After": "5"})
                    if not waiting:
                        if self._waiting[order.model] >= self.wait_limit:
                            raise self._full_error(order.model, full)
                        self._waiting[order.model] += 1
                        waiting = True
                    await self._wait_for_room()
                    full.clear()
                    continue
                try:
                    return await attempt(node, order, bool(failures))
                except NodeFull as exc:
                    full[node] = _seconds(exc.error.headers.get("Retry-After"))
                except NodeUnavailable as exc:
                    failures.add(node)
                    log.warning("request %s: node %s failed (%s); %s", order.request_id, node.id, exc,
                                "retrying" if len(failures) <= self.retries else "giving up")
                    if len(failures) > self.retries:
                        raise ApiError(503, f"{len(failures)} nodes failed this request; try again",
                                       code="nodes_failed", headers={"Retry-After": "5"}) from exc
        finally:
            if waiting:
                self._waiting[order.model] -= 1

    def room(self, model: str) -> int | None:
        """How many more orders for `model` would be taken now (sent to a node, or waiting here) before a 429;
        None when no node hosts it (render answers 503 then)."""
        nodes = self.registry.candidates(model)
        if not nodes:
            return None
        free = sum(max(0, n.report.load.get(model, ModelLoad()).capacity - n.in_flight.get(model, 0)) for n in nodes)
        return free + max(0, self.wait_limit - self._waiting[model])

    def full_error(self, model: str) -> ApiError:
        return self._full_error(model, {})

    # -- internals ---------------------------------------------------------------------------------

    async def _send(self, node: NodeRecord, order: RenderOrder, retry: bool) -> RenderedImages:
        self._begin(node, order, retry)
        started = time.perf_counter()
        try:
            result = await _unless_lost(node, node.transport.render(order))
            self.metrics.node_latency.labels(node.id).observe(time.perf_counter() - started)
            return result
        except NodeUnavailable as exc:
            self._node_failed(node, exc)
            raise
        finally:
            await self._end(node, order)

    async def _open(self, node: NodeRecord, order: RenderOrder, retry: bool,
                    opening: Callable[[NodeTransport], Awaitable[AsyncGenerator[T, None]]]) -> NodeStream[T]:
        """Start a stream on `node`; it counts as in flight there until the stream ends. A node lost while
        the stream runs (lease expired, probe failed, replaced) ends it as a dead connection would."""
        self._begin(node, order, retry)
        try:
            pieces = await _unless_lost(node, opening(node.transport))
        except NodeUnavailable as exc:
            self._node_failed(node, exc)
            await self._end(node, order)
            raise
        except BaseException:
            await self._end(node, order)
            raise

        async def tracked() -> AsyncGenerator[T, None]:
            try:
                while True:
                    try:
                        piece = await _unless_lost(node, anext(pieces))
                    except StopAsyncIteration:
                        return
                    except NodeUnavailable as exc:
                        raise NodeGone(str(exc)) from exc
                    yield piece
            except NodeGone as exc:
                if not isinstance(exc, StreamCut):  # a cut stream is this request's loss, not the node's
                    self._node_failed(node, exc)
                raise
            finally:
                await pieces.aclose()
                await self._end(node, order)

        return NodeStream(node.id, tracked())

    def _begin(self, node: NodeRecord, order: RenderOrder, retry: bool) -> None:
        node.in_flight[order.model] = node.in_flight.get(order.model, 0) + 1
        node.in_flight_work += order.work
        node.requests += 1
        self.metrics.node_requests.labels(node.id).inc()
        if retry:
            self.metrics.retries.inc()

    async def _end(self, node: NodeRecord, order: RenderOrder) -> None:
        node.in_flight[order.model] -= 1
        node.in_flight_work -= order.work
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
        """400 when the nodes serving `model` hold its adapters and ControlNets nowhere together (none hosting
        it: 503 below)."""
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
        # nodes that have the model loaded first, then those with room to load it; then the least work
        best = min((node.readiness(model), node.score()) for node in nodes)
        return random.choice([node for node in nodes if (node.readiness(model), node.score()) == best])

    def _hosting(self, model: str, exclude: set[NodeRecord], wanted: frozenset[str] = frozenset()) -> bool:
        return any(n not in exclude for n in self.registry.candidates(model, wanted))

    def _full_error(self, model: str, full: dict[NodeRecord, int]) -> ApiError:
        """429, with the soonest wait any node estimates (from its refusal, else its last report). A standalone
        server with no other node answers as its own queue does."""
        self._refresh_local()
        nodes = self.registry.candidates(model)
        if nodes and all(n.local for n in nodes):
            load = nodes[0].report.load.get(model, ModelLoad())
            return queue_full(model, load.running, load.waiting, load.retry_after)
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
        self.registry.refresh_local()

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


def _node_state(record: NodeRecord) -> str:
    state = record.state()
    why = f" ({record.last_error})" if record.last_error and state != "healthy" else ""
    return f"{record.id} {state}{why}" + ("" if record.report.models else " with no model loaded")


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


def _raise(exc: Exception) -> NoReturn:
    raise exc


def _seconds(value: str | None) -> int:
    try:
        return max(1, int(value or 1))
    except ValueError:
        return 1
