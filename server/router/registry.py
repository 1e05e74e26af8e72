"""The router's view of its nodes: who they are, what they host, whether they are in rotation.

A node is in rotation while its lease lives (a heartbeat within `heartbeat_timeout`) and the router's
last call to it succeeded. A failed call, a failed probe or an expired lease takes it out at once and
sets its `lost` event, which re-dispatches the requests still waiting on it; only a successful router →
node call (registration or probe) puts it back: a heartbeat proves the node can reach us, not that we
can reach it. Each registration gets a lease that heartbeats and deregistration must present, so a node
cannot speak for another node's identity. A record replaced or removed is retired: its waiting requests
go elsewhere and its transport is closed once none is using it.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import msgspec

from engines.info import ModelInfo
from server.adapters import merged, offers
from server.errors import ApiError
from server.wire import PROTOCOL_VERSION, ModelLoad, NodeReport, NodeTransport


class NodeView(msgspec.Struct):
    """One node as `/v0/nodes` lists it."""

    node_id: str
    url: str
    state: Literal["healthy", "unhealthy", "sick", "draining"]  # sick: the node says so (last_error: why)
    models: list[str]
    loaded: list[str] | None  # the models loaded there now (None: it loads every model at start-up)
    backend: str  # the first model's, for a glance; model_backends has each
    device: str
    model_backends: dict[str, str]  # model id → backend it renders on ("tensorrt", "cuda", "cpu"…)
    in_flight: int  # requests this router has sent and not yet had answered
    load: dict[str, ModelLoad]
    requests: int
    failures: int
    last_heartbeat_seconds: float | None
    last_error: str | None


class NodeList(msgspec.Struct):
    data: list[NodeView]
    object: str = "list"


@dataclass(eq=False)
class NodeRecord:
    report: NodeReport
    lease: str
    transport: NodeTransport  # how orders reach it: over HTTP, or in-process
    last_seen: float = field(default_factory=time.monotonic)
    healthy: bool = True
    refresh: Callable[[], NodeReport] | None = None  # the in-process node's report, read fresh (no heartbeats)
    last_error: str | None = None
    requests: int = 0
    failures: int = 0
    in_flight: dict[str, int] = field(default_factory=dict)  # model → requests this router has outstanding
    in_flight_work: int = 0
    lost: asyncio.Event = field(default_factory=asyncio.Event)  # set when requests on it should go elsewhere
    retired: bool = False  # replaced or removed: close the transport once idle
    closed: bool = False

    @property
    def id(self) -> str:
        return self.report.node_id

    @property
    def local(self) -> bool:
        """This process's own engine pool (standalone): always alive, never probed or forgotten."""
        return self.refresh is not None

    @property
    def draining(self) -> bool:
        return self.report.draining

    def hosts(self, model: str, adapters: frozenset[str] = frozenset()) -> bool:
        """Whether this node renders `model`, offering every named LoRA adapter for it."""
        return any(m.id == model and offers(m, adapters) for m in self.report.models)

    def readiness(self, model: str) -> int:
        """How soon this node renders `model`: 0 loaded (or a node that loads everything at start-up), 1 loading
        or loadable without unloading another model, 2 only after unloading one."""
        loaded = self.report.loaded
        if loaded is None or model in loaded:
            return 0
        return 1 if model in self.report.room_for or model in self.report.loading else 2

    def has_room(self, model: str) -> bool:
        load = self.report.load.get(model, ModelLoad())
        return self.in_flight.get(model, 0) < load.capacity

    def retry_after(self, model: str) -> int:
        """The node's wait estimate for `model` from its last report, less the time since it was sent."""
        reported = self.report.load.get(model, ModelLoad()).retry_after
        return reported if self.local else max(1, reported - int(time.monotonic() - self.last_seen))

    def score(self) -> int:
        """Outstanding work: what this router has sent, or what the node last reported when that is more
        (other routers send it work too)."""
        reported = sum(load.work for load in self.report.load.values())
        return max(self.in_flight_work, reported)

    def idle(self) -> bool:
        return not any(self.in_flight.values())

    async def close_if_retired(self) -> None:
        if self.retired and self.idle() and not self.closed:
            self.closed = True
            await self.transport.close()

    def state(self) -> str:
        if self.draining:
            return "draining"
        if not self.healthy:
            return "unhealthy"
        return "sick" if self.report.sick else "healthy"

    def view(self) -> NodeView:
        age = None if self.local else round(time.monotonic() - self.last_seen, 2)
        return NodeView(node_id=self.id, url=self.report.url, state=self.state(),
                        models=[m.id for m in self.report.models], loaded=self.report.loaded,
                        backend=self.report.backend,
                        device=self.report.device, model_backends={m.id: m.backend for m in self.report.models},
                        in_flight=sum(self.in_flight.values()), load=self.report.load,
                        requests=self.requests, failures=self.failures, last_heartbeat_seconds=age,
                        last_error=self.last_error or self.report.sick)


class Registry:
    def __init__(self, heartbeat_timeout: float) -> None:
        self.heartbeat_timeout = heartbeat_timeout
        self.nodes: dict[str, NodeRecord] = {}
        # False once this front door stops listening (SIGTERM): heartbeats cannot reach it any more, so leases
        # stop expiring and the prober alone says whether a node that still renders for it is alive
        self.listening = True

    def register(self, report: NodeReport, transport: NodeTransport,
                 refresh: Callable[[], NodeReport] | None = None) -> NodeRecord:
        """A new record for the node (replacing any record of the same id: `retire` that one); `refresh` for
        the in-process node."""
        check_protocol(report)
        record = NodeRecord(report=report, lease=secrets.token_urlsafe(24), transport=transport, refresh=refresh)
        self.nodes[report.node_id] = record
        return record

    def authenticate(self, node_id: str, lease: str) -> NodeRecord:
        record = self.nodes.get(node_id)
        if record is None:
            raise ApiError(409, f"node {node_id} is not registered here (router restarted?); register again",
                           param="node_id", code="unknown_node")
        if not secrets.compare_digest(record.lease.encode(), lease.encode()):
            raise ApiError(403, f"wrong lease for node {node_id}", param="lease", code="wrong_lease")
        return record

    def heartbeat(self, record: NodeRecord, report: NodeReport) -> None:
        if report.url != record.report.url or report.node_id != record.id:
            raise ApiError(409, "a heartbeat cannot change the node's identity or URL; register again",
                           code="identity_changed")
        record.report = report
        record.last_seen = time.monotonic()

    def restore(self, record: NodeRecord, report: NodeReport) -> bool:
        """A probe reached the node: back in rotation if it is still the same node and not sick (True when it
        was out and is back)."""
        if report.node_id != record.id or record.retired:
            return False
        was_out = not record.healthy or record.report.sick is not None
        record.report = report
        record.healthy, record.last_error = True, None
        if record.lost.is_set():
            record.lost = asyncio.Event()
        return was_out and report.sick is None

    async def remove(self, record: NodeRecord) -> None:
        if self.nodes.get(record.id) is record:
            del self.nodes[record.id]
        await self.retire(record)

    @staticmethod
    async def retire(record: NodeRecord) -> None:
        record.retired = True
        record.lost.set()
        await record.close_if_retired()

    def alive(self, record: NodeRecord) -> bool:
        return record.local or not self.listening or time.monotonic() - record.last_seen <= self.heartbeat_timeout

    def in_rotation(self, record: NodeRecord) -> bool:
        return record.healthy and not record.draining and not record.report.sick and self.alive(record)

    def candidates(self, model: str, adapters: frozenset[str] = frozenset()) -> list[NodeRecord]:
        return [r for r in self.nodes.values() if r.hosts(model, adapters) and self.in_rotation(r)]

    def refresh_local(self) -> None:
        """The in-process node's report, read fresh (it sends no heartbeats)."""
        for record in self.nodes.values():
            if record.refresh is not None:
                record.report = record.refresh()

    def ready_models(self) -> dict[str, ModelInfo]:
        models: dict[str, ModelInfo] = {}
        for record in self.nodes.values():
            if self.in_rotation(record):
                for info in record.report.models:
                    models[info.id] = merged(models[info.id], info) if info.id in models else info
        return models

    def known_models(self) -> set[str]:
        known = set()
        for record in self.nodes.values():
            known.update(m.id for m in record.report.models)
            known.update(record.report.loading)
        return known

    def mark_failed(self, record: NodeRecord, reason: str, abandon: bool = True) -> None:
        """Out of rotation until the prober reaches it again. `abandon`: its requests in flight go elsewhere
        too (it may hang); not when it answered, or refused the connection (a node shutting down finishes
        what it has, and a dead one breaks those connections itself)."""
        record.healthy = False
        record.failures += 1
        record.last_error = reason
        if abandon:
            record.lost.set()

    def expire_leases(self) -> list[NodeRecord]:
        """Nodes whose lease ran out since the last look: out of rotation, their requests re-dispatched."""
        expired = [r for r in self.nodes.values() if r.healthy and not self.alive(r)]
        for record in expired:
            self.mark_failed(record, f"no heartbeat for {self.heartbeat_timeout:g} s (lease expired)")
        return expired

    def views(self) -> list[NodeView]:
        return [record.view() for _, record in sorted(self.nodes.items())]


def check_protocol(report: NodeReport) -> None:
    if report.protocol != PROTOCOL_VERSION:
        raise ApiError(400, f"node {report.node_id} speaks protocol {report.protocol}; this router speaks "
                       f"{PROTOCOL_VERSION}: run the same sdserve version on both", param="protocol",
                       code="protocol_mismatch")
