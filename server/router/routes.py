"""A front door's fleet routes: node registration, heartbeats, deregistration (node token), and the
`/v0/nodes` listing (admin key)."""

from __future__ import annotations

import logging

from litestar import Request, delete, get, post

from server.errors import documented
from server.guards import admin_key, node_token
from server.router import admission
from server.router.dispatch import Dispatcher
from server.router.registry import NodeList, Registry
from server.state import AppState
from server.wire import NodeReport, Registered

log = logging.getLogger("sdserve.router")


def fleet_of(request: Request) -> tuple[Registry, Dispatcher]:
    return request.app.state.registry, request.app.state.dispatcher


@post("/nodes/register", status_code=200, guards=[node_token], responses=documented(400, 401, 409),
      summary="A node joins (node token)")
async def register(data: NodeReport, request: Request) -> Registered:
    """Admitted after the checks in `server.router.admission` (protocol, networks, a call back to the
    advertised URL that must answer with the same node id)."""
    settings, (registry, dispatcher) = AppState.of(request).settings, fleet_of(request)
    record = await admission.admit(data, settings, registry)
    await dispatcher.notify()
    return Registered(node_id=record.id, lease=record.lease, heartbeat_interval=settings.heartbeat_interval)


@post("/nodes/{node_id:str}/heartbeat", status_code=200, guards=[node_token],
      responses=documented(400, 401, 403, 409), summary="Node heartbeat")
async def heartbeat(node_id: str, data: NodeReport, request: Request) -> dict[str, str]:
    registry, dispatcher = fleet_of(request)
    record = registry.authenticate(node_id, request.headers.get("x-node-lease", ""))
    registry.heartbeat(record, data)
    await dispatcher.notify()
    return {"status": "ok"}


@delete("/nodes/{node_id:str}", status_code=200, guards=[node_token], responses=documented(401, 403, 409),
        summary="A node leaves")
async def deregister(node_id: str, request: Request) -> dict[str, str]:
    registry, _ = fleet_of(request)
    record = registry.authenticate(node_id, request.headers.get("x-node-lease", ""))
    await registry.remove(record)
    log.info("node %s (%s) deregistered: it is shutting down", node_id, record.report.url)
    return {"status": "removed"}


@get("/nodes", guards=[admin_key], responses=documented(401), summary="Nodes with their state and counters (admin key)")
async def list_nodes(request: Request) -> NodeList:
    registry, _ = fleet_of(request)
    registry.refresh_local()
    return NodeList(data=registry.views())


FLEET_ROUTES = [register, heartbeat, deregister, list_nodes]
