"""The router's fleet routes: node registration, heartbeats, deregistration (node token), and the
`/v0/nodes` listing (admin key)."""

from __future__ import annotations

import logging

from litestar import Request, delete, get, post

from server.errors import documented
from server.protocol import NodeList, NodeReport, Registered
from server.router import admission
from server.routes.guards import admin_key, node_token
from server.state import AppState

log = logging.getLogger("sdserve.router")


@post("/nodes/register", status_code=200, guards=[node_token], responses=documented(400, 401, 409),
      summary="A node joins (node token)")
async def register(data: NodeReport, request: Request) -> Registered:
    """Admitted after the checks in `server.router.admission` (protocol, networks, a call back to the
    advertised URL that must answer with the same node id)."""
    state = AppState.of(request)
    record = await admission.admit(data, state.settings, state.registry)
    await state.dispatcher.notify()
    return Registered(node_id=record.id, lease=record.lease, heartbeat_interval=state.settings.heartbeat_interval)


@post("/nodes/{node_id:str}/heartbeat", status_code=200, guards=[node_token],
      responses=documented(400, 401, 403, 409), summary="Node heartbeat")
async def heartbeat(node_id: str, data: NodeReport, request: Request) -> dict[str, str]:
    state = AppState.of(request)
    record = state.registry.authenticate(node_id, request.headers.get("x-node-lease", ""))
    state.registry.heartbeat(record, data)
    await state.dispatcher.notify()
    return {"status": "ok"}


@delete("/nodes/{node_id:str}", status_code=200, guards=[node_token], responses=documented(401, 403, 409),
        summary="A node leaves")
async def deregister(node_id: str, request: Request) -> dict[str, str]:
    state = AppState.of(request)
    record = state.registry.authenticate(node_id, request.headers.get("x-node-lease", ""))
    await state.registry.remove(record)
    log.info("node %s (%s) deregistered: it is shutting down", node_id, record.report.url)
    return {"status": "removed"}


@get("/nodes", guards=[admin_key], responses=documented(401), summary="Nodes with their state and counters (admin key)")
async def list_nodes(request: Request) -> NodeList:
    state = AppState.of(request)
    state.dispatcher.ready_models()  # refreshes the in-process node's report
    return NodeList(data=state.registry.views())
